//! Command line. `vfio-multifd bench ...` execs this binary with the same arguments.

use std::path::PathBuf;

use clap::{Parser, ValueEnum};

use crate::scenario::ScenarioName;

/// One row of the comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, ValueEnum)]
pub enum RowKind {
    /// The `uring` engine on both helpers.
    Uring,
    /// The `threads` engine (QEMU 10.0's design, with its copies) on both helpers.
    Threads,
    /// One multifd channel with devices saved one after another (QEMU before 10.0), `uring`
    /// engine.
    Single,
    /// The same kernel copies with no framing: blocking threads pumping data_fd -> TCP -> data_fd.
    Ceiling,
    /// Real QEMU 10.x migrating as many bytes of random RAM over as many multifd channels.
    #[value(name = "qemu-ram")]
    QemuRam,
    /// The transport alone: blocking threads send a buffer over N TCP connections, the receiver
    /// drops it (no devices, no framing).
    Loopback,
}

impl RowKind {
    pub fn name(self) -> &'static str {
        match self {
            RowKind::Uring => "uring",
            RowKind::Threads => "threads",
            RowKind::Single => "single",
            RowKind::Ceiling => "ceiling",
            RowKind::QemuRam => "qemu-ram",
            RowKind::Loopback => "loopback",
        }
    }

    /// What the row is, in one line.
    pub fn what(self) -> &'static str {
        match self {
            RowKind::Uring => "vfio-multifd send/recv, uring engine on both sides",
            RowKind::Threads => {
                "vfio-multifd send/recv, threads engine on both sides (QEMU 10.0's design)"
            }
            RowKind::Single => {
                "vfio-multifd send/recv over 1 channel, devices one after another, uring engine (QEMU before 10.0: device state on its main channel, device by device)"
            }
            RowKind::Ceiling => {
                "no framing: blocking threads read data_fd -> send on N TCP connections; recv -> write data_fd"
            }
            RowKind::QemuRam => {
                "real QEMU: paused TCG VM, as many bytes of random RAM (memory-backend-file), same multifd channels, loopback"
            }
            RowKind::Loopback => {
                "the transport alone: blocking threads send a buffer over N TCP connections, the receiver reads and drops it (no devices, no framing)"
            }
        }
    }
}

#[derive(Debug, Parser)]
#[command(
    name = "vfio-multifd-bench",
    version,
    about = "vfio-multifd engines side by side in one run: uring, threads, one channel, a raw-pump ceiling and real QEMU",
    after_help = "Rows run in one process tree on this machine, alternating order across repeats, after one uncounted warm-up round; every claim is a ratio from the same run. --out DIR writes the table, JSON, HdrHistogram percentile distributions (.hgrm), interval logs (.hlog) and SVG plots."
)]
pub struct BenchArgs {
    /// Device/channel shape: seed (4 x 100 MiB, 6 channels, devices at 512 MiB/s), gpu (1 x 4 GiB,
    /// 8 channels, 8 MiB reads), many (16 x 32 MiB, 16 channels), small (4 x 64 MiB, 64 KiB
    /// reads). The shape flags below override single values.
    #[arg(long, value_enum, default_value = "seed")]
    pub scenario: ScenarioName,
    /// Shrink sizes (and default repeats to 3) for a fast check.
    #[arg(long)]
    pub quick: bool,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Write the table, JSON, .hgrm, .hlog and SVG plots into DIR (created if missing).
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Simulated devices (1 to 256).
    #[arg(long, value_name = "N")]
    pub devices: Option<u32>,
    /// Device state per device (BYTES, binary suffixes K/M/G/T or KiB/MiB/GiB/TiB).
    #[arg(long, value_name = "BYTES")]
    pub size: Option<String>,
    /// Multifd channels (1 to 255).
    #[arg(long, value_name = "N")]
    pub channels: Option<u8>,
    /// Bytes per data_fd read / packet (16 B to 64 MiB).
    #[arg(long, value_name = "BYTES")]
    pub chunk: Option<String>,
    /// Simulated device save and load speed, BYTES/s (e.g. 512MiB/s), or `unlimited`.
    #[arg(long, value_name = "BYTES/s")]
    pub device_speed: Option<String>,
    /// Counted repeats per row [default: 5, or 3 with --quick].
    #[arg(long, value_name = "N")]
    pub repeats: Option<u32>,
    /// Rows to run, comma-separated.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "uring,threads,single,ceiling,qemu-ram"
    )]
    pub rows: Vec<RowKind>,
    /// io_uring workers per helper (passed as --workers) [default: the helper's, the usable cores].
    #[arg(long, value_name = "N")]
    pub workers: Option<u32>,
    /// Worker scaling instead of --rows: `uring` with each of these worker counts per helper,
    /// and `loopback` over as many connections as the largest count (e.g. 1,2,4,8).
    #[arg(
        long,
        value_name = "N,N,...",
        value_delimiter = ',',
        conflicts_with_all = ["rows", "workers"]
    )]
    pub scaling: Vec<u32>,
    /// The vfio-multifd binary [default: $VFIO_MULTIFD_BIN, else the one next to this binary].
    #[arg(long, value_name = "PATH")]
    pub helper: Option<PathBuf>,
    /// Log level of this binary and of the helpers (error, warn, info, debug).
    #[arg(long, default_value = "warn")]
    pub log_level: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documented_command_lines_parse() {
        let args = BenchArgs::try_parse_from([
            "vfio-multifd-bench",
            "--scenario",
            "gpu",
            "--quick",
            "--json",
            "--rows",
            "uring,qemu-ram",
            "--workers",
            "2",
        ])
        .expect("parses");
        assert_eq!(args.scenario, ScenarioName::Gpu);
        assert_eq!(args.rows, vec![RowKind::Uring, RowKind::QemuRam]);
        let args = BenchArgs::try_parse_from(["vfio-multifd-bench"]).expect("defaults parse");
        assert_eq!(
            args.rows,
            vec![
                RowKind::Uring,
                RowKind::Threads,
                RowKind::Single,
                RowKind::Ceiling,
                RowKind::QemuRam
            ]
        );
        assert!(BenchArgs::try_parse_from(["vfio-multifd-bench", "--rows", "epoll"]).is_err());
        let args = BenchArgs::try_parse_from(["vfio-multifd-bench", "--scaling", "1,2,4,8"])
            .expect("--scaling parses");
        assert_eq!(args.scaling, vec![1, 2, 4, 8]);
        for other in [["--rows", "uring"], ["--workers", "2"]] {
            let argv = ["vfio-multifd-bench", "--scaling", "1,8", other[0], other[1]];
            assert!(BenchArgs::try_parse_from(argv).is_err(), "{other:?}");
        }
    }
}
