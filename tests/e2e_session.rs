//! The sessions through the library: simulated devices on real fds, real loopback sockets, and
//! the device states checked after success, a destination failure, a cancel and a stall.

// Test helpers unwrap too: a failed step is a failed test (clippy allows it only in #[test] fns).
#![allow(clippy::unwrap_used)]

use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use vfio::sim::fault::Fault;
use vfio::sim::{config_blob, DeviceSpeed, SimSink, SimSource, SimSpec};
use vfio::{MigState, MigrationDevice, MigrationFlags, Owner, PrecopyInfo, VfioError};
use vfio_multifd::config::ChannelOrder;
use vfio_multifd::engine::{self, DataPlaneError, Engine, EngineConfig, EngineKind, Progress};
use vfio_multifd::error::SessionError;
use vfio_multifd::session::dest::{DestInput, DestOutcome, DestParams, DestSession};
use vfio_multifd::session::link::{ControlLink, Notice, Phase, VmmCommand};
use vfio_multifd::session::source::{SourceInput, SourceOutcome, SourceParams, SourceSession};
use vfio_multifd::wire::{DeviceId, MultifdInitPacket};
use zerocopy::IntoBytes;

const UUID: [u8; 16] = *b"session-test-uid";
const CHUNK: usize = 256 << 10;

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

fn spec(i: u32, size: u64, speed: Option<u64>) -> SimSpec {
    SimSpec {
        size,
        seed: 100 + u64::from(i),
        precopy_initial: 0,
        precopy_dirty: 0,
        speed: speed.map(|rate| DeviceSpeed {
            save_bytes_per_sec: rate,
            load_bytes_per_sec: 0,
            per_read_latency: Duration::ZERO,
        }),
        config_len: 512,
    }
}

fn id(i: u32) -> DeviceId {
    DeviceId::new(format!("0000:{i:02x}:02.0/vfio"), 0).unwrap()
}

fn sources(n: u32, size: u64, speed: Option<u64>) -> Vec<SourceInput> {
    (0..n)
        .map(|i| {
            let device = SimSource::new(&id(i).to_string(), spec(i, size, speed)).unwrap();
            SourceInput {
                id: id(i),
                config: device.config_blob(),
                device: Box::new(device),
                precopy_fd: None,
            }
        })
        .collect()
}

fn sinks(n: u32, size: u64, seed_shift: u64) -> Vec<DestInput> {
    (0..n)
        .map(|i| {
            let mut spec = spec(i, size, None);
            spec.seed += seed_shift;
            DestInput {
                id: id(i),
                device: Box::new(SimSink::new(&id(i).to_string(), spec).unwrap()),
                expected_config: Some(config_blob(&spec)),
                max_queued_bytes: None,
            }
        })
        .collect()
}

fn states<'a>(devices: impl Iterator<Item = &'a dyn MigrationDevice>) -> Vec<MigState> {
    devices.map(|d| d.state().unwrap()).collect()
}

/// Runs a destination session on its own thread; returns its result and its devices.
fn spawn_dest(
    listener: TcpListener,
    mut devices: Vec<DestInput>,
    kind: EngineKind,
    channels: u8,
    timeout: Duration,
) -> thread::JoinHandle<(Result<DestOutcome, SessionError>, Vec<DestInput>)> {
    thread::spawn(move || {
        let params = DestParams {
            channels,
            uuid: UUID,
            chunk: CHUNK,
            timeout,
        };
        let result = DestSession::new(
            listener,
            params,
            &mut devices,
            engine(kind),
            Arc::new(Progress::default()),
        )
        .run();
        (result, devices)
    })
}

/// A threads-engine source session that must fail: its error.
fn failing_source(params: SourceParams, devices: &mut [SourceInput]) -> SessionError {
    SourceSession::new(
        params,
        devices,
        engine(EngineKind::Threads),
        Arc::new(Progress::default()),
    )
    .run()
    .unwrap_err()
}

fn source_params(listener: &TcpListener, channels: u8, timeout: Duration) -> SourceParams {
    SourceParams {
        connect: listener.local_addr().unwrap(),
        channels,
        uuid: UUID,
        chunk: CHUNK,
        timeout,
        order: ChannelOrder::Shuffle(3),
    }
}

