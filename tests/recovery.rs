//! Failed and cancelled migrations with both engines, in each phase: the source devices end
//! RUNNING (or STOP when the outcome is unknown) with their state intact, which a second
//! migration of the same devices to verifying sinks proves; the destination's devices are
//! reset; no fd of the migration stays open.

// Test helpers unwrap too: a failed step is a failed test (clippy allows it only in #[test] fns).
#![allow(clippy::unwrap_used)]

use std::net::TcpListener;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use vfio::sim::fault::Fault;
use vfio::sim::{config_blob, DeviceSpeed, SimSink, SimSource, SimSpec};
use vfio::{MigState, MigrationDevice};
use vfio_multifd::config::ChannelOrder;
use vfio_multifd::engine::{self, Engine, EngineConfig, EngineKind, Progress};
use vfio_multifd::error::{error_chain, SessionError};
use vfio_multifd::session::dest::{DestInput, DestOutcome, DestParams, DestSession};
use vfio_multifd::session::link::{ControlLink, Notice, Phase, VmmCommand};
use vfio_multifd::session::source::{SourceInput, SourceParams, SourceSession};
use vfio_multifd::wire::DeviceId;

const UUID: [u8; 16] = *b"recovery-testuid";
const CHUNK: usize = 256 << 10;
const ENGINES: [EngineKind; 2] = [EngineKind::Uring, EngineKind::Threads];

/// The fd counts below are per process: one scenario at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

/// Waits (a little) for threads that close fds after a session returned.
fn assert_fds_settle(base: usize, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let now = open_fds();
        if now <= base {
            return;
        }
        if Instant::now() >= deadline {
            let list: Vec<String> = std::fs::read_dir("/proc/self/fd")
                .unwrap()
                .filter_map(|e| e.ok())
                .filter_map(|e| std::fs::read_link(e.path()).ok())
                .map(|p| p.display().to_string())
                .collect();
            panic!("{what}: {now} fds open, {base} before: {list:?}");
        }
        thread::sleep(Duration::from_millis(20));
    }
}

fn engine(kind: EngineKind) -> Arc<dyn Engine> {
    let config = EngineConfig {
        workers: 2,
        chunk_size: CHUNK,
        pool_buffers: 16,
        max_packet_size: (CHUNK + 12) as u32,
        ..EngineConfig::default()
    };
    Arc::from(engine::select(kind, &config))
}

fn id(i: u32) -> DeviceId {
    DeviceId::new(format!("0000:{i:02x}:03.0/vfio"), 0).unwrap()
}

fn spec(i: u32, size: u64, precopy: bool, save_rate: Option<u64>) -> SimSpec {
    SimSpec {
        size,
        seed: 500 + u64::from(i),
        precopy_initial: if precopy { size / 4 } else { 0 },
        precopy_dirty: if precopy { size / 16 } else { 0 },
        speed: save_rate.map(|rate| DeviceSpeed {
            save_bytes_per_sec: rate,
            load_bytes_per_sec: 0,
            per_read_latency: Duration::ZERO,
        }),
        config_len: 300,
    }
}

fn sources(specs: &[SimSpec]) -> Vec<SourceInput> {
    specs
        .iter()
        .enumerate()
        .map(|(i, spec)| {
            let device = SimSource::new(&id(i as u32).to_string(), *spec).unwrap();
            SourceInput {
                id: id(i as u32),
                config: device.config_blob(),
                device: Box::new(device),
                precopy_fd: None,
            }
        })
        .collect()
}

/// Verifying sinks for `specs` (speed and precopy do not change the content).
fn sinks(specs: &[SimSpec]) -> Vec<DestInput> {
    specs
        .iter()
        .enumerate()
        .map(|(i, spec)| {
            let plain = SimSpec {
                speed: None,
                ..*spec
            };
            DestInput {
                id: id(i as u32),
                device: Box::new(SimSink::new(&format!("sink-{i}"), plain).unwrap()),
                expected_config: Some(config_blob(spec)),
                max_queued_bytes: None,
            }
        })
        .collect()
}

type DestJoin = thread::JoinHandle<(Result<DestOutcome, SessionError>, Vec<DestInput>)>;

fn spawn_dest(
    listener: TcpListener,
    mut devices: Vec<DestInput>,
    kind: EngineKind,
    channels: u8,
    timeout: Duration,
    progress: Arc<Progress>,
) -> DestJoin {
    thread::spawn(move || {
        let params = DestParams {
            channels,
            uuid: UUID,
            chunk: CHUNK,
            timeout,
        };
        let result = DestSession::new(listener, params, &mut devices, engine(kind), progress).run();
        (result, devices)
    })
}

