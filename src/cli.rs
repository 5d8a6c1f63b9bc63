//! Command line: one subcommand per job. Values are parsed as text here and checked in
//! [`crate::config`], which turns them into a validated [`crate::config::Config`].

use clap::{Args, Parser, Subcommand};

use crate::engine::EngineKind;

/// `bench`: every argument goes to `vfio-multifd-bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    #[arg(
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "ARGS"
    )]
    pub args: Vec<std::ffi::OsString>,
}

/// Replaces this process with `vfio-multifd-bench` from the directory of the running binary
/// (cargo builds both; `bench/` is its own package). Returns only on failure.
pub fn exec_bench(args: &BenchArgs) -> String {
    use std::os::unix::process::CommandExt;
    let bench = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|dir| dir.join("vfio-multifd-bench")));
    match bench {
        Some(bench) if bench.exists() => {
            let err = std::process::Command::new(&bench).args(&args.args).exec();
            format!("running {}: {err}", bench.display())
        }
        _ => "vfio-multifd-bench is not built next to this binary: run `cargo build --release` \
              (the workspace's default members include the bench)"
            .to_string(),
    }
}

#[derive(Debug, Parser)]
#[command(
    name = "vfio-multifd",
    version,
    about = "VFIO device state over QEMU 10.x multifd channels"
)]
pub struct Cli {
    /// Log level (off, error, warn, info, debug, trace, or MODULE=LEVEL directives separated by
    /// commas); RUST_LOG overrides it.
    #[arg(long, global = true, default_value = "warn", value_parser = log_filter)]
    pub log_level: String,
    #[command(subcommand)]
    pub command: Command,
}

/// `--log-level`: env_logger reads a bare word that is not a level (`warning`) as a module
/// name and then logs nothing of this crate, errors included; refuse it instead.
fn log_filter(text: &str) -> Result<String, String> {
    for directive in text.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        let level = directive
            .rsplit_once('=')
            .map_or(directive, |(_, level)| level);
        if level.parse::<log::LevelFilter>().is_err() {
            return Err(format!(
                "{directive:?} is not a level: use off, error, warn, info, debug or trace \
                 (or MODULE=LEVEL)"
            ));
        }
    }
    Ok(text.to_string())
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Decode raw captures of migration connections (main or multifd) and summarise them.
    Inspect(crate::inspect::InspectArgs),
    /// Source helper without a VMM: migrate simulated devices to a `recv` helper.
    Send(SendArgs),
    /// Destination helper without a VMM: receive simulated devices from a `send` helper and
    /// verify every byte.
    Recv(RecvArgs),
    /// Migrate simulated devices between two helpers on loopback and print the numbers.
    Demo(DemoArgs),
    /// What this kernel gives the data plane: io_uring features, pinning, VFIO interfaces, and
    /// the path a helper would take here.
    Probe(crate::probe::ProbeArgs),
    /// Serve a VMM on a unix socket: it hands over devices (or their data_fds) and channel
    /// sockets and drives the migration (protocol: docs/control-protocol.md).
    Serve(ServeArgs),
    /// Benchmark engines side by side (runs `vfio-multifd-bench`, built next to this binary,
    /// with the same arguments; `vfio-multifd bench --help` lists them).
    #[command(disable_help_flag = true)]
    Bench(BenchArgs),
}

/// `serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Create a unix socket (mode 0600) at PATH and serve one VMM at a time on it.
    #[arg(
        long,
        value_name = "PATH",
        conflicts_with = "fd",
        required_unless_present_any = ["fd", "print_capabilities"]
    )]
    pub socket_path: Option<std::path::PathBuf>,
    /// Serve on inherited descriptor N: a listening unix socket (one VMM at a time) or a
    /// connected one (that VMM only; the helper exits when it leaves).
    #[arg(long, value_name = "N")]
    pub fd: Option<i32>,
    /// Print this helper's capabilities (protocol, engines, io_uring features, limits) as
    /// JSON and exit.
    #[arg(long)]
    pub print_capabilities: bool,
    /// Data-plane engine; uring falls back to threads where io_uring is unavailable.
    #[arg(long, value_enum, default_value = "uring")]
    pub engine: EngineKind,
    /// io_uring workers (one ring each; 1 to 1024) [default: the usable cores].
    #[arg(long, value_name = "N")]
    pub workers: Option<String>,
    /// Device bytes per packet (16 B to 64 MiB; QEMU reads 1 MiB).
    #[arg(long, default_value = "1MiB", value_name = "BYTES")]
    pub chunk: String,
    /// Packet buffers per migration, fixed at its start (2 to 65535); `auto`: 32, or as many as
    /// fit in 96 MiB with chunks over 3 MiB (at least 8).
    #[arg(long, default_value = "auto", value_name = "N|auto")]
    pub pool_buffers: String,
    /// io_uring features not to use (as for `demo --forbid`); added to VFIO_MULTIFD_FORBID.
    #[arg(long, value_name = "FEATURES")]
    pub forbid: Option<String>,
    /// Seconds a migration step may wait without progress once the VM is stopped (and while
    /// channels connect) before it fails (1 to 3600); a migrate command may override it.
    #[arg(long, default_value = "60", value_name = "SECONDS")]
    pub timeout: String,
}