#[test]
fn success_leaves_source_devices_stopped_and_destination_devices_running() {
    for (src_kind, dst_kind) in [
        (EngineKind::Threads, EngineKind::Threads),
        (EngineKind::Uring, EngineKind::Threads),
    ] {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let params = source_params(&listener, 3, Duration::from_secs(30));
        let dest = spawn_dest(
            listener,
            sinks(3, 1_500_000, 0),
            dst_kind,
            3,
            Duration::from_secs(30),
        );
        let mut devices = sources(3, 1_500_000, None);
        let outcome = SourceSession::new(
            params,
            &mut devices,
            engine(src_kind),
            Arc::new(Progress::default()),
        )
        .run()
        .unwrap();
        let (dest_result, dest_devices) = dest.join().unwrap();
        let dest_outcome = dest_result.unwrap();

        assert_eq!(
            states(devices.iter().map(|d| d.device.as_ref())),
            vec![MigState::Stop; 3]
        );
        assert_eq!(
            states(dest_devices.iter().map(|d| d.device.as_ref())),
            vec![MigState::Running; 3]
        );
        assert!(outcome.result.ok);
        assert_eq!(outcome.result.devices.len(), 3);
        for (i, result) in outcome.result.devices.iter().enumerate() {
            assert_eq!(result.bytes, 1_500_000);
            assert_eq!(result.idstr, id(i as u32).idstr);
        }
        for (input, config) in devices.iter().zip(&dest_outcome.configs) {
            assert_eq!(&input.config, config, "config blob handed over unchanged");
        }
        assert!(
            outcome.switchover_ns <= dest_outcome.loaded_ns,
            "downtime is positive"
        );
        assert!(dest_outcome.switchover_ns >= outcome.switchover_ns);
        let packets = 1_500_000usize.div_ceil(CHUNK);
        for report in &outcome.report.devices {
            assert_eq!(report.read_issued_ns.len(), packets);
        }
    }
}

/// A second source pointed at a destination that has all its channels (its channel 1 again) is
/// told no at once, not left in the listen backlog until the migration ends, and the migration
/// it would have joined completes.
#[test]
fn an_extra_connection_is_refused_while_the_migration_goes_on() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let params = source_params(&listener, 2, Duration::from_secs(30));
    let dest = spawn_dest(
        listener,
        sinks(2, 1_500_000, 0),
        EngineKind::Threads,
        2,
        Duration::from_secs(30),
    );
    let progress = Arc::new(Progress::default());
    let source = {
        let progress = progress.clone();
        // About 3 s at this speed: longer than the extra connection may be left waiting.
        let mut devices = sources(2, 1_500_000, Some(500_000));
        thread::spawn(move || {
            let outcome =
                SourceSession::new(params, &mut devices, engine(EngineKind::Threads), progress)
                    .run();
            (outcome, devices)
        })
    };
    // Device bytes flow only once every channel is connected.
    let deadline = Instant::now() + Duration::from_secs(10);
    while progress.bytes.load(Ordering::Relaxed) == 0 {
        assert!(Instant::now() < deadline, "the migration did not start");
        thread::sleep(Duration::from_millis(5));
    }
    let bound = Duration::from_secs(2);
    let started = Instant::now();
    match TcpStream::connect_timeout(&addr, bound) {
        Err(e) => assert_eq!(e.kind(), io::ErrorKind::ConnectionRefused, "{e}"),
        Ok(mut extra) => {
            // A reset may already fail this write; the read below says so too.
            let _ = extra.write_all(MultifdInitPacket::new(UUID, 1).as_bytes());
            extra.set_read_timeout(Some(bound)).unwrap();
            match extra.read(&mut [0u8; 1]) {
                Ok(0) => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionAborted
                    ) => {}
                other => panic!("the extra connection was left waiting: {other:?}"),
            }
        }
    }
    assert!(started.elapsed() < bound, "{:?}", started.elapsed());
    assert!(
        !source.is_finished(),
        "turned away by the migration's end, not by the destination refusing it"
    );
    let (outcome, devices) = source.join().unwrap();
    assert!(outcome.unwrap().result.ok);
    let (dest_result, dest_devices) = dest.join().unwrap();
    dest_result.unwrap();
    assert_eq!(
        states(devices.iter().map(|d| d.device.as_ref())),
        vec![MigState::Stop; 2]
    );
    assert_eq!(
        states(dest_devices.iter().map(|d| d.device.as_ref())),
        vec![MigState::Running; 2]
    );
}

/// A device that logs every state a session asks of it, in one log shared by all devices.
struct Recorded<D> {
    inner: D,
    index: usize,
    log: Arc<Mutex<Vec<(usize, MigState)>>>,
}

