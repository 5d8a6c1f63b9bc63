//! Engine conformance: the same cases for every engine, over real loopback TCP sockets and real
//! fds (memfds, pipes). The harness does what a session does before an engine runs: it connects
//! N channels, writes and validates the 64-byte init packets, and hands the destination its
//! channels in the order the init packet ids say (the connections are made in a scrambled
//! order). Bad-input cases write hand-made streams into `run_dest`.
//!
//! Conventions every engine follows (checked here):
//! - `ChannelReport::bytes` counts wire bytes after the init packet (headers included);
//! - `Progress` counts device data bytes and data packets (not the config packet);
//! - error offsets are stream offsets counted from the start of the channel, init packet
//!   included, and name the start of the offending packet.
//!
//! A uring case where the engine cannot be set up here (no io_uring, refused by seccomp,
//! forbidden, or no memory for its buffers) prints why and passes.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::OwnedFd;
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use nix::sys::memfd::{memfd_create, MFdFlags};
use zerocopy::IntoBytes;

use super::*;
use crate::session::reassembly::ReassemblyError;
use crate::wire::{
    write_packet_headers, InitExpectation, MultifdInitPacket, WireError, INIT_PACKET_LEN,
    PACKET_HEADER_ROOM,
};

/// A run that takes longer than this is a hang.
const TIMEOUT: Duration = Duration::from_secs(60);
/// After a hang, how long cancel may take to stop it.
const CANCEL_GRACE: Duration = Duration::from_secs(10);
const UUID: [u8; 16] = *b"conformance-uuid";
/// Wire bytes of a packet besides its data: device-state header + VFIO header.
const OVERHEAD: u64 = PACKET_HEADER_ROOM as u64;

fn test_config() -> EngineConfig {
    EngineConfig {
        workers: 2,
        chunk_size: 64 << 10,
        pool_buffers: 16,
        ..EngineConfig::default()
    }
}

/// The engine of `kind`, or `None` (with the reason printed) where it cannot be built here.
fn engine_or_skip(kind: EngineKind, config: &EngineConfig) -> Option<Box<dyn Engine>> {
    if kind == EngineKind::Uring {
        if let Err(why) = super::uring::UringEngine::new(config.clone()) {
            println!("skipping the uring case: the uring engine is unavailable ({why})");
            return None;
        }
    }
    let engine = select(kind, config);
    assert_eq!(engine.kind(), kind, "select() gave another engine");
    Some(engine)
}

fn device_id(i: usize) -> DeviceId {
    DeviceId::new(format!("0000:00:{:02x}.0/vfio", i + 2), i as u32 % 2).unwrap()
}

/// Deterministic bytes, different per seed.
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// Connection order for `n` channels: neither ascending nor descending.
fn scrambled(n: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).rev().collect();
    order.rotate_left(n / 3);
    order
}

/// `n` loopback TCP channels with init packets exchanged: (source ends by id, destination
/// ends by the id their init packet carried).
fn channel_streams(n: usize) -> (Vec<TcpStream>, Vec<TcpStream>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let mut src: Vec<Option<TcpStream>> = (0..n).map(|_| None).collect();
    for id in scrambled(n) {
        let mut stream = TcpStream::connect(addr).unwrap();
        stream
            .write_all(MultifdInitPacket::new(UUID, id as u8).as_bytes())
            .unwrap();
        src[id] = Some(stream);
    }
    let expect = InitExpectation {
        uuid: UUID,
        channels: n as u8,
    };
    let mut dst: Vec<Option<TcpStream>> = (0..n).map(|_| None).collect();
    for _ in 0..n {
        let (mut stream, _) = listener.accept().unwrap();
        let mut init = [0u8; INIT_PACKET_LEN];
        stream.read_exact(&mut init).unwrap();
        let id = MultifdInitPacket::decode(&init, &expect).unwrap() as usize;
        assert!(dst[id].is_none(), "init packet id {id} twice");
        dst[id] = Some(stream);
    }
    (
        src.into_iter().map(Option::unwrap).collect(),
        dst.into_iter().map(Option::unwrap).collect(),
    )
}

fn channel_pairs(n: usize) -> (Vec<OwnedFd>, Vec<OwnedFd>) {
    let (src, dst) = channel_streams(n);
    (
        src.into_iter().map(OwnedFd::from).collect(),
        dst.into_iter().map(OwnedFd::from).collect(),
    )
}

fn memfd_with(bytes: &[u8]) -> OwnedFd {
    let mut file = File::from(memfd_create("conformance-src", MFdFlags::MFD_CLOEXEC).unwrap());
    file.write_all(bytes).unwrap();
    file.seek(SeekFrom::Start(0)).unwrap();
    OwnedFd::from(file)
}

/// A pipe whose write end a thread feeds `piece` bytes at a time with pauses, so reads of more
/// than `piece` bytes come back short.
fn pipe_fed(bytes: Vec<u8>, piece: usize) -> (OwnedFd, JoinHandle<()>) {
    let (read, write) = vfio::fd::pipe().unwrap();
    let feeder = thread::Builder::new()
        .name("test-feed".into())
        .spawn(move || {
            let mut write = File::from(write);
            for chunk in bytes.chunks(piece) {
                if write.write_all(chunk).is_err() {
                    return; // the engine failed and closed the read end
                }
                thread::sleep(Duration::from_micros(50));
            }
        })
        .unwrap();
    (read, feeder)
}

/// Where a destination device's bytes end up.
enum Sink {
    /// A memfd; the clone reads it back afterwards.
    Memfd(OwnedFd),
    /// A pipe drained by a thread until EOF (the engine dropping its end).
    Pipe(JoinHandle<Vec<u8>>),
}

impl Sink {
    fn memfd() -> (OwnedFd, Sink) {
        let fd = memfd_create("conformance-dst", MFdFlags::MFD_CLOEXEC).unwrap();
        let keep = fd.try_clone().unwrap();
        (fd, Sink::Memfd(keep))
    }

    fn pipe() -> (OwnedFd, Sink) {
        let (read, write) = vfio::fd::pipe().unwrap();
        let drain = thread::Builder::new()
            .name("test-drain".into())
            .spawn(move || {
                let mut out = Vec::new();
                File::from(read).read_to_end(&mut out).unwrap();
                out
            })
            .unwrap();
        (write, Sink::Pipe(drain))
    }

    fn contents(self) -> Vec<u8> {
        match self {
            Sink::Memfd(fd) => {
                let mut file = File::from(fd);
                file.seek(SeekFrom::Start(0)).unwrap();
                let mut out = Vec::new();
                file.read_to_end(&mut out).unwrap();
                out
            }
            Sink::Pipe(drain) => drain.join().unwrap(),
        }
    }
}

/// Runs `f` on its own thread; the answer arrives on the receiver.
fn spawn_side<T: Send + 'static>(
    name: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> mpsc::Receiver<T> {
    let (tx, rx) = mpsc::channel();
    thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            let _ = tx.send(f());
        })
        .unwrap();
    rx
}

/// Waits for a side within [`TIMEOUT`]; on a hang it cancels every progress and fails.
fn await_side<T>(rx: &mpsc::Receiver<T>, cancel: &[&Arc<Progress>], what: &str) -> T {
    match rx.recv_timeout(TIMEOUT) {
        Ok(result) => result,
        Err(_) => {
            for progress in cancel {
                progress.cancel.store(true, Ordering::Relaxed);
            }
            match rx.recv_timeout(CANCEL_GRACE) {
                Ok(_) => panic!("{what} hung for {TIMEOUT:?} (it did stop on cancel)"),
                Err(_) => panic!("{what} hung for {TIMEOUT:?} and ignored cancel"),
            }
        }
    }
}

#[derive(Clone)]
enum Source {
    Memfd,
    /// Fed `piece` bytes at a time: reads come back short.
    Pipe {
        piece: usize,
    },
    /// A fd that cannot be read (a pipe's write end): the read fails.
    Unreadable,
}

#[derive(Clone, Copy, PartialEq)]
enum SinkKind {
    Memfd,
    Pipe,
}

#[derive(Clone)]
struct DevSpec {
    size: usize,
    read_size: usize,
    source: Source,
    sink: SinkKind,
    config_len: usize,
}

impl DevSpec {
    fn memfd(size: usize, read_size: usize) -> Self {
        Self {
            size,
            read_size,
            source: Source::Memfd,
            sink: SinkKind::Memfd,
            config_len: 77,
        }
    }
}

fn data_of(i: usize, spec: &DevSpec) -> Vec<u8> {
    pattern(i as u64 * 1000 + spec.size as u64, spec.size)
}

