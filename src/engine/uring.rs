//! The io_uring engine: per-core workers over the `uring` crate.
//!
//! Source, per worker (it owns some devices and some channels, one ring, one buffer pool):
//! each buffer slot is [device-state header | VFIO header | chunk]. The headers are written for
//! a full chunk, then the `data_fd` read into the chunk is linked to the send of the whole slot
//! on an idle channel. A short read cancels the send; the completion path rewrites
//! `next_packet_size` and sends what was read. A read of 0 ends the device, whose config packet
//! goes last. One read in flight per device (a `data_fd` is a stream), one send per channel.
//! With fewer devices than workers, one worker reads each device and lends the filled slots to
//! the other workers, which own the channels and send (`handoff`): otherwise a single device
//! would run on one worker, its read and send copies on one core.
//!
//! Destination, per worker (it owns some channels, one ring, one pool): per channel, the 288
//! header bytes are received into a small buffer, then the payload straight into a pool slot,
//! which is written to the device's `data_fd` from that slot when it is next in idx order. The
//! devices' reassembly is shared by all workers (a mutex per device); only the worker owning a
//! slot writes from it, and a worker whose write makes another worker's slot deliverable wakes
//! that worker. A channel whose next packet cannot be placed (queued-bytes limit, no free slot)
//! is parked, not read, until something is written.
//!
//! Workers are not pinned to cores: the scheduler places them within the process's affinity
//! mask (set it with taskset or a cpuset to give the helper its cores). Pinning worker i to
//! the i-th core put both helpers of a same-host migration on the same first cores: gpu (one
//! device, so one source worker) on 2 cores left CPU 1 idle 65 % of the switchover while the
//! destination's worker 0 waited 350 ms for CPU 0; unpinned, gpu went from 1.45-1.87 to
//! 1.61-2.59 GiB/s, with seed, small and many unchanged within noise.

use std::collections::{HashMap, VecDeque};
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use ::uring::{Arena, Buffer, BufferPool, Completion, OpKind, Ring, RingConfig, Waker};

use super::*;
use crate::session::reassembly::{Admission, Reassembly};
use crate::wire::{
    write_packet_headers, DeviceStatePacketHeader, VfioDeviceStatePacketHeader,
    DEVICE_STATE_HEADER_LEN, PACKET_HEADER_ROOM, VFIO_HEADER_LEN,
};
use handoff::Handoff;

mod handoff;

const POLL: Duration = Duration::from_millis(100);
/// With every channel parked and nothing in flight anywhere, how long before "no progress".
/// With a channel parked, no write in flight anywhere and no packet moving, how long before
/// "no progress possible" (a receive idling on an empty channel is not progress).
const STALL_GRACE: Duration = Duration::from_secs(3);

pub struct UringEngine {
    config: EngineConfig,
    /// Every worker's buffers, made (and faulted in) with the engine, before any migration:
    /// a run cuts one pool per worker out of it and puts it back when every ring let go.
    arena: Mutex<Option<Arc<Arena>>>,
}

impl UringEngine {
    /// Checks that a ring can be set up here with the configured mask (io_uring may be
    /// disabled by sysctl, refused by seccomp, or forbidden by the mask), and makes the
    /// buffer arena.
    pub fn new(config: EngineConfig) -> io::Result<Self> {
        let probe_pool = BufferPool::new(1, 4096)?;
        Ring::new(
            &RingConfig {
                entries: 8,
                forbid: config.forbid,
            },
            probe_pool,
        )
        .map_err(|err| io::Error::other(error_chain(&err)))?;
        let slot = BufferPool::slot_bytes(PACKET_HEADER_ROOM + config.chunk_size)?;
        let arena = Arena::new(config.pool_buffers.max(2).saturating_mul(slot))?;
        Ok(Self {
            config,
            arena: Mutex::new(Some(arena)),
        })
    }

    fn ring_config(&self) -> RingConfig {
        RingConfig {
            entries: 256,
            forbid: self.config.forbid,
        }
    }

    /// One pool per worker, `pool_buffers` slots split evenly (at least 2 each), every slot
    /// room for a whole packet (both sides use the same slot size, so one arena serves either).
    fn worker_pools(
        &self,
        workers: usize,
    ) -> Result<(Arc<Arena>, Vec<BufferPool>), DataPlaneError> {
        let setup = |source| DataPlaneError::Setup {
            engine: "uring",
            source,
        };
        let slots = vec![(self.config.pool_buffers / workers).max(2); workers];
        let slot = PACKET_HEADER_ROOM + self.config.chunk_size;
        let need = slots.iter().sum::<usize>() * BufferPool::slot_bytes(slot).map_err(setup)?;
        let kept = self.arena.lock().unwrap_or_else(|p| p.into_inner()).take();
        let arena = match kept {
            Some(arena) if arena.len() >= need => arena,
            // Another run holds it, or this split needs more: a fresh one, faulted in now.
            _ => Arena::new(need).map_err(setup)?,
        };
        let pools = BufferPool::cut(&arena, &slots, slot).map_err(setup)?;
        Ok((arena, pools))
    }

    /// Keeps the arena for the next run unless a ring leaked a pool of it (its ops never
    /// finished, so the kernel may still write there).
    fn keep_arena(&self, arena: Arc<Arena>) {
        if Arc::strong_count(&arena) == 1 {
            *self.arena.lock().unwrap_or_else(|p| p.into_inner()) = Some(arena);
        }
    }
}

/// `statfs` magic of anonymous-inode files (VFIO's `data_fd`), from linux/magic.h.
const ANON_INODE_FS_MAGIC: nix::sys::statfs::FsType = nix::sys::statfs::FsType(0x0904_1934);

fn on_filesystem(fd: BorrowedFd<'_>, magics: &[nix::sys::statfs::FsType]) -> bool {
    nix::sys::statfs::fstatfs(fd).is_ok_and(|fs| magics.contains(&fs.filesystem_type()))
}

/// Shmem files: io_uring hands every buffered write of theirs to an io-wq worker (no
/// FMODE_BUF_WASYNC, and O_NONBLOCK does not change that for regular files), so the worker
/// that holds the bytes writes them itself: the copy costs the same, the handoff (a wakeup and
/// two context switches per packet) goes: `bench --scenario small --quick` switched context
/// 540 times a run instead of 3470 and moved 1.14-1.16 GiB/s instead of 0.95-1.05.
fn writes_only_in_io_wq(fd: BorrowedFd<'_>) -> bool {
    on_filesystem(fd, &[nix::sys::statfs::TMPFS_MAGIC])
}

/// Saving `data_fd`s that io_uring can only read from a worker thread (files without
/// FMODE_NOWAIT: shmem and anonymous-inode device files such as VFIO's) are switched to
/// O_NONBLOCK for the run: the read then runs inline in the submitting thread. A device with
/// nothing saved yet says EAGAIN (mlx5 does under O_NONBLOCK), which io_uring itself turns
/// into a wait for readiness on any file with a poll method. Pipes, sockets and disk files
/// already read inline or wait inside the kernel, so they are left alone. The open file description is
/// shared with whoever passed the fd, so the flag is cleared again when the run ends.
struct NonBlockingReads(Vec<OwnedFd>);

impl NonBlockingReads {
    fn set(devices: &[SourceDevice]) -> Self {
        use nix::fcntl::{fcntl, FcntlArg, OFlag};
        let mut switched = Vec::new();
        for device in devices {
            let fd = &device.data_fd;
            let punted = on_filesystem(
                fd.as_fd(),
                &[nix::sys::statfs::TMPFS_MAGIC, ANON_INODE_FS_MAGIC],
            );
            let Ok(flags) = fcntl(fd, FcntlArg::F_GETFL).map(OFlag::from_bits_truncate) else {
                continue;
            };
            if !punted || flags.contains(OFlag::O_NONBLOCK) {
                continue;
            }
            match fd.try_clone() {
                Ok(dup) if fcntl(&dup, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK)).is_ok() => {
                    switched.push(dup)
                }
                _ => log::debug!("device {}: reads stay blocking", device.id),
            }
        }
        NonBlockingReads(switched)
    }
}

impl Drop for NonBlockingReads {
    fn drop(&mut self) {
        use nix::fcntl::{fcntl, FcntlArg, OFlag};
        for fd in &self.0 {
            let restored = fcntl(fd, FcntlArg::F_GETFL)
                .map(OFlag::from_bits_truncate)
                .and_then(|flags| fcntl(fd, FcntlArg::F_SETFL(flags - OFlag::O_NONBLOCK)));
            if let Err(err) = restored {
                log::warn!("clearing O_NONBLOCK on a data_fd again: {err}");
            }
        }
    }
}

fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Workers and what each owns: item i goes to worker i % n.
fn split_round_robin<T>(items: Vec<T>, n: usize) -> Vec<Vec<(usize, T)>> {
    let mut out: Vec<Vec<(usize, T)>> = (0..n).map(|_| Vec::new()).collect();
    for (i, item) in items.into_iter().enumerate() {
        out[i % n].push((i, item));
    }
    out
}

/// First error wins; everybody else stops.
#[derive(Default)]
struct Failure {
    failed: AtomicBool,
    first: Mutex<Option<DataPlaneError>>,
}

impl Failure {
    fn set(&self, err: DataPlaneError) {
        let mut first = self.first.lock().unwrap_or_else(|p| p.into_inner());
        if first.is_none() {
            *first = Some(err);
        }
        self.failed.store(true, Ordering::SeqCst);
    }

    fn is_set(&self) -> bool {
        self.failed.load(Ordering::SeqCst)
    }