impl<D: MigrationDevice> MigrationDevice for Recorded<D> {
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn owner(&self) -> Owner {
        self.inner.owner()
    }
    fn migration_flags(&self) -> Result<MigrationFlags, VfioError> {
        self.inner.migration_flags()
    }
    fn state(&self) -> Result<MigState, VfioError> {
        self.inner.state()
    }
    fn set_state(&mut self, target: MigState) -> Result<Option<OwnedFd>, VfioError> {
        self.log.lock().unwrap().push((self.index, target));
        self.inner.set_state(target)
    }
    fn precopy_info(&self) -> Result<PrecopyInfo, VfioError> {
        self.inner.precopy_info()
    }
    fn stop_copy_size(&self) -> Result<u64, VfioError> {
        self.inner.stop_copy_size()
    }
    fn reset(&mut self) -> Result<(), VfioError> {
        self.inner.reset()
    }
}

/// The states asked of all devices, in order, with the device's index.
type StateLog = Arc<Mutex<Vec<(usize, MigState)>>>;

/// Wraps `device` so that the states asked of it go into `log` under `index`.
fn record(device: &mut Box<dyn MigrationDevice>, index: usize, log: &StateLog) {
    let placeholder = Box::new(SimSink::new("placeholder", spec(99, 16, None)).unwrap());
    let inner = std::mem::replace(device, placeholder);
    *device = Box::new(Recorded {
        inner,
        index,
        log: log.clone(),
    });
}

fn recorded_sources(n: u32, size: u64, log: &StateLog) -> Vec<SourceInput> {
    let mut inputs = sources(n, size, None);
    for (index, input) in inputs.iter_mut().enumerate() {
        record(&mut input.device, index, log);
    }
    inputs
}

/// Whether, in `log`, all `n` devices were asked for `p2p` before any was asked for `then`
/// (and each was asked for both).
fn all_p2p_before_any(log: &[(usize, MigState)], n: usize, p2p: MigState, then: MigState) -> bool {
    let first_then = log.iter().position(|&(_, s)| s == then);
    let p2p_at: Vec<usize> = (0..n)
        .filter_map(|d| log.iter().position(|&e| e == (d, p2p)))
        .collect();
    match first_then {
        Some(first) => p2p_at.len() == n && p2p_at.iter().all(|&at| at < first),
        None => false,
    }
}

/// The uAPI's P2P rule: every device is in a P2P state before any is stopped (switchover,
/// and back on rollback) or started (the destination without a VMM).
#[test]
fn every_device_reaches_p2p_before_any_stops_or_runs() {
    let log: StateLog = Arc::default();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let params = source_params(&listener, 2, Duration::from_secs(30));
    let mut dest_devices = sinks(3, 300_000, 0);
    for (index, input) in dest_devices.iter_mut().enumerate() {
        record(&mut input.device, 10 + index, &log);
    }
    let dest = spawn_dest(
        listener,
        dest_devices,
        EngineKind::Threads,
        2,
        Duration::from_secs(30),
    );
    let mut devices = recorded_sources(3, 300_000, &log);
    SourceSession::new(
        params,
        &mut devices,
        engine(EngineKind::Threads),
        Arc::new(Progress::default()),
    )
    .run()
    .unwrap();
    let (dest_result, _) = dest.join().unwrap();
    dest_result.unwrap();
    let all = log.lock().unwrap().clone();
    let source: Vec<_> = all.iter().copied().filter(|&(d, _)| d < 10).collect();
    let dest: Vec<_> = all
        .iter()
        .filter(|&&(d, _)| d >= 10)
        .map(|&(d, s)| (d - 10, s))
        .collect();
    assert!(
        all_p2p_before_any(&source, 3, MigState::RunningP2p, MigState::StopCopy),
        "{source:?}"
    );
    assert!(
        all_p2p_before_any(&dest, 3, MigState::RunningP2p, MigState::Running),
        "{dest:?}"
    );

    // Rollback: the destination rejects every device; the source returns them to RUNNING.
    let log: StateLog = Arc::default();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let params = source_params(&listener, 2, Duration::from_secs(30));
    let dest = spawn_dest(
        listener,
        sinks(3, 300_000, 1000),
        EngineKind::Threads,
        2,
        Duration::from_secs(30),
    );
    let mut devices = recorded_sources(3, 300_000, &log);
    failing_source(params, &mut devices);
    let _ = dest.join().unwrap();
    let source = log.lock().unwrap().clone();
    let after_stop: Vec<_> = source
        .iter()
        .copied()
        .skip_while(|&(_, s)| s != MigState::StopCopy)
        .filter(|&(_, s)| s != MigState::StopCopy)
        .collect();
    assert!(
        all_p2p_before_any(&after_stop, 3, MigState::RunningP2p, MigState::Running),
        "{source:?}"
    );
    assert_eq!(
        states(devices.iter().map(|d| d.device.as_ref())),
        vec![MigState::Running; 3]
    );
}