fn config_of(i: usize, spec: &DevSpec) -> Vec<u8> {
    pattern(!(i as u64), spec.config_len)
}

struct Transfer {
    channels: usize,
    devices: Vec<DevSpec>,
    config: EngineConfig,
}

impl Transfer {
    fn new(channels: usize, devices: Vec<DevSpec>) -> Self {
        Self {
            channels,
            devices,
            config: test_config(),
        }
    }
}

struct Outcome {
    source: Result<SourceReport, DataPlaneError>,
    dest: Result<DestReport, DataPlaneError>,
    source_progress: Arc<Progress>,
    dest_progress: Arc<Progress>,
    received: Vec<Vec<u8>>,
    /// Both runs, from spawning them to their return (setup and checks excluded).
    elapsed: Duration,
}

/// Runs a source engine and a destination engine against each other over real channels.
fn run_transfer(src_kind: EngineKind, dst_kind: EngineKind, t: &Transfer) -> Option<Outcome> {
    let src_engine = engine_or_skip(src_kind, &t.config)?;
    let dst_engine = engine_or_skip(dst_kind, &t.config)?;
    let (src_channels, dst_channels) = channel_pairs(t.channels);
    let mut feeders = Vec::new();
    let mut source_devices = Vec::new();
    let mut dest_devices = Vec::new();
    let mut sinks = Vec::new();
    for (i, spec) in t.devices.iter().enumerate() {
        let data = data_of(i, spec);
        let data_fd = match spec.source {
            Source::Memfd => memfd_with(&data),
            Source::Pipe { piece } => {
                let (fd, feeder) = pipe_fed(data, piece);
                feeders.push(feeder);
                fd
            }
            Source::Unreadable => vfio::fd::pipe().unwrap().1,
        };
        source_devices.push(SourceDevice {
            id: device_id(i),
            data_fd,
            read_size: spec.read_size,
            config: config_of(i, spec),
        });
        let (data_fd, sink) = match spec.sink {
            SinkKind::Memfd => Sink::memfd(),
            SinkKind::Pipe => Sink::pipe(),
        };
        dest_devices.push(DestDevice {
            id: device_id(i),
            data_fd,
            max_queued_bytes: None,
        });
        sinks.push(sink);
    }
    let source_progress = Arc::new(Progress::default());
    let dest_progress = Arc::new(Progress::default());
    let dest_plan = DestPlan {
        devices: dest_devices,
        channels: dst_channels,
        progress: dest_progress.clone(),
    };
    let source_plan = SourcePlan {
        devices: source_devices,
        channels: src_channels,
        progress: source_progress.clone(),
    };
    let started = Instant::now();
    let dest_rx = spawn_side("test-dest", move || dst_engine.run_dest(dest_plan));
    let source_rx = spawn_side("test-source", move || src_engine.run_source(source_plan));
    let both = [&source_progress, &dest_progress];
    let source = await_side(&source_rx, &both, "run_source");
    if source.is_err() {
        // The destination cannot finish without its peer; stop it rather than wait.
        dest_progress.cancel.store(true, Ordering::Relaxed);
    }
    let dest = await_side(&dest_rx, &both, "run_dest");
    let elapsed = started.elapsed();
    for feeder in feeders {
        feeder.join().unwrap();
    }
    let received = sinks.into_iter().map(Sink::contents).collect();
    Some(Outcome {
        source,
        dest,
        source_progress,
        dest_progress,
        received,
        elapsed,
    })
}

/// Everything a correct transfer must show: bytes, configs, counts, timestamps.
fn verify(t: &Transfer, out: Outcome) {
    let source = out
        .source
        .unwrap_or_else(|e| panic!("run_source failed: {e} ({e:?})"));
    let dest = out
        .dest
        .unwrap_or_else(|e| panic!("run_dest failed: {e} ({e:?})"));
    assert_eq!(source.devices.len(), t.devices.len());
    assert_eq!(dest.devices.len(), t.devices.len());
    let (mut total_bytes, mut total_packets, mut total_wire) = (0u64, 0u64, 0u64);
    for (i, spec) in t.devices.iter().enumerate() {
        let id = device_id(i);
        let (s, d) = (&source.devices[i], &dest.devices[i]);
        assert!(
            out.received[i] == data_of(i, spec),
            "device {id}: destination got {} bytes, not the source's {} bytes",
            out.received[i].len(),
            spec.size
        );
        assert_eq!(d.config, config_of(i, spec), "device {id}: config blob");
        assert_eq!(s.bytes, spec.size as u64, "device {id}: source bytes");
        assert_eq!(d.bytes, spec.size as u64, "device {id}: destination bytes");
        let full_reads = spec.size.div_ceil(spec.read_size) as u32;
        match spec.source {
            Source::Memfd => assert_eq!(s.data_packets, full_reads, "device {id}: data packets"),
            _ => assert!(s.data_packets >= full_reads, "device {id}: data packets"),
        }
        assert_eq!(d.data_packets, s.data_packets, "device {id}: data packets");
        // One timestamp per data packet, for the first MAX_PACKET_TIMESTAMPS of them.
        let kept = (s.data_packets as usize).min(MAX_PACKET_TIMESTAMPS);
        assert_eq!(s.read_issued_ns.len(), kept, "device {id}");
        assert_eq!(d.written_ns.len(), kept, "device {id}");
        assert!(
            s.read_issued_ns.is_sorted(),
            "device {id}: reads are issued in idx order"
        );
        assert!(
            d.written_ns.is_sorted(),
            "device {id}: writes complete in idx order"
        );
        for (idx, (&read, &written)) in s.read_issued_ns.iter().zip(&d.written_ns).enumerate() {
            assert!(
                written >= read,
                "device {id} idx {idx}: written at {written} ns before its read at {read} ns"
            );
        }
        assert!(d.loaded_ns > 0, "device {id}: loaded_ns");
        assert!(d.loaded_ns >= d.written_ns.last().copied().unwrap_or(0));
        total_bytes += spec.size as u64;
        total_packets += u64::from(s.data_packets);
        total_wire +=
            spec.size as u64 + spec.config_len as u64 + (u64::from(s.data_packets) + 1) * OVERHEAD;
    }
    assert_eq!(source.channels.len(), t.channels);
    assert_eq!(dest.channels.len(), t.channels);
    for (n, (s, d)) in source.channels.iter().zip(&dest.channels).enumerate() {
        assert_eq!(s.bytes, d.bytes, "channel {n}: bytes sent and received");
        assert_eq!(
            s.packets, d.packets,
            "channel {n}: packets sent and received"
        );
    }
    let sent_packets: u64 = source.channels.iter().map(|c| c.packets).sum();
    let sent_bytes: u64 = source.channels.iter().map(|c| c.bytes).sum();
    assert_eq!(sent_packets, total_packets + t.devices.len() as u64);
    assert_eq!(sent_bytes, total_wire, "wire bytes over all channels");
    if sent_packets >= 4 * t.channels as u64 {
        for (n, c) in source.channels.iter().enumerate() {
            assert!(
                c.packets > 0,
                "channel {n} carried nothing: packets must spread"
            );
        }
    }
    for (side, progress) in [
        ("source", &out.source_progress),
        ("dest", &out.dest_progress),
    ] {
        assert_eq!(
            progress.bytes.load(Ordering::Relaxed),
            total_bytes,
            "{side} progress"
        );
        assert_eq!(
            progress.packets.load(Ordering::Relaxed),
            total_packets,
            "{side} progress"
        );
    }
}

fn transfer_verifies(kind: EngineKind, t: Transfer) {
    if let Some(out) = run_transfer(kind, kind, &t) {
        verify(&t, out);
    }
}

/// Devices of different sizes and read sizes (memfd sources, memfd sinks).
fn mixed_devices(n: usize) -> Vec<DevSpec> {
    let read_sizes = [16 << 10, 64 << 10, 4097, 30_000];
    (0..n)
        .map(|i| DevSpec::memfd(300_000 + i * 123_457 + 7, read_sizes[i % read_sizes.len()]))
        .collect()
}

fn matrix(kind: EngineKind, channels: usize, devices: usize) {
    transfer_verifies(kind, Transfer::new(channels, mixed_devices(devices)));
}

fn matrix_1ch_1dev(kind: EngineKind) {
    matrix(kind, 1, 1)
}
fn matrix_1ch_4dev(kind: EngineKind) {
    matrix(kind, 1, 4)
}
fn matrix_4ch_1dev(kind: EngineKind) {
    matrix(kind, 4, 1)
}
fn matrix_4ch_4dev(kind: EngineKind) {
    matrix(kind, 4, 4)
}
fn matrix_16ch_1dev(kind: EngineKind) {
    matrix(kind, 16, 1)
}
fn matrix_16ch_4dev(kind: EngineKind) {
    matrix(kind, 16, 4)
}