/// Device 0's sink, `spec`'s, that stops taking data for `duration` after `at` bytes.
fn stalling_sink(name: &str, spec: SimSpec, at: u64, duration: Duration) -> DestInput {
    let device = SimSink::with_fault(name, spec, Fault::Stall { at, duration }).unwrap();
    DestInput {
        id: id(0),
        device: Box::new(device),
        expected_config: Some(config_blob(&spec)),
        max_queued_bytes: None,
    }
}

fn params(listener: &TcpListener, channels: u8, timeout: Duration) -> SourceParams {
    SourceParams {
        connect: listener.local_addr().unwrap(),
        channels,
        uuid: UUID,
        chunk: CHUNK,
        timeout,
        order: ChannelOrder::Ascending,
    }
}

fn states<'a>(devices: impl Iterator<Item = &'a dyn MigrationDevice>) -> Vec<MigState> {
    devices.map(|d| d.state().unwrap()).collect()
}

/// The source devices' state is intact: a second migration of them to verifying sinks
/// succeeds (the sinks check every byte and the config).
fn migrate_again_and_verify(devices: &mut [SourceInput], specs: &[SimSpec], kind: EngineKind) {
    for input in devices.iter_mut() {
        assert_eq!(input.device.state().unwrap(), MigState::Running);
    }
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let p = params(&listener, 2, Duration::from_secs(20));
    let dest = spawn_dest(
        listener,
        sinks(specs),
        kind,
        2,
        Duration::from_secs(20),
        Arc::default(),
    );
    let result = SourceSession::new(p, devices, engine(kind), Arc::default()).run();
    let (dest_result, dest_devices) = dest.join().unwrap();
    if let Err(e) = &dest_result {
        panic!("{kind:?}: the second migration failed: {}", error_chain(e));
    }
    result.unwrap();
    assert_eq!(
        states(dest_devices.iter().map(|d| d.device.as_ref())),
        vec![MigState::Running; specs.len()]
    );
    // Back to RUNNING for the next scenario (a completed source is left in STOP).
    for input in devices.iter_mut() {
        input.device.set_state(MigState::Running).unwrap();
    }
}

fn cancel_after_bytes(progress: Arc<Progress>, after: Duration) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(10);
        while progress.bytes.load(Ordering::Relaxed) == 0 && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(2));
        }
        thread::sleep(after);
        progress.cancel.store(true, Ordering::Relaxed);
    })
}

/// STOP_COPY, source cancelled mid-stream: both sides roll back; the state is intact.
#[test]
fn a_cancel_mid_stream_loses_nothing_with_either_engine() {
    let _serial = serial();
    for kind in ENGINES {
        let specs = [
            spec(0, 8 << 20, false, Some(16 << 20)),
            spec(1, 8 << 20, false, None),
        ];
        let mut devices = sources(&specs);
        let base = open_fds();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let p = params(&listener, 2, Duration::from_secs(20));
        let dest = spawn_dest(
            listener,
            sinks(&specs),
            kind,
            2,
            Duration::from_secs(20),
            Arc::default(),
        );
        let progress = Arc::new(Progress::default());
        let canceller = cancel_after_bytes(progress.clone(), Duration::from_millis(100));
        let started = Instant::now();
        let err = SourceSession::new(p, &mut devices, engine(kind), progress)
            .run()
            .unwrap_err();
        canceller.join().unwrap();
        assert!(
            matches!(err, SessionError::Cancelled { .. }),
            "{kind:?}: {}",
            error_chain(&err)
        );
        assert!(started.elapsed() < Duration::from_secs(10));
        assert_eq!(
            states(devices.iter().map(|d| d.device.as_ref())),
            vec![MigState::Running; 2],
            "{kind:?}"
        );
        let (dest_result, dest_devices) = dest.join().unwrap();
        assert!(dest_result.is_err(), "{kind:?}");
        assert_eq!(
            states(dest_devices.iter().map(|d| d.device.as_ref())),
            vec![MigState::Running; 2],
            "{kind:?}: the destination reset its devices"
        );
        drop(dest_devices);
        assert_fds_settle(base, &format!("{kind:?} cancel mid-stream"));
        migrate_again_and_verify(&mut devices, &specs, kind);
    }
}