#[test]
fn destination_rejection_returns_source_devices_to_running() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let params = source_params(&listener, 2, Duration::from_secs(30));
    // The destination expects other content for every device.
    let dest = spawn_dest(
        listener,
        sinks(2, 1 << 20, 1000),
        EngineKind::Threads,
        2,
        Duration::from_secs(30),
    );
    let mut devices = sources(2, 1 << 20, None);
    let err = failing_source(params, &mut devices);
    let text = vfio_multifd::error::error_chain(&err);
    assert!(
        matches!(err, SessionError::DestinationFailed { .. }),
        "{text}"
    );
    assert!(
        text.contains(&id(0).to_string()),
        "names the device: {text}"
    );
    assert_eq!(
        states(devices.iter().map(|d| d.device.as_ref())),
        vec![MigState::Running; 2]
    );

    let (dest_result, dest_devices) = dest.join().unwrap();
    assert!(dest_result.is_err());
    // The helper owns the simulated sinks: it reset them.
    assert_eq!(
        states(dest_devices.iter().map(|d| d.device.as_ref())),
        vec![MigState::Running; 2]
    );
}

/// Fails with the error chain of whichever side failed (`what` says which run it was).
fn both_succeeded<S, D>(
    what: &str,
    first: &Result<S, SessionError>,
    second: &Result<D, SessionError>,
) {
    if let Some(err) = first.as_ref().err().or(second.as_ref().err()) {
        panic!("{what}: {}", vfio_multifd::error::error_chain(err));
    }
}

/// A migration of `n` simulated devices of `size` bytes over 2 channels with `kind` on both
/// sides, device `faulty` failing as `fault` says: the source's result, its devices and the
/// destination's result.
fn migrate_with_a_faulty_source(
    kind: EngineKind,
    n: u32,
    size: u64,
    faulty: u32,
    fault: Fault,
) -> (
    Result<SourceOutcome, SessionError>,
    Vec<SourceInput>,
    Result<DestOutcome, SessionError>,
) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let params = source_params(&listener, 2, Duration::from_secs(30));
    let dest = spawn_dest(
        listener,
        sinks(n, size, 0),
        kind,
        2,
        Duration::from_secs(30),
    );
    let mut devices = sources(n, size, None);
    let device =
        SimSource::with_fault(&id(faulty).to_string(), spec(faulty, size, None), fault).unwrap();
    devices[faulty as usize].device = Box::new(device);
    let result = SourceSession::new(
        params,
        &mut devices,
        engine(kind),
        Arc::new(Progress::default()),
    )
    .run();
    let (dest_result, _) = dest.join().unwrap();
    (result, devices, dest_result)
}

/// A source device whose data_fd fails (EIO, mid-stream) is named as the cause, with both
/// engines: the destination's "every channel closed" that follows it is only its consequence.
#[test]
fn a_source_device_read_error_is_reported_as_ours_not_the_destinations() {
    for kind in [EngineKind::Uring, EngineKind::Threads] {
        let fault = Fault::Errno {
            at: 300 << 10,
            errno: libc::EIO,
        };
        let (result, devices, dest_result) =
            migrate_with_a_faulty_source(kind, 2, 1 << 20, 1, fault);
        let err = result.unwrap_err();
        let text = vfio_multifd::error::error_chain(&err);
        assert!(
            matches!(
                err,
                SessionError::DataPlane {
                    source: DataPlaneError::ReadDevice { .. },
                    ..
                }
            ),
            "{kind:?}: {text}"
        );
        assert!(text.contains(&id(1).to_string()), "{kind:?}: {text}");
        assert_eq!(
            states(devices.iter().map(|d| d.device.as_ref())),
            vec![MigState::Running; 2]
        );
        assert!(dest_result.is_err());
    }
}

/// A data_fd that says EAGAIN mid-stream (an O_NONBLOCK mlx5 data_fd with nothing saved yet)
/// is waited for, not failed, with either engine: every byte arrives, in order.
#[test]
fn a_source_device_saying_eagain_mid_stream_is_waited_for_with_either_engine() {
    for kind in [EngineKind::Uring, EngineKind::Threads] {
        let fault = Fault::NotReady {
            at: 700 << 10,
            reads: 5,
        };
        let (result, _, dest_result) = migrate_with_a_faulty_source(kind, 1, 2 << 20, 0, fault);
        both_succeeded(&format!("{kind:?}"), &result, &dest_result);
    }
}

