//! Standalone use without a VMM: `send` and `recv` migrate simulated devices between two
//! helper processes over their own main channel (see [`crate::session`]), and `demo` runs both
//! on loopback as child processes of itself, so each side's CPU time is its own process's,
//! then checks every byte and prints the numbers ([`crate::metrics`]).
//!
//! Both helpers build the same simulated devices from `--devices`, `--size`, `--seed` and
//! `--config-len`: device i is `0000:<i>:02.0/vfio` (QEMU's idstr shape), instance 0, with
//! content seeded from `--seed` and i. The destination's devices verify every byte at
//! RESUMING -> STOP, and its session checks each config blob against the expected one.

use std::io::{BufRead, BufReader, IsTerminal, Write};
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use vfio::sim::{config_blob, DeviceSpeed, SimSink, SimSource, SimSpec};
use vfio::{MigrationDevice, VfioContainer, VfioDevice};

use crate::cli::MigrationArgs;
use crate::config::{DemoConfig, MigrationConfig, RecvConfig, SendConfig};
use crate::engine::{self, Engine, Progress};
use crate::error::error_chain;
use crate::error::{DemoError, StandaloneError};
use crate::metrics::{self, DemoSummary, DeviceTimes, PathReport, Side, SideReport};
use crate::session::dest::{DestInput, DestParams, DestSession};
use crate::session::source::{SourceInput, SourceParams, SourceSession};
use crate::wire::DeviceId;

/// How often `--events` helpers report progress.
const PROGRESS_INTERVAL: Duration = Duration::from_millis(100);

/// The idstr of simulated device `index` (QEMU's `<pci path>/vfio` shape).
pub fn sim_device_id(index: u32) -> DeviceId {
    DeviceId::new(format!("0000:{index:02x}:02.0/vfio"), 0)
        .expect("a short ASCII idstr fits the wire field")
}

/// The spec of simulated device `index`; both helpers derive the same one.
pub fn sim_spec(config: &MigrationConfig, index: u32) -> SimSpec {
    SimSpec {
        size: config.size,
        seed: config
            .seed
            .wrapping_add(u64::from(index).wrapping_mul(0x9E37_79B9_7F4A_7C15)),
        precopy_initial: 0,
        precopy_dirty: 0,
        speed: config.device_speed.map(|rate| DeviceSpeed {
            save_bytes_per_sec: rate,
            load_bytes_per_sec: rate,
            per_read_latency: Duration::ZERO,
        }),
        config_len: config.config_len,
    }
}

/// The source's simulated devices, RUNNING.
pub fn sim_sources(config: &MigrationConfig) -> Result<Vec<SourceInput>, StandaloneError> {
    (0..config.devices)
        .map(|i| {
            let id = sim_device_id(i);
            let spec = sim_spec(config, i);
            let device = SimSource::new(&id.to_string(), spec).map_err(|source| {
                StandaloneError::SimDevice {
                    device: id.to_string(),
                    source,
                }
            })?;
            Ok(SourceInput {
                config: device.config_blob(),
                id,
                device: Box::new(device),
                precopy_fd: None,
            })
        })
        .collect()
}

/// The destination's simulated devices, RUNNING, with the config blob each must receive.
pub fn sim_sinks(config: &MigrationConfig) -> Result<Vec<DestInput>, StandaloneError> {
    (0..config.devices)
        .map(|i| {
            let id = sim_device_id(i);
            let spec = sim_spec(config, i);
            let device = SimSink::new(&id.to_string(), spec).map_err(|source| {
                StandaloneError::SimDevice {
                    device: id.to_string(),
                    source,
                }
            })?;
            Ok(DestInput {
                id,
                device: Box::new(device),
                expected_config: Some(config_blob(&spec)),
                max_queued_bytes: None,
            })
        })
        .collect()
}

