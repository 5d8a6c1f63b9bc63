use clap::Parser;
use vfio_multifd::cli::{Cli, Command};

fn main() {
    let cli = Cli::parse();
    env_logger::Builder::new()
        .parse_filters(&cli.log_level)
        .parse_default_env()
        .init();
    let code = match &cli.command {
        Command::Inspect(args) => vfio_multifd::inspect::run(args),
    };
    std::process::exit(code);
}