    fn take(&self) -> Option<DataPlaneError> {
        self.first.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

/// Records a worker's error unless it only stopped because another worker failed first.
fn record_failure<T>(
    result: Result<T, DataPlaneError>,
    failure: &Failure,
    progress: &Progress,
) -> Result<T, DataPlaneError> {
    match result {
        Err(DataPlaneError::Cancelled) if !progress.cancelled() && failure.is_set() => {
            Err(DataPlaneError::Cancelled)
        }
        Err(err) => {
            failure.set(err);
            Err(DataPlaneError::Cancelled)
        }
        ok => ok,
    }
}

/// Joins the workers: every worker's value, or the first real error (else Cancelled).
fn join_workers<T>(
    handles: Vec<io::Result<std::thread::ScopedJoinHandle<'_, Result<T, DataPlaneError>>>>,
    failure: &Failure,
    progress: &Progress,
) -> Result<Vec<T>, DataPlaneError> {
    let mut results = Vec::new();
    let mut all_ok = true;
    for handle in handles {
        match handle {
            Ok(handle) => match handle.join() {
                Ok(Ok(value)) => results.push(value),
                Ok(Err(_)) => all_ok = false,
                Err(_) => failure.set(DataPlaneError::Stalled {
                    detail: "an io_uring worker panicked".into(),
                }),
            },
            Err(source) => failure.set(DataPlaneError::Setup {
                engine: "uring",
                source,
            }),
        }
    }
    if let Some(err) = failure.take() {
        return Err(err);
    }
    if !all_ok || progress.cancelled() {
        return Err(DataPlaneError::Cancelled);
    }
    Ok(results)
}

/// The error for a worker thread that could not be started (its `io::Error` stays with the
/// join handle, which reports it too; the first report wins).
fn spawn_failed(err: &io::Error) -> DataPlaneError {
    DataPlaneError::Setup {
        engine: "uring",
        source: io::Error::new(err.kind(), format!("starting an io_uring worker: {err}")),
    }
}

fn shutdown(channels: &[OwnedFd], how: nix::sys::socket::Shutdown) {
    for fd in channels {
        let _ = nix::sys::socket::shutdown(std::os::fd::AsRawFd::as_raw_fd(fd), how);
    }
}

// ---------------------------------------------------------------------------------------------
// Source

struct SrcDevice {
    index: usize,
    id: DeviceId,
    fd: OwnedFd,
    idstr_field: [u8; crate::wire::IDSTR_LEN],
    read_size: usize,
    config: Option<Vec<u8>>,
    next_idx: u32,
    reading: bool,
    /// A short read cancelled its linked send: the packet must be queued for resending before
    /// this device's next read, so each channel carries each device's idx in order.
    resend_pending: bool,
    at_end: bool,
    report: SourceDeviceReport,
}

/// A packet in a buffer, ready to go on any idle channel.
struct ReadyPacket {
    device: usize,
    idx: u32,
    buf: Buffer,
    len: usize,
}

/// What a channel is sending.
struct InFlightSend {
    device: usize,
    idx: u32,
    /// Bytes of the whole packet as submitted.
    len: usize,
    /// For a chained send: the read's result once known.
    read: Option<usize>,
    chained: bool,
}

struct SrcChannel {
    index: usize,
    fd: OwnedFd,
    zc: bool,
    sending: Option<InFlightSend>,
    report: ChannelReport,
}

const TAG_DEVICE: u64 = 1 << 32;

/// A source worker's devices and channels, with their global indexes.
type SourceShare = (Vec<(usize, SourceDevice)>, Vec<(usize, OwnedFd)>);

/// A source worker's reports, by global device and channel index, and its notes.
type SourceWorkerReport = (
    Vec<(usize, SourceDeviceReport)>,
    Vec<(usize, ChannelReport)>,
    Vec<String>,
);

/// A source worker's part in the run.
#[derive(Clone, Copy)]
enum Role<'a> {
    /// Reads its devices and sends their packets on its channels.
    Alone,
    /// Reads device `device` (its only one) and hands the packets to the senders.
    Reader { handoff: &'a Handoff, device: usize },
    /// Owns channels and sends what the readers hand it.
    Sender { handoff: &'a Handoff, me: usize },
}

struct SourceWorker<'a> {
    role: Role<'a>,
    ring: Ring,
    devices: Vec<SrcDevice>,
    channels: Vec<SrcChannel>,
    ready: VecDeque<ReadyPacket>,
    next_channel: usize,
    next_device: usize,
    sequential: bool,
    progress: &'a Progress,
    failure: &'a Failure,
    notes: Vec<String>,
}

impl UringEngine {
    fn source_worker(
        &self,
        role: Role<'_>,
        (devices, channels): SourceShare,
        pool: BufferPool,
        progress: &Progress,
        failure: &Failure,
    ) -> Result<SourceWorkerReport, DataPlaneError> {
        let ring = Ring::new(&self.ring_config(), pool).map_err(|err| DataPlaneError::Setup {
            engine: "uring",
            source: io::Error::other(error_chain(&err)),
        })?;
        match role {
            Role::Alone => {}
            Role::Reader { handoff, device } => handoff.register_reader(device, ring.waker()),
            Role::Sender { handoff, me } => handoff.register_sender(me, ring.waker()),
        }
        let zc = ring.send_zc();
        let mut worker = SourceWorker {
            role,
            notes: ring.notes().to_vec(),
            ring,
            devices: devices
                .into_iter()
                .map(|(index, d)| SrcDevice {
                    index,
                    idstr_field: d.id.idstr_field(),
                    read_size: d.read_size,
                    id: d.id,
                    fd: d.data_fd,
                    config: Some(d.config),
                    next_idx: 0,
                    reading: false,
                    resend_pending: false,
                    at_end: false,
                    report: SourceDeviceReport::default(),
                })
                .collect(),
            channels: channels
                .into_iter()
                .map(|(index, fd)| SrcChannel {
                    index,
                    fd,
                    zc,
                    sending: None,
                    report: ChannelReport::default(),
                })
                .collect(),
            ready: VecDeque::new(),
            next_channel: 0,
            next_device: 0,
            sequential: self.config.sequential_devices,
            progress,
            failure,
        };
        let result = worker.run();
        if result.is_err() {
            worker.ring.cancel_all(Duration::from_secs(5));
        }
        result?;
        Ok((
            worker
                .devices
                .into_iter()
                .map(|d| (d.index, d.report))
                .collect(),
            worker
                .channels
                .into_iter()
                .map(|c| (c.index, c.report))
                .collect(),
            worker.notes,
        ))
    }
}

impl SourceWorker<'_> {
    fn run(&mut self) -> Result<(), DataPlaneError> {
        loop {
            if self.progress.cancelled() {
                return Err(DataPlaneError::Cancelled);
            }
            if self.failure.is_set() {
                return Err(DataPlaneError::Cancelled);
            }
            self.dispatch()?;
            if self.finished() {
                if let Role::Reader { handoff, .. } = self.role {
                    handoff.reader_done();
                }
                return Ok(());
            }
            self.ring
                .wait(1, Some(POLL))
                .map_err(|source| DataPlaneError::Setup {
                    engine: "uring",
                    source,
                })?;
            while let Some(done) = self.ring.next_completion() {
                self.complete(done)?;
            }
        }
    }

    fn finished(&self) -> bool {
        let own_done = self.ready.is_empty()
            && self.devices.iter().all(|d| d.at_end && d.config.is_none())
            && self.channels.iter().all(|c| c.sending.is_none());
        match self.role {
            Role::Sender { handoff, me } => own_done && handoff.inbox_closed(me),
            Role::Alone | Role::Reader { .. } => own_done,
        }
    }

    fn idle_channel(&mut self) -> Option<usize> {
        let n = self.channels.len();
        let found = (0..n)
            .map(|i| (self.next_channel + i) % n)
            .find(|&c| self.channels[c].sending.is_none())?;
        self.next_channel = (found + 1) % n;
        Some(found)
    }

    /// Hands out work: ready packets first (resends, config packets), then new reads, devices
    /// taken round robin so several devices interleave fairly.
    fn dispatch(&mut self) -> Result<(), DataPlaneError> {
        match self.role {
            Role::Alone => {}
            Role::Reader { handoff, device } => {
                for slot in handoff.take_returns(device) {
                    self.ring.pool().take_back(slot);
                }
                while let Some(packet) = self.ready.pop_front() {
                    let packet = self.lend(packet);
                    handoff.hand_over(packet);
                }
            }
            Role::Sender { handoff, me } => self.ready.extend(handoff.take_inbox(me)),
        }
        while !self.ready.is_empty() {
            let Some(c) = self.idle_channel() else { break };
            let packet = self.ready.pop_front().expect("checked non-empty");
            self.send_ready(c, packet)?;
        }
        let n = self.devices.len();
        // Sequential mode: only the first device not yet finished may read.
        let current = self
            .sequential
            .then(|| self.devices.iter().position(|d| !d.at_end))
            .flatten();
        for i in 0..n {
            let d = (self.next_device + i) % n;
            let device = &self.devices[d];
            if device.reading
                || device.resend_pending
                || device.at_end
                || current.is_some_and(|c| c != d)
            {
                continue;
            }
            if self.ring.pool().free_slots() == 0 {
                break;
            }
            if let Role::Reader { handoff, .. } = self.role {
                if !handoff.has_room() {
                    break;
                }
            }
            if self.ring.linked_chains() && !self.channels.is_empty() {
                let Some(c) = self.idle_channel() else { break };
                self.start_chain(d, c)?;
            } else {
                self.start_read(d)?;
            }
            self.next_device = (d + 1) % n;
        }
        Ok(())
    }

    fn prepare_slot(&mut self, d: usize) -> (::uring::BufId, usize) {
        let buf = self.ring.pool().take().expect("caller checked a free slot");
        let device = &mut self.devices[d];
        let slot = self.ring.pool().slot_mut(&buf);
        let room: &mut [u8; PACKET_HEADER_ROOM] = (&mut slot[..PACKET_HEADER_ROOM])
            .try_into()
            .expect("slot holds the header room");
        write_packet_headers(
            room,
            &device.idstr_field,
            device.id.instance_id,
            device.next_idx,
            false,
            device.read_size as u32,
        );
        device.reading = true;
        device.report.read_issued_ns.push(monotonic_ns());
        (buf, device.read_size)
    }

    fn start_chain(&mut self, d: usize, c: usize) -> Result<(), DataPlaneError> {
        let (buf, read_size) = self.prepare_slot(d);
        let device = &self.devices[d];
        let channel = &self.channels[c];
        let idx = device.next_idx;
        let len = PACKET_HEADER_ROOM + read_size;
        self.ring
            .read_then_send(
                c as u64,
                device.fd.as_fd(),
                channel.fd.as_fd(),
                buf,
                PACKET_HEADER_ROOM..len,
                0..len,
                channel.zc,
            )
            .map_err(|source| DataPlaneError::Send {
                channel: channel.index,
                device: device.id.clone(),
                idx,
                source,
            })?;
        self.channels[c].sending = Some(InFlightSend {
            device: d,
            idx,
            len,
            read: None,
            chained: true,
        });
        Ok(())
    }

    fn start_read(&mut self, d: usize) -> Result<(), DataPlaneError> {
        let (buf, read_size) = self.prepare_slot(d);
        let device = &self.devices[d];
        self.ring
            .read(
                TAG_DEVICE | d as u64,
                device.fd.as_fd(),
                Buffer::Pool(buf),
                PACKET_HEADER_ROOM..PACKET_HEADER_ROOM + read_size,
            )
            .map_err(|source| DataPlaneError::ReadDevice {
                device: device.id.clone(),
                idx: device.next_idx,
                source,
            })
    }

    /// A packet of this reader for a sender: its device by global index, a pool slot lent.
    fn lend(&mut self, packet: ReadyPacket) -> ReadyPacket {
        let buf = match packet.buf {
            Buffer::Pool(id) => Buffer::Lent(self.ring.pool().lend(id)),
            other => other,
        };
        ReadyPacket {
            device: self.devices[packet.device].index,
            buf,
            ..packet
        }
    }

    /// Device `d` (a sender's `d` is the global index of a handed-over packet's device).
    fn device_id(&self, d: usize) -> DeviceId {
        match self.role {
            Role::Sender { handoff, .. } => handoff.device_id(d).clone(),
            Role::Alone | Role::Reader { .. } => self.devices[d].id.clone(),
        }
    }

    fn send_ready(&mut self, c: usize, packet: ReadyPacket) -> Result<(), DataPlaneError> {
        let channel = &self.channels[c];
        self.ring
            .send(
                c as u64,
                channel.fd.as_fd(),
                packet.buf,
                0..packet.len,
                channel.zc,
            )
            .map_err(|source| DataPlaneError::Send {
                channel: channel.index,
                device: self.device_id(packet.device),
                idx: packet.idx,
                source,
            })?;
        self.channels[c].sending = Some(InFlightSend {
            device: packet.device,
            idx: packet.idx,
            len: packet.len,
            read: None,
            chained: false,
        });
        Ok(())
    }

    /// A read of `n` bytes finished for device `d`: account it; 0 ends the device.
    fn read_done(&mut self, d: usize, result: io::Result<usize>) -> Result<usize, DataPlaneError> {
        let device = &mut self.devices[d];
        device.reading = false;
        let n = result.map_err(|source| DataPlaneError::ReadDevice {
            device: device.id.clone(),
            idx: device.next_idx,
            source,
        })?;
        if n == 0 {
            device.at_end = true;
            device.report.read_issued_ns.pop();
            self.queue_config(d);
        } else {
            device.next_idx += 1;
            device.report.bytes += n as u64;
            device.report.data_packets += 1;
            self.progress.add(n);
        }
        Ok(n)
    }

    fn queue_config(&mut self, d: usize) {
        let device = &mut self.devices[d];
        let Some(config) = device.config.take() else {
            return;
        };
        let mut packet = vec![0u8; PACKET_HEADER_ROOM + config.len()].into_boxed_slice();
        let room: &mut [u8; PACKET_HEADER_ROOM] = (&mut packet[..PACKET_HEADER_ROOM])
            .try_into()
            .expect("packet holds the header room");
        write_packet_headers(
            room,
            &device.idstr_field,
            device.id.instance_id,
            device.next_idx,
            true,
            config.len() as u32,
        );
        packet[PACKET_HEADER_ROOM..].copy_from_slice(&config);
        let len = packet.len();
        // The config packet counts as sent once its send completes (kept in `config` until
        // then would need another flag; `ready` plus `sending` cover it for `finished`).
        self.ready.push_back(ReadyPacket {
            device: d,
            idx: device.next_idx,
            buf: Buffer::Heap(packet),
            len,
        });
    }

    /// The packet for a short read of `n` bytes: `next_packet_size` rewritten.
    fn short_packet(&mut self, d: usize, idx: u32, buf: Buffer, n: usize) -> Option<ReadyPacket> {
        let Buffer::Pool(id) = buf else { return None };
        let slot = self.ring.pool().slot_mut(&id);
        let header: &mut [u8; DEVICE_STATE_HEADER_LEN] = (&mut slot[..DEVICE_STATE_HEADER_LEN])
            .try_into()
            .expect("slot holds the header");
        DeviceStatePacketHeader::set_next_packet_size(header, (VFIO_HEADER_LEN + n) as u32);
        Some(ReadyPacket {
            device: d,
            idx,
            buf: Buffer::Pool(id),
            len: PACKET_HEADER_ROOM + n,
        })
    }

    fn recycle(&mut self, buf: Option<Buffer>) {
        if let Some(Buffer::Pool(id)) = buf {
            self.ring.pool().put(id);
        }
    }

    /// A packet of device `d` is on the wire: its buffer is free again (a lent one goes back
    /// to its reader).
    fn sent(&mut self, d: usize, buf: Option<Buffer>) {
        match self.role {
            Role::Sender { handoff, me } => {
                let slot = match buf {
                    Some(Buffer::Lent(slot)) => Some(slot),
                    _ => None,
                };
                handoff.sent(me, d, slot);
            }
            Role::Alone | Role::Reader { .. } => self.recycle(buf),
        }
    }

    fn complete(&mut self, done: Completion) -> Result<(), DataPlaneError> {
        match done.kind {
            OpKind::Wake => Ok(()),
            OpKind::Read => {
                let d = (done.tag & !TAG_DEVICE) as usize;
                let idx = self.devices[d].next_idx;
                let n = self.read_done(d, done.result)?;
                if n == 0 {
                    self.recycle(done.buf);
                } else if let Some(buf) = done.buf {
                    // Queue order is read order.
                    if let Some(packet) = self.short_packet(d, idx, buf, n) {
                        self.ready.push_back(packet);
                    }
                }
                Ok(())
            }
            OpKind::ChainRead => {
                let c = done.tag as usize;
                let Some(sending) = self.channels[c].sending.as_ref() else {
                    return Ok(());
                };
                let d = sending.device;
                let n = self.read_done(d, done.result)?;
                if n > 0 && n < self.devices[d].read_size {
                    self.devices[d].resend_pending = true;
                }
                if let Some(sending) = self.channels[c].sending.as_mut() {
                    sending.read = Some(n);
                }
                Ok(())
            }
            OpKind::ChainSend | OpKind::Send => self.send_done(done),
            OpKind::Write | OpKind::Recv => Ok(()),
        }
    }

    fn send_done(&mut self, done: Completion) -> Result<(), DataPlaneError> {
        let c = done.tag as usize;
        let Some(sending) = self.channels[c].sending.take() else {
            self.recycle(done.buf);
            return Ok(());
        };
        // What the op was sent as: a refused SEND_ZC also posts a notification.
        let sent_zc = self.channels[c].zc;
        if done.zc_copied && sent_zc {
            self.channels[c].zc = false;
            self.note(format!(
                "channel {}: the kernel copied a SEND_ZC (loopback does); plain send from now on",
                self.channels[c].index
            ));
        }
        match done.result {
            Ok(sent) => {
                let report = &mut self.channels[c].report;
                report.bytes += sent as u64;
                report.packets += 1;
                self.sent(sending.device, done.buf);
                Ok(())
            }
            Err(err) if sending.chained && err.raw_os_error() == Some(libc::ECANCELED) => {
                self.devices[sending.device].resend_pending = false;
                match (sending.read, done.buf) {
                    (Some(n), Some(buf)) if n > 0 => {
                        let packet = self.short_packet(sending.device, sending.idx, buf, n);
                        // The channel the chain had is idle now: the packet goes out on it at
                        // once, before this device's next read.
                        if let Some(packet) = packet {
                            self.send_ready(c, packet)?;
                        }
                    }
                    (_, buf) => self.recycle(buf),
                }
                Ok(())
            }
            // EOPNOTSUPP: not a TCP/UDP socket; EINVAL: a kernel without REPORT_USAGE (6.0/6.1).
            Err(err)
                if matches!(err.raw_os_error(), Some(libc::EOPNOTSUPP | libc::EINVAL))
                    && sent_zc =>
            {
                self.channels[c].zc = false;
                self.note(format!(
                    "channel {}: SEND_ZC refused ({err}); plain send",
                    self.channels[c].index
                ));
                let buf = done.buf.expect("a send returns its buffer");
                // A linked send runs only after a full read (a short one cancels it), so the
                // slot holds the packet exactly as prepared: resend it plain on the same, now
                // idle, channel.
                self.send_ready(
                    c,
                    ReadyPacket {
                        device: sending.device,
                        idx: sending.idx,
                        buf,
                        len: sending.len,
                    },
                )?;
                Ok(())
            }
            Err(source) => Err(DataPlaneError::Send {
                channel: self.channels[c].index,
                device: self.device_id(sending.device),
                idx: sending.idx,
                source,
            }),
        }
    }

    fn note(&mut self, note: String) {
        log::info!("{note}");
        self.notes.push(note);
    }
}

impl Engine for UringEngine {
    fn kind(&self) -> EngineKind {
        EngineKind::Uring
    }