/// The config blob a standalone helper sends for a real device: QEMU's framing of an empty
/// config (config space belongs to a VMM, and there is none here).
const EMPTY_VFIO_CONFIG: [u8; 16] = [
    0xff, 0xff, 0xff, 0xff, 0xef, 0x10, 0x00, 0x02, 0xff, 0xff, 0xff, 0xff, 0xef, 0x10, 0x00, 0x01,
];

/// Real VFIO devices opened by the helper through the legacy group path (all in one
/// container), named on the wire by position like the simulated ones.
fn open_vfio(names: &[String]) -> Result<Vec<(DeviceId, VfioDevice)>, StandaloneError> {
    let container = VfioContainer::open().map_err(|source| StandaloneError::VfioDevice {
        device: "/dev/vfio/vfio".into(),
        source,
    })?;
    names
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let device = VfioDevice::open_legacy(&container, name).map_err(|source| {
                StandaloneError::VfioDevice {
                    device: name.clone(),
                    source,
                }
            })?;
            Ok((sim_device_id(i as u32), device))
        })
        .collect()
}

/// The source's real devices, as opened (RUNNING).
pub fn vfio_sources(names: &[String]) -> Result<Vec<SourceInput>, StandaloneError> {
    Ok(open_vfio(names)?
        .into_iter()
        .map(|(id, device)| SourceInput {
            id,
            device: Box::new(device),
            config: EMPTY_VFIO_CONFIG.to_vec(),
            precopy_fd: None,
        })
        .collect())
}

/// The destination's real devices; their driver checks the stream on RESUMING -> STOP.
pub fn vfio_sinks(names: &[String]) -> Result<Vec<DestInput>, StandaloneError> {
    Ok(open_vfio(names)?
        .into_iter()
        .map(|(id, device)| DestInput {
            id,
            device: Box::new(device),
            expected_config: Some(EMPTY_VFIO_CONFIG.to_vec()),
            max_queued_bytes: None,
        })
        .collect())
}

/// The engine for `config`, and notes on any fallback.
pub fn make_engine(config: &MigrationConfig) -> (Arc<dyn Engine>, Vec<String>) {
    let mut notes = Vec::new();
    let (kind, why) = config.engine_kind();
    if let Some(why) = why {
        log::warn!("{why}");
        notes.push(why);
    }
    let engine: Arc<dyn Engine> = Arc::from(engine::select(kind, &config.engine_config));
    if engine.kind() != kind {
        notes.push(format!(
            "the {} engine could not be set up; the {} engine ran",
            kind.name(),
            engine.kind().name()
        ));
    }
    (engine, notes)
}

/// A QMP-style event line: `{"event", "data", "timestamp"}`.
#[derive(Debug, Serialize, Deserialize)]
pub struct EventLine {
    pub event: String,
    pub data: serde_json::Value,
    #[serde(default)]
    pub timestamp: Timestamp,
}

/// QMP's event timestamp.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Timestamp {
    pub seconds: u64,
    pub microseconds: u32,
}

fn emit(event: &str, data: serde_json::Value) {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let line = EventLine {
        event: event.into(),
        data,
        timestamp: Timestamp {
            seconds: now.as_secs(),
            microseconds: now.subsec_micros(),
        },
    };
    match serde_json::to_string(&line) {
        Ok(text) => {
            let mut out = std::io::stdout().lock();
            // The reader (demo) is gone: nothing left to tell it.
            let _ = writeln!(out, "{text}").and_then(|()| out.flush());
        }
        Err(e) => log::warn!("encoding event {event}: {e}"),
    }
}

/// Emits PROGRESS events while a session runs (with `--events`).
struct ProgressEvents {
    stop: Arc<AtomicBool>,
    handle: Option<thread::JoinHandle<()>>,
}

