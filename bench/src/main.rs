//! `vfio-multifd-bench`: the engines side by side in one run, against one channel, a raw pump
//! ceiling and real QEMU migrating RAM; hdrhistogram output and plots. See `bench/README.md`.
//!
//! Every measured side runs as its own process under a small wrapper (`__measure`, this same
//! binary) whose only child it is, so each side's CPU seconds and peak memory are the kernel's
//! accounting of that process (`getrusage(RUSAGE_CHILDREN)` in the wrapper after reaping it).
//! The ceiling's two sides are this binary too (`__ceiling-send`, `__ceiling-recv`).
#![forbid(unsafe_code)]

mod bench;
mod ceiling;
mod cli;
mod hist;
mod machine;
mod measure;
mod proc;
mod qemu;
mod report;
mod runs;
mod scenario;
mod stats;
mod svg;

use std::ffi::OsString;
use std::process::ExitCode;

use clap::Parser;

fn init_logging(level: &str) {
    env_logger::Builder::new()
        .parse_filters(level)
        .parse_default_env()
        .init();
}

fn main() -> ExitCode {
    let argv: Vec<OsString> = std::env::args_os().collect();
    match argv.get(1).and_then(|a| a.to_str()) {
        Some(measure::SUBCOMMAND) => return measure::main(&argv[2..]),
        Some(mode @ (ceiling::SEND | ceiling::RECV)) => {
            let send = mode == ceiling::SEND;
            let args = match ceiling::PumpArgs::try_parse_from(&argv[1..]) {
                Ok(args) => args,
                Err(e) => {
                    let _ = e.print();
                    return ExitCode::from(2);
                }
            };
            init_logging(&args.log_level);
            return ceiling::main(send, &args);
        }
        _ => {}
    }
    let args = cli::BenchArgs::parse();
    init_logging(&args.log_level);
    match bench::run(&args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("vfio-multifd-bench: {e}");
            ExitCode::from(2)
        }
    }
}
