//! `vfio-multifd inspect`: decodes captured channels. Under construction.

/// Arguments of `inspect`.
#[derive(Debug, clap::Args)]
pub struct InspectArgs {
    /// Raw bytes one side sent on one connection, one file per connection.
    #[arg(required = true)]
    pub files: Vec<std::path::PathBuf>,
    /// One JSON object instead of the listing.
    #[arg(long)]
    pub json: bool,
}

/// Runs `inspect`; returns the process exit code.
pub fn run(args: &InspectArgs) -> i32 {
    eprintln!("inspect: not built yet ({} files)", args.files.len());
    1
}