impl ProgressEvents {
    fn start(enabled: bool, progress: &Arc<Progress>, total: u64) -> Result<Self, StandaloneError> {
        let stop = Arc::new(AtomicBool::new(false));
        let handle = if enabled {
            let stop = stop.clone();
            let progress = progress.clone();
            Some(
                thread::Builder::new()
                    .name("progress".into())
                    .spawn(move || {
                        while !stop.load(Ordering::Relaxed) {
                            let bytes = progress.bytes.load(Ordering::Relaxed);
                            emit(
                                "PROGRESS",
                                serde_json::json!({ "bytes": bytes, "total": total }),
                            );
                            thread::sleep(PROGRESS_INTERVAL);
                        }
                    })
                    .map_err(|source| StandaloneError::Thread {
                        what: "progress",
                        source,
                    })?,
            )
        } else {
            None
        };
        Ok(Self { stop, handle })
    }

    fn stop(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(handle) = self.handle.take() {
            let _ = handle.join();
        }
    }
}

fn device_state(device: &dyn MigrationDevice) -> Option<String> {
    device.state().ok().map(|s| s.kernel_name().to_string())
}

/// Prints a side's report: an event (`--events`), JSON (`--json`) or a human line.
fn print_side(config: &MigrationConfig, report: &SideReport) {
    if config.events {
        match serde_json::to_value(report) {
            Ok(value) => emit("REPORT", value),
            Err(e) => log::warn!("encoding the report: {e}"),
        }
        return;
    }
    if config.json {
        match serde_json::to_string(&report.without_timestamps()) {
            Ok(text) => println!("{text}"),
            Err(e) => log::warn!("encoding the report: {e}"),
        }
        return;
    }
    let opt =
        |v: Option<f64>, unit: &str| v.map_or_else(|| "n/a".into(), |v| format!("{v:.2}{unit}"));
    let (name, span) = match report.side {
        Side::Source => ("send", "SWITCHOVER_START sent -> result received"),
        Side::Destination => ("recv", "SWITCHOVER_START received -> last device loaded"),
    };
    println!(
        "{name}: {} devices, {} over {} channels, engine {}: {}",
        report.devices.len(),
        metrics::human_bytes(report.bytes),
        report.channels,
        report.engine,
        if report.ok { "ok" } else { "FAILED" }
    );
    if report.ok {
        println!(
            "  {} ({span}), {}, CPU {}{}",
            opt(report.downtime_ms(), " ms"),
            opt(report.throughput_gib_s(), " GiB/s"),
            opt(report.cpu_s_per_gib(), " s/GiB"),
            if report.side == Side::Destination {
                ", every byte verified"
            } else {
                ""
            }
        );
    }
    for device in report.devices.iter().filter(|d| d.state.is_some()) {
        if !report.ok {
            println!(
                "  device {}/{}: {}",
                device.idstr,
                device.instance_id,
                device.state.as_deref().unwrap_or("?")
            );
        }
    }
}

/// `send`: migrate simulated devices to a `recv` helper.
/// A side's report before its numbers are in: what ran, over what, on which devices.
fn side_report<T>(
    side: Side,
    m: &MigrationConfig,
    engine: &dyn Engine,
    progress: &Progress,
    result: &Result<T, crate::error::SessionError>,
    devices: Vec<DeviceTimes>,
) -> SideReport {
    SideReport {
        side,
        ok: result.is_ok(),
        error: None,
        engine: engine.kind().name().into(),
        notes: Vec::new(),
        channels: m.channels,
        chunk: m.chunk(),
        bytes: progress.bytes.load(Ordering::Relaxed),
        devices,
        switchover_ns: None,
        end_ns: None,
        cpu_s: 0.0,
        verified: false,
        workers: None,
        path: None,
    }
}

/// Reports a side whose session failed (error text, notes, CPU so far) and returns its error.
fn failed_side(
    m: &MigrationConfig,
    mut report: SideReport,
    notes: Vec<String>,
    cpu_start: f64,
    side: &'static str,
    err: crate::error::SessionError,
) -> StandaloneError {
    report.error = Some(error_chain(&err));
    report.notes = notes;
    report.cpu_s = metrics::process_cpu_seconds() - cpu_start;
    print_side(m, &report);
    StandaloneError::Session { side, source: err }
}