/// QEMU before 10.0 saved devices one after another: with `sequential_devices`, no read of a
/// device is issued before the previous device's last read, and every byte still arrives.
fn sequential_devices(kind: EngineKind) {
    let mut t = Transfer::new(2, mixed_devices(4));
    t.config.sequential_devices = true;
    let Some(out) = run_transfer(kind, kind, &t) else {
        return;
    };
    let source = out
        .source
        .as_ref()
        .expect("sequential source succeeds")
        .clone();
    for pair in source.devices.windows(2) {
        let previous_last = pair[0].read_issued_ns.last().copied().unwrap_or(0);
        let next_first = pair[1].read_issued_ns.first().copied().unwrap_or(u64::MAX);
        assert!(
            next_first >= previous_last,
            "a device started reading before the previous one finished"
        );
    }
    verify(&t, out);
}

/// Pipe sources fed in small pieces: reads come back short and packets have odd sizes; pipe
/// sinks take partial writes.
fn short_reads_from_pipes(kind: EngineKind) {
    let pipe = |size, read_size, piece, sink| DevSpec {
        size,
        read_size,
        source: Source::Pipe { piece },
        sink,
        config_len: 33,
    };
    let t = Transfer::new(
        4,
        vec![
            pipe(200_000, 16 << 10, 1000, SinkKind::Pipe),
            pipe(150_001, 64 << 10, 3333, SinkKind::Memfd),
            pipe(300, 4096, 1, SinkKind::Pipe),
        ],
    );
    let Some(out) = run_transfer(kind, kind, &t) else {
        return;
    };
    let short = match &out.source {
        Ok(report) => report.devices[0].data_packets > 200_000u32.div_ceil(16 << 10),
        Err(_) => true, // verify() reports the error
    };
    verify(&t, out);
    assert!(
        short,
        "a source fed 1000 bytes at a time must give short reads"
    );
}

fn zero_byte_device(kind: EngineKind) {
    let mut empty_config = DevSpec::memfd(0, 4096);
    empty_config.config_len = 0;
    transfer_verifies(
        kind,
        Transfer::new(4, vec![DevSpec::memfd(0, 4096), empty_config]),
    );
}

fn one_chunk_device(kind: EngineKind) {
    transfer_verifies(
        kind,
        Transfer::new(4, vec![DevSpec::memfd(64 << 10, 64 << 10)]),
    );
}

fn one_byte_device(kind: EngineKind) {
    transfer_verifies(
        kind,
        Transfer::new(4, vec![DevSpec::memfd(1, 64 << 10), DevSpec::memfd(1, 1)]),
    );
}

/// Per-packet timestamps stay bounded: a device of MAX_PACKET_TIMESTAMPS + 100 one-byte reads
/// (as many packets) moves in full, and each side keeps the timestamps of the first
/// MAX_PACKET_TIMESTAMPS packets only, still paired by idx (`verify`).
fn timestamps_are_bounded(kind: EngineKind) {
    let t = Transfer::new(2, vec![DevSpec::memfd(MAX_PACKET_TIMESTAMPS + 100, 1)]);
    let Some(out) = run_transfer(kind, kind, &t) else {
        return;
    };
    if let (Ok(source), Ok(dest)) = (&out.source, &out.dest) {
        assert_eq!(
            source.devices[0].data_packets as usize,
            MAX_PACKET_TIMESTAMPS + 100
        );
        assert_eq!(
            source.devices[0].read_issued_ns.len(),
            MAX_PACKET_TIMESTAMPS
        );
        assert_eq!(dest.devices[0].written_ns.len(), MAX_PACKET_TIMESTAMPS);
    }
    verify(&t, out);
}

fn cross_engine(src: EngineKind, dst: EngineKind) {
    let mut devices = mixed_devices(3);
    devices.push(DevSpec::memfd(0, 4096));
    devices.push(DevSpec {
        source: Source::Pipe { piece: 5000 },
        sink: SinkKind::Pipe,
        ..DevSpec::memfd(100_000, 16 << 10)
    });
    let t = Transfer::new(6, devices);
    if let Some(out) = run_transfer(src, dst, &t) {
        verify(&t, out);
    }
}

#[test]
fn cross_engine_threads_to_uring() {
    cross_engine(EngineKind::Threads, EngineKind::Uring);
}

#[test]
fn cross_engine_uring_to_threads() {
    cross_engine(EngineKind::Uring, EngineKind::Threads);
}

/// One packet as QEMU frames it.
fn packet(id: &DeviceId, idx: u32, config: bool, data: &[u8]) -> Vec<u8> {
    let mut room = [0u8; PACKET_HEADER_ROOM];
    write_packet_headers(
        &mut room,
        &id.idstr_field(),
        id.instance_id,
        idx,
        config,
        data.len() as u32,
    );
    let mut out = room.to_vec();
    out.extend_from_slice(data);
    out
}

/// A source engine's stream is QEMU's framing byte for byte: one channel, one device of three
/// reads (the last one short), then the config packet, then EOF.
fn source_wire_bytes(kind: EngineKind) {
    let config = test_config();
    let Some(engine) = engine_or_skip(kind, &config) else {
        return;
    };
    let (src, mut dst) = channel_streams(1);
    let id = device_id(0);
    let data = pattern(7, 10_000);
    let blob = pattern(8, 21);
    let plan = SourcePlan {
        devices: vec![SourceDevice {
            id: id.clone(),
            data_fd: memfd_with(&data),
            read_size: 4096,
            config: blob.clone(),
        }],
        channels: src.into_iter().map(OwnedFd::from).collect(),
        progress: Arc::new(Progress::default()),
    };
    let progress = plan.progress.clone();
    let rx = spawn_side("test-source", move || engine.run_source(plan));
    let mut stream = dst.remove(0);
    let reader = spawn_side("test-capture", move || {
        let mut captured = Vec::new();
        stream.read_to_end(&mut captured).map(|_| captured)
    });
    let report = await_side(&rx, &[&progress], "run_source").unwrap();
    let captured = await_side(&reader, &[], "reading the channel").unwrap();
    let mut expected = packet(&id, 0, false, &data[..4096]);
    expected.extend(packet(&id, 1, false, &data[4096..8192]));
    expected.extend(packet(&id, 2, false, &data[8192..]));
    expected.extend(packet(&id, 3, true, &blob));
    assert_eq!(captured.len(), expected.len());
    assert!(
        captured == expected,
        "the stream differs from QEMU's framing"
    );
    assert_eq!(report.devices[0].data_packets, 3);
    assert_eq!(report.channels[0].packets, 4);
    assert_eq!(report.channels[0].bytes, expected.len() as u64);
}

/// A destination fed by hand: the test writes raw streams into the source ends.
struct RawDest {
    feeds: Vec<TcpStream>,
    result: mpsc::Receiver<Result<DestReport, DataPlaneError>>,
    progress: Arc<Progress>,
    sinks: Vec<Sink>,
    ids: Vec<DeviceId>,
}

impl RawDest {
    fn start(
        kind: EngineKind,
        channels: usize,
        devices: usize,
        config: EngineConfig,
    ) -> Option<Self> {
        Self::with_limits(kind, channels, &vec![None; devices], config)
    }

    /// One device per entry of `limits`, each with that queued-bytes limit of its own.
    fn with_limits(
        kind: EngineKind,
        channels: usize,
        limits: &[Option<u64>],
        config: EngineConfig,
    ) -> Option<Self> {
        let engine = engine_or_skip(kind, &config)?;
        let (feeds, dst) = channel_streams(channels);
        let ids: Vec<DeviceId> = (0..limits.len()).map(device_id).collect();
        let mut dest_devices = Vec::new();
        let mut sinks = Vec::new();
        for (id, &max_queued_bytes) in ids.iter().zip(limits) {
            let (data_fd, sink) = Sink::memfd();
            dest_devices.push(DestDevice {
                id: id.clone(),
                data_fd,
                max_queued_bytes,
            });
            sinks.push(sink);
        }
        let progress = Arc::new(Progress::default());
        let plan = DestPlan {
            devices: dest_devices,
            channels: dst.into_iter().map(OwnedFd::from).collect(),
            progress: progress.clone(),
        };
        let result = spawn_side("test-dest", move || engine.run_dest(plan));
        Some(Self {
            feeds,
            result,
            progress,
            sinks,
            ids,
        })
    }

    fn send(&mut self, channel: usize, bytes: &[u8]) {
        // The engine may already have failed and shut the channel: that is fine here.
        let _ = self.feeds[channel].write_all(bytes);
    }