/// The destination is cancelled while it loads (its sink is slow): it resets its devices, the
/// source hears of the failure and rolls back.
#[test]
fn a_destination_cancelled_while_loading_loses_nothing() {
    let _serial = serial();
    for kind in ENGINES {
        let specs = [spec(0, 8 << 20, false, None)];
        let mut devices = sources(&specs);
        let base = open_fds();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let p = params(&listener, 2, Duration::from_secs(20));
        let slow = stalling_sink("slow-sink", specs[0], 1 << 20, Duration::from_secs(3));
        let dest_progress = Arc::new(Progress::default());
        let dest = spawn_dest(
            listener,
            vec![slow],
            kind,
            2,
            Duration::from_secs(20),
            dest_progress.clone(),
        );
        let canceller = cancel_after_bytes(dest_progress, Duration::from_millis(300));
        let started = Instant::now();
        let result = SourceSession::new(p, &mut devices, engine(kind), Arc::default()).run();
        canceller.join().unwrap();
        let (dest_result, dest_devices) = dest.join().unwrap();
        let err = result.unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(10), "{kind:?}");
        assert!(
            !matches!(err, SessionError::OutcomeUnknown { .. }),
            "{kind:?}: {}",
            error_chain(&err)
        );
        assert_eq!(
            states(devices.iter().map(|d| d.device.as_ref())),
            vec![MigState::Running],
            "{kind:?}: {}",
            error_chain(&err)
        );
        let dest_err = dest_result.unwrap_err();
        assert!(
            matches!(dest_err, SessionError::Cancelled { .. }),
            "{kind:?}: {}",
            error_chain(&dest_err)
        );
        assert_eq!(
            states(dest_devices.iter().map(|d| d.device.as_ref())),
            vec![MigState::Running],
            "{kind:?}"
        );
        drop(dest_devices);
        assert_fds_settle(base, &format!("{kind:?} destination cancel"));
        migrate_again_and_verify(&mut devices, &specs, kind);
    }
}

/// Everything sent, then a cancel before the result: the source stops (outcome unknown); once
/// the VMM resumes the devices, their state is intact.
#[test]
fn a_cancel_after_eof_before_the_result_stops_and_keeps_the_state() {
    let _serial = serial();
    for kind in ENGINES {
        let specs = [spec(0, 64 << 10, false, None)];
        let mut devices = sources(&specs);
        let base = open_fds();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let p = params(&listener, 2, Duration::from_secs(20));
        let slow = stalling_sink("stalling-sink", specs[0], 60 << 10, Duration::from_secs(2));
        let dest = spawn_dest(
            listener,
            vec![slow],
            kind,
            2,
            Duration::from_secs(20),
            Arc::default(),
        );
        let progress = Arc::new(Progress::default());
        let canceller = cancel_after_bytes(progress.clone(), Duration::from_millis(500));
        let err = SourceSession::new(p, &mut devices, engine(kind), progress)
            .run()
            .unwrap_err();
        canceller.join().unwrap();
        assert!(
            matches!(err, SessionError::OutcomeUnknown { .. }),
            "{kind:?}: {}",
            error_chain(&err)
        );
        assert_eq!(devices[0].device.state().unwrap(), MigState::Stop);
        let (_dest_result, dest_devices) = dest.join().unwrap();
        drop(dest_devices);
        assert_fds_settle(base, &format!("{kind:?} cancel awaiting the result"));
        // The VMM learns the destination does not run the VM and resumes the source.
        devices[0].device.set_state(MigState::Running).unwrap();
        migrate_again_and_verify(&mut devices, &specs, kind);
    }
}

/// A source under a VMM with a helper-driven precopy device.
struct PrecopyRun {
    err: SessionError,
}