pub fn run_send(config: &SendConfig) -> Result<SideReport, StandaloneError> {
    let m = &config.migration;
    let mut devices = if config.vfio.is_empty() {
        sim_sources(m)?
    } else {
        vfio_sources(&config.vfio)?
    };
    let (engine, mut notes) = make_engine(m);
    let progress = Arc::new(Progress::default());
    let events = ProgressEvents::start(m.events, &progress, m.total_bytes())?;
    let params = SourceParams {
        connect: config.connect,
        channels: m.channels,
        uuid: m.uuid,
        chunk: m.chunk(),
        timeout: m.timeout,
        order: config.channel_order,
    };
    let cpu_start = metrics::process_cpu_seconds();
    let result = SourceSession::new(params, &mut devices, engine.clone(), progress.clone()).run();
    events.stop();
    let states: Vec<Option<String>> = devices
        .iter()
        .map(|d| device_state(d.device.as_ref()))
        .collect();
    let device_times = devices
        .iter()
        .zip(&states)
        .map(|(d, state)| DeviceTimes {
            idstr: d.id.idstr.clone(),
            instance_id: d.id.instance_id,
            state: state.clone(),
            ..DeviceTimes::default()
        })
        .collect();
    let mut report = side_report(
        Side::Source,
        m,
        engine.as_ref(),
        &progress,
        &result,
        device_times,
    );
    let outcome = match result {
        Ok(outcome) => outcome,
        Err(err) => return Err(failed_side(m, report, notes, cpu_start, "source", err)),
    };
    notes.extend(outcome.report.notes.iter().cloned());
    report.notes = notes;
    report.workers = outcome.report.workers;
    report.path = PathReport::taken(&report.engine, &outcome.report.rings);
    report.bytes = outcome.report.devices.iter().map(|d| d.bytes).sum();
    for (device, engine_report) in report.devices.iter_mut().zip(&outcome.report.devices) {
        device.bytes = engine_report.bytes;
        device.data_packets = engine_report.data_packets;
        device.timestamps_ns = engine_report.read_issued_ns.clone();
    }
    report.switchover_ns = Some(outcome.switchover_ns);
    report.end_ns = Some(outcome.result_ns);
    report.verified = outcome.result.ok;
    report.cpu_s = outcome.cpu_s;
    print_side(m, &report);
    Ok(report)
}

/// `recv`: receive one migration from a `send` helper and verify it.
pub fn run_recv(config: &RecvConfig) -> Result<SideReport, StandaloneError> {
    let m = &config.migration;
    let listener = TcpListener::bind(config.listen).map_err(|source| StandaloneError::Listen {
        addr: config.listen,
        source,
    })?;
    let addr = listener
        .local_addr()
        .map_err(|source| StandaloneError::Listen {
            addr: config.listen,
            source,
        })?;
    let mut devices = if config.vfio.is_empty() {
        sim_sinks(m)?
    } else {
        vfio_sinks(&config.vfio)?
    };
    let (engine, mut notes) = make_engine(m);
    if m.events {
        emit("LISTENING", serde_json::json!({ "addr": addr.to_string() }));
    } else {
        eprintln!("recv: listening on {addr}");
    }
    let progress = Arc::new(Progress::default());
    let events = ProgressEvents::start(m.events, &progress, m.total_bytes())?;
    let params = DestParams {
        channels: m.channels,
        uuid: m.uuid,
        chunk: m.chunk(),
        timeout: m.timeout,
    };
    let cpu_start = metrics::process_cpu_seconds();
    let result = DestSession::new(
        listener,
        params,
        &mut devices,
        engine.clone(),
        progress.clone(),
    )
    .run();
    events.stop();
    let device_times = devices
        .iter()
        .map(|d| DeviceTimes {
            idstr: d.id.idstr.clone(),
            instance_id: d.id.instance_id,
            state: device_state(d.device.as_ref()),
            ..DeviceTimes::default()
        })
        .collect();
    let mut report = side_report(
        Side::Destination,
        m,
        engine.as_ref(),
        &progress,
        &result,
        device_times,
    );
    let outcome = match result {
        Ok(outcome) => outcome,
        Err(err) => return Err(failed_side(m, report, notes, cpu_start, "destination", err)),
    };
    notes.extend(outcome.report.notes.iter().cloned());
    report.notes = notes;
    report.workers = outcome.report.workers;
    report.path = PathReport::taken(&report.engine, &outcome.report.rings);
    report.bytes = outcome.report.devices.iter().map(|d| d.bytes).sum();
    for (device, engine_report) in report.devices.iter_mut().zip(&outcome.report.devices) {
        device.bytes = engine_report.bytes;
        device.data_packets = engine_report.data_packets;
        device.loaded_ns = Some(engine_report.loaded_ns);
        device.timestamps_ns = engine_report.written_ns.clone();
    }
    report.switchover_ns = Some(outcome.switchover_ns);
    report.end_ns = Some(outcome.loaded_ns);
    // The session checked every config blob and each device checked its stream.
    report.verified = report.bytes == m.total_bytes();
    report.cpu_s = outcome.cpu_s;
    print_side(m, &report);
    Ok(report)
}

