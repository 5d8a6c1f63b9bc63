//! One bench invocation: rounds of rows (a warm-up round, then the counted repeats, row order
//! alternating), then the report.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime};

use crate::cli::{BenchArgs, RowKind};
use crate::machine::{busy_cpu_s, Machine};
use crate::report::{dedup_rows, Report};
use crate::runs::{self, Run, RunMetrics};
use crate::scenario::{size_arg, Scenario};
use crate::stats::{scaling_label, RowSummary};
use crate::{ceiling, qemu};

/// The helper binary's name.
const HELPER: &str = "vfio-multifd";
/// Environment variable naming the helper binary.
const HELPER_ENV: &str = "VFIO_MULTIFD_BIN";

/// A scratch directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Result<TempDir, String> {
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let dir =
            std::env::temp_dir().join(format!("vfio-multifd-bench-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        Ok(TempDir(dir))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

struct Ctx {
    bench_exe: PathBuf,
    helper: Option<PathBuf>,
    scenario: Scenario,
    log_level: String,
    work: TempDir,
    /// The random RAM of `qemu-ram`, made on first use, and its size in MiB.
    ram: Option<(qemu::RamImage, u64)>,
}

fn find_helper(args: &BenchArgs, bench_exe: &Path) -> Result<PathBuf, String> {
    if let Some(path) = &args.helper {
        return Ok(path.clone());
    }
    if let Some(path) = std::env::var_os(HELPER_ENV) {
        return Ok(PathBuf::from(path));
    }
    let beside = bench_exe.with_file_name(HELPER);
    if beside.is_file() {
        return Ok(beside);
    }
    Err(format!(
        "{HELPER} not found next to {} (build it with `cargo build --release`, or pass --helper PATH or set {HELPER_ENV})",
        bench_exe.display()
    ))
}

/// One row to run: what it is, its name in the outputs, and the workers asked of each helper.
struct Entry {
    kind: RowKind,
    label: String,
    workers: Option<u32>,
}

/// `--rows` as asked (each once), or with `--scaling` one `uring` row per worker count and the
/// loopback transport.
fn entries(args: &BenchArgs, scenario: &Scenario) -> Vec<Entry> {
    if scenario.scaling.is_empty() {
        return dedup_rows(&args.rows)
            .into_iter()
            .map(|kind| Entry {
                kind,
                label: kind.name().into(),
                workers: scenario.workers,
            })
            .collect();
    }
    let uring = scenario.scaling.iter().map(|&n| Entry {
        kind: RowKind::Uring,
        label: scaling_label(n),
        workers: Some(n),
    });
    uring
        .chain(std::iter::once(Entry {
            kind: RowKind::Loopback,
            label: RowKind::Loopback.name().into(),
            workers: None,
        }))
        .collect()
}

pub fn run(args: &BenchArgs) -> Result<ExitCode, String> {
    let scenario = Scenario::from_args(args)?;
    let rows = entries(args, &scenario);
    let bench_exe =
        std::env::current_exe().map_err(|e| format!("locating this executable: {e}"))?;
    let needs_helper = rows
        .iter()
        .any(|r| matches!(r.kind, RowKind::Uring | RowKind::Threads | RowKind::Single));
    let helper = if needs_helper {
        Some(find_helper(args, &bench_exe)?)
    } else {
        None
    };
    let mut skipped: BTreeMap<RowKind, String> = BTreeMap::new();
    let qemu_version = if rows.iter().any(|r| r.kind == RowKind::QemuRam) {
        match qemu::probe() {
            Ok(version) => Some(version),
            Err(why) => {
                skipped.insert(RowKind::QemuRam, why);
                None
            }
        }
    } else {
        None
    };
    let machine = Machine::probe(qemu_version);
    let mut ctx = Ctx {
        bench_exe,
        helper,
        scenario: scenario.clone(),
        log_level: args.log_level.clone(),
        work: TempDir::new()?,
        ram: None,
    };
    let started = SystemTime::now();
    let mut runs: BTreeMap<String, Vec<Run>> = BTreeMap::new();
    let rounds = scenario.repeats + 1;
    eprintln!(
        "vfio-multifd-bench: scenario {} ({}), rows {}, 1 warm-up + {} counted rounds",
        scenario.name.name(),
        scenario.shape.describe(),
        rows.iter()
            .map(|r| r.label.as_str())
            .collect::<Vec<_>>()
            .join(","),
        scenario.repeats
    );
    for round in 0..rounds {
        let mut order: Vec<&Entry> = rows.iter().collect();
        if round % 2 == 1 {
            order.reverse();
        }
        for row in order {
            if skipped.contains_key(&row.kind) {
                continue;
            }
            let begun = SystemTime::now();
            let clock = Instant::now();
            let busy_before = busy_cpu_s();
            let mut result = ctx.run_once(row, round);
            let wall = clock.elapsed();
            if let (Ok(m), Some(before), Some(after)) = (&mut result, busy_before, busy_cpu_s()) {
                let ours: f64 = [&m.proc_src, &m.proc_dst]
                    .iter()
                    .filter_map(|u| u.as_ref().map(|u| u.cpu_s()))
                    .sum();
                let secs = wall.as_secs_f64();
                if secs > 0.0 {
                    m.other_load_cores = Some(((after - before - ours) / secs).max(0.0));
                }
            }
            match &result {
                Ok(m) => eprintln!(
                    "  {} {}: {:.1} ms, {:.2} GiB/s",
                    round_name(round),
                    row.label,
                    m.downtime_ms,
                    m.throughput_gib_s
                ),
                Err(e) => eprintln!("  {} {}: FAILED: {e}", round_name(round), row.label),
            }
            runs.entry(row.label.clone()).or_default().push(Run {
                round,
                warmup: round == 0,
                started: begun,
                wall,
                result,
            });
        }
    }
    let summaries: Vec<RowSummary> = rows
        .into_iter()
        .map(|row| {
            let runs = runs.remove(&row.label).unwrap_or_default();
            let skipped = skipped.get(&row.kind).cloned();
            RowSummary::new(row.kind, row.label, row.workers, skipped, runs)
        })
        .collect();
    let report = Report::new(scenario, machine, started, summaries);
    if let Some(dir) = &args.out {
        let written = report.write_dir(dir)?;
        eprintln!("wrote {} files to {}", written.len(), dir.display());
    }
    if args.json {
        println!("{}", report.json());
    } else {
        print!("{}", report.human());
    }
    Ok(if report.all_ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn round_name(round: u32) -> String {
    if round == 0 {
        "warm-up".into()
    } else {
        format!("round {round}")
    }
}

impl Ctx {
    /// A generous bound for one run: 60 s plus 64 MiB/s for the bytes.
    fn timeout(&self) -> Duration {
        Duration::from_secs(60)
            + Duration::from_secs_f64(self.scenario.shape.total_bytes() as f64 / (64 << 20) as f64)
    }

    fn shape_args(&self, channels: u8) -> Vec<OsString> {
        let shape = &self.scenario.shape;
        let mut argv: Vec<String> = vec![
            "--devices".into(),
            shape.devices.to_string(),
            "--size".into(),
            size_arg(shape.size),
            "--channels".into(),
            channels.to_string(),
            "--chunk".into(),
            size_arg(shape.chunk),
            "--log-level".into(),
            self.log_level.clone(),
        ];
        if let Some(speed) = shape.device_speed {
            argv.push("--device-speed".into());
            argv.push(format!("{}/s", size_arg(speed)));
        }
        argv.into_iter().map(OsString::from).collect()
    }

    fn run_once(&mut self, entry: &Entry, round: u32) -> Result<RunMetrics, String> {
        let row = entry.kind;
        let dir = self.work.0.join(format!("round{round}-{}", entry.label));
        std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        let shape = self.scenario.shape;
        let expected = shape.total_bytes();
        let timeout = self.timeout();
        match row {
            RowKind::Uring | RowKind::Threads | RowKind::Single => {
                let helper = self
                    .helper
                    .clone()
                    .ok_or_else(|| "no helper binary".to_string())?;
                let (engine, channels) = match row {
                    RowKind::Threads => ("threads", shape.channels),
                    RowKind::Single => ("uring", 1),
                    _ => ("uring", shape.channels),
                };
                let mut common = self.shape_args(channels);
                common.extend(
                    [
                        "--engine",
                        engine,
                        "--events",
                        "--timeout",
                        &(timeout.as_secs().min(3600)).to_string(),
                    ]
                    .iter()
                    .map(OsString::from),
                );
                if let Some(workers) = entry.workers {
                    common.push("--workers".into());
                    common.push(workers.to_string().into());
                }
                if row == RowKind::Single {
                    // QEMU before 10.0: device state on its one main channel, one device
                    // after another.
                    common.push("--sequential-devices".into());
                }
                let helper_os = helper.into_os_string();
                let mut dest_args: Vec<OsString> =
                    vec!["recv".into(), "--listen".into(), "127.0.0.1:0".into()];
                dest_args.extend(common.iter().cloned());
                let pair = runs::run_pair(
                    &self.bench_exe,
                    &dir,
                    timeout,
                    (&helper_os, dest_args),
                    |addr| {
                        let mut args: Vec<OsString> =
                            vec!["send".into(), "--connect".into(), addr.into()];
                        args.extend(common.iter().cloned());
                        (helper_os.clone(), args)
                    },
                )?;
                runs::pair_metrics(pair, expected)
            }
            RowKind::Ceiling | RowKind::Loopback => {
                let bench = self.bench_exe.clone().into_os_string();
                let mut common = if row == RowKind::Loopback {
                    // As many connections as the most workers a scaling run asks for.
                    let connections = self
                        .scenario
                        .scaling
                        .last()
                        .map_or(shape.channels, |&n| u8::try_from(n).unwrap_or(u8::MAX));
                    let mut args = self.shape_args(connections);
                    args.push("--memory".into());
                    args
                } else {
                    self.shape_args(shape.channels)
                };
                common.push("--timeout".into());
                common.push(timeout.as_secs().min(3600).to_string().into());
                let mut dest_args: Vec<OsString> = vec![
                    ceiling::RECV.into(),
                    "--listen".into(),
                    "127.0.0.1:0".into(),
                ];
                dest_args.extend(common.iter().cloned());
                let pair = runs::run_pair(
                    &self.bench_exe,
                    &dir,
                    timeout,
                    (&bench, dest_args),
                    |addr| {
                        let mut args: Vec<OsString> =
                            vec![ceiling::SEND.into(), "--connect".into(), addr.into()];
                        args.extend(common.iter().cloned());
                        (bench.clone(), args)
                    },
                )?;
                runs::pair_metrics(pair, expected)
            }
            RowKind::QemuRam => {
                let mib = qemu::ram_mib(expected);
                if self.ram.is_none() {
                    eprintln!("  writing {mib} MiB of random RAM for qemu-ram");
                    self.ram = Some((qemu::RamImage::new(mib)?, mib));
                }
                let (path, mib) = match &self.ram {
                    Some((image, mib)) => (image.path(), *mib),
                    None => return Err("no RAM image".into()),
                };
                qemu::run(&self.bench_exe, &dir, &path, mib, shape.channels, timeout)
            }
        }
    }
}