/// Runs a VMM-driven source whose devices the helper drives (precopy on device 0); `vmm`
/// decides what to do on each notice (return false to cancel there).
fn precopy_source(
    devices: &mut [SourceInput],
    kind: EngineKind,
    p: SourceParams,
    cancel_on: impl Fn(&Notice) -> bool + Send + 'static,
) -> PrecopyRun {
    let (notices, notice_rx) = mpsc::channel();
    let n = devices.len();
    let link = ControlLink {
        vmm_driven: vec![false; n],
        data_fds: (0..n).map(|_| None).collect(),
        precopy: (0..n).map(|i| i == 0).collect(),
        passed: None,
        precopy_bytes: Arc::new(AtomicU64::new(0)),
        notify: Box::new(move |n: Notice| {
            let _ = notices.send(n);
        }),
    };
    let progress = Arc::new(Progress::default());
    let session = SourceSession::new(p, devices, engine(kind), progress.clone()).with_control(link);
    let commander = session.commander();
    let vmm = thread::spawn(move || {
        while let Ok(notice) = notice_rx.recv() {
            if cancel_on(&notice) {
                thread::sleep(Duration::from_millis(100));
                progress.cancel.store(true, Ordering::Relaxed);
                commander.send(VmmCommand::Wake);
                return;
            }
            if matches!(notice, Notice::SwitchoverAck) {
                commander.send(VmmCommand::SwitchoverStart { updates: vec![] });
            }
        }
    });
    let err = session.run().unwrap_err();
    vmm.join().unwrap();
    PrecopyRun { err }
}

/// A helper-driven precopy device cancelled in precopy (before and after the ack) and in
/// stop-copy: back to RUNNING, intact, nothing left open.
#[test]
fn a_cancelled_precopy_device_loses_nothing() {
    let _serial = serial();
    for kind in ENGINES {
        for phase in ["precopy", "acked", "stop-copy"] {
            let specs = [
                spec(
                    0,
                    4 << 20,
                    true,
                    if phase == "stop-copy" {
                        Some(8 << 20)
                    } else {
                        None
                    },
                ),
                spec(1, 2 << 20, false, None),
            ];
            let mut devices = sources(&specs);
            let base = open_fds();
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            let p = params(&listener, 2, Duration::from_secs(20));
            // "precopy": a destination that never acks (it is never started).
            let dest = (phase != "precopy").then(|| {
                spawn_dest(
                    listener.try_clone().unwrap(),
                    sinks(&specs),
                    kind,
                    2,
                    Duration::from_secs(20),
                    Arc::default(),
                )
            });
            let run = precopy_source(&mut devices, kind, p, move |notice| match phase {
                "precopy" => matches!(notice, Notice::InitialDataSent { .. }),
                "acked" => matches!(notice, Notice::SwitchoverAck),
                _ => matches!(notice, Notice::Phase(Phase::StopCopy)),
            });
            drop(listener);
            assert!(
                matches!(run.err, SessionError::Cancelled { .. }),
                "{kind:?} {phase}: {}",
                error_chain(&run.err)
            );
            assert_eq!(
                states(devices.iter().map(|d| d.device.as_ref())),
                vec![MigState::Running; 2],
                "{kind:?} {phase}"
            );
            if let Some(dest) = dest {
                let (dest_result, dest_devices) = dest.join().unwrap();
                assert!(dest_result.is_err(), "{kind:?} {phase}");
                assert_eq!(
                    states(dest_devices.iter().map(|d| d.device.as_ref())),
                    vec![MigState::Running; 2],
                    "{kind:?} {phase}"
                );
            }
            assert_fds_settle(base, &format!("{kind:?} {phase}"));
            migrate_again_and_verify(&mut devices, &specs, kind);
        }
    }
}

/// The destination is cancelled while precopy data streams in (the source waits for the ack,
/// its VMM never switches over): the destination resets its devices, the source rolls back.
#[test]
fn a_destination_cancelled_in_precopy_loses_nothing() {
    let _serial = serial();
    for kind in ENGINES {
        let specs = [spec(0, 16 << 20, true, None), spec(1, 2 << 20, false, None)];
        let mut devices = sources(&specs);
        let base = open_fds();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let p = params(&listener, 2, Duration::from_secs(20));
        let dest_progress = Arc::new(Progress::default());
        let mut dest_sinks = sinks(&specs);
        // A slow sink: precopy bytes pile up in the destination's main-channel reader.
        dest_sinks[0] = stalling_sink(
            "slow-precopy-sink",
            SimSpec {
                speed: None,
                ..specs[0]
            },
            1 << 20,
            Duration::from_secs(2),
        );
        let dest = spawn_dest(
            listener,
            dest_sinks,
            kind,
            2,
            Duration::from_secs(20),
            dest_progress.clone(),
        );
        let canceller = {
            let progress = dest_progress.clone();
            thread::spawn(move || {
                thread::sleep(Duration::from_millis(400));
                progress.cancel.store(true, Ordering::Relaxed);
            })
        };
        let started = Instant::now();
        let run = precopy_source(&mut devices, kind, p, |_| false);
        canceller.join().unwrap();
        let (dest_result, dest_devices) = dest.join().unwrap();
        assert!(started.elapsed() < Duration::from_secs(10), "{kind:?}");
        let dest_err = dest_result.unwrap_err();
        assert!(
            matches!(dest_err, SessionError::Cancelled { .. }),
            "{kind:?}: {}",
            error_chain(&dest_err)
        );
        assert_eq!(
            states(dest_devices.iter().map(|d| d.device.as_ref())),
            vec![MigState::Running; 2],
            "{kind:?}"
        );
        assert!(
            !matches!(run.err, SessionError::OutcomeUnknown { .. }),
            "{kind:?}: {}",
            error_chain(&run.err)
        );
        assert_eq!(
            states(devices.iter().map(|d| d.device.as_ref())),
            vec![MigState::Running; 2],
            "{kind:?}: {}",
            error_chain(&run.err)
        );
        drop(dest_devices);
        assert_fds_settle(base, &format!("{kind:?} destination cancel in precopy"));
        migrate_again_and_verify(&mut devices, &specs, kind);
    }
}