/// Arguments that make a child helper build the same devices and channels.
fn child_args(args: &MigrationArgs) -> Vec<String> {
    let mut argv: Vec<String> = [
        ("--devices", &args.devices),
        ("--size", &args.size),
        ("--channels", &args.channels),
        ("--chunk", &args.chunk),
        ("--pool-buffers", &args.pool_buffers),
        ("--seed", &args.seed),
        ("--timeout", &args.timeout),
    ]
    .iter()
    .flat_map(|(flag, value)| [flag.to_string(), value.to_string()])
    .collect();
    for (flag, value) in [
        ("--workers", &args.workers),
        ("--device-speed", &args.device_speed),
        ("--queued-bytes-limit", &args.queued_bytes_limit),
        ("--uuid", &args.uuid),
        ("--config-len", &args.config_len),
        ("--forbid", &args.forbid),
    ] {
        if let Some(value) = value {
            argv.push(flag.into());
            argv.push(value.clone());
        }
    }
    if args.sequential_devices {
        argv.push("--sequential-devices".into());
    }
    argv.push("--events".into());
    argv
}

/// A line (or the end) of a child's stdout.
enum ChildLine {
    Event(Side, EventLine),
    Closed(Side),
}

/// A child helper, killed if still running when dropped (only ever this child, by its id).
struct Helper {
    side: Side,
    child: Child,
    reader: Option<thread::JoinHandle<()>>,
}

impl Helper {
    fn spawn(
        side: Side,
        args: Vec<String>,
        tx: mpsc::Sender<ChildLine>,
    ) -> Result<Self, DemoError> {
        let name = side_name(side);
        let exe = std::env::current_exe()
            .map_err(|source| DemoError::CurrentExe { side: name, source })?;
        let mut child = Command::new(exe)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|source| DemoError::Spawn { side: name, source })?;
        let stdout = child.stdout.take().expect("stdout was piped");
        let reader = thread::Builder::new()
            .name(format!("demo-{name}"))
            .spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    match serde_json::from_str::<EventLine>(&line) {
                        Ok(event) => {
                            if tx.send(ChildLine::Event(side, event)).is_err() {
                                return;
                            }
                        }
                        Err(_) => println!("{line}"),
                    }
                }
                let _ = tx.send(ChildLine::Closed(side));
            });
        let reader = match reader {
            Ok(handle) => handle,
            Err(source) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(DemoError::Thread {
                    what: "child reader",
                    source,
                });
            }
        };
        Ok(Self {
            side,
            child,
            reader: Some(reader),
        })
    }

    /// Waits up to `limit` for the child to exit, then kills it.
    fn wait(mut self, limit: Duration) -> Result<std::process::ExitStatus, DemoError> {
        let name = side_name(self.side);
        let deadline = Instant::now() + limit;
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => {
                    if let Some(reader) = self.reader.take() {
                        let _ = reader.join();
                    }
                    return Ok(status);
                }
                Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(10)),
                Ok(None) => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    return Err(DemoError::Timeout { side: name, limit });
                }
                Err(source) => return Err(DemoError::Wait { side: name, source }),
            }
        }
    }
}