    fn close(&mut self, channel: usize) {
        let _ = self.feeds[channel].shutdown(std::net::Shutdown::Write);
    }

    fn finish(self) -> (Result<DestReport, DataPlaneError>, Vec<Vec<u8>>) {
        let result = await_side(&self.result, &[&self.progress], "run_dest");
        drop(self.feeds);
        (result, self.sinks.into_iter().map(Sink::contents).collect())
    }

    /// The run's report, once it succeeded with device 0 holding `data` and `config`.
    fn loaded(self, data: &[u8], config: &[u8]) -> DestReport {
        let (result, received) = self.finish();
        let report = result.unwrap_or_else(|e| panic!("{e} ({e:?})"));
        assert!(received[0] == data, "bytes differ");
        assert_eq!(report.devices[0].config, config);
        report
    }

    /// The run's error; the feeds stay open until it arrives, so it cannot depend on EOF.
    fn error(self) -> DataPlaneError {
        let (result, _) = self.finish();
        match result {
            Ok(_) => panic!("run_dest succeeded on bad input"),
            Err(e) => e,
        }
    }
}

fn assert_names(err: &DataPlaneError, parts: &[&str]) {
    let text = err.to_string();
    for part in parts {
        assert!(text.contains(part), "error {text:?} does not name {part:?}");
    }
}

fn dest_bad_magic(kind: EngineKind) {
    let Some(mut d) = RawDest::start(kind, 2, 1, test_config()) else {
        return;
    };
    let mut bad = packet(&d.ids[0], 0, false, b"data");
    bad[0] = 0x55;
    d.send(1, &bad);
    let err = d.error();
    assert!(
        matches!(
            err,
            DataPlaneError::Wire {
                channel: 1,
                offset: 64,
                source: WireError::BadMagic {
                    got: 0x5522_3344,
                    offset: 0
                }
            }
        ),
        "{err:?}"
    );
    assert_names(&err, &["channel 1", "offset 64"]);
}

fn dest_unknown_idstr(kind: EngineKind) {
    let Some(mut d) = RawDest::start(kind, 2, 1, test_config()) else {
        return;
    };
    let first = packet(&d.ids[0], 0, false, b"fine");
    d.send(0, &first);
    let stranger = DeviceId::new("0000:00:1f.0/vfio", 3).unwrap();
    d.send(0, &packet(&stranger, 0, false, b"data"));
    let err = d.error();
    match &err {
        DataPlaneError::UnknownDevice {
            channel: 0,
            idstr,
            instance_id: 3,
            offset,
        } => {
            assert_eq!(idstr, "0000:00:1f.0/vfio");
            assert_eq!(*offset, 64 + first.len() as u64);
        }
        other => panic!("{other:?}"),
    }
    assert_names(&err, &["channel 0", "0000:00:1f.0/vfio", "instance id 3"]);
}

fn expect_reassembly(
    err: &DataPlaneError,
    channel: usize,
    device: &DeviceId,
    idx: u32,
    want: ReassemblyError,
) {
    match err {
        DataPlaneError::Reassembly {
            channel: c,
            device: d,
            idx: i,
            source,
        } => {
            assert_eq!((*c, d, *i), (channel, device, idx), "{err}");
            assert_eq!(source, &want);
        }
        other => panic!("expected a reassembly error, got {other:?}"),
    }
    assert_names(
        err,
        &[
            &format!("channel {channel}"),
            &device.to_string(),
            &format!("idx {idx}"),
        ],
    );
}

fn dest_duplicate_idx(kind: EngineKind) {
    let Some(mut d) = RawDest::start(kind, 2, 2, test_config()) else {
        return;
    };
    let id = d.ids[1].clone();
    d.send(1, &packet(&id, 1, false, b"first"));
    d.send(1, &packet(&id, 1, false, b"again"));
    let err = d.error();
    expect_reassembly(&err, 1, &id, 1, ReassemblyError::Duplicate { idx: 1 });
}

fn dest_second_config(kind: EngineKind) {
    let Some(mut d) = RawDest::start(kind, 2, 1, test_config()) else {
        return;
    };
    let id = d.ids[0].clone();
    d.send(1, &packet(&id, 3, true, b"config"));
    d.send(1, &packet(&id, 5, true, b"config again"));
    let err = d.error();
    expect_reassembly(
        &err,
        1,
        &id,
        5,
        ReassemblyError::SecondConfig { idx: 5, first: 3 },
    );
}

fn dest_data_above_config(kind: EngineKind) {
    let Some(mut d) = RawDest::start(kind, 2, 1, test_config()) else {
        return;
    };
    let id = d.ids[0].clone();
    d.send(0, &packet(&id, 2, true, b"config"));
    d.send(0, &packet(&id, 3, false, b"late data"));
    let err = d.error();
    expect_reassembly(
        &err,
        0,
        &id,
        3,
        ReassemblyError::AboveConfig {
            idx: 3,
            config_idx: 2,
        },
    );
}

/// A peer-given size above the bound fails at once: nothing is allocated or read by it (the
/// payload never comes and the channel stays open).
fn dest_packet_too_large(kind: EngineKind) {
    let config = EngineConfig {
        max_packet_size: 4096 + 12,
        ..test_config()
    };
    let Some(mut d) = RawDest::start(kind, 2, 1, config) else {
        return;
    };
    let mut header = packet(&d.ids[0], 0, false, &[]);
    header.truncate(276);
    header[272..276].copy_from_slice(&0xFFFF_FF00u32.to_be_bytes());
    d.send(1, &header);
    let err = d.error();
    assert!(
        matches!(
            err,
            DataPlaneError::Wire {
                channel: 1,
                offset: 64,
                source: WireError::PacketTooLarge {
                    size: 0xFFFF_FF00,
                    max: 4108,
                    ..
                }
            }
        ),
        "{err:?}"
    );
}

/// The payload ends early: the error names the channel, the packet's offset, its device and
/// its idx (its headers came).
fn dest_truncated_payload(kind: EngineKind) {
    let Some(mut d) = RawDest::start(kind, 2, 1, test_config()) else {
        return;
    };
    let id = d.ids[0].clone();
    let full = packet(&id, 3, false, &[7u8; 1000]);
    d.send(0, &full[..full.len() - 500]);
    d.close(0);
    let err = d.error();
    assert!(
        matches!(
            err,
            DataPlaneError::TruncatedPayload {
                channel: 0,
                ref device,
                idx: Some(3),
                offset: 64
            } if *device == id
        ),
        "{err:?}"
    );
    assert_names(&err, &["channel 0", &id.to_string(), "idx 3"]);
}

fn dest_truncated_header(kind: EngineKind) {
    let Some(mut d) = RawDest::start(kind, 2, 1, test_config()) else {
        return;
    };
    let first = packet(&d.ids[0], 1, false, b"some data");
    d.send(1, &first);
    d.send(1, &packet(&d.ids[0], 2, false, b"x")[..100]);
    d.close(1);
    let err = d.error();
    let at = 64 + first.len() as u64;
    assert!(
        matches!(err, DataPlaneError::TruncatedPacket { channel: 1, offset } if offset == at),
        "{err:?}"
    );
}

/// Every channel closes cleanly but idx 1 never came: the device is named with its next idx
/// and its config idx, and what was deliverable was written.
fn dest_channel_closed_early(kind: EngineKind) {
    let Some(mut d) = RawDest::start(kind, 2, 1, test_config()) else {
        return;
    };
    let id = d.ids[0].clone();
    d.send(0, &packet(&id, 0, false, b"idx zero"));
    d.send(0, &packet(&id, 2, true, b"config"));
    d.close(1);
    thread::sleep(Duration::from_millis(50));
    d.close(0);
    let (result, received) = d.finish();
    match result {
        Err(DataPlaneError::Incomplete {
            ref device,
            next_idx: 1,
            config_idx: Some(2),
        }) if *device == id => {}
        other => panic!("{other:?}"),
    }
    assert_eq!(received[0], b"idx zero");
}

/// With room for two packets per device, packets sent far out of order across channels
/// (channel 0 runs ahead, idx 0 comes late on channel 1) still all arrive: the destination
/// stops reading channel 0 instead of failing.
fn dest_backpressure_out_of_order(kind: EngineKind) {
    idx_zero_late(kind, 2000, 8000, 1000, Duration::from_millis(100));
}