/// A sink whose resuming data_fd is O_NONBLOCK, as an event-loop VMM may hand it over.
struct NonBlockingSink(SimSink);

impl MigrationDevice for NonBlockingSink {
    fn name(&self) -> &str {
        self.0.name()
    }
    fn owner(&self) -> Owner {
        self.0.owner()
    }
    fn migration_flags(&self) -> Result<MigrationFlags, VfioError> {
        self.0.migration_flags()
    }
    fn state(&self) -> Result<MigState, VfioError> {
        self.0.state()
    }
    fn set_state(&mut self, target: MigState) -> Result<Option<OwnedFd>, VfioError> {
        use nix::fcntl::{fcntl, FcntlArg, OFlag};
        let fd = self.0.set_state(target)?;
        if let Some(fd) = &fd {
            let flags = OFlag::from_bits_truncate(fcntl(fd, FcntlArg::F_GETFL).unwrap());
            fcntl(fd, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK)).unwrap();
        }
        Ok(fd)
    }
    fn precopy_info(&self) -> Result<PrecopyInfo, VfioError> {
        self.0.precopy_info()
    }
    fn stop_copy_size(&self) -> Result<u64, VfioError> {
        self.0.stop_copy_size()
    }
    fn reset(&mut self) -> Result<(), VfioError> {
        self.0.reset()
    }
    fn load_done_ns(&self) -> Option<u64> {
        self.0.load_done_ns()
    }
}

/// A resuming data_fd that is O_NONBLOCK and says EAGAIN while the device's buffer is full (a
/// pipe drained at the device's pace) is waited for, not failed, with either engine.
#[test]
fn a_destination_device_saying_eagain_is_waited_for_with_either_engine() {
    for kind in [EngineKind::Uring, EngineKind::Threads] {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let params = source_params(&listener, 2, Duration::from_secs(30));
        let size = 4 << 20;
        let mut paced = spec(0, size, None);
        paced.speed = Some(DeviceSpeed {
            save_bytes_per_sec: 0,
            load_bytes_per_sec: 16 << 20,
            per_read_latency: Duration::ZERO,
        });
        let sink = SimSink::new(&id(0).to_string(), paced).unwrap();
        let dest = spawn_dest(
            listener,
            vec![DestInput {
                id: id(0),
                device: Box::new(NonBlockingSink(sink)),
                expected_config: Some(config_blob(&spec(0, size, None))),
                max_queued_bytes: None,
            }],
            kind,
            2,
            Duration::from_secs(30),
        );
        let mut devices = sources(1, size, None);
        let result = SourceSession::new(
            params,
            &mut devices,
            engine(kind),
            Arc::new(Progress::default()),
        )
        .run();
        let (dest_result, _) = dest.join().unwrap();
        both_succeeded(&format!("{kind:?}"), &dest_result, &result);
    }
}

/// Precopy data, which the destination writes from its main-channel reader, waits for an
/// O_NONBLOCK resuming data_fd that says EAGAIN too (here under a VMM-driven source whose
/// helper-driven device streams precopy).
#[test]
fn precopy_data_waits_for_a_destination_device_saying_eagain() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let params = source_params(&listener, 2, Duration::from_secs(30));
    let size = 4 << 20;
    let mut device_spec = spec(0, size, None);
    device_spec.precopy_initial = 3 << 20;
    let mut paced = device_spec;
    paced.speed = Some(DeviceSpeed {
        save_bytes_per_sec: 0,
        load_bytes_per_sec: 16 << 20,
        per_read_latency: Duration::ZERO,
    });
    let sink = SimSink::new(&id(0).to_string(), paced).unwrap();
    let dest = spawn_dest(
        listener,
        vec![DestInput {
            id: id(0),
            device: Box::new(NonBlockingSink(sink)),
            expected_config: Some(config_blob(&device_spec)),
            max_queued_bytes: None,
        }],
        EngineKind::Threads,
        2,
        Duration::from_secs(30),
    );
    let source = SimSource::new(&id(0).to_string(), device_spec).unwrap();
    let mut devices = vec![SourceInput {
        id: id(0),
        config: source.config_blob(),
        device: Box::new(source),
        precopy_fd: None,
    }];
    let (notices, notice_rx) = mpsc::channel();
    let link = ControlLink {
        vmm_driven: vec![false],
        data_fds: vec![None],
        precopy: vec![true],
        passed: None,
        precopy_bytes: Arc::new(AtomicU64::new(0)),
        notify: Box::new(move |n: Notice| {
            let _ = notices.send(n);
        }),
    };
    let session = SourceSession::new(
        params,
        &mut devices,
        engine(EngineKind::Threads),
        Arc::new(Progress::default()),
    )
    .with_control(link);
    let commander = session.commander();
    let vmm = thread::spawn(move || {
        while let Ok(notice) = notice_rx.recv() {
            if matches!(notice, Notice::SwitchoverAck) {
                commander.send(VmmCommand::SwitchoverStart { updates: vec![] });
            }
        }
    });
    let result = session.run();
    let (dest_result, _) = dest.join().unwrap();
    vmm.join().unwrap();
    both_succeeded("", &dest_result, &result);
}