impl Drop for Helper {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn side_name(side: Side) -> &'static str {
    match side {
        Side::Source => "source",
        Side::Destination => "destination",
    }
}

/// Draws `[####....]  45%  180 MiB / 400 MiB  1.23 GiB/s` on stderr; the rate counts from
/// the first byte moved.
fn draw_progress(bytes: u64, total: u64, first_byte: Option<Instant>) {
    const WIDTH: usize = 30;
    let fraction = if total == 0 {
        1.0
    } else {
        (bytes as f64 / total as f64).min(1.0)
    };
    let filled = (fraction * WIDTH as f64) as usize;
    let secs = first_byte.map_or(0.0, |t| t.elapsed().as_secs_f64());
    let rate = if secs > 0.0 {
        bytes as f64 / metrics::GIB / secs
    } else {
        0.0
    };
    let mut err = std::io::stderr().lock();
    let _ = write!(
        err,
        "\r[{}{}] {:>3.0}%  {} / {}  {:.2} GiB/s ",
        "#".repeat(filled),
        ".".repeat(WIDTH - filled),
        fraction * 100.0,
        metrics::human_bytes(bytes),
        metrics::human_bytes(total),
        rate
    );
    let _ = err.flush();
}

fn clear_progress() {
    let mut err = std::io::stderr().lock();
    let _ = write!(err, "\r{}\r", " ".repeat(79));
    let _ = err.flush();
}

/// `demo`: both helpers on loopback as child processes; returns the combined numbers. With
/// `--json`, a failure before both helpers reported still prints one object
/// (`{"verified": false, "error": ...}`).
pub fn run_demo(config: &DemoConfig, log_level: &str) -> Result<DemoSummary, DemoError> {
    let result = demo_inner(config, log_level);
    if let (Err(err), true) = (&result, config.migration.json) {
        println!(
            "{}",
            serde_json::json!({ "verified": false, "error": error_chain(err) })
        );
    }
    result
}