/// Flags that shape only the simulated devices: with `--vfio` they would be ignored, and a
/// helper given `--devices 8` beside one `--vfio` would migrate one device without a word.
const SIMULATED_ONLY: [&str; 5] = ["devices", "size", "seed", "config_len", "device_speed"];

/// `send`.
#[derive(Debug, Args)]
pub struct SendArgs {
    /// Destination address (HOST:PORT) of the `recv` helper.
    #[arg(long, value_name = "ADDR")]
    pub connect: String,
    /// A real VFIO device to migrate instead of the simulated ones (repeatable): its sysfs
    /// name (PCI address or mdev UUID), opened through /dev/vfio by the helper, which then owns
    /// it. Devices are named on the wire by position, so the i-th `--vfio` of `send` goes to the
    /// i-th `--vfio` of `recv`.
    #[arg(
        long = "vfio",
        value_name = "NAME",
        conflicts_with_all = SIMULATED_ONLY
    )]
    pub vfio: Vec<String>,
    #[command(flatten)]
    pub migration: MigrationArgs,
    /// Order in which the multifd channels connect: in order (QEMU's), reversed, or shuffled
    /// by --seed (the main channel then connects last). For testing destinations.
    #[arg(long, value_enum, default_value = "ascending", hide = true)]
    pub channel_order: ChannelOrderArg,
}

/// `recv`.
#[derive(Debug, Args)]
pub struct RecvArgs {
    /// Address to listen on (HOST:PORT; port 0 picks a free one, printed on stderr).
    #[arg(long, value_name = "ADDR")]
    pub listen: String,
    /// A real VFIO device to migrate instead of the simulated ones (repeatable): its sysfs
    /// name (PCI address or mdev UUID), opened through /dev/vfio by the helper, which then owns
    /// it. Devices are named on the wire by position, so the i-th `--vfio` of `send` goes to the
    /// i-th `--vfio` of `recv`.
    #[arg(
        long = "vfio",
        value_name = "NAME",
        conflicts_with_all = SIMULATED_ONLY
    )]
    pub vfio: Vec<String>,
    #[command(flatten)]
    pub migration: MigrationArgs,
}

/// `demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    #[command(flatten)]
    pub migration: MigrationArgs,
    /// Engine of the destination helper, if it should differ from --engine.
    #[arg(long, value_enum, value_name = "ENGINE")]
    pub dest_engine: Option<EngineKind>,
    /// No progress bar, even on a terminal.
    #[arg(long)]
    pub no_progress: bool,
}