    fn run_source(&self, plan: SourcePlan) -> Result<SourceReport, DataPlaneError> {
        let SourcePlan {
            devices,
            channels,
            progress,
        } = plan;
        let n_devices = devices.len();
        let n_channels = channels.len();
        if n_channels == 0 {
            return Err(DataPlaneError::Stalled {
                detail: "no channels to send on".into(),
            });
        }
        if let Some(device) = devices
            .iter()
            .find(|d| d.read_size == 0 || d.read_size > self.config.chunk_size)
        {
            return Err(DataPlaneError::Setup {
                engine: "uring",
                source: io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "device {}: read size {} is outside 1..={} (the chunk size)",
                        device.id, device.read_size, self.config.chunk_size
                    ),
                ),
            });
        }
        // Devices one after another is one stream of work: one worker, as QEMU's single
        // migration thread was.
        let workers = if self.config.sequential_devices {
            1
        } else {
            self.config.workers.clamp(1, n_channels)
        };
        // Channel fds stay here (dup'd for the workers) so they can be shut down at the end.
        let dup = |fd: &OwnedFd| {
            fd.try_clone().map_err(|source| DataPlaneError::Setup {
                engine: "uring",
                source,
            })
        };
        let worker_channels: Vec<OwnedFd> = channels.iter().map(dup).collect::<Result<_, _>>()?;
        let _non_blocking = NonBlockingReads::set(&devices);
        let handoff = (n_devices > 0 && n_devices < workers).then(|| {
            Handoff::new(
                devices.iter().map(|d| d.id.clone()).collect(),
                workers - n_devices,
                n_channels,
            )
        });
        let (arena, shares) = match &handoff {
            None => {
                let workers = workers.min(n_devices.max(1));
                let (arena, pools) = self.worker_pools(workers)?;
                let shares: Vec<_> = split_round_robin(devices, workers)
                    .into_iter()
                    .zip(split_round_robin(worker_channels, workers))
                    .zip(pools)
                    .map(|(share, pool)| (Role::Alone, share, pool))
                    .collect();
                (arena, shares)
            }
            Some(handoff) => {
                let (arena, pools) = self.worker_pools(n_devices)?;
                let mut shares: Vec<_> = devices
                    .into_iter()
                    .enumerate()
                    .zip(pools)
                    .map(|((d, device), pool)| {
                        let role = Role::Reader { handoff, device: d };
                        (role, (vec![(d, device)], Vec::new()), pool)
                    })
                    .collect();
                let senders = split_round_robin(worker_channels, workers - n_devices);
                for (me, chans) in senders.into_iter().enumerate() {
                    // Senders send from lent slots: their own pool is a page the ring needs.
                    let pool =
                        BufferPool::new(1, 4096).map_err(|source| DataPlaneError::Setup {
                            engine: "uring",
                            source,
                        })?;
                    shares.push((Role::Sender { handoff, me }, (Vec::new(), chans), pool));
                }
                (arena, shares)
            }
        };
        let failure = Failure::default();
        let results = std::thread::scope(|scope| {
            let handles: Vec<_> = shares
                .into_iter()
                .enumerate()
                .map(|(w, (role, share, pool))| {
                    let (progress, failure) = (&*progress, &failure);
                    let spawned = std::thread::Builder::new()
                        .name(format!("uring-{w}"))
                        .spawn_scoped(scope, move || {
                            let result = self.source_worker(role, share, pool, progress, failure);
                            record_failure(result, failure, progress)
                        });
                    // Readers and senders wait on each other: the others stop now, not at join.
                    if let Err(err) = &spawned {
                        failure.set(spawn_failed(err));
                    }
                    spawned
                })
                .collect();
            join_workers(handles, &failure, &progress)
        });
        let handed_off = handoff.is_some();
        // Slots still in mailboxes hold the arena.
        drop(handoff);
        self.keep_arena(arena);
        let results = match results {
            Ok(results) => results,
            Err(err) => {
                shutdown(&channels, nix::sys::socket::Shutdown::Both);
                return Err(err);
            }
        };
        shutdown(&channels, nix::sys::socket::Shutdown::Write);
        let mut report = SourceReport {
            devices: vec![SourceDeviceReport::default(); n_devices],
            channels: vec![ChannelReport::default(); n_channels],
            notes: Vec::new(),
        };
        if handed_off {
            report.notes.push(format!(
                "handoff: {n_devices} reading and {} sending workers (fewer devices than workers)",
                workers - n_devices
            ));
        }
        for (devs, chans, notes) in results {
            for (i, d) in devs {
                report.devices[i] = d;
            }
            for (i, c) in chans {
                report.channels[i] = c;
            }
            report.notes.extend(notes);
        }
        Ok(report)
    }

    fn run_dest(&self, plan: DestPlan) -> Result<DestReport, DataPlaneError> {
        let DestPlan {
            devices,
            channels,
            progress,
        } = plan;
        let n_channels = channels.len();
        if n_channels == 0 {
            return Err(DataPlaneError::Stalled {
                detail: "no channels to receive on".into(),
            });
        }
        for (i, device) in devices.iter().enumerate() {
            if devices[..i].iter().any(|other| other.id == device.id) {
                return Err(DataPlaneError::Setup {
                    engine: "uring",
                    source: io::Error::new(
                        io::ErrorKind::InvalidInput,
                        format!("device {} is listed twice", device.id),
                    ),
                });
            }
        }
        let workers = self.config.workers.clamp(1, n_channels);
        let shared = DestShared::new(devices, self.config.max_queued_bytes, workers, n_channels);
        let worker_channels: Vec<OwnedFd> = channels
            .iter()
            .map(|fd| {
                fd.try_clone().map_err(|source| DataPlaneError::Setup {
                    engine: "uring",
                    source,
                })
            })
            .collect::<Result<_, _>>()?;
        let per_worker = split_round_robin(worker_channels, workers);
        let (arena, pools) = self.worker_pools(workers)?;
        let notes = std::thread::scope(|scope| {
            let handles: Vec<_> = per_worker
                .into_iter()
                .zip(pools)
                .enumerate()
                .map(|(w, (chans, pool))| {
                    let (shared, progress) = (&shared, &*progress);
                    let spawned = std::thread::Builder::new()
                        .name(format!("uring-{w}"))
                        .spawn_scoped(scope, move || {
                            let result = self.dest_worker(w, chans, pool, shared, progress);
                            let result = record_failure(result, &shared.failure, progress);
                            if result.is_err() {
                                shared.wake_all();
                            }
                            result
                        });
                    // The other workers stop now: a device can complete only with every channel.
                    if let Err(err) = &spawned {
                        shared.failure.set(spawn_failed(err));
                        shared.wake_all();
                    }
                    spawned
                })
                .collect();
            join_workers(handles, &shared.failure, &progress)
        });
        self.keep_arena(arena);
        let notes = match notes {
            Ok(notes) => notes,
            Err(err) => {
                shutdown(&channels, nix::sys::socket::Shutdown::Both);
                return Err(err);
            }
        };
        let mut report = DestReport {
            devices: Vec::new(),
            channels: vec![ChannelReport::default(); n_channels],
            notes: notes.into_iter().flatten().collect(),
        };
        for (i, c) in shared
            .channel_reports
            .into_inner()
            .unwrap_or_else(|p| p.into_inner())
        {
            report.channels[i] = c;
        }
        for (device, state) in shared.devices.iter().zip(shared.states) {
            let state = state.into_inner().unwrap_or_else(|p| p.into_inner());
            if !state.reassembly.is_loaded() {
                return Err(DataPlaneError::Incomplete {
                    device: device.id.clone(),
                    next_idx: state.reassembly.next_idx(),
                    config_idx: state.reassembly.config_idx(),
                });
            }
            report.devices.push(state.report);
        }
        Ok(report)
    }
}