fn demo_inner(config: &DemoConfig, log_level: &str) -> Result<DemoSummary, DemoError> {
    let m = &config.migration;
    let (tx, rx) = mpsc::channel();
    let mut common = child_args(&config.args);
    common.splice(0..0, ["--log-level".to_string(), log_level.to_string()]);
    let recv_args = {
        let mut argv = vec![
            common[0].clone(),
            common[1].clone(),
            "recv".into(),
            "--listen".into(),
            "127.0.0.1:0".into(),
        ];
        argv.extend(common[2..].iter().cloned());
        argv.extend(["--engine".into(), config.dest_engine.name().into()]);
        argv
    };
    let dest = Helper::spawn(Side::Destination, recv_args, tx.clone())?;

    // The destination says where it listens.
    let deadline = Instant::now() + m.timeout;
    let addr = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(ChildLine::Event(_, event)) if event.event == "LISTENING" => {
                if let Some(addr) = event.data.get("addr").and_then(|a| a.as_str()) {
                    break addr.to_string();
                }
            }
            Ok(ChildLine::Event(..)) => {}
            Ok(ChildLine::Closed(_)) | Err(_) => {
                return Err(DemoError::NoListenAddr {
                    side: "destination",
                    waited: m.timeout,
                })
            }
        }
    };
    let send_args = {
        let mut argv = vec![
            common[0].clone(),
            common[1].clone(),
            "send".into(),
            "--connect".into(),
            addr,
        ];
        argv.extend(common[2..].iter().cloned());
        argv.extend(["--engine".into(), config.migration.engine.name().into()]);
        argv
    };
    let source = Helper::spawn(Side::Source, send_args, tx)?;

    let show_progress = config.progress && std::io::stderr().is_terminal();
    let total = m.total_bytes();
    let mut first_byte = None;
    let mut reports: [Option<SideReport>; 2] = [None, None];
    let mut open = 2;
    // Each helper stops itself after `timeout` without progress; this is the backstop.
    let silence_limit = m.timeout + Duration::from_secs(10);
    let mut last_heard = Instant::now();
    while open > 0 {
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(ChildLine::Event(side, event)) => {
                last_heard = Instant::now();
                match event.event.as_str() {
                    "PROGRESS" if side == Side::Destination && show_progress => {
                        let bytes = event
                            .data
                            .get("bytes")
                            .and_then(|b| b.as_u64())
                            .unwrap_or(0);
                        if bytes > 0 && first_byte.is_none() {
                            first_byte = Some(Instant::now());
                        }
                        draw_progress(bytes, total, first_byte);
                    }
                    "REPORT" => match serde_json::from_value::<SideReport>(event.data) {
                        Ok(report) => reports[side as usize] = Some(report),
                        Err(e) => log::warn!(
                            "the {} sent a report that does not parse: {e}",
                            side_name(side)
                        ),
                    },
                    _ => {}
                }
            }
            Ok(ChildLine::Closed(side)) => {
                log::debug!("the {} helper closed its output", side_name(side));
                open -= 1;
            }
            Err(RecvTimeoutError::Timeout) => {
                if last_heard.elapsed() > silence_limit {
                    if show_progress {
                        clear_progress();
                    }
                    return Err(DemoError::Timeout {
                        side: "demo",
                        limit: silence_limit,
                    });
                }
            }
            Err(RecvTimeoutError::Disconnected) => break,
        }
    }
    if show_progress {
        clear_progress();
    }
    let source_status = source.wait(Duration::from_secs(10))?;
    let dest_status = dest.wait(Duration::from_secs(10))?;
    let [source_report, dest_report] = reports;
    let source_report = source_report.ok_or_else(|| DemoError::NoReport {
        side: "source",
        status: source_status.to_string(),
    })?;
    let dest_report = dest_report.ok_or_else(|| DemoError::NoReport {
        side: "destination",
        status: dest_status.to_string(),
    })?;
    let mut summary = DemoSummary::from_reports(&source_report, &dest_report, m.devices, m.size);
    if !(source_status.success() && dest_status.success()) {
        summary.verified = false;
    }
    if m.json {
        match serde_json::to_string(&summary) {
            Ok(text) => println!("{text}"),
            Err(e) => log::warn!("encoding the summary: {e}"),
        }
    } else {
        print!("{}", summary.human());
    }
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sim_ids_are_distinct_and_fit_the_wire() {
        let ids: std::collections::BTreeSet<_> = (0..256).map(sim_device_id).collect();
        assert_eq!(ids.len(), 256);
        assert_eq!(sim_device_id(0).to_string(), "0000:00:02.0/vfio/0");
        assert_eq!(sim_device_id(255).idstr, "0000:ff:02.0/vfio");
    }

    #[test]
    fn child_args_round_trip_through_the_parser() {
        use clap::Parser;
        let cli = crate::cli::Cli::try_parse_from([
            "vfio-multifd",
            "demo",
            "--size",
            "3MiB",
            "--uuid",
            "12345678-9abc-def0-1122-334455667788",
            "--device-speed",
            "1GiB/s",
        ])
        .unwrap();
        let crate::cli::Command::Demo(demo) = cli.command else {
            unreachable!()
        };
        let mut argv = vec![
            "vfio-multifd".to_string(),
            "recv".into(),
            "--listen".into(),
            "127.0.0.1:0".into(),
        ];
        argv.extend(child_args(&demo.migration));
        let cli = crate::cli::Cli::try_parse_from(argv).unwrap();
        let crate::cli::Command::Recv(recv) = cli.command else {
            unreachable!()
        };
        assert_eq!(recv.migration.size, "3MiB");
        assert_eq!(recv.migration.device_speed.as_deref(), Some("1GiB/s"));
        assert!(recv.migration.events);
    }
}