#[test]
fn borrowed_destination_devices_are_named_not_reset() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let params = source_params(&listener, 2, Duration::from_secs(30));
    // The right config blob but other stream content: RESUMING -> STOP rejects the stream.
    let right = spec(0, 1 << 20, None);
    let mut wrong = right;
    wrong.seed += 1000;
    let borrowed = vec![DestInput {
        id: id(0),
        device: Box::new(
            SimSink::new(&id(0).to_string(), wrong)
                .unwrap()
                .with_owner(Owner::Vmm),
        ),
        expected_config: Some(config_blob(&right)),
        max_queued_bytes: None,
    }];
    let dest = spawn_dest(
        listener,
        borrowed,
        EngineKind::Threads,
        2,
        Duration::from_secs(30),
    );
    let mut devices = sources(1, 1 << 20, None);
    let err = failing_source(params, &mut devices);
    assert!(
        matches!(err, SessionError::DestinationFailed { .. }),
        "{err:?}"
    );
    assert_eq!(devices[0].device.state().unwrap(), MigState::Running);
    let (dest_result, dest_devices) = dest.join().unwrap();
    let text = vfio_multifd::error::error_chain(&dest_result.unwrap_err());
    assert!(text.contains("for the VMM to recover"), "{text}");
    assert_eq!(
        dest_devices[0].device.state().unwrap(),
        MigState::Error,
        "not reset by the helper"
    );
}

#[test]
fn cancel_mid_stream_rolls_both_sides_back() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let params = source_params(&listener, 2, Duration::from_secs(30));
    let dest = spawn_dest(
        listener,
        sinks(2, 16 << 20, 0),
        EngineKind::Threads,
        2,
        Duration::from_secs(30),
    );
    // 16 MiB at 32 MiB/s per device: half a second of streaming, cancelled after 150 ms.
    let mut devices = sources(2, 16 << 20, Some(32 << 20));
    let progress = Arc::new(Progress::default());
    let canceller = {
        let progress = progress.clone();
        thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(10);
            while progress.bytes.load(Ordering::Relaxed) == 0 && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(5));
            }
            thread::sleep(Duration::from_millis(150));
            progress.cancel.store(true, Ordering::Relaxed);
        })
    };
    let started = Instant::now();
    let err = SourceSession::new(params, &mut devices, engine(EngineKind::Threads), progress)
        .run()
        .unwrap_err();
    canceller.join().unwrap();
    assert!(matches!(err, SessionError::Cancelled { .. }), "{err:?}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "cancel is prompt"
    );
    assert_eq!(
        states(devices.iter().map(|d| d.device.as_ref())),
        vec![MigState::Running; 2]
    );

    let (dest_result, dest_devices) = dest.join().unwrap();
    let err = dest_result.unwrap_err();
    let text = vfio_multifd::error::error_chain(&err);
    assert!(
        matches!(
            err,
            SessionError::SourceVanished { .. } | SessionError::SourceVanishedMidStream { .. }
        ),
        "{text}"
    );
    assert_eq!(
        states(dest_devices.iter().map(|d| d.device.as_ref())),
        vec![MigState::Running; 2]
    );
}