/// Channel 0 sends idx 1.. of `len` bytes in `chunk`-byte packets and closes, held back by
/// `limit`; after `gap`, channel 1 sends idx 0 and the config. Every byte must arrive.
fn idx_zero_late(kind: EngineKind, limit: u64, len: usize, chunk: usize, gap: Duration) {
    let config = EngineConfig {
        max_queued_bytes: limit,
        ..test_config()
    };
    let Some(mut d) = RawDest::start(kind, 2, 1, config) else {
        return;
    };
    let id = d.ids[0].clone();
    let data = pattern(3, len);
    let packets = data.chunks(chunk).count() as u32;
    for (idx, piece) in data.chunks(chunk).enumerate().skip(1) {
        d.send(0, &packet(&id, idx as u32, false, piece));
    }
    d.close(0);
    thread::sleep(gap);
    d.send(1, &packet(&id, 0, false, &data[..chunk]));
    d.send(1, &packet(&id, packets, true, b"config"));
    d.close(1);
    let report = d.loaded(&data, b"config");
    assert_eq!(report.devices[0].data_packets, packets);
}

/// Each device keeps to its own queued-bytes limit (QEMU 10.1's is a per-device property):
/// channel 0 carries device 1's packets far out of order, then device 0's, and only device 0
/// has a limit (1000 bytes). Device 1 holds all five of its early packets plus its idx 0
/// (6000 bytes); device 0 holds one early packet plus its idx 0, and channel 0 waits for it.
fn dest_queued_bytes_limit_per_device(kind: EngineKind) {
    let Some(mut d) = RawDest::with_limits(kind, 2, &[Some(1000), None], test_config()) else {
        return;
    };
    let (limited, free) = (d.ids[0].clone(), d.ids[1].clone());
    let limited_data = pattern(8, 4000);
    let free_data = pattern(9, 6000);
    for (idx, chunk) in free_data.chunks(1000).enumerate().skip(1) {
        d.send(0, &packet(&free, idx as u32, false, chunk));
    }
    for (idx, chunk) in limited_data.chunks(1000).enumerate().skip(1) {
        d.send(0, &packet(&limited, idx as u32, false, chunk));
    }
    d.close(0);
    thread::sleep(Duration::from_millis(100));
    d.send(1, &packet(&free, 0, false, &free_data[..1000]));
    d.send(1, &packet(&free, 6, true, b"free"));
    d.send(1, &packet(&limited, 0, false, &limited_data[..1000]));
    d.send(1, &packet(&limited, 4, true, b"limited"));
    d.close(1);
    let (result, received) = d.finish();
    let report = result.unwrap_or_else(|e| panic!("{e} ({e:?})"));
    assert!(
        received[0] == limited_data && received[1] == free_data,
        "bytes differ"
    );
    assert_eq!(report.devices[0].peak_queued_bytes, 2000);
    // Its config blob (4 bytes) may arrive while data is still queued.
    let free_peak = report.devices[1].peak_queued_bytes;
    assert!((6000..=6004).contains(&free_peak), "{free_peak}");
}

/// All devices together keep to the process-wide cap (4000 bytes here), each with no limit of
/// its own, and hitting it is backpressure, not a failure: channel 0 carries idx 1..=3 of each
/// of 8 devices (24000 bytes out of order), and only later channel 1 each device's idx 0 and
/// config, device 0's once every other device's data is written. Device 0's early packets fill
/// 3000 bytes until then, so every other device holds at most 1000 bytes out of order plus its
/// next idx (2000), where without the cap each held all four of its packets (4000). The threads
/// engine's cap; the uring engine is bounded by its pool instead.
fn dest_queued_bytes_limit_process_wide(kind: EngineKind) {
    const DEVICES: usize = 8;
    let config = EngineConfig {
        max_total_queued_bytes: 4000,
        ..test_config()
    };
    let Some(mut d) = RawDest::with_limits(kind, 2, &[None; DEVICES], config) else {
        return;
    };
    let ids = d.ids.clone();
    let data: Vec<Vec<u8>> = (0..DEVICES).map(|i| pattern(20 + i as u64, 4000)).collect();
    for (id, data) in ids.iter().zip(&data) {
        for (idx, chunk) in data.chunks(1000).enumerate().skip(1) {
            d.send(0, &packet(id, idx as u32, false, chunk));
        }
    }
    d.close(0);
    thread::sleep(Duration::from_millis(100));
    let send_first_and_config = |d: &mut RawDest, i: usize| {
        d.send(1, &packet(&ids[i], 0, false, &data[i][..1000]));
        d.send(1, &packet(&ids[i], 4, true, b"conf"));
    };
    for i in 1..DEVICES {
        send_first_and_config(&mut d, i);
    }
    let others = (DEVICES as u64 - 1) * 4000;
    let deadline = Instant::now() + TIMEOUT;
    while d.progress.bytes.load(Ordering::Relaxed) < others {
        assert!(Instant::now() < deadline, "devices 1.. were never written");
        thread::sleep(Duration::from_millis(10));
    }
    send_first_and_config(&mut d, 0);
    d.close(1);
    let (result, received) = d.finish();
    let report = result.unwrap_or_else(|e| panic!("{e} ({e:?})"));
    assert!(received == data, "bytes differ");
    for (i, device) in report.devices.iter().enumerate().skip(1) {
        assert_eq!(device.config, b"conf");
        assert!(
            device.peak_queued_bytes <= 2000,
            "device {i} held {} bytes at once",
            device.peak_queued_bytes
        );
    }
    // Its config packet waits for room until its idx 0 is written.
    assert_eq!(report.devices[0].peak_queued_bytes, 4000);
}

/// Every open channel holds a packet that only the process-wide cap keeps out, and no device
/// can write: channel 0 fills the cap (4000 bytes) with idx 1 of devices 0..=3 and holds idx 1
/// of device 4 with device 0's idx 0 behind it; channel 1 holds idx 1 of device 5 with device
/// 1's idx 0 behind it. The error says it is the process-wide cap, not a device's limit.
fn dest_stall_names_the_process_wide_cap(kind: EngineKind) {
    let config = EngineConfig {
        max_total_queued_bytes: 4000,
        ..test_config()
    };
    let Some(mut d) = RawDest::with_limits(kind, 2, &[None; 6], config) else {
        return;
    };
    let ids = d.ids.clone();
    let chunk = [2u8; 1000];
    for id in &ids[..5] {
        d.send(0, &packet(id, 1, false, &chunk));
    }
    d.send(0, &packet(&ids[0], 0, false, &chunk));
    d.close(0);
    // Let channel 0 fill the cap before channel 1 has anything.
    thread::sleep(Duration::from_millis(100));
    d.send(1, &packet(&ids[5], 1, false, &chunk));
    d.send(1, &packet(&ids[1], 0, false, &chunk));
    d.close(1);
    let err = d.error();
    assert!(matches!(err, DataPlaneError::Stalled { .. }), "{err:?}");
    assert_names(
        &err,
        &[
            &format!("channel 0 holds idx 1 (1000 bytes) of device {}", ids[4]),
            &format!("channel 1 holds idx 1 (1000 bytes) of device {}", ids[5]),
            "held by the process-wide cap, not the device's limit: 4000 of max 4000 bytes queued by all devices",
        ],
    );
}

#[test]
fn threads_dest_queued_bytes_limit_process_wide() {
    dest_queued_bytes_limit_process_wide(EngineKind::Threads);
}

#[test]
fn threads_dest_stall_names_the_process_wide_cap() {
    dest_stall_names_the_process_wide_cap(EngineKind::Threads);
}