/// A source device whose SET to STOP_COPY fails (once), where the kernel leaves it in STOP.
struct FailsStopCopyOnce {
    inner: SimSource,
    armed: bool,
}

impl MigrationDevice for FailsStopCopyOnce {
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn owner(&self) -> vfio::Owner {
        self.inner.owner()
    }
    fn migration_flags(&self) -> Result<vfio::MigrationFlags, vfio::VfioError> {
        self.inner.migration_flags()
    }
    fn state(&self) -> Result<MigState, vfio::VfioError> {
        self.inner.state()
    }
    fn set_state(
        &mut self,
        target: MigState,
    ) -> Result<Option<std::os::fd::OwnedFd>, vfio::VfioError> {
        if self.armed && target == MigState::StopCopy {
            self.armed = false;
            self.inner.set_state(MigState::Stop)?;
            return Err(vfio::VfioError::SetState {
                device: self.name().to_owned(),
                from: MigState::Stop,
                to: MigState::StopCopy,
                target,
                now: Some(MigState::Stop),
                source: std::io::Error::from_raw_os_error(libc::ENOMEM),
            });
        }
        self.inner.set_state(target)
    }
    fn precopy_info(&self) -> Result<vfio::PrecopyInfo, vfio::VfioError> {
        self.inner.precopy_info()
    }
    fn stop_copy_size(&self) -> Result<u64, vfio::VfioError> {
        self.inner.stop_copy_size()
    }
    fn reset(&mut self) -> Result<(), vfio::VfioError> {
        self.inner.reset()
    }
}

/// The second device's SET to STOP_COPY fails after SWITCHOVER_START, the first one already
/// streams (a precopy device, from PRE_COPY): both are back in RUNNING, intact, the error names
/// the device, the destination resets its devices.
#[test]
fn a_failed_switch_to_stop_copy_loses_nothing() {
    let _serial = serial();
    for kind in ENGINES {
        let specs = [spec(0, 4 << 20, true, None), spec(1, 2 << 20, false, None)];
        let mut devices = sources(&specs);
        devices[1].device = Box::new(FailsStopCopyOnce {
            inner: SimSource::new(&id(1).to_string(), specs[1]).unwrap(),
            armed: true,
        });
        let base = open_fds();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let p = params(&listener, 2, Duration::from_secs(20));
        let dest = spawn_dest(
            listener,
            sinks(&specs),
            kind,
            2,
            Duration::from_secs(20),
            Arc::default(),
        );
        let run = precopy_source(&mut devices, kind, p, |_| false);
        let text = error_chain(&run.err);
        assert!(
            matches!(run.err, SessionError::DeviceState { .. }),
            "{kind:?}: {text}"
        );
        assert!(text.contains(&id(1).to_string()), "{kind:?}: {text}");
        assert_eq!(
            states(devices.iter().map(|d| d.device.as_ref())),
            vec![MigState::Running; 2],
            "{kind:?}: {text}"
        );
        let (dest_result, dest_devices) = dest.join().unwrap();
        assert!(dest_result.is_err(), "{kind:?}");
        assert_eq!(
            states(dest_devices.iter().map(|d| d.device.as_ref())),
            vec![MigState::Running; 2],
            "{kind:?}"
        );
        drop(dest_devices);
        assert_fds_settle(base, &format!("{kind:?} failed STOP_COPY"));
        migrate_again_and_verify(&mut devices, &specs, kind);
    }
}
