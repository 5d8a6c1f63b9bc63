//! Parse, validate into a `Config`, run the library, log the error, exit code.

use std::process::ExitCode;

use clap::Parser;
use vfio_multifd::cli::{Cli, Command};
use vfio_multifd::config::Config;
use vfio_multifd::error::error_chain;

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::Serve(args) = &cli.command {
        if args.print_capabilities {
            // Before logging starts: stdout carries only the JSON.
            return match vfio_multifd::control::ServeConfig::try_from(args) {
                Ok(config) => {
                    vfio_multifd::control::print_capabilities(&config);
                    ExitCode::SUCCESS
                }
                Err(err) => {
                    eprintln!("vfio-multifd: {}", error_chain(&err));
                    ExitCode::from(2)
                }
            };
        }
    }
    env_logger::Builder::new()
        .parse_filters(&cli.log_level)
        .parse_default_env()
        .init();
    if let Err(err) = uring::raise_open_file_limit() {
        log::warn!("raising the open-file limit: {err}");
    }
    let config = match Config::try_from(cli.command) {
        Ok(config) => config,
        Err(err) => {
            // Straight to stderr, not through the log filter: `--log-level off` or a RUST_LOG
            // for other modules must not turn a refused flag into a silent exit 2.
            eprintln!("vfio-multifd: {}", error_chain(&err));
            return ExitCode::from(2);
        }
    };
    let outcome = match config {
        Config::Inspect(args) => {
            return ExitCode::from(vfio_multifd::inspect::run(&args).clamp(0, 255) as u8)
        }
        Config::Probe(args) => {
            return ExitCode::from(vfio_multifd::probe::run(&args).clamp(0, 255) as u8)
        }
        Config::Bench(args) => Err(vfio_multifd::cli::exec_bench(&args)),
        Config::Send(config) => vfio_multifd::demo::run_send(&config)
            .map(|report| report.ok)
            .map_err(|e| error_chain(&e)),
        Config::Recv(config) => vfio_multifd::demo::run_recv(&config)
            .map(|report| report.ok)
            .map_err(|e| error_chain(&e)),
        Config::Demo(config) => vfio_multifd::demo::run_demo(&config, &cli.log_level)
            .map(|summary| {
                if !summary.verified {
                    log::error!(
                        "demo: not verified{}",
                        summary.error.map(|e| format!(": {e}")).unwrap_or_default()
                    );
                }
                summary.verified
            })
            .map_err(|e| error_chain(&e)),
        Config::Serve(config) => vfio_multifd::control::serve(&config)
            .map(|()| true)
            .map_err(|e| error_chain(&e)),
    };
    match outcome {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(text) => {
            log::error!("{text}");
            ExitCode::FAILURE
        }
    }
}