/// A peer's bytes, mutated at random, never panic or hang a destination: each of 150 runs (two
/// devices of three data packets and a config packet over two channels, one mutation of one
/// channel's stream: a bit flip, a BE u32 set to a boundary value, a truncation, a duplicated
/// packet or inserted bytes) ends with the devices loaded or an error that names a channel or
/// a device. `ENGINE_FUZZ_RUNS` and `ENGINE_FUZZ_SEED` run it longer or elsewhere.
fn dest_survives_mutated_streams(kind: EngineKind) {
    let env = |name: &str, default: u64| {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let mut state = env("ENGINE_FUZZ_SEED", 0x0dd_ba11) | 1;
    let mut next = move |n: usize| {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        (state.wrapping_mul(0x2545_f491_4f6c_dd1d) % n.max(1) as u64) as usize
    };
    let (mut loaded, mut failed) = (0, 0);
    for run in 0..env("ENGINE_FUZZ_RUNS", 150) {
        let Some(mut d) = RawDest::start(kind, 2, 2, test_config()) else {
            return;
        };
        let mut streams = [Vec::new(), Vec::new()];
        for (i, id) in d.ids.clone().iter().enumerate() {
            for idx in 0..3u32 {
                let data = pattern(u64::from(idx) + 10 * i as u64, 100 + next(900));
                streams[next(2)].push(packet(id, idx, false, &data));
            }
            streams[next(2)].push(packet(id, 3, true, b"config"));
        }
        let victim = match (streams[0].is_empty(), streams[1].is_empty()) {
            (true, _) => 1,
            (_, true) => 0,
            _ => next(2),
        };
        let mut bytes: Vec<u8> = streams[victim].concat();
        let at = next(bytes.len());
        let mutation = next(5);
        match mutation {
            0 => bytes[at] ^= 1 << next(8),
            1 => {
                let value: u32 = [0, 1, 12, 13, 0x7fff_ffff, u32::MAX][next(6)];
                let at = at.min(bytes.len().saturating_sub(4));
                bytes[at..at + 4].copy_from_slice(&value.to_be_bytes());
            }
            2 => bytes.truncate(at),
            3 => {
                let again = streams[victim][next(streams[victim].len())].clone();
                bytes.extend(again);
            }
            _ => {
                let junk: Vec<u8> = (0..1 + next(64)).map(|_| next(256) as u8).collect();
                bytes.splice(at..at, junk);
            }
        }
        d.send(victim, &bytes);
        d.send(1 - victim, &streams[1 - victim].concat());
        d.close(0);
        d.close(1);
        match d.finish().0 {
            Ok(_) => loaded += 1,
            Err(err) => {
                let text = err.to_string();
                assert!(
                    text.contains("channel") || text.contains("device"),
                    "run {run}, mutation {mutation} at {at}: {text}"
                );
                failed += 1;
            }
        }
    }
    // Both outcomes occur: a flip in payload data still loads, most others fail.
    assert!(loaded > 0 && failed > 0, "{loaded} loaded, {failed} failed");
}

/// A data packet without data (next_packet_size 12, which the wire allows) is taken in order
/// and writes nothing.
fn dest_empty_data_packet(kind: EngineKind) {
    let Some(mut d) = RawDest::start(kind, 2, 1, test_config()) else {
        return;
    };
    let id = d.ids[0].clone();
    let data = pattern(6, 2000);
    d.send(0, &packet(&id, 0, false, &data[..1000]));
    d.send(1, &packet(&id, 1, false, b""));
    d.send(0, &packet(&id, 2, false, &data[1000..]));
    d.send(1, &packet(&id, 3, true, b"config"));
    d.close(0);
    d.close(1);
    d.loaded(&data, b"config");
}

/// A packet slow to arrive is not a stall: with channel 0 held back by the queued-bytes limit,
/// the device's next idx comes on channel 1 in two parts 4.5 s apart (longer than the stall
/// grace a parked channel waits), and the run completes.
fn dest_slow_packet_is_not_a_stall(kind: EngineKind) {
    let config = EngineConfig {
        max_queued_bytes: 1000,
        ..test_config()
    };
    let Some(mut d) = RawDest::start(kind, 2, 1, config) else {
        return;
    };
    let id = d.ids[0].clone();
    let data = pattern(5, 3000);
    d.send(0, &packet(&id, 1, false, &data[1000..2000]));
    d.send(0, &packet(&id, 2, false, &data[2000..]));
    let first = packet(&id, 0, false, &data[..1000]);
    d.send(1, &first[..400]);
    thread::sleep(Duration::from_millis(4500));
    d.send(1, &first[400..]);
    d.send(1, &packet(&id, 3, true, b"config"));
    d.close(0);
    d.close(1);
    d.loaded(&data, b"config");
}

/// A channel idle between packets is not a stall: channel 0 runs ahead with idx 1..=20 until it
/// is held back (the uring engine's pool: 8 slots per worker, the last kept for the next idx;
/// the threads engine's 1000-byte queued-bytes limit), while channel 1, which carries idx 0,
/// sends nothing for 4 s (longer than the uring engine's former 3 s stall grace) and has not
/// begun a packet. It could still deliver, so the run must wait for it and complete.
fn dest_idle_channel_is_not_a_stall(kind: EngineKind) {
    idx_zero_late(kind, 1000, 2100, 100, Duration::from_secs(4));
}

/// Every open channel holds a packet its device has no room for and the device's next idx is
/// behind them: a clear error naming both channels, the device and the idx, and no hang (the
/// channels stay open).
fn dest_stall_detected(kind: EngineKind) {
    let config = EngineConfig {
        max_queued_bytes: 1000,
        ..test_config()
    };
    let Some(mut d) = RawDest::start(kind, 2, 1, config) else {
        return;
    };
    let id = d.ids[0].clone();
    let chunk = [1u8; 1000];
    d.send(0, &packet(&id, 1, false, &chunk));
    d.send(0, &packet(&id, 2, false, &chunk));
    d.send(0, &packet(&id, 3, false, &chunk));
    // Let channel 0's receiver take idx 1 and hold idx 2 before channel 1 has anything.
    thread::sleep(Duration::from_millis(100));
    d.send(1, &packet(&id, 4, false, &chunk));
    d.send(1, &packet(&id, 0, false, &chunk));
    let err = d.error();
    assert!(matches!(err, DataPlaneError::Stalled { .. }), "{err:?}");
    assert_names(
        &err,
        &["channel 0", "channel 1", &id.to_string(), "idx 2", "idx 4"],
    );
}

/// A peer that never sends a device's next idx cannot make the destination hold ever more,
/// even with no queued-bytes limit (QEMU's default): out-of-order packets, with data or
/// without, fill what the engine holds (the uring pool's 16 buffers; the threads engine's cap
/// of queued packets per device) and the run then stalls with an error naming the channels and
/// the device.
fn dest_out_of_order_flood_is_bounded(kind: EngineKind) {
    let config = test_config();
    assert_eq!(config.max_queued_bytes, u64::MAX);
    let Some(d) = RawDest::start(kind, 2, 1, config) else {
        return;
    };
    let id = d.ids[0].clone();
    let mut feeds: Vec<TcpStream> = d
        .feeds
        .iter()
        .map(|f| f.try_clone().expect("clone a feed"))
        .collect();
    // From another thread: once the destination stops reading, these writes block until it
    // fails and shuts its channels.
    let flood_id = id.clone();
    let flood = thread::spawn(move || {
        // Each channel alone carries more than either engine holds, so both end up waiting.
        for idx in 1..=(2 * QUEUE_CAP_PACKETS as u32 + 200) {
            let payload: &[u8] = if idx % 2 == 0 { b"" } else { b"x" };
            let bytes = packet(&flood_id, idx, false, payload);
            if feeds[(idx % 2) as usize].write_all(&bytes).is_err() {
                return;
            }
        }
    });
    let err = d.error();
    assert!(matches!(err, DataPlaneError::Stalled { .. }), "{err:?}");
    assert_names(&err, &["channel 0", "channel 1", &id.to_string()]);
    flood.join().expect("the flood thread ends");
}

/// Packets bigger than any buffer slot (the uring engine holds them on the heap), with no
/// queued-bytes limit (QEMU's default) and never the device's next idx: both engines stop at
/// the same cap (`QUEUE_CAP_BYTES` per device) and stall with an error naming the channels and
/// the device, instead of holding ever more.
fn dest_large_packet_flood_is_bounded(kind: EngineKind) {
    let config = test_config();
    assert_eq!(config.max_queued_bytes, u64::MAX);
    let Some(d) = RawDest::start(kind, 2, 1, config) else {
        return;
    };
    let id = d.ids[0].clone();
    const PACKET: usize = 1 << 20;
    // Each channel alone carries more than the cap, so both end up waiting.
    let per_channel = (QUEUE_CAP_BYTES as usize / PACKET) as u32 + 40;
    let floods: Vec<_> = d
        .feeds
        .iter()
        .enumerate()
        .map(|(c, feed)| {
            let mut feed = feed.try_clone().expect("clone a feed");
            let id = id.clone();
            // Once the destination stops reading, these writes block until it fails and shuts
            // its channels.
            thread::spawn(move || {
                let payload = vec![0x5a; PACKET];
                for k in 0..per_channel {
                    let idx = 1 + 2 * k + c as u32;
                    if feed.write_all(&packet(&id, idx, false, &payload)).is_err() {
                        return;
                    }
                }
            })
        })
        .collect();
    let err = d.error();
    assert!(matches!(err, DataPlaneError::Stalled { .. }), "{err:?}");
    assert_names(
        &err,
        &[
            "channel 0",
            "channel 1",
            &id.to_string(),
            &QUEUE_CAP_BYTES.to_string(),
        ],
    );
    for flood in floods {
        flood.join().expect("a flood thread ends");
    }
}

/// A destination that reads part of a packet too big for the socket buffers and then closes:
/// the send fails after partial progress (MSG_WAITALL then reports the bytes it sent, not the
/// error), and the source run fails naming the channel, the device and the idx, rather than
/// counting the packet as sent. The big packet is the last one (the config blob), so no later
/// send can fail in its place.
fn source_short_send_is_an_error(kind: EngineKind) {
    let config = test_config();
    let Some(engine) = engine_or_skip(kind, &config) else {
        return;
    };
    let (src, mut dst) = channel_streams(1);
    let id = device_id(0);
    let plan = SourcePlan {
        devices: vec![SourceDevice {
            id: id.clone(),
            data_fd: memfd_with(&pattern(2, 1000)),
            read_size: 4096,
            config: pattern(3, 64 << 20),
        }],
        channels: src.into_iter().map(OwnedFd::from).collect(),
        progress: Arc::new(Progress::default()),
    };
    let progress = plan.progress.clone();
    let rx = spawn_side("test-source", move || engine.run_source(plan));
    let mut peer = dst.remove(0);
    let mut part = vec![0u8; 1 << 20];
    peer.read_exact(&mut part).unwrap();
    drop(peer);
    let err = match await_side(&rx, &[&progress], "run_source") {
        Ok(_) => panic!("run_source succeeded: a packet the peer never took counted as sent"),
        Err(err) => err,
    };
    match &err {
        DataPlaneError::Send {
            channel: 0,
            device,
            idx: 1,
            ..
        } if *device == id => {}
        other => panic!("{other:?}"),
    }
    assert_names(&err, &["channel 0", &id.to_string(), "idx 1"]);
}

/// Channels that never end: cancel stops the run and every thread.
fn dest_cancel(kind: EngineKind) {
    let Some(mut d) = RawDest::start(kind, 3, 2, test_config()) else {
        return;
    };
    let id = d.ids[0].clone();
    d.send(2, &packet(&id, 0, false, b"some"));
    thread::sleep(Duration::from_millis(100));
    d.progress.cancel.store(true, Ordering::Relaxed);
    let started = Instant::now();
    let err = d.error();
    assert!(matches!(err, DataPlaneError::Cancelled), "{err:?}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "cancel took {:?}",
        started.elapsed()
    );
}

/// Runs the source of one device reading `data_fd` on two channels whose peer never reads,
/// cancels it after 300 ms and returns the run's error once it stopped (within 5 s) and the
/// progress it reported to.
fn cancelled_source(kind: EngineKind, data_fd: OwnedFd) -> Option<(DataPlaneError, Arc<Progress>)> {
    let config = test_config();
    let engine = engine_or_skip(kind, &config)?;
    let (src, _dst_kept_open) = channel_pairs(2);
    let progress = Arc::new(Progress::default());
    let plan = SourcePlan {
        devices: vec![SourceDevice {
            id: device_id(0),
            data_fd,
            read_size: 64 << 10,
            config: vec![1, 2, 3],
        }],
        channels: src,
        progress: progress.clone(),
    };
    let rx = spawn_side("test-source", move || engine.run_source(plan));
    thread::sleep(Duration::from_millis(300));
    Some((cancelled_within_5s(&rx, &progress, "run_source"), progress))
}

/// Sets `progress`'s cancel and waits for the run's error: it must come within 5 s.
fn cancelled_within_5s<T: std::fmt::Debug>(
    rx: &mpsc::Receiver<Result<T, DataPlaneError>>,
    progress: &Progress,
    what: &str,
) -> DataPlaneError {
    progress.cancel.store(true, Ordering::Relaxed);
    let started = Instant::now();
    let err = await_side(rx, &[], what).unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "cancel took {:?}",
        started.elapsed()
    );
    err
}