// ---------------------------------------------------------------------------------------------
// Destination

/// A received payload waiting in a device's reassembly: which worker's pool it belongs to.
#[derive(Debug)]
struct Held {
    worker: usize,
    channel: usize,
    buf: Buffer,
}

struct DevState {
    reassembly: Reassembly<Held>,
    report: DestDeviceReport,
}

struct DestShared {
    devices: Vec<DestDevice>,
    /// Per device: written from the worker thread itself (see `writes_only_in_io_wq`).
    write_now: Vec<bool>,
    by_id: HashMap<(Vec<u8>, u32), usize>,
    states: Vec<Mutex<DevState>>,
    wakers: Mutex<Vec<Option<Waker>>>,
    parked: Vec<AtomicUsize>,
    /// recvs + writes in flight, all workers.
    active_ops: AtomicUsize,
    /// Device writes in flight, all workers.
    writes_in_flight: AtomicUsize,
    progress_events: AtomicU64,
    loaded: AtomicUsize,
    done_channels: AtomicUsize,
    n_channels: usize,
    /// Channels parked anywhere, with what they hold, for the stall message.
    parked_detail: Mutex<HashMap<usize, String>>,
    failure: Failure,
    channel_reports: Mutex<Vec<(usize, ChannelReport)>>,
}

impl DestShared {
    fn new(devices: Vec<DestDevice>, max_queued: u64, workers: usize, n_channels: usize) -> Self {
        let by_id = devices
            .iter()
            .enumerate()
            .map(|(i, d)| ((d.id.idstr.as_bytes().to_vec(), d.id.instance_id), i))
            .collect();
        let states = devices
            .iter()
            .map(|_| {
                Mutex::new(DevState {
                    reassembly: Reassembly::new(max_queued),
                    report: DestDeviceReport::default(),
                })
            })
            .collect();
        let write_now = devices
            .iter()
            .map(|d| writes_only_in_io_wq(d.data_fd.as_fd()))
            .collect();
        Self {
            devices,
            write_now,
            by_id,
            states,
            wakers: Mutex::new(vec![None; workers]),
            parked: (0..workers).map(|_| AtomicUsize::new(0)).collect(),
            active_ops: AtomicUsize::new(0),
            writes_in_flight: AtomicUsize::new(0),
            progress_events: AtomicU64::new(0),
            loaded: AtomicUsize::new(0),
            done_channels: AtomicUsize::new(0),
            n_channels,
            parked_detail: Mutex::new(HashMap::new()),
            failure: Failure::default(),
            channel_reports: Mutex::new(Vec::new()),
        }
    }