#[test]
fn a_destination_that_never_answers_is_a_stall_not_a_hang() {
    // Connections complete in the kernel's backlog, but nobody reads or answers.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let params = source_params(&listener, 2, Duration::from_millis(500));
    let mut devices = sources(1, 64 << 10, None);
    let started = Instant::now();
    let err = failing_source(params, &mut devices);
    assert!(matches!(err, SessionError::Stalled { .. }), "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(devices[0].device.state().unwrap(), MigState::Running);
    drop(listener);
}

/// A source that sends its EOF and closes the main channel without waiting for the result is
/// told as that, not as one that ended "before EOF"; the destination fails (the source cannot
/// learn the outcome, so its devices must not run here too).
#[test]
fn a_source_that_leaves_after_its_eof_is_named_as_such() {
    use std::io::Write;
    use vfio_multifd::session::main_channel::{
        encode_completion, encode_setup, encode_switchover_start, Setup,
    };
    use zerocopy::IntoBytes;
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let dest = spawn_dest(
        listener,
        sinks(1, 64 << 10, 0),
        EngineKind::Threads,
        1,
        Duration::from_secs(10),
    );
    let setup = Setup {
        uuid: UUID,
        channels: 1,
        chunk: CHUNK as u64,
        devices: vec![id(0)],
        precopy: Vec::new(),
    };
    let mut main = std::net::TcpStream::connect(addr).unwrap();
    main.write_all(&encode_setup(&setup).unwrap()).unwrap();
    let mut channel = std::net::TcpStream::connect(addr).unwrap();
    channel
        .write_all(vfio_multifd::wire::MultifdInitPacket::new(UUID, 0).as_bytes())
        .unwrap();
    main.write_all(&encode_switchover_start()).unwrap();
    main.write_all(&encode_completion(1)).unwrap();
    thread::sleep(Duration::from_millis(200));
    drop(main);
    let (result, devices) = dest.join().unwrap();
    let err = result.unwrap_err();
    let text = vfio_multifd::error::error_chain(&err);
    assert!(
        matches!(err, SessionError::SourceLeftBeforeResult { .. }),
        "{text}"
    );
    assert_eq!(
        states(devices.iter().map(|d| d.device.as_ref())),
        vec![MigState::Running]
    );
    drop(channel);
}

/// A destination for one 64 KiB device whose sink takes no bytes for 3 s near its end: the
/// source's bytes are all in socket buffers by then, so it waits for the result.
fn spawn_stalling_dest(
    listener: TcpListener,
) -> thread::JoinHandle<(Result<DestOutcome, SessionError>, Vec<DestInput>)> {
    let sink_spec = spec(0, 64 << 10, None);
    let sink = SimSink::with_fault(
        "slow-sink",
        sink_spec,
        Fault::Stall {
            at: 60 << 10,
            duration: Duration::from_secs(3),
        },
    )
    .unwrap();
    spawn_dest(
        listener,
        vec![DestInput {
            id: id(0),
            device: Box::new(sink),
            expected_config: Some(config_blob(&sink_spec)),
            max_queued_bytes: None,
        }],
        EngineKind::Threads,
        2,
        Duration::from_secs(10),
    )
}

/// Everything sent, then no result within the timeout: the destination may already be
/// running the VM, so the source stops its devices instead of resuming them, and says the
/// outcome is unknown. (The destination's device takes no bytes for 3 s near the end; the
/// source's 64 KiB are all in socket buffers by then.)
#[test]
fn no_result_after_everything_was_sent_leaves_the_source_stopped() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let params = source_params(&listener, 2, Duration::from_millis(500));
    let dest = spawn_stalling_dest(listener);
    let mut devices = sources(1, 64 << 10, None);
    let err = failing_source(params, &mut devices);
    assert!(
        matches!(err, SessionError::OutcomeUnknown { .. }),
        "{}",
        vfio_multifd::error::error_chain(&err)
    );
    assert_eq!(devices[0].device.state().unwrap(), MigState::Stop);
    let _ = dest.join().unwrap();
}

/// A VMM's cancel after everything was sent (the control thread sets the flag and wakes the
/// session): the outcome is as unknown as after a stall, so the source stops its devices and
/// does not resume them beside a destination that may run the VM.
#[test]
fn a_cancel_while_waiting_for_the_result_leaves_the_source_stopped() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let params = source_params(&listener, 2, Duration::from_secs(10));
    let dest = spawn_stalling_dest(listener);
    let (notices, notice_rx) = mpsc::channel();
    let link = ControlLink {
        vmm_driven: vec![false],
        data_fds: vec![None],
        precopy: vec![false],
        passed: None,
        precopy_bytes: Arc::new(AtomicU64::new(0)),
        notify: Box::new(move |n: Notice| {
            let _ = notices.send(n);
        }),
    };
    let mut devices = sources(1, 64 << 10, None);
    let progress = Arc::new(Progress::default());
    let session = SourceSession::new(
        params,
        &mut devices,
        engine(EngineKind::Threads),
        progress.clone(),
    )
    .with_control(link);
    let commander = session.commander();
    let vmm = thread::spawn(move || {
        while let Ok(notice) = notice_rx.recv() {
            match notice {
                Notice::SwitchoverAck => {
                    assert!(commander.send(VmmCommand::SwitchoverStart { updates: vec![] }))
                }
                Notice::Phase(Phase::StopCopy) => {
                    // The 64 KiB are sent within milliseconds; the sink stalls for 3 s.
                    thread::sleep(Duration::from_secs(1));
                    progress.cancel.store(true, Ordering::Relaxed);
                    commander.send(VmmCommand::Wake);
                    return;
                }
                _ => {}
            }
        }
    });
    let err = session.run().unwrap_err();
    vmm.join().unwrap();
    assert!(
        matches!(err, SessionError::OutcomeUnknown { .. }),
        "{}",
        vfio_multifd::error::error_chain(&err)
    );
    assert_eq!(devices[0].device.state().unwrap(), MigState::Stop);
    let _ = dest.join().unwrap();
}

