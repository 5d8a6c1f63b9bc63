//! Command line: one subcommand per job.

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "vfio-multifd", version, about = "VFIO device state over QEMU 10.x multifd channels")]
pub struct Cli {
    /// Log level (error, warn, info, debug, trace); RUST_LOG overrides it.
    #[arg(long, global = true, default_value = "warn")]
    pub log_level: String,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Decode raw captures of migration connections (main or multifd) and summarise them.
    Inspect(crate::inspect::InspectArgs),
}