    fn state(&self, d: usize) -> MutexGuard<'_, DevState> {
        self.states[d].lock().unwrap_or_else(|p| p.into_inner())
    }

    fn waker(&self, w: usize) -> Option<Waker> {
        self.wakers.lock().unwrap_or_else(|p| p.into_inner())[w].clone()
    }

    fn wake_all(&self) {
        for waker in self
            .wakers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .flatten()
        {
            waker.wake();
        }
    }
}

/// Where a destination channel is.
enum ChanState {
    /// Receiving the 288 header bytes; `got` of them are in `hdr`.
    Header {
        got: usize,
    },
    /// The header is decoded; the packet waits for a place (parked) or its payload is coming.
    Packet(PacketInfo),
    Done,
}

#[derive(Clone, Copy)]
struct PacketInfo {
    device: usize,
    idx: u32,
    config: bool,
    len: u32,
    /// The payload is being received; `got` bytes so far.
    got: usize,
    parked: bool,
}

struct DstChannel {
    index: usize,
    fd: OwnedFd,
    state: ChanState,
    hdr: Option<Box<[u8]>>,
    payload: Option<Buffer>,
    /// Bytes of the stream consumed before the current packet.
    offset: u64,
    report: ChannelReport,
}

/// A write in flight: to device `device`, idx `idx`, `done` of `len` bytes written.
struct WriteOp {
    device: usize,
    idx: u32,
    channel: usize,
    len: usize,
    done: usize,
}

const TAG_WRITE: u64 = 1 << 40;

/// Whether a write completion finished its logical write or continued it.
enum WriteProgress {
    Partial,
    Done,
}

struct DestWorker<'a> {
    w: usize,
    ring: Ring,
    channels: Vec<DstChannel>,
    writes: HashMap<u64, WriteOp>,
    next_write_tag: u64,
    heap_held: usize,
    shared: &'a DestShared,
    progress: &'a Progress,
    max_packet_size: u32,
    last_progress: (u64, Instant),
}

impl UringEngine {
    fn dest_worker(
        &self,
        w: usize,
        channels: Vec<(usize, OwnedFd)>,
        pool: BufferPool,
        shared: &DestShared,
        progress: &Progress,
    ) -> Result<Vec<String>, DataPlaneError> {
        let ring = Ring::new(&self.ring_config(), pool).map_err(|err| DataPlaneError::Setup {
            engine: "uring",
            source: io::Error::other(error_chain(&err)),
        })?;
        // Registered before this worker's first receive: only a worker that owns a slot or a
        // parked channel is ever woken, and it owns neither before it has received, so no wake
        // is lost and workers need not wait for each other to start.
        shared.wakers.lock().unwrap_or_else(|p| p.into_inner())[w] = Some(ring.waker());
        let notes = ring.notes().to_vec();
        let mut worker = DestWorker {
            w,
            ring,
            channels: channels
                .into_iter()
                .map(|(index, fd)| DstChannel {
                    index,
                    fd,
                    state: ChanState::Header { got: 0 },
                    hdr: Some(vec![0u8; PACKET_HEADER_ROOM].into_boxed_slice()),
                    payload: None,
                    offset: crate::wire::INIT_PACKET_LEN as u64,
                    report: ChannelReport::default(),
                })
                .collect(),
            writes: HashMap::new(),
            next_write_tag: 0,
            heap_held: 0,
            shared,
            progress,
            max_packet_size: self.config.max_packet_size,
            last_progress: (0, Instant::now()),
        };
        let result = worker.run();
        if result.is_err() {
            worker.ring.cancel_all(Duration::from_secs(5));
        }
        // Hand back buffers still queued in reassembly that belong to this worker: none are
        // left on success; on failure the pool is dropped with the ring.
        let reports = worker.channels.iter().map(|c| (c.index, c.report.clone()));
        shared
            .channel_reports
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(reports);
        result.map(|()| notes)
    }
}