/// Settings shared by `send`, `recv` and `demo`. Both helpers of one migration must agree on
/// the device list (`--devices`, `--seed`, `--size`, `--config-len`), `--channels` and
/// `--uuid`; the destination checks what it can on the main channel.
#[derive(Debug, Clone, Args)]
pub struct MigrationArgs {
    /// Simulated devices (1 to 256).
    #[arg(long, default_value = "4", value_name = "N")]
    pub devices: String,
    /// Device state per device: BYTES with an optional K/KiB, M/MiB, G/GiB or T/TiB suffix
    /// (binary); 0 to 1 TiB. Simulated devices live in memory, so --devices x --size (twice for
    /// `demo`) must fit in MemAvailable.
    #[arg(long, default_value = "100MiB", value_name = "BYTES")]
    pub size: String,
    /// Multifd channels (1 to 255; QEMU's multifd-channels).
    #[arg(long, default_value = "6", value_name = "N")]
    pub channels: String,
    /// Device bytes per packet (16 B to 64 MiB; QEMU reads 1 MiB).
    #[arg(long, default_value = "1MiB", value_name = "BYTES")]
    pub chunk: String,
    /// Data-plane engine; uring falls back to threads where io_uring is unavailable.
    #[arg(long, value_enum, default_value = "uring")]
    pub engine: EngineKind,
    /// io_uring workers (one ring each) per helper (1 to 1024) [default: the usable cores].
    #[arg(long, value_name = "N")]
    pub workers: Option<String>,
    /// Simulated device read speed, BYTES per second (e.g. 2GiB/s); the device then streams
    /// through a pipe, so reads come back short.
    #[arg(long, value_name = "BYTES/s")]
    pub device_speed: Option<String>,
    /// Per device, out-of-order bytes a destination may hold (QEMU 10.1
    /// x-migration-max-queued-buffers-size); beyond it the destination stops reading that
    /// channel for a while [default: unlimited].
    #[arg(long, value_name = "BYTES")]
    pub queued_bytes_limit: Option<String>,
    /// Packet buffers per helper, fixed at start (2 to 65535; at most 4 GiB with --chunk);
    /// `auto`: 32, or as many as fit in 96 MiB with chunks over 3 MiB (at least 8).
    #[arg(long, default_value = "auto", value_name = "N|auto")]
    pub pool_buffers: String,
    /// Migration uuid sent in every init packet (QEMU's -uuid) [default: all zeros, as QEMU
    /// without -uuid].
    #[arg(long, value_name = "UUID")]
    pub uuid: Option<String>,
    /// Seed of the simulated device contents; both helpers must use the same one.
    #[arg(long, default_value = "1", value_name = "N")]
    pub seed: String,
    /// Config-space bytes in each simulated device's config blob, which adds 16 bytes of QEMU
    /// markers and must fit one chunk [default: 1 KiB, less if --chunk is smaller].
    #[arg(long, value_name = "BYTES")]
    pub config_len: Option<String>,
    /// io_uring features not to use (comma-separated: send-zc, fixed-buffers, linked-chains,
    /// defer-taskrun, coop-taskrun, sqpoll, buffer-ring, io-uring, all); added to
    /// VFIO_MULTIFD_FORBID. Forbidding io-uring selects the threads engine.
    #[arg(long, value_name = "FEATURES")]
    pub forbid: Option<String>,
    /// Seconds any step may wait without progress (connecting, accepting, moving bytes, the
    /// peer's answer) before the migration fails (1 to 3600).
    #[arg(long, default_value = "60", value_name = "SECONDS")]
    pub timeout: String,
    /// Save devices one after another, as QEMU before 10.0 did on its main channel (the
    /// benchmark's `single` baseline); by default every device streams at once.
    #[arg(long)]
    pub sequential_devices: bool,
    /// Print one JSON object instead of the human summary.
    #[arg(long)]
    pub json: bool,
    /// Print QMP-style JSON-line events (listening, progress, report) on stdout; used by
    /// `demo` to drive its two helpers.
    #[arg(long, hide = true)]
    pub events: bool,
}

/// `--channel-order`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ChannelOrderArg {
    Ascending,
    Reverse,
    Shuffle,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_parse() {
        let cli = Cli::try_parse_from(["vfio-multifd", "demo"]).unwrap();
        let Command::Demo(args) = cli.command else {
            panic!("demo expected")
        };
        assert_eq!(args.migration.devices, "4");
        assert_eq!(args.migration.size, "100MiB");
        assert_eq!(args.migration.channels, "6");
        assert_eq!(args.migration.engine, EngineKind::Uring);
    }

    #[test]
    fn send_needs_connect_and_recv_needs_listen() {
        assert!(Cli::try_parse_from(["vfio-multifd", "send"]).is_err());
        assert!(Cli::try_parse_from(["vfio-multifd", "recv"]).is_err());
        assert!(Cli::try_parse_from(["vfio-multifd", "recv", "--listen", "127.0.0.1:0"]).is_ok());
    }

    #[test]
    fn log_level_takes_levels_and_directives_only() {
        for good in ["warn", "OFF", "trace", "vfio_multifd=debug,warn"] {
            assert!(
                Cli::try_parse_from(["vfio-multifd", "--log-level", good, "demo"]).is_ok(),
                "{good}"
            );
        }
        for bad in ["warning", "verbose", "vfio_multifd=loud"] {
            let err = Cli::try_parse_from(["vfio-multifd", "demo", "--log-level", bad])
                .unwrap_err()
                .to_string();
            assert!(err.contains("--log-level"), "{bad}: {err}");
        }
    }

    #[test]
    fn vfio_conflicts_with_the_simulated_device_flags() {
        for side in [["send", "--connect", "h:1"], ["recv", "--listen", "h:1"]] {
            let mut argv = vec!["vfio-multifd"];
            argv.extend(side);
            argv.extend(["--vfio", "0000:01:00.0"]);
            assert!(Cli::try_parse_from(&argv).is_ok(), "{argv:?}");
            for flag in [
                "--devices",
                "--size",
                "--seed",
                "--config-len",
                "--device-speed",
            ] {
                let mut bad = argv.clone();
                bad.extend([flag, "8"]);
                let err = Cli::try_parse_from(&bad).unwrap_err().to_string();
                assert!(
                    err.contains(flag) && err.contains("--vfio"),
                    "{bad:?}: {err}"
                );
            }
        }
    }

    #[test]
    fn unknown_engine_is_rejected() {
        assert!(Cli::try_parse_from(["vfio-multifd", "demo", "--engine", "epoll"]).is_err());
    }
}