/// A destination that never reads: the source blocks on full sockets until cancelled.
fn source_cancel(kind: EngineKind) {
    let Some((err, _)) = cancelled_source(kind, memfd_with(&pattern(1, 64 << 20))) else {
        return;
    };
    assert!(matches!(err, DataPlaneError::Cancelled), "{err:?}");
}

/// A device whose save never produces data (a driver stuck in STOP_COPY: its data_fd read
/// blocks) must not keep a cancelled run waiting for it.
fn source_cancel_with_a_silent_device(kind: EngineKind) {
    let (silent, _writer_kept_open) = vfio::fd::pipe().unwrap();
    let Some((err, progress)) = cancelled_source(kind, silent) else {
        return;
    };
    assert!(matches!(err, DataPlaneError::Cancelled), "{err:?}");
    // The stall's account names the stuck read: "device X: read of idx 0 ..." (threads) or
    // "channel N: read and send of idx 0 of device X ..." (uring, whose reads are chained).
    let outstanding = progress.take_outstanding();
    let id = device_id(0).to_string();
    assert!(
        outstanding
            .iter()
            .any(|line| line.contains("read") && line.contains("idx 0") && line.contains(&id)),
        "{outstanding:?}"
    );
}

/// A destination run of device 0 writing to `data_fd`, on `channels` channels: what feeds
/// them, the run's progress and its result.
struct OneDeviceDest {
    feeds: Vec<TcpStream>,
    progress: Arc<Progress>,
    rx: mpsc::Receiver<Result<DestReport, DataPlaneError>>,
}

fn one_device_dest(kind: EngineKind, channels: usize, data_fd: OwnedFd) -> Option<OneDeviceDest> {
    let config = test_config();
    let engine = engine_or_skip(kind, &config)?;
    let (feeds, dst) = channel_streams(channels);
    let progress = Arc::new(Progress::default());
    let plan = DestPlan {
        devices: vec![DestDevice {
            id: device_id(0),
            data_fd,
            max_queued_bytes: None,
        }],
        channels: dst.into_iter().map(OwnedFd::from).collect(),
        progress: progress.clone(),
    };
    let rx = spawn_side("test-dest", move || engine.run_dest(plan));
    Some(OneDeviceDest {
        feeds,
        progress,
        rx,
    })
}

/// A device whose load stops taking data (its data_fd write blocks) must not keep a cancelled
/// destination waiting for it.
fn dest_cancel_with_a_stuck_device(kind: EngineKind) {
    // Nobody reads the pipe: once its buffer is full, every write to it blocks.
    let (_reader_kept_open, stuck) = vfio::fd::pipe().unwrap();
    let Some(mut d) = one_device_dest(kind, 1, stuck) else {
        return;
    };
    let id = device_id(0);
    let mut feed = d.feeds.remove(0);
    let packets: Vec<Vec<u8>> = pattern(7, 4 << 20)
        .chunks(1 << 20)
        .enumerate()
        .map(|(idx, chunk)| packet(&id, idx as u32, false, chunk))
        .collect();
    // Its own thread: the engine may stop reading the channel once the device is stuck.
    let _feeder = thread::spawn(move || {
        for p in packets {
            if feed.write_all(&p).is_err() {
                break;
            }
        }
        feed
    });
    thread::sleep(Duration::from_millis(500));
    let err = cancelled_within_5s(&d.rx, &d.progress, "run_dest");
    assert!(matches!(err, DataPlaneError::Cancelled), "{err:?}");
}

/// A destination that stops reading (frozen) leaves a send that never completes; the run the
/// session then cancels for its stall says which channel's send of which packet is stuck and
/// for how long (what the session appends to its stall error).
fn source_cancel_names_the_stuck_send(kind: EngineKind) {
    use nix::sys::socket::{setsockopt, sockopt};
    let config = test_config();
    let Some(engine) = engine_or_skip(kind, &config) else {
        return;
    };
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    // Small socket buffers: a few packets fill them.
    setsockopt(&listener, sockopt::RcvBuf, &4096).expect("SO_RCVBUF");
    let channel = TcpStream::connect(listener.local_addr().expect("address")).expect("connect");
    setsockopt(&channel, sockopt::SndBuf, &4096).expect("SO_SNDBUF");
    // Never read: the frozen destination.
    let (_frozen, _) = listener.accept().expect("accept");
    let id = device_id(0);
    let progress = Arc::new(Progress::default());
    let plan = SourcePlan {
        devices: vec![SourceDevice {
            id: id.clone(),
            data_fd: memfd_with(&pattern(1, 4 << 20)),
            read_size: 64 << 10,
            config: vec![],
        }],
        channels: vec![OwnedFd::from(channel)],
        progress: progress.clone(),
    };
    let rx = spawn_side("test-source", move || engine.run_source(plan));
    let deadline = Instant::now() + TIMEOUT;
    while progress.bytes.load(Ordering::Relaxed) == 0 {
        assert!(Instant::now() < deadline, "the first read never finished");
        thread::sleep(Duration::from_millis(10));
    }
    thread::sleep(Duration::from_millis(300));
    progress.cancel.store(true, Ordering::Relaxed);
    let err = await_side(&rx, &[], "run_source").unwrap_err();
    assert!(matches!(err, DataPlaneError::Cancelled), "{err:?}");
    let outstanding = progress.take_outstanding();
    assert_eq!(outstanding.len(), 1, "{outstanding:?}");
    let line = &outstanding[0];
    let secs: f64 = line
        .strip_prefix("channel 0: send of idx ")
        .and_then(|rest| rest.split_once(&format!(" of device {id} outstanding ")))
        .and_then(|(idx, secs)| idx.parse::<u32>().ok().and(secs.strip_suffix(" s")))
        .and_then(|secs| secs.parse().ok())
        .unwrap_or_else(|| panic!("{line:?}"));
    assert!(secs >= 0.2, "{line:?}: stuck since before the 300 ms wait");
}