impl DestWorker<'_> {
    fn run(&mut self) -> Result<(), DataPlaneError> {
        for c in 0..self.channels.len() {
            self.recv_header(c)?;
        }
        loop {
            if self.progress.cancelled() {
                return Err(DataPlaneError::Cancelled);
            }
            if self.shared.failure.is_set() {
                return Err(DataPlaneError::Cancelled);
            }
            if self.finished()? {
                return Ok(());
            }
            self.ring
                .wait(1, Some(POLL))
                .map_err(|source| DataPlaneError::Setup {
                    engine: "uring",
                    source,
                })?;
            let mut woken = false;
            while let Some(done) = self.ring.next_completion() {
                match done.kind {
                    OpKind::Wake => woken = true,
                    OpKind::Recv => self.recv_done(done)?,
                    OpKind::Write => self.write_done(done)?,
                    _ => {}
                }
            }
            if woken || self.has_parked() {
                self.deliver_mine()?;
                self.retry_parked()?;
            }
            self.check_stall()?;
        }
    }

    /// This worker is done when its channels reached EOF, nothing of its is in flight, and no
    /// buffer of its pool waits in a reassembly (another worker's write may still make it
    /// deliverable, and only this worker may write from it).
    fn finished(&mut self) -> Result<bool, DataPlaneError> {
        let idle = self
            .channels
            .iter()
            .all(|c| matches!(c.state, ChanState::Done))
            && self.writes.is_empty()
            && self.ring.in_flight() == 0;
        if !idle {
            return Ok(false);
        }
        if self.heap_held == 0 && self.ring.buffers().free_slots() == self.ring.buffers().slots() {
            return Ok(true);
        }
        // Buffers of this worker wait in a reassembly. Once every channel everywhere has ended
        // and nothing is in flight anywhere, only deliveries can still happen: stay while any
        // device's next buffer is here (deliver it, or wake its owner), leave when none is.
        let all_ended = self.shared.done_channels.load(Ordering::SeqCst) == self.shared.n_channels
            && self.shared.active_ops.load(Ordering::SeqCst) == 0;
        if !all_ended {
            return Ok(false);
        }
        let deliverable = (0..self.shared.devices.len())
            .any(|d| self.shared.state(d).reassembly.peek_ready().is_some());
        if deliverable {
            self.deliver_mine()?;
            return Ok(false);
        }
        Ok(true)
    }

    fn has_parked(&self) -> bool {
        self.shared.parked[self.w].load(Ordering::SeqCst) > 0
    }

    fn recv_header(&mut self, c: usize) -> Result<(), DataPlaneError> {
        let channel = &mut self.channels[c];
        let ChanState::Header { got } = channel.state else {
            return Ok(());
        };
        let hdr = channel
            .hdr
            .take()
            .expect("header buffer is home between packets");
        // Without MSG_WAITALL: one recv when the header is there (the common case), and a bad
        // device-state header is reported even if its VFIO header never follows.
        self.shared.active_ops.fetch_add(1, Ordering::SeqCst);
        self.ring
            .recv_some(
                c as u64,
                channel.fd.as_fd(),
                Buffer::Heap(hdr),
                got..PACKET_HEADER_ROOM,
            )
            .map_err(|source| DataPlaneError::Recv {
                channel: channel.index,
                offset: channel.offset + got as u64,
                source,
            })
    }

    /// `active_ops` drops only after the completion's effects (a filled reassembly slot, the
    /// next receive, a write handed out) are in place: a worker that sees nothing in flight and
    /// nothing deliverable may leave, so there must be no gap between the two.
    fn recv_done(&mut self, done: Completion) -> Result<(), DataPlaneError> {
        let result = self.recv_finished(done);
        self.shared.active_ops.fetch_sub(1, Ordering::SeqCst);
        result
    }

    fn recv_finished(&mut self, done: Completion) -> Result<(), DataPlaneError> {
        let c = done.tag as usize;
        let channel = &mut self.channels[c];
        let index = channel.index;
        let n = match done.result {
            Ok(n) => n,
            Err(source) => {
                let offset = channel.offset;
                return Err(DataPlaneError::Recv {
                    channel: index,
                    offset,
                    source,
                });
            }
        };
        match &mut channel.state {
            ChanState::Header { got } => {
                channel.hdr = match done.buf {
                    Some(Buffer::Heap(hdr)) => Some(hdr),
                    _ => None,
                };
                if n == 0 && *got == 0 {
                    channel.state = ChanState::Done;
                    self.shared.done_channels.fetch_add(1, Ordering::SeqCst);
                    return Ok(());
                }
                if n == 0 {
                    return Err(DataPlaneError::TruncatedPacket {
                        channel: index,
                        offset: channel.offset,
                    });
                }
                *got += n;
                let (before, got) = (*got - n, *got);
                if before < DEVICE_STATE_HEADER_LEN && got >= DEVICE_STATE_HEADER_LEN {
                    self.check_device_state_header(c)?;
                }
                if got < PACKET_HEADER_ROOM {
                    return self.recv_header(c);
                }
                let info = self.decode_header(c)?;
                self.channels[c].state = ChanState::Packet(info);
                self.place(c)
            }
            ChanState::Packet(info) => {
                if n == 0 {
                    return Err(DataPlaneError::TruncatedPacket {
                        channel: index,
                        offset: channel.offset,
                    });
                }
                info.got += n;
                channel.payload = done.buf;
                if info.got < info.len as usize {
                    return self.recv_payload(c);
                }
                self.payload_done(c)
            }
            ChanState::Done => Ok(()),
        }
    }

    fn check_device_state_header(&self, c: usize) -> Result<(), DataPlaneError> {
        let channel = &self.channels[c];
        let hdr = channel
            .hdr
            .as_deref()
            .expect("header buffer is home after its recv");
        let ds: &[u8; DEVICE_STATE_HEADER_LEN] = hdr[..DEVICE_STATE_HEADER_LEN]
            .try_into()
            .expect("288-byte header buffer");
        DeviceStatePacketHeader::decode(ds, self.max_packet_size)
            .map(drop)
            .map_err(|source| DataPlaneError::Wire {
                channel: channel.index,
                offset: channel.offset,
                source,
            })
    }

    fn decode_header(&mut self, c: usize) -> Result<PacketInfo, DataPlaneError> {
        let channel = &self.channels[c];
        let (index, offset) = (channel.index, channel.offset);
        let hdr = channel
            .hdr
            .as_deref()
            .expect("header buffer is home after its recv");
        let wire = |source| DataPlaneError::Wire {
            channel: index,
            offset,
            source,
        };
        let (ds, vfio) = hdr.split_at(DEVICE_STATE_HEADER_LEN);
        let ds: &[u8; DEVICE_STATE_HEADER_LEN] = ds.try_into().expect("288-byte header buffer");
        let view = DeviceStatePacketHeader::decode(ds, self.max_packet_size).map_err(wire)?;
        let vfio: &[u8; VFIO_HEADER_LEN] = vfio.try_into().expect("288-byte header buffer");
        let vfio =
            VfioDeviceStatePacketHeader::decode(vfio, DEVICE_STATE_HEADER_LEN).map_err(wire)?;
        let key = (view.idstr.to_vec(), view.instance_id);
        let Some(&device) = self.shared.by_id.get(&key) else {
            return Err(DataPlaneError::UnknownDevice {
                channel: index,
                idstr: String::from_utf8_lossy(view.idstr).into_owned(),
                instance_id: view.instance_id,
                offset,
            });
        };
        Ok(PacketInfo {
            device,
            idx: vfio.idx,
            config: vfio.config,
            len: view.next_packet_size - VFIO_HEADER_LEN as u32,
            got: 0,
            parked: false,
        })
    }

    /// Finds the packet a place: admission by the device's reassembly, then a buffer. Parks the
    /// channel when either says "not now".
    fn place(&mut self, c: usize) -> Result<(), DataPlaneError> {
        let ChanState::Packet(mut info) = self.channels[c].state else {
            return Ok(());
        };
        let index = self.channels[c].index;
        let mut state = self.shared.state(info.device);
        let admission = state
            .reassembly
            .admit(info.idx, info.config, info.len)
            .map_err(|source| DataPlaneError::Reassembly {
                channel: index,
                device: self.shared.devices[info.device].id.clone(),
                idx: info.idx,
                source,
            })?;
        let is_next = state.reassembly.is_next(info.idx);
        let fits_slot = info.len as usize <= self.ring.buffers().slot_size();
        // The last free slot is kept for the packet that is next in order, so out-of-order
        // packets cannot take every slot and leave nothing for the one that unblocks them.
        let free = self.ring.buffers().free_slots();
        let buffer_ok = !fits_slot || free > 1 || (free == 1 && is_next);
        if admission == Admission::Wait || !buffer_ok {
            let why = if admission == Admission::Wait {
                format!(
                    "over the queued-bytes limit with {} bytes queued",
                    state.reassembly.queued_bytes()
                )
            } else {
                "no free buffer".to_string()
            };
            let detail = format!(
                "channel {index} holds device {} idx {} ({} bytes) while the device waits for idx {} ({why})",
                self.shared.devices[info.device].id,
                info.idx,
                info.len,
                state.reassembly.next_idx(),
            );
            drop(state);
            self.shared
                .parked_detail
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(index, detail);
            if !info.parked {
                info.parked = true;
                self.shared.parked[self.w].fetch_add(1, Ordering::SeqCst);
                self.channels[c].state = ChanState::Packet(info);
            }
            return Ok(());
        }
        state.reassembly.reserve(info.idx, info.config, info.len);
        drop(state);
        if info.parked {
            info.parked = false;
            self.shared.parked[self.w].fetch_sub(1, Ordering::SeqCst);
            self.shared
                .parked_detail
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&index);
        }
        let buf = if fits_slot {
            Buffer::Pool(self.ring.pool().take().expect("checked a free slot"))
        } else {
            self.heap_held += 1;
            Buffer::Heap(vec![0u8; info.len as usize].into_boxed_slice())
        };
        self.channels[c].payload = Some(buf);
        self.channels[c].state = ChanState::Packet(info);
        if info.len == 0 {
            return self.payload_done(c);
        }
        self.recv_payload(c)
    }

    fn recv_payload(&mut self, c: usize) -> Result<(), DataPlaneError> {
        let channel = &mut self.channels[c];
        let ChanState::Packet(info) = channel.state else {
            return Ok(());
        };
        let buf = channel
            .payload
            .take()
            .expect("payload buffer set when placed");
        self.shared.active_ops.fetch_add(1, Ordering::SeqCst);
        self.ring
            .recv(
                c as u64,
                channel.fd.as_fd(),
                buf,
                info.got..info.len as usize,
            )
            .map_err(|source| DataPlaneError::Recv {
                channel: channel.index,
                offset: channel.offset + (PACKET_HEADER_ROOM + info.got) as u64,
                source,
            })
    }

    fn payload_done(&mut self, c: usize) -> Result<(), DataPlaneError> {
        let channel = &mut self.channels[c];
        let ChanState::Packet(info) = channel.state else {
            return Ok(());
        };
        let buf = channel
            .payload
            .take()
            .expect("payload received into its buffer");
        channel.offset += (PACKET_HEADER_ROOM + info.len as usize) as u64;
        channel.report.bytes += (PACKET_HEADER_ROOM + info.len as usize) as u64;
        channel.report.packets += 1;
        channel.state = ChanState::Header { got: 0 };
        let index = channel.index;
        self.shared.progress_events.fetch_add(1, Ordering::SeqCst);
        self.shared.state(info.device).reassembly.fill(
            info.idx,
            Held {
                worker: self.w,
                channel: index,
                buf,
            },
        );
        self.deliver(info.device)?;
        self.recv_header(c)
    }

    /// Starts the device's next in-order write if its buffer is this worker's; wakes the owner
    /// otherwise.
    fn deliver(&mut self, d: usize) -> Result<(), DataPlaneError> {
        let mut state = self.shared.state(d);
        let owner = match state.reassembly.peek_ready() {
            Some(held) => held.worker,
            None => return Ok(()),
        };
        if owner != self.w {
            drop(state);
            if let Some(waker) = self.shared.waker(owner) {
                waker.wake();
            }
            return Ok(());
        }
        let ready = state.reassembly.pop_ready().expect("peeked a ready buffer");
        if ready.config {
            let blob = self.buffer_bytes(&ready.buf.buf, ready.len as usize);
            state.report.config = blob;
            let loaded = state.reassembly.complete(ready.len);
            state.report.loaded_ns = monotonic_ns();
            drop(state);
            self.release(ready.buf.buf);
            if loaded {
                self.shared.loaded.fetch_add(1, Ordering::SeqCst);
                self.shared.wake_all();
            }
            return Ok(());
        }
        // Counted while the device is still locked: its next buffer is out of the reassembly
        // now, so "in flight" must already say so.
        self.shared.active_ops.fetch_add(1, Ordering::SeqCst);
        self.shared.writes_in_flight.fetch_add(1, Ordering::SeqCst);
        drop(state);
        let tag = TAG_WRITE | self.next_write_tag;
        self.next_write_tag += 1;
        let len = ready.len as usize;
        self.writes.insert(
            tag,
            WriteOp {
                device: d,
                idx: ready.idx,
                channel: ready.buf.channel,
                len,
                done: 0,
            },
        );
        self.submit_write(tag, ready.buf.buf, 0)
    }

    fn submit_write(&mut self, tag: u64, buf: Buffer, from: usize) -> Result<(), DataPlaneError> {
        let op = &self.writes[&tag];
        let device = &self.shared.devices[op.device];
        if self.shared.write_now[op.device] {
            self.ring
                .write_now(tag, device.data_fd.as_fd(), buf, from..op.len);
            return Ok(());
        }
        self.ring
            .write(tag, device.data_fd.as_fd(), buf, from..op.len)
            .map_err(|source| DataPlaneError::WriteDevice {
                device: device.id.clone(),
                idx: op.idx,
                channel: op.channel,
                source,
            })
    }

    fn write_done(&mut self, done: Completion) -> Result<(), DataPlaneError> {
        // One count per logical write (a partial write continues it); it drops only after the
        // next write was handed out, so there is no gap between two writes.
        let result = self.write_finished(done);
        if !matches!(result, Ok(WriteProgress::Partial)) {
            self.shared.writes_in_flight.fetch_sub(1, Ordering::SeqCst);
            self.shared.active_ops.fetch_sub(1, Ordering::SeqCst);
        }
        result.map(drop)
    }

    fn write_finished(&mut self, done: Completion) -> Result<WriteProgress, DataPlaneError> {
        let Some(op) = self.writes.get_mut(&done.tag) else {
            return Ok(WriteProgress::Done);
        };
        let written = match done.result {
            Ok(0) => Err(io::Error::from(io::ErrorKind::WriteZero)),
            other => other,
        };
        let n = written.map_err(|source| DataPlaneError::WriteDevice {
            device: self.shared.devices[op.device].id.clone(),
            idx: op.idx,
            channel: op.channel,
            source,
        })?;
        op.done += n;
        let buf = done.buf.expect("a write returns its buffer");
        if op.done < op.len {
            let from = op.done;
            return self
                .submit_write(done.tag, buf, from)
                .map(|()| WriteProgress::Partial);
        }
        let op = self.writes.remove(&done.tag).expect("looked up above");
        self.release(buf);
        let now = monotonic_ns();
        {
            let mut state = self.shared.state(op.device);
            let report = &mut state.report;
            let idx = op.idx as usize;
            if report.written_ns.len() <= idx {
                report.written_ns.resize(idx + 1, 0);
            }
            report.written_ns[idx] = now;
            report.bytes += op.len as u64;
            report.data_packets += 1;
            state.reassembly.complete(op.len as u32);
        }
        self.progress.add(op.len);
        self.shared.progress_events.fetch_add(1, Ordering::SeqCst);
        self.deliver(op.device)?;
        // Something was written: parked channels anywhere may fit now.
        for w in 0..self.shared.parked.len() {
            if w != self.w && self.shared.parked[w].load(Ordering::SeqCst) > 0 {
                if let Some(waker) = self.shared.waker(w) {
                    waker.wake();
                }
            }
        }
        self.retry_parked().map(|()| WriteProgress::Done)
    }

    fn buffer_bytes(&mut self, buf: &Buffer, len: usize) -> Vec<u8> {
        match buf {
            Buffer::Pool(id) => self.ring.pool().slot_mut(id)[..len].to_vec(),
            Buffer::Heap(heap) => heap[..len].to_vec(),
            Buffer::Lent(slot) => slot.bytes()[..len].to_vec(),
        }
    }

    fn release(&mut self, buf: Buffer) {
        match buf {
            Buffer::Pool(id) => self.ring.pool().put(id),
            Buffer::Heap(_) => self.heap_held -= 1,
            // Destination workers lend nothing; a lent slot here would just be dropped.
            Buffer::Lent(_) => {}
        }
    }

    fn deliver_mine(&mut self) -> Result<(), DataPlaneError> {
        for d in 0..self.shared.devices.len() {
            self.deliver(d)?;
        }
        Ok(())
    }

    fn retry_parked(&mut self) -> Result<(), DataPlaneError> {
        for c in 0..self.channels.len() {
            if matches!(
                self.channels[c].state,
                ChanState::Packet(PacketInfo { parked: true, .. })
            ) {
                self.place(c)?;
            }
        }
        Ok(())
    }

    /// Fails when no channel anywhere can move: every live channel is parked and no receive or
    /// write is in flight in any worker, for longer than a wake-up can take.
    fn check_stall(&mut self) -> Result<(), DataPlaneError> {
        let events = self.shared.progress_events.load(Ordering::SeqCst);
        if events != self.last_progress.0 || !self.has_parked() {
            self.last_progress = (events, Instant::now());
            return Ok(());
        }
        if self.shared.writes_in_flight.load(Ordering::SeqCst) > 0
            || self.last_progress.1.elapsed() < STALL_GRACE
        {
            return Ok(());
        }
        let mut parked: Vec<(usize, String)> = self
            .shared
            .parked_detail
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(c, d)| (*c, d.clone()))
            .collect();
        parked.sort();
        let parked: Vec<String> = parked.into_iter().map(|(_, d)| d).collect();
        Err(DataPlaneError::Stalled {
            detail: format!(
                "{}; {} of {} buffers free: raise the queued-bytes limit or the buffer pool",
                parked.join("; "),
                self.ring.buffers().free_slots(),
                self.ring.buffers().slots()
            ),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{InitExpectation, MultifdInitPacket};
    use std::io::{Read, Seek, Write};
    use std::os::fd::AsRawFd;
    use zerocopy::IntoBytes;

    fn tmpfs_file(bytes: &[u8]) -> std::fs::File {
        use std::sync::atomic::AtomicU64;
        static N: AtomicU64 = AtomicU64::new(0);
        let path = std::path::Path::new("/dev/shm").join(format!(
            "uring-engine-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .unwrap();
        std::fs::remove_file(&path).unwrap();
        file.write_all(bytes).unwrap();
        file.rewind().unwrap();
        file
    }

    fn channel_pairs(n: usize) -> (Vec<OwnedFd>, Vec<OwnedFd>) {
        let uuid = [7u8; 16];
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut src = Vec::new();
        for id in 0..n {
            let mut s = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
            s.write_all(MultifdInitPacket::new(uuid, id as u8).as_bytes())
                .unwrap();
            src.push(OwnedFd::from(s));
        }
        let mut dst: Vec<Option<OwnedFd>> = (0..n).map(|_| None).collect();
        for _ in 0..n {
            let (mut s, _) = listener.accept().unwrap();
            let mut init = [0u8; 64];
            s.read_exact(&mut init).unwrap();
            let id = MultifdInitPacket::decode(
                &init,
                &InitExpectation {
                    uuid,
                    channels: n as u8,
                },
            )
            .unwrap();
            dst[id as usize] = Some(OwnedFd::from(s));
        }
        (src, dst.into_iter().map(Option::unwrap).collect())
    }

    fn content(seed: u8, len: usize) -> Vec<u8> {
        (0..len)
            .map(|i| {
                (i as u32)
                    .wrapping_mul(2_654_435_761)
                    .wrapping_add(seed as u32) as u8
                    ^ (i >> 12) as u8
            })
            .collect()
    }

    fn migrate(
        config: EngineConfig,
        sizes: &[usize],
        channels: usize,
    ) -> (SourceReport, DestReport, Vec<Vec<u8>>) {
        migrate_over(config, sizes, channel_pairs(channels))
    }

    /// Unix stream channels (QEMU's `unix:` migration URI); init packets are the test's job
    /// elsewhere, so these carry none.
    fn unix_pairs(n: usize) -> (Vec<OwnedFd>, Vec<OwnedFd>) {
        (0..n)
            .map(|_| {
                let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
                (OwnedFd::from(a), OwnedFd::from(b))
            })
            .unzip()
    }

    fn migrate_over(
        config: EngineConfig,
        sizes: &[usize],
        (src_ch, dst_ch): (Vec<OwnedFd>, Vec<OwnedFd>),
    ) -> (SourceReport, DestReport, Vec<Vec<u8>>) {
        let mut src_devices = Vec::new();
        let mut dst_devices = Vec::new();
        let mut outputs = Vec::new();
        for (i, &size) in sizes.iter().enumerate() {
            let id = DeviceId::new(format!("0000:00:0{i}.0/vfio"), 0).unwrap();
            let src = tmpfs_file(&content(i as u8, size));
            let dst = tmpfs_file(&[]);
            outputs.push(dst.try_clone().unwrap());
            src_devices.push(SourceDevice {
                id: id.clone(),
                data_fd: src.into(),
                read_size: config.chunk_size,
                config: format!("config of {i}").into_bytes(),
            });
            dst_devices.push(DestDevice {
                id,
                data_fd: dst.into(),
            });
        }
        let (src_report, dst_report) = run_pair(config, src_devices, dst_devices, (src_ch, dst_ch));
        let bytes = outputs
            .into_iter()
            .map(|mut f| {
                f.rewind().unwrap();
                let mut v = Vec::new();
                f.read_to_end(&mut v).unwrap();
                v
            })
            .collect();
        (src_report, dst_report, bytes)
    }

    fn run_pair(
        config: EngineConfig,
        src_devices: Vec<SourceDevice>,
        dst_devices: Vec<DestDevice>,
        (src_ch, dst_ch): (Vec<OwnedFd>, Vec<OwnedFd>),
    ) -> (SourceReport, DestReport) {
        let engine = UringEngine::new(config).unwrap();
        std::thread::scope(|s| {
            let dst = s.spawn(|| {
                engine.run_dest(DestPlan {
                    devices: dst_devices,
                    channels: dst_ch,
                    progress: Arc::default(),
                })
            });
            let src = engine.run_source(SourcePlan {
                devices: src_devices,
                channels: src_ch,
                progress: Arc::default(),
            });
            (src.unwrap(), dst.join().unwrap().unwrap())
        })
    }

    fn is_non_blocking(fd: &impl AsFd) -> bool {
        use nix::fcntl::{fcntl, FcntlArg, OFlag};
        OFlag::from_bits_truncate(fcntl(fd, FcntlArg::F_GETFL).unwrap()).contains(OFlag::O_NONBLOCK)
    }

    #[test]
    fn an_o_nonblock_pipe_and_a_tmpfs_source_move_and_the_tmpfs_flags_come_back() {
        use nix::fcntl::{fcntl, FcntlArg, OFlag};
        let chunk = 64 << 10;
        let bursts: Vec<Vec<u8>> = (0..4).map(|i| content(i, 100 << 10)).collect();
        // Passed already O_NONBLOCK (as a VMM may): between bursts reads say EAGAIN.
        let (pipe_rx, pipe_tx) = nix::unistd::pipe2(OFlag::O_NONBLOCK).unwrap();
        fcntl(&pipe_tx, FcntlArg::F_SETFL(OFlag::empty())).unwrap();
        // Blocking tmpfs: switched to O_NONBLOCK for the run only.
        let shm = tmpfs_file(&content(9, 300 << 10));
        let shm_probe = shm.try_clone().unwrap();
        let ids: Vec<DeviceId> = (0..2)
            .map(|i| DeviceId::new(format!("0000:00:0{i}.0/vfio"), 0).unwrap())
            .collect();
        let outputs = [tmpfs_file(&[]), tmpfs_file(&[])];
        let src_devices = [pipe_rx, OwnedFd::from(shm)]
            .into_iter()
            .zip(&ids)
            .map(|(data_fd, id)| SourceDevice {
                id: id.clone(),
                data_fd,
                read_size: chunk,
                config: b"config".to_vec(),
            })
            .collect();
        let dst_devices = outputs
            .iter()
            .zip(&ids)
            .map(|(f, id)| DestDevice {
                id: id.clone(),
                data_fd: f.try_clone().unwrap().into(),
            })
            .collect();
        let writer = std::thread::spawn({
            let bursts = bursts.clone();
            move || {
                let mut tx = std::fs::File::from(pipe_tx);
                for burst in bursts {
                    std::thread::sleep(Duration::from_millis(30));
                    tx.write_all(&burst).unwrap();
                }
            }
        });
        let (src, _dst) = run_pair(config(1, chunk), src_devices, dst_devices, channel_pairs(2));
        writer.join().unwrap();
        let mut got = Vec::new();
        for mut f in outputs {
            f.rewind().unwrap();
            let mut v = Vec::new();
            f.read_to_end(&mut v).unwrap();
            got.push(v);
        }
        assert!(
            got[0] == bursts.concat(),
            "the paced pipe's bytes arrive in order"
        );
        assert!(
            got[1] == content(9, 300 << 10),
            "the tmpfs device's bytes arrive"
        );
        assert_eq!(src.devices[0].bytes, 400 << 10);
        assert!(
            !is_non_blocking(&shm_probe),
            "O_NONBLOCK cleared after the run"
        );
    }

    #[test]
    fn a_device_saying_eagain_mid_stream_is_waited_for_not_failed() {
        use ::vfio::sim::fault::{fuse_available, Fault};
        use ::vfio::{MigState, MigrationDevice, SimSource, SimSpec};
        if let Err(err) = fuse_available() {
            eprintln!("SKIP: FUSE fault devices unavailable here: {err}");
            return;
        }
        let (size, chunk) = (1 << 20, 64 << 10);
        let spec = SimSpec::new(size, 77);
        let fault = Fault::NotReady {
            at: 300 << 10,
            reads: 3,
        };
        let mut device = SimSource::with_fault("not-ready", spec, fault).unwrap();
        let data_fd = device.set_state(MigState::StopCopy).unwrap().unwrap();
        let id = DeviceId::new("0000:00:05.0/vfio".to_string(), 0).unwrap();
        let output = tmpfs_file(&[]);
        let source = SourceDevice {
            id: id.clone(),
            data_fd,
            read_size: chunk,
            config: b"config".to_vec(),
        };
        let sink = DestDevice {
            id,
            data_fd: output.try_clone().unwrap().into(),
        };
        // The FUSE file has a poll method, so io_uring waits for readiness itself, as it does
        // on mlx5's data_fd.
        let (src, dst) = run_pair(config(1, chunk), vec![source], vec![sink], channel_pairs(2));
        let mut got = Vec::new();
        let mut output = output;
        output.rewind().unwrap();
        output.read_to_end(&mut got).unwrap();
        let mut want = vec![0u8; size as usize];
        ::vfio::sim::fill(77, 0, &mut want);
        let bad = got.iter().zip(&want).position(|(a, b)| a != b);
        assert!(got == want, "every byte, in order, after the not-ready reads: {} of {size}, first difference at {bad:?}", got.len());
        assert_eq!(src.devices[0].bytes, size);
        assert_eq!(dst.devices[0].config, b"config");
        assert_eq!(
            src.devices[0].read_issued_ns.len(),
            16,
            "one issue per packet"
        );
    }

    fn check(config: EngineConfig, sizes: &[usize], channels: usize) {
        let chunk = config.chunk_size;
        let (src, dst, outputs) = migrate(config, sizes, channels);
        for (i, &size) in sizes.iter().enumerate() {
            assert_eq!(outputs[i].len(), size, "device {i} size");
            assert!(
                outputs[i] == content(i as u8, size),
                "device {i} bytes differ"
            );
            assert_eq!(dst.devices[i].config, format!("config of {i}").into_bytes());
            let packets = size.div_ceil(chunk) as u32;
            assert_eq!(src.devices[i].data_packets, packets);
            assert_eq!(dst.devices[i].data_packets, packets);
            assert_eq!(src.devices[i].read_issued_ns.len(), packets as usize);
            for (idx, &written) in dst.devices[i].written_ns.iter().enumerate() {
                assert!(
                    written >= src.devices[i].read_issued_ns[idx],
                    "latency >= 0"
                );
            }
        }
        let sent: u64 = src.channels.iter().map(|c| c.bytes).sum();
        let received: u64 = dst.channels.iter().map(|c| c.bytes).sum();
        assert_eq!(sent, received);
    }

    fn config(workers: usize, chunk: usize) -> EngineConfig {
        EngineConfig {
            workers,
            chunk_size: chunk,
            pool_buffers: 16,
            ..EngineConfig::default()
        }
    }

    pub(super) fn check_pub(config: EngineConfig, sizes: &[usize], channels: usize) {
        check(config, sizes, channels)
    }

    pub(super) fn config_pub(workers: usize, chunk: usize) -> EngineConfig {
        config(workers, chunk)
    }

    #[test]
    fn moves_every_byte_with_short_reads_empty_and_tiny_devices() {
        check(
            config(1, 64 << 10),
            &[1 << 20, (64 << 10) * 3 + 17, 0, 1, 64 << 10],
            3,
        );
    }

    #[test]
    fn moves_every_byte_with_two_workers_and_many_channels() {
        check(config(2, 32 << 10), &[3 << 20, 2 << 20, 1 << 20, 12345], 16);
    }

    #[test]
    fn unlinked_unregistered_and_zero_copy_free_paths_move_the_same_bytes() {
        for forbid in [
            ::uring::FeatureMask::parse("linked-chains").unwrap(),
            ::uring::FeatureMask::parse("fixed-buffers,send-zc").unwrap(),
            ::uring::FeatureMask::parse("all").unwrap(),
        ] {
            check(
                EngineConfig {
                    forbid,
                    ..config(2, 16 << 10)
                },
                &[300_001, 70_000],
                4,
            );
        }
    }

    #[test]
    fn unix_socket_channels_refuse_zero_copy_and_fall_back_to_plain_send() {
        let sizes = [300_000, 1 << 20];
        let (src, dst, outputs) = migrate_over(config(1, 64 << 10), &sizes, unix_pairs(3));
        for (i, &size) in sizes.iter().enumerate() {
            assert!(
                outputs[i] == content(i as u8, size),
                "device {i} bytes differ"
            );
            assert_eq!(dst.devices[i].config, format!("config of {i}").into_bytes());
        }
        assert!(
            src.notes.iter().any(|n| n.contains("SEND_ZC refused")),
            "{:?}",
            src.notes
        );
    }

    #[test]
    fn fewer_devices_than_workers_are_read_by_one_worker_each_and_sent_by_the_others() {
        // (workers, pool buffers, device sizes, channels): one device on four workers; two
        // devices on four; one device whose reader has only two slots, so it reads again only
        // when a sender gives a slot back; every fallback path of the send.
        for (workers, pool_buffers, sizes, channels) in [
            (4, 16, &[(64 << 10) * 40 + 123][..], 6),
            (4, 16, &[1 << 20, (64 << 10) * 5 + 1], 8),
            (3, 2, &[(64 << 10) * 30][..], 5),
        ] {
            let config = EngineConfig {
                pool_buffers,
                ..config(workers, 64 << 10)
            };
            check(config.clone(), sizes, channels);
            let (src, _, _) = migrate(config, sizes, channels);
            let note = format!(
                "handoff: {} reading and {} sending workers",
                sizes.len(),
                workers - sizes.len()
            );
            assert!(
                src.notes.iter().any(|n| n.contains(&note)),
                "{:?}",
                src.notes
            );
            // Senders own every channel and take the least loaded: with many more packets
            // than channels, each channel carries some.
            for (c, channel) in src.channels.iter().enumerate() {
                assert!(channel.packets > 0, "channel {c} idle: {:?}", src.channels);
            }
        }
        check(
            EngineConfig {
                forbid: ::uring::FeatureMask::parse("all").unwrap(),
                ..config(2, 16 << 10)
            },
            &[300_001],
            4,
        );
        let sizes = [300_000];
        let (src, _, outputs) = migrate_over(config(3, 64 << 10), &sizes, unix_pairs(3));
        assert!(outputs[0] == content(0, sizes[0]), "bytes differ");
        assert!(
            src.notes.iter().any(|n| n.contains("SEND_ZC refused")),
            "{:?}",
            src.notes
        );
    }

    /// `cargo test --release -- --ignored source_only_speed --nocapture`: a rough look, not a
    /// test. One 1 GiB device over 8 channels into sinks that drop what they receive without
    /// copying it (TCP `MSG_TRUNC`), so the source has the cores to itself: 1 worker reads and
    /// sends on one thread, 2 and 4 hand the sends to other workers.
    #[test]
    #[ignore]
    fn source_only_speed() {
        use nix::sys::socket::{recv, MsgFlags};
        let size = 1usize << 30;
        let file = tmpfs_file(&content(0, size));
        for round in 0..3 {
            for workers in [1, 2, 4] {
                let (src_ch, dst_ch) = channel_pairs(8);
                let sinks: Vec<_> = dst_ch
                    .into_iter()
                    .map(|fd| {
                        std::thread::spawn(move || {
                            let mut scratch = vec![0u8; 1 << 20];
                            let mut total = 0usize;
                            while let Ok(n @ 1..) =
                                recv(fd.as_raw_fd(), &mut scratch, MsgFlags::MSG_TRUNC)
                            {
                                total += n;
                            }
                            total
                        })
                    })
                    .collect();
                let engine = UringEngine::new(config(workers, 8 << 20)).unwrap();
                let mut reader = file.try_clone().unwrap();
                reader.rewind().unwrap();
                let start = std::time::Instant::now();
                let report = engine
                    .run_source(SourcePlan {
                        devices: vec![SourceDevice {
                            id: DeviceId::new("0000:00:01.0/vfio", 0).unwrap(),
                            data_fd: OwnedFd::from(reader),
                            read_size: 8 << 20,
                            config: Vec::new(),
                        }],
                        channels: src_ch,
                        progress: Arc::default(),
                    })
                    .unwrap();
                let secs = start.elapsed().as_secs_f64();
                let received: usize = sinks.into_iter().map(|s| s.join().unwrap()).sum();
                assert!(received > size);
                println!(
                    "round {round} workers {workers}: {:.2} GiB/s ({} packets)",
                    size as f64 / secs / (1u64 << 30) as f64,
                    report.devices[0].data_packets
                );
            }
        }
    }

    #[test]
    fn a_tiny_queued_bytes_limit_backpressures_instead_of_failing() {
        let config = EngineConfig {
            max_queued_bytes: 1,
            ..config(2, 16 << 10)
        };
        check(config, &[1 << 20, 1 << 20], 8);
    }
}

#[cfg(test)]
mod speed {
    /// `cargo test --release -- --ignored uring_speed --nocapture`: a rough look, not a test.
    #[test]
    #[ignore]
    fn uring_speed() {
        for workers in [1, 2] {
            let start = std::time::Instant::now();
            let sizes = [100 << 20; 4];
            super::tests::check_pub(super::tests::config_pub(workers, 1 << 20), &sizes, 6);
            let secs = start.elapsed().as_secs_f64();
            println!(
                "workers {workers}: 400 MiB in {secs:.3}s incl. setup+verify = {:.2} GB/s",
                400.0 * 1.048576e6 / secs / 1e9
            );
        }
    }
}