#[test]
fn a_source_that_never_connects_times_the_destination_out() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let dest = spawn_dest(
        listener,
        sinks(1, 4096, 0),
        EngineKind::Threads,
        2,
        Duration::from_millis(300),
    );
    let (result, devices) = dest.join().unwrap();
    let err = result.unwrap_err();
    let text = vfio_multifd::error::error_chain(&err);
    assert!(text.contains("0 of 2 multifd channels"), "{text}");
    assert_eq!(
        devices[0].device.state().unwrap(),
        MigState::Running,
        "never touched"
    );
}

/// A hostile source over loopback TCP: its setup announces a precopy device, then a precopy
/// SECTION_PART declares 4 GiB of data and the source stalls with the channel open. The
/// destination refuses the record at its size field, long before its 10 s timeout, names
/// the main channel, the section and the device, and resets its device.
#[test]
fn a_precopy_part_declaring_4_gib_is_refused_at_once_naming_section_and_device() {
    use std::io::Write;
    use vfio_multifd::session::main_channel::{encode_setup, Setup};
    use vfio_multifd::wire::main_stream::VFIO_MIG_FLAG_DEV_DATA_STATE;
    use zerocopy::IntoBytes;
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let dest = spawn_dest(
        listener,
        sinks(1, 64 << 10, 0),
        EngineKind::Threads,
        1,
        Duration::from_secs(10),
    );
    let setup = Setup {
        uuid: UUID,
        channels: 1,
        chunk: CHUNK as u64,
        devices: vec![id(0)],
        precopy: vec![0],
    };
    let started = Instant::now();
    let mut main = std::net::TcpStream::connect(addr).unwrap();
    main.write_all(&encode_setup(&setup).unwrap()).unwrap();
    let mut channel = std::net::TcpStream::connect(addr).unwrap();
    channel
        .write_all(vfio_multifd::wire::MultifdInitPacket::new(UUID, 0).as_bytes())
        .unwrap();
    let mut part = vec![0x02, 0, 0, 0, 0];
    part.extend(VFIO_MIG_FLAG_DEV_DATA_STATE.to_be_bytes());
    part.extend((4u64 << 30).to_be_bytes());
    part.extend([0x5a; 100]);
    main.write_all(&part).unwrap();
    let (result, devices) = dest.join().unwrap();
    let err = result.unwrap_err();
    let text = vfio_multifd::error::error_chain(&err);
    assert!(started.elapsed() < Duration::from_secs(5), "{text}");
    assert!(
        text.contains("main channel")
            && text.contains(&format!("section 0 (device {})", id(0)))
            && text.contains("a length field is too large"),
        "{text}"
    );
    assert_eq!(
        vfio_multifd::session::link::locate(&err).device,
        Some(id(0).to_string())
    );
    assert_eq!(
        states(devices.iter().map(|d| d.device.as_ref())),
        vec![MigState::Running]
    );
    drop((main, channel));
}

/// A peer over loopback TCP whose main channel opens with a wrong magic ("QEVX"), then
/// stalls: the destination refuses it at once, saying which magic it got, instead of waiting
/// its whole timeout for a multifd init packet.
#[test]
fn a_connection_with_neither_magic_is_refused_at_once() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let dest = spawn_dest(
        listener,
        sinks(1, 64 << 10, 0),
        EngineKind::Threads,
        1,
        Duration::from_secs(10),
    );
    let started = Instant::now();
    let mut main = TcpStream::connect(addr).unwrap();
    main.write_all(b"QEVX\x00\x00\x00\x03").unwrap();
    let (result, devices) = dest.join().unwrap();
    let text = vfio_multifd::error::error_chain(&result.unwrap_err());
    assert!(started.elapsed() < Duration::from_secs(5), "{text}");
    assert!(
        text.contains("received packet magic 51455658, expected 11223344"),
        "{text}"
    );
    assert_eq!(
        states(devices.iter().map(|d| d.device.as_ref())),
        vec![MigState::Running]
    );
    drop(main);
}