/// The destination goes away: the source fails naming the channel, device and idx.
fn source_peer_gone(kind: EngineKind) {
    let config = test_config();
    let Some(engine) = engine_or_skip(kind, &config) else {
        return;
    };
    let (src, dst) = channel_pairs(2);
    drop(dst);
    let plan = SourcePlan {
        devices: vec![SourceDevice {
            id: device_id(0),
            data_fd: memfd_with(&pattern(1, 64 << 20)),
            read_size: 64 << 10,
            config: vec![],
        }],
        channels: src,
        progress: Arc::new(Progress::default()),
    };
    let progress = plan.progress.clone();
    let rx = spawn_side("test-source", move || engine.run_source(plan));
    let err = await_side(&rx, &[&progress], "run_source").unwrap_err();
    match &err {
        DataPlaneError::Send {
            channel, device, ..
        } => {
            assert!(*channel < 2);
            assert_eq!(*device, device_id(0));
        }
        other => panic!("{other:?}"),
    }
    assert_names(&err, &["channel", &device_id(0).to_string(), "idx"]);
}

/// One device's data_fd cannot be read: the run fails naming it and idx 0, and the other
/// device's threads are stopped too.
fn source_read_error(kind: EngineKind) {
    let mut devices = mixed_devices(1);
    devices.push(unreadable_device());
    fails_reading(kind, Transfer::new(2, devices), 1);
}

/// A lone device that cannot be read, on more channels than devices (the uring source hands
/// such a device's packets from its reader to sending workers): the run fails naming it and
/// idx 0, and the sending side stops too.
fn source_read_error_on_a_lone_device(kind: EngineKind) {
    fails_reading(kind, Transfer::new(4, vec![unreadable_device()]), 0);
}

fn unreadable_device() -> DevSpec {
    DevSpec {
        source: Source::Unreadable,
        ..DevSpec::memfd(1000, 4096)
    }
}

/// Runs `t`, whose device `unreadable` cannot be read: the source fails naming it and idx 0,
/// and the destination does not complete.
fn fails_reading(kind: EngineKind, t: Transfer, unreadable: usize) {
    let Some(out) = run_transfer(kind, kind, &t) else {
        return;
    };
    match out.source {
        Err(DataPlaneError::ReadDevice {
            ref device, idx: 0, ..
        }) if *device == device_id(unreadable) => {}
        Err(other) => panic!("{other:?}"),
        Ok(_) => panic!("run_source succeeded with an unreadable device"),
    }
    assert!(
        out.dest.is_err(),
        "the destination cannot complete without the source"
    );
}

/// A destination data_fd that cannot be written: the error names the device, idx 0 and the
/// channel the packet came on.
fn dest_write_error(kind: EngineKind) {
    let (read_end, _write_end) = vfio::fd::pipe().unwrap();
    let Some(mut d) = one_device_dest(kind, 2, read_end) else {
        return;
    };
    let id = device_id(0);
    d.feeds[1]
        .write_all(&packet(&id, 0, false, b"cannot land"))
        .unwrap();
    let err = await_side(&d.rx, &[&d.progress], "run_dest").unwrap_err();
    match &err {
        DataPlaneError::WriteDevice {
            device,
            idx: 0,
            channel: 1,
            ..
        } if *device == id => {}
        other => panic!("{other:?}"),
    }
}

/// Plans an engine must refuse before moving anything.
fn invalid_plans(kind: EngineKind) {
    let config = test_config();
    let Some(engine) = engine_or_skip(kind, &config) else {
        return;
    };
    let (src, _dst) = channel_pairs(1);
    let plan = SourcePlan {
        devices: vec![SourceDevice {
            id: device_id(0),
            data_fd: memfd_with(b"abc"),
            read_size: 0,
            config: vec![],
        }],
        channels: src,
        progress: Arc::new(Progress::default()),
    };
    let err = engine.run_source(plan).unwrap_err();
    assert!(matches!(err, DataPlaneError::Setup { .. }), "{err:?}");
    let plan = DestPlan {
        devices: vec![
            DestDevice {
                id: device_id(0),
                data_fd: Sink::memfd().0,
                max_queued_bytes: None,
            },
            DestDevice {
                id: device_id(0),
                data_fd: Sink::memfd().0,
                max_queued_bytes: None,
            },
        ],
        channels: channel_pairs(1).1,
        progress: Arc::new(Progress::default()),
    };
    let err = engine.run_dest(plan).unwrap_err();
    assert!(matches!(err, DataPlaneError::Setup { .. }), "{err:?}");
}

/// `cargo test --release -p vfio-multifd engine::conformance::speed -- --ignored --nocapture`:
/// 4 devices x 100 MiB over 6 channels, 1 MiB chunks, memfd to memfd, each engine to itself.
/// Prints numbers; asserts only that the bytes arrived.
#[test]
#[ignore = "a measurement, not a test"]
fn speed() {
    for kind in [EngineKind::Threads, EngineKind::Uring] {
        let mut t = Transfer::new(6, vec![DevSpec::memfd(100 << 20, 1 << 20); 4]);
        t.config.chunk_size = 1 << 20;
        t.config.workers = std::thread::available_parallelism().map_or(1, |n| n.get());
        t.config.pool_buffers = 64;
        let Some(out) = run_transfer(kind, kind, &t) else {
            continue;
        };
        let secs = out.elapsed.as_secs_f64();
        let mut latencies: Vec<u64> = Vec::new();
        if let (Ok(s), Ok(d)) = (&out.source, &out.dest) {
            for (s, d) in s.devices.iter().zip(&d.devices) {
                latencies.extend(
                    s.read_issued_ns
                        .iter()
                        .zip(&d.written_ns)
                        .map(|(r, w)| w - r),
                );
            }
        }
        latencies.sort_unstable();
        let pct = |p: f64| {
            latencies
                .get(((latencies.len() as f64 - 1.0) * p) as usize)
                .map_or(0, |ns| ns / 1000)
        };
        println!(
            "{:>7}: 400 MiB in {:.3} s = {:.2} GiB/s; per-packet latency us p50 {} p99 {} max {}",
            kind.name(),
            secs,
            0.390625 / secs,
            pct(0.5),
            pct(0.99),
            pct(1.0)
        );
        verify(&t, out);
    }
}

/// Every case, once per engine: `engine::conformance::threads::<case>` and `...::uring::<case>`.
macro_rules! per_engine {
    ($($case:ident),* $(,)?) => {
        mod threads {
            $(#[test] fn $case() { super::$case(super::EngineKind::Threads) })*
        }
        mod uring {
            $(#[test] fn $case() { super::$case(super::EngineKind::Uring) })*
        }
    };
}

per_engine!(
    source_cancel_with_a_silent_device,
    dest_cancel_with_a_stuck_device,
    sequential_devices,
    matrix_1ch_1dev,
    matrix_1ch_4dev,
    matrix_4ch_1dev,
    matrix_4ch_4dev,
    matrix_16ch_1dev,
    matrix_16ch_4dev,
    short_reads_from_pipes,
    zero_byte_device,
    one_chunk_device,
    one_byte_device,
    timestamps_are_bounded,
    source_wire_bytes,
    dest_bad_magic,
    dest_unknown_idstr,
    dest_duplicate_idx,
    dest_second_config,
    dest_data_above_config,
    dest_packet_too_large,
    dest_truncated_payload,
    dest_truncated_header,
    dest_channel_closed_early,
    dest_backpressure_out_of_order,
    dest_queued_bytes_limit_per_device,
    dest_survives_mutated_streams,
    dest_stall_detected,
    dest_slow_packet_is_not_a_stall,
    dest_idle_channel_is_not_a_stall,
    dest_empty_data_packet,
    dest_out_of_order_flood_is_bounded,
    dest_large_packet_flood_is_bounded,
    source_short_send_is_an_error,
    dest_cancel,
    source_cancel,
    source_cancel_names_the_stuck_send,
    source_peer_gone,
    source_read_error,
    source_read_error_on_a_lone_device,
    dest_write_error,
    invalid_plans,
);
