//! The seed's thread-per-channel design (QEMU 10.0), kept faithful on purpose: it is the
//! fallback where io_uring is unavailable and the honest baseline in benchmarks, so it keeps the
//! seed's copies and hand-offs and is not optimised beyond them.
//!
//! Source (`multifd_device_state_send_*`, `vfio_multifd_save_complete_precopy_thread`):
//! - one `save-<dev>` thread per device with one reusable buffer of 12 + `read_size` bytes:
//!   `read(data_fd)` right after the VFIO header, then the packet is **copied** into a queued
//!   job (`multifd_queue_device_state`); read 0 = end, then the config packet (flag 1, idx =
//!   number of data packets);
//! - `multifd_send()`: one job slot per channel behind one global mutex; a producer blocks until
//!   some channel is idle and hands its job to the first idle channel scanning round-robin from
//!   after the last one used, so one device's packets spread over all channels;
//! - one `send-<n>` thread per channel writes the 276-byte device-state header and the payload
//!   with one gather write; after every device is done each channel is shut down for writing, so
//!   the destination sees EOF at a packet boundary.
//!
//! Destination (`multifd_device_state_recv`, `vfio_multifd_load_state_buffer`, the load thread):
//! - one `recv-<n>` thread per channel reads the header, routes it by idstr + instance id, reads
//!   the payload into a freshly allocated buffer (the seed's copy into the per-device queue) and
//!   inserts it into the device's [`Reassembly`] under the device's mutex;
//! - one `load-<dev>` thread per device writes buffers in idx order to `data_fd` and hands the
//!   config blob over last.
//!
//! Where QEMU 10.1 fails on its queued-buffers limit, a receiver here keeps the packet it read
//! and stops reading its channel until the device has written something (memory: per device,
//! at most `max_queued_bytes`, and never more than [`QUEUE_CAP_BYTES`] in [`QUEUE_CAP_PACKETS`]
//! packets, queued; all devices together at most `max_total_queued_bytes`
//! ([`QUEUE_CAP_TOTAL_BYTES`]); plus one packet held per channel). When every open channel waits
//! like that and no device whose write would let one go on can write, no progress is possible
//! and the run fails with [`DataPlaneError::Stalled`] instead of hanging.
//!
//! Stream offsets in errors count from the start of the channel, init packet included.
//!
//! Failure and cancel: the first error is kept; a shared flag is set, every channel socket is
//! shut down (which ends blocked socket reads and writes) and every condition variable is woken;
//! all threads are joined before the error is returned. A read or write of a `data_fd` in
//! progress is not interrupted (QEMU's are not either): the engine notices at the next one.

use std::io::IoSlice;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::{self, Scope, ScopedJoinHandle};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::socket::{self, MsgFlags, Shutdown};
use vfio::interrupt::IoThread;

use super::*;
use crate::session::reassembly::{Admission, Reassembly};
use crate::wire::{
    DeviceStatePacketHeader, VfioDeviceStatePacketHeader, DEVICE_STATE_HEADER_LEN, INIT_PACKET_LEN,
    VFIO_HEADER_LEN,
};

/// The caps both engines apply (see [`EngineConfig::queued_bytes_limit`]).
pub use super::{QUEUE_CAP_BYTES, QUEUE_CAP_PACKETS, QUEUE_CAP_TOTAL_BYTES};

/// How often a waiting run looks at [`Progress::cancel`].
const CANCEL_POLL: Duration = Duration::from_millis(20);
const ENGINE: &str = "threads";

/// The seed's threaded engine.
pub struct ThreadsEngine {
    config: EngineConfig,
}

impl ThreadsEngine {
    /// `workers` and `pool_buffers` are ignored: the seed has a thread per device and per
    /// channel and allocates a buffer per packet.
    pub fn new(config: EngineConfig) -> Self {
        Self { config }
    }
}

impl Engine for ThreadsEngine {
    fn kind(&self) -> EngineKind {
        EngineKind::Threads
    }

    fn run_source(&self, plan: SourcePlan) -> Result<SourceReport, DataPlaneError> {
        check_source_plan(ENGINE, &self.config, &plan)?;
        let SourcePlan {
            devices,
            channels,
            progress,
        } = plan;
        let shared = SourceShared {
            channels: &channels,
            devices: &devices,
            queue: Mutex::new(SendQueue {
                slots: (0..channels.len()).map(|_| None).collect(),
                busy: vec![false; channels.len()],
                sending: (0..channels.len()).map(|_| None).collect(),
                next: 0,
                done: false,
            }),
            idle: Condvar::new(),
            slot_ready: (0..channels.len()).map(|_| Condvar::new()).collect(),
            abort: Abort::default(),
            savers: Live::default(),
            reading: devices.iter().map(|_| DeviceRead::default()).collect(),
            savers_io: DeviceThreads::default(),
            senders: Live::default(),
            progress: &progress,
            turn: self.config.sequential_devices.then(|| Mutex::new(0)),
            turn_changed: Condvar::new(),
        };
        let shared = &shared;
        let devices = &devices;
        let (device_reports, channel_reports) = thread::scope(|s| {
            let senders: Vec<_> = (0..channels.len())
                .map_while(|n| {
                    let guard = shared.senders.enter(shared);
                    spawn(s, shared, format!("send-{n}"), move || {
                        let _guard = guard;
                        shared.send_thread(n, devices)
                    })
                })
                .collect();
            let savers: Vec<_> = devices
                .iter()
                .enumerate()
                .map_while(|(i, device)| {
                    let guard = shared.savers.enter(shared);
                    spawn(s, shared, format!("save-{i}"), move || {
                        let _guard = guard;
                        let _interruptible = shared.savers_io.enter();
                        shared.save_thread(i, device)
                    })
                })
                .collect();
            shared.savers.wait_all(shared, shared.progress);
            // Every job is queued (or the run failed): let the senders drain and stop.
            lock(&shared.queue).done = true;
            for cv in &shared.slot_ready {
                cv.notify_all();
            }
            shared.senders.wait_all(shared, shared.progress);
            (join_all(shared, savers), join_all(shared, senders))
        });
        if let Some(err) = shared.abort.take_error() {
            return Err(err);
        }
        let mut report = SourceReport::default();
        for sent in channel_reports {
            let sent = sent.ok_or_else(|| internal("a sender ended without a report"))?;
            report.notes.extend(sent.note);
            report.channels.push(sent.report);
        }
        for saved in device_reports {
            report
                .devices
                .push(saved.ok_or_else(|| internal("a save thread ended without a report"))?);
        }
        Ok(report)
    }

    fn run_dest(&self, plan: DestPlan) -> Result<DestReport, DataPlaneError> {
        check_dest_plan(ENGINE, &plan)?;
        let DestPlan {
            devices,
            channels,
            progress,
        } = plan;
        // Whatever the queued-bytes limit and whatever the peer sends, a device queues at most
        // QUEUE_CAP_BYTES in QUEUE_CAP_PACKETS packets, as in the uring engine, and all devices
        // together at most max_total_queued_bytes.
        let shared = DestShared {
            channels: &channels,
            devices: devices
                .iter()
                .map(|d| DevSlot {
                    id: &d.id,
                    state: Mutex::new(self.config.dest_reassembly(d)),
                    cv: Condvar::new(),
                })
                .collect(),
            status: Mutex::new(vec![ChanStatus::Reading; channels.len()]),
            total: Mutex::new(TotalQueued::default()),
            max_total_queued_bytes: self.config.max_total_queued_bytes,
            channels_closed: AtomicBool::new(false),
            max_packet_size: self.config.max_packet_size,
            abort: Abort::default(),
            live: Live::default(),
            loaders_io: DeviceThreads::default(),
            progress: &progress,
        };
        let shared = &shared;
        let (device_reports, channel_reports) = thread::scope(|s| {
            let receivers: Vec<_> = (0..channels.len())
                .map_while(|n| {
                    let guard = shared.live.enter(shared);
                    spawn(s, shared, format!("recv-{n}"), move || {
                        let _guard = guard;
                        shared.recv_thread(n)
                    })
                })
                .collect();
            let loaders: Vec<_> = devices
                .iter()
                .enumerate()
                .map_while(|(i, device)| {
                    let guard = shared.live.enter(shared);
                    spawn(s, shared, format!("load-{i}"), move || {
                        let _guard = guard;
                        let _interruptible = shared.loaders_io.enter();
                        shared.load_thread(i, device)
                    })
                })
                .collect();
            shared.live.wait_all(shared, shared.progress);
            (join_all(shared, loaders), join_all(shared, receivers))
        });
        if let Some(err) = shared.abort.take_error() {
            return Err(err);
        }
        let mut report = DestReport::default();
        for received in channel_reports {
            report
                .channels
                .push(received.ok_or_else(|| internal("a receiver ended without a report"))?);
        }
        for loaded in device_reports {
            report
                .devices
                .push(loaded.ok_or_else(|| internal("a load thread ended without a report"))?);
        }
        Ok(report)
    }
}

/// A broken invariant of this engine (a thread panicked); reported, never propagated as a panic.
fn internal(what: &str) -> DataPlaneError {
    DataPlaneError::Stalled {
        detail: format!("internal error in the {ENGINE} engine: {what}"),
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A poisoned mutex means a thread panicked; its guard already failed the run, and the
    // others only need to get out.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

fn wait<'a, T>(cv: &Condvar, guard: MutexGuard<'a, T>) -> MutexGuard<'a, T> {
    cv.wait(guard).unwrap_or_else(PoisonError::into_inner)
}

/// The first error of a run and the flag every thread checks.
#[derive(Default)]
struct Abort {
    failed: AtomicBool,
    first: Mutex<Option<DataPlaneError>>,
}

impl Abort {
    fn failed(&self) -> bool {
        self.failed.load(Ordering::Acquire)
    }

    /// Keeps the first error; returns true for the call that set the flag.
    fn record(&self, err: DataPlaneError) -> bool {
        let mut first = lock(&self.first);
        if first.is_none() {
            log::debug!("{ENGINE} engine: {err}");
            *first = Some(err);
        }
        drop(first);
        !self.failed.swap(true, Ordering::AcqRel)
    }

    fn take_error(&self) -> Option<DataPlaneError> {
        lock(&self.first).take()
    }
}

/// Stops every thread of a side: record the error, shut the channels, wake every waiter.
trait Side: Sync {
    fn fail(&self, err: DataPlaneError);
    /// The run failed: every thread is on its way out, once its device call returns.
    fn failed(&self) -> bool;
    /// The side's save or load threads, which a shutdown of the channels does not reach.
    fn device_threads(&self) -> &DeviceThreads;
}

/// Save and load threads: a data_fd read or write can block for good (a driver stuck in
/// STOP_COPY or RESUMING, a pipe nobody drains), and unlike a socket's, nothing but a signal
/// ends it. A failed run interrupts them until they have left.
#[derive(Default)]
struct DeviceThreads {
    /// Slots of threads inside [`DeviceThreads::enter`]'s guard; `None` once left.
    threads: Mutex<Vec<Option<IoThread>>>,
}

/// Registers the calling thread from [`DeviceThreads::enter`] until dropped.
struct DeviceThreadGuard<'a> {
    owner: &'a DeviceThreads,
    slot: Option<usize>,
}

impl DeviceThreads {
    fn enter(&self) -> DeviceThreadGuard<'_> {
        let slot = match IoThread::current() {
            Ok(thread) => {
                let mut threads = lock(&self.threads);
                threads.push(Some(thread));
                Some(threads.len() - 1)
            }
            Err(e) => {
                log::warn!(
                    "{ENGINE} engine: a stuck device read or write cannot be interrupted: {e}"
                );
                None
            }
        };
        DeviceThreadGuard { owner: self, slot }
    }

    /// Ends the blocking device call each registered thread is in, if any.
    fn interrupt_all(&self) {
        for thread in lock(&self.threads).iter().flatten() {
            thread.interrupt();
        }
    }
}

impl Drop for DeviceThreadGuard<'_> {
    fn drop(&mut self) {
        if let Some(slot) = self.slot {
            lock(&self.owner.threads)[slot] = None;
        }
    }
}

fn shutdown_all(channels: &[OwnedFd]) {
    for channel in channels {
        // Unblocks this channel's reader or writer; an error only means it is already dead.
        let _ = socket::shutdown(channel.as_raw_fd(), Shutdown::Both);
    }
}

/// Threads of one kind still running, so the caller can wait for them while watching cancel.
#[derive(Default)]
struct Live {
    count: Mutex<usize>,
    cv: Condvar,
}

/// Counts a thread from before its spawn until its closure ends (or is dropped unspawned).
struct LiveGuard<'a> {
    live: &'a Live,
    side: &'a dyn Side,
}

impl Live {
    fn enter<'a>(&'a self, side: &'a dyn Side) -> LiveGuard<'a> {
        *lock(&self.count) += 1;
        LiveGuard { live: self, side }
    }

    /// Until every counted thread ended; turns [`Progress::cancel`] into a failure.
    fn wait_all(&self, side: &dyn Side, progress: &Progress) {
        let mut count = lock(&self.count);
        let mut cancel_seen = false;
        while *count > 0 {
            if !cancel_seen && progress.cancelled() {
                cancel_seen = true;
                drop(count);
                side.fail(DataPlaneError::Cancelled);
                count = lock(&self.count);
                continue;
            }
            if side.failed() {
                // Again at every poll: a thread between calls when the signal came may have
                // entered its blocking call since.
                side.device_threads().interrupt_all();
            }
            count = self
                .cv
                .wait_timeout(count, CANCEL_POLL)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }
}

impl Drop for LiveGuard<'_> {
    fn drop(&mut self) {
        if thread::panicking() {
            let name = thread::current().name().unwrap_or("?").to_owned();
            self.side.fail(internal(&format!("thread {name} panicked")));
        }
        *lock(&self.live.count) -= 1;
        self.live.cv.notify_all();
    }
}

/// Spawns a named scoped thread; a spawn failure fails the run and stops further spawns.
fn spawn<'scope, 'env, T: Send + 'scope>(
    scope: &'scope Scope<'scope, 'env>,
    side: &dyn Side,
    name: String,
    f: impl FnOnce() -> Option<T> + Send + 'scope,
) -> Option<ScopedJoinHandle<'scope, Option<T>>> {
    match thread::Builder::new().name(name).spawn_scoped(scope, f) {
        Ok(handle) => Some(handle),
        Err(source) => {
            side.fail(DataPlaneError::Setup {
                engine: ENGINE,
                source,
            });
            None
        }
    }
}

/// Joins every thread; a panicked one yields `None` (its guard already failed the run).
fn join_all<T>(side: &dyn Side, handles: Vec<ScopedJoinHandle<'_, Option<T>>>) -> Vec<Option<T>> {
    handles
        .into_iter()
        .map(|handle| match handle.join() {
            Ok(result) => result,
            Err(_) => {
                side.fail(internal("a thread panicked"));
                None
            }
        })
        .collect()
}

/// Reads until `buf` is full or EOF; returns the bytes read.
fn read_full(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match nix::unistd::read(fd, &mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(got)
}

/// One read of a device, retried on EINTR until the run failed (then it is the interrupt of
/// [`DeviceThreads`]).
fn read_device(fd: BorrowedFd<'_>, buf: &mut [u8], abort: &Abort) -> io::Result<usize> {
    loop {
        match nix::unistd::read(fd, buf) {
            Err(Errno::EINTR) if !abort.failed() => {}
            other => return other.map_err(io::Error::from),
        }
    }
}

/// Waits up to 50 ms for an O_NONBLOCK `fd` that said EAGAIN to be ready for `events`. A file
/// that polls ready at once although it just said EAGAIN has no `.poll` of its own: it is
/// retried once a millisecond instead of spun on.
fn wait_ready(fd: BorrowedFd<'_>, events: nix::poll::PollFlags) {
    use nix::poll::{poll, PollFd, PollTimeout};
    let mut fds = [PollFd::new(fd, events)];
    if matches!(poll(&mut fds, PollTimeout::ZERO), Ok(n) if n > 0) {
        thread::sleep(Duration::from_millis(1));
        return;
    }
    let _ = poll(&mut fds, PollTimeout::from(50u8));
}

/// Writes all of `buf` to a device, looping on partial writes (QEMU's load thread does the
/// same); EINTR as in [`read_device`]. An O_NONBLOCK data_fd (a VMM may pass one) that says
/// EAGAIN is waited for until the run has failed.
fn write_device(fd: BorrowedFd<'_>, mut buf: &[u8], abort: &Abort) -> io::Result<()> {
    while !buf.is_empty() {
        match nix::unistd::write(fd, buf) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => buf = &buf[n..],
            Err(Errno::EINTR) if !abort.failed() => {}
            Err(Errno::EAGAIN) if !abort.failed() => wait_ready(fd, nix::poll::PollFlags::POLLOUT),
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// One gather write of header + payload, looped until all of it is sent (QEMU's
/// `qio_channel_writev_full_all`). MSG_NOSIGNAL: a dead peer is an error, not a SIGPIPE.
fn send_all(fd: BorrowedFd<'_>, mut head: &[u8], mut body: &[u8]) -> io::Result<()> {
    while !head.is_empty() || !body.is_empty() {
        let iov = [IoSlice::new(head), IoSlice::new(body)];
        let first = usize::from(head.is_empty());
        match socket::sendmsg::<()>(
            fd.as_raw_fd(),
            &iov[first..],
            &[],
            MsgFlags::MSG_NOSIGNAL,
            None,
        ) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(mut n) => {
                let from_head = n.min(head.len());
                head = &head[from_head..];
                n -= from_head;
                body = &body[n..];
            }
            Err(Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Source

/// A queued packet: the VFIO header and data, copied out of the save thread's buffer.
struct Job {
    device: usize,
    idx: u32,
    packet: Vec<u8>,
}

/// A packet a sender took from its slot and has not finished writing.
struct Sending {
    device: usize,
    idx: u32,
    since: Instant,
}

/// A save thread's data_fd read in progress.
#[derive(Default)]
struct DeviceRead {
    idx: std::sync::atomic::AtomicU32,
    /// When it was issued (monotonic ns), 0 when none is.
    since_ns: AtomicU64,
}

/// `multifd_send_state`: one job slot per channel, guarded by the global send mutex.
struct SendQueue {
    slots: Vec<Option<Job>>,
    /// `pending_job`: the channel holds a job, or is still writing the last one.
    busy: Vec<bool>,
    /// Per channel, the packet its sender is writing: what a cancelled run names as stuck.
    sending: Vec<Option<Sending>>,
    /// Where the next round-robin scan starts (after the last channel used).
    next: usize,
    /// Every job was queued: senders stop once their slot is empty.
    done: bool,
}

struct SourceShared<'a> {
    channels: &'a [OwnedFd],
    devices: &'a [SourceDevice],
    queue: Mutex<SendQueue>,
    /// Some channel became idle.
    idle: Condvar,
    /// Per channel: a job was put in its slot (or `done`/failure).
    slot_ready: Vec<Condvar>,
    abort: Abort,
    savers: Live,
    /// Per device, the data_fd read its save thread is in: what a cancelled run names as stuck.
    reading: Vec<DeviceRead>,
    /// The save threads, for a failed run to interrupt a stuck data_fd read.
    savers_io: DeviceThreads,
    senders: Live,
    progress: &'a Progress,
    /// With `sequential_devices`: the device whose save thread may run now.
    turn: Option<Mutex<usize>>,
    turn_changed: Condvar,
}

/// Passes the turn to the next device when a sequential save thread ends, however it ends.
struct TurnGuard<'a, 'b>(&'a SourceShared<'b>);

impl Drop for TurnGuard<'_, '_> {
    fn drop(&mut self) {
        if let Some(turn) = &self.0.turn {
            *lock(turn) += 1;
            self.0.turn_changed.notify_all();
        }
    }
}

impl Side for SourceShared<'_> {
    fn fail(&self, err: DataPlaneError) {
        let cancelled = matches!(err, DataPlaneError::Cancelled);
        if self.abort.record(err) {
            if cancelled {
                // Before the shutdown ends the sends: a session that cancelled for a stall
                // names the channel and packet that stopped moving.
                self.progress.report_outstanding(self.outstanding());
            }
            shutdown_all(self.channels);
        }
        drop(lock(&self.queue));
        if let Some(turn) = &self.turn {
            drop(lock(turn));
            self.turn_changed.notify_all();
        }
        self.idle.notify_all();
        for cv in &self.slot_ready {
            cv.notify_all();
        }
    }

    fn failed(&self) -> bool {
        self.abort.failed()
    }

    fn device_threads(&self) -> &DeviceThreads {
        &self.savers_io
    }
}

struct SenderResult {
    report: ChannelReport,
    note: Option<String>,
}

impl SourceShared<'_> {
    /// "channel 2: send of idx 188 of device X outstanding 3.0 s", one per channel writing a
    /// packet (as the uring engine says it), then "device X: read of idx 4 outstanding 3.0 s",
    /// one per save thread in a data_fd read.
    fn outstanding(&self) -> Vec<String> {
        let queue = lock(&self.queue);
        let sends = queue
            .sending
            .iter()
            .enumerate()
            .filter_map(|(n, sending)| {
                let sending = sending.as_ref()?;
                Some(format!(
                    "channel {n}: send of idx {} of device {} outstanding {:.1} s",
                    sending.idx,
                    self.devices[sending.device].id,
                    sending.since.elapsed().as_secs_f64()
                ))
            })
            .collect::<Vec<_>>();
        drop(queue);
        let now = monotonic_ns();
        let reads = self.reading.iter().enumerate().filter_map(|(i, reading)| {
            let since = reading.since_ns.load(Ordering::Acquire);
            (since != 0).then(|| {
                format!(
                    "device {}: read of idx {} outstanding {:.1} s",
                    self.devices[i].id,
                    reading.idx.load(Ordering::Acquire),
                    now.saturating_sub(since) as f64 / 1e9
                )
            })
        });
        sends.into_iter().chain(reads).collect()
    }

    /// `multifd_send()`: waits for an idle channel, puts the job in its slot. False when the
    /// run failed meanwhile.
    fn queue_job(&self, job: Job) -> bool {
        let mut queue = lock(&self.queue);
        let channels = queue.slots.len();
        loop {
            if self.abort.failed() {
                return false;
            }
            let start = queue.next;
            if let Some(n) = (0..channels)
                .map(|k| (start + k) % channels)
                .find(|&n| !queue.busy[n])
            {
                queue.busy[n] = true;
                queue.slots[n] = Some(job);
                queue.next = (n + 1) % channels;
                drop(queue);
                self.slot_ready[n].notify_one();
                return true;
            }
            queue = wait(&self.idle, queue);
        }
    }

    /// `vfio_multifd_save_complete_precopy_thread`.
    fn save_thread(&self, i: usize, device: &SourceDevice) -> Option<SourceDeviceReport> {
        if let Some(turn) = &self.turn {
            let mut current = lock(turn);
            while *current != i {
                if self.abort.failed() {
                    return None;
                }
                current = self
                    .turn_changed
                    .wait_timeout(current, std::time::Duration::from_millis(50))
                    .map_or_else(|p| p.into_inner().0, |(g, _)| g);
            }
        }
        let _turn = TurnGuard(self);
        let mut report = SourceDeviceReport::default();
        let mut buf = vec![0u8; VFIO_HEADER_LEN + device.read_size];
        let mut idx: u32 = 0;
        loop {
            if self.abort.failed() {
                return None;
            }
            let issued = monotonic_ns();
            let reading = &self.reading[i];
            reading.idx.store(idx, Ordering::Release);
            // Kept across EAGAIN retries: the account counts from the first try.
            let _ = reading.since_ns.compare_exchange(
                0,
                issued.max(1),
                Ordering::AcqRel,
                Ordering::Acquire,
            );
            let read = read_device(
                device.data_fd.as_fd(),
                &mut buf[VFIO_HEADER_LEN..],
                &self.abort,
            );
            if !matches!(&read, Err(e) if e.raw_os_error() == Some(libc::EAGAIN)) {
                reading.since_ns.store(0, Ordering::Release);
            }
            let n = match read {
                Ok(n) => n,
                // An O_NONBLOCK data_fd (a VMM may pass one; mlx5 honours it) with nothing
                // saved yet: wait for it, as io_uring does for the other engine. Bounded, so
                // the loop sees a failure of the run.
                Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => {
                    wait_ready(device.data_fd.as_fd(), nix::poll::PollFlags::POLLIN);
                    continue;
                }
                Err(source) => {
                    self.fail(DataPlaneError::ReadDevice {
                        device: device.id.clone(),
                        idx,
                        source,
                    });
                    return None;
                }
            };
            if n == 0 {
                break;
            }
            if let Err(err) = check_data_idx(&device.id, idx) {
                self.fail(err);
                return None;
            }
            let header: &mut [u8; VFIO_HEADER_LEN] = (&mut buf[..VFIO_HEADER_LEN])
                .try_into()
                .expect("the buffer starts with VFIO_HEADER_LEN bytes of header room");
            VfioDeviceStatePacketHeader::write(header, idx, false);
            record_packet_ns(&mut report.read_issued_ns, idx, issued);
            report.bytes += n as u64;
            report.data_packets += 1;
            self.progress.add(n);
            // The seed's copy: multifd_queue_device_state() duplicates the buffer.
            let packet = buf[..VFIO_HEADER_LEN + n].to_vec();
            if !self.queue_job(Job {
                device: i,
                idx,
                packet,
            }) {
                return None;
            }
            idx += 1;
        }
        let mut packet = vec![0u8; VFIO_HEADER_LEN + device.config.len()];
        let (header, blob) = packet.split_at_mut(VFIO_HEADER_LEN);
        let header: &mut [u8; VFIO_HEADER_LEN] =
            header.try_into().expect("split at VFIO_HEADER_LEN");
        VfioDeviceStatePacketHeader::write(header, idx, true);
        blob.copy_from_slice(&device.config);
        if !self.queue_job(Job {
            device: i,
            idx,
            packet,
        }) {
            return None;
        }
        Some(report)
    }

    /// `multifd_send_thread` for device-state jobs.
    fn send_thread(&self, n: usize, devices: &[SourceDevice]) -> Option<SenderResult> {
        let fd = self.channels[n].as_fd();
        let mut report = ChannelReport::default();
        let mut last: Option<(usize, u32)> = None;
        let mut header = [0u8; DEVICE_STATE_HEADER_LEN];
        loop {
            let job = {
                let mut queue = lock(&self.queue);
                loop {
                    if self.abort.failed() {
                        return None;
                    }
                    if let Some(job) = queue.slots[n].take() {
                        queue.sending[n] = Some(Sending {
                            device: job.device,
                            idx: job.idx,
                            since: Instant::now(),
                        });
                        break job;
                    }
                    if queue.done {
                        drop(queue);
                        return Some(self.finish_channel(n, devices, last, report));
                    }
                    queue = wait(&self.slot_ready[n], queue);
                }
            };
            let device = &devices[job.device];
            let size = u32::try_from(job.packet.len())
                .expect("packet sizes are checked against u32 in check_source_plan");
            DeviceStatePacketHeader::write(
                &mut header,
                &device.id.idstr_field(),
                device.id.instance_id,
                size,
            );
            if let Err(source) = send_all(fd, &header, &job.packet) {
                self.fail(DataPlaneError::Send {
                    channel: n,
                    device: device.id.clone(),
                    idx: job.idx,
                    source,
                });
                return None;
            }
            report.bytes += (DEVICE_STATE_HEADER_LEN + job.packet.len()) as u64;
            report.packets += 1;
            last = Some((job.device, job.idx));
            drop(job);
            let mut queue = lock(&self.queue);
            queue.busy[n] = false;
            queue.sending[n] = None;
            drop(queue);
            self.idle.notify_one();
        }
    }

    /// Every packet of this channel is with the kernel: EOF for the destination.
    fn finish_channel(
        &self,
        n: usize,
        devices: &[SourceDevice],
        last: Option<(usize, u32)>,
        report: ChannelReport,
    ) -> SenderResult {
        let mut note = None;
        if let Err(errno) = socket::shutdown(self.channels[n].as_raw_fd(), Shutdown::Write) {
            match last {
                Some((device, idx)) => self.fail(DataPlaneError::Send {
                    channel: n,
                    device: devices[device].id.clone(),
                    idx,
                    source: errno.into(),
                }),
                None => {
                    // Nothing was sent on it, so nothing was lost: say so and go on.
                    let line = format!(
                        "channel {n}: shutdown for writing failed ({errno}); it carried no packets"
                    );
                    log::warn!("{line}");
                    note = Some(line);
                }
            }
        }
        SenderResult { report, note }
    }
}

// ---------------------------------------------------------------------------------------------
// Destination

/// A received payload (VFIO header + data) and the channel it came on.
struct Payload {
    bytes: Vec<u8>,
    channel: usize,
}

struct DevSlot<'a> {
    id: &'a DeviceId,
    state: Mutex<Reassembly<Payload>>,
    /// Signalled on insert (the load thread may go on), on complete (a waiting receiver may
    /// retry), on failure and when every channel closed.
    cv: Condvar,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ChanStatus {
    Reading,
    /// Holds a packet the device has no room for yet.
    Waiting {
        device: usize,
        idx: u32,
        config: bool,
        len: u32,
    },
    /// Clean EOF.
    Closed,
}

/// The process-wide side of the queued bytes.
#[derive(Default)]
struct TotalQueued {
    /// The sum of every device's `Reassembly::queued_bytes`. Changed only under the mutex of the
    /// device whose bytes they are, so a check holding every device's mutex sees them agree.
    bytes: u64,
    /// Receivers asleep on their device's condvar until all devices together have room: while
    /// there are any, a device that frees bytes wakes every device.
    waiters: usize,
}

struct DestShared<'a> {
    channels: &'a [OwnedFd],
    devices: Vec<DevSlot<'a>>,
    /// What each receiver is doing; taken before any device mutex, never after.
    status: Mutex<Vec<ChanStatus>>,
    /// What all devices queue together; taken after a device mutex, never before.
    total: Mutex<TotalQueued>,
    max_total_queued_bytes: u64,
    /// Every channel reached a clean EOF: nothing more will arrive.
    channels_closed: AtomicBool,
    max_packet_size: u32,
    abort: Abort,
    live: Live,
    /// The load threads, for a failed run to interrupt a stuck data_fd write.
    loaders_io: DeviceThreads,
    progress: &'a Progress,
}

impl Side for DestShared<'_> {
    fn fail(&self, err: DataPlaneError) {
        if self.abort.record(err) {
            shutdown_all(self.channels);
        }
        self.wake_devices();
    }

    fn failed(&self) -> bool {
        self.abort.failed()
    }

    fn device_threads(&self) -> &DeviceThreads {
        &self.loaders_io
    }
}

/// True when the device's next idx is queued or being written: its load thread can go on.
fn can_write<B>(r: &Reassembly<B>) -> bool {
    // admit() of the next idx answers Duplicate when it is queued and AlreadyWritten when it
    // is in flight; Ok means it has not arrived, AfterLoaded that the device is done.
    matches!(
        r.admit(r.next_idx(), false, 0),
        Err(ReassemblyError::Duplicate { .. } | ReassemblyError::AlreadyWritten { .. })
    )
}

impl DestShared<'_> {
    /// Wakes every device's waiters; each checks the flags under its mutex, so taking the
    /// mutex first means no wakeup is lost.
    fn wake_devices(&self) {
        for slot in &self.devices {
            drop(lock(&slot.state));
            slot.cv.notify_all();
        }
    }

    /// `multifd_recv_thread` for device-state packets.
    fn recv_thread(&self, n: usize) -> Option<ChannelReport> {
        let fd = self.channels[n].as_fd();
        let mut report = ChannelReport::default();
        let mut offset = INIT_PACKET_LEN as u64;
        let mut header = [0u8; DEVICE_STATE_HEADER_LEN];
        loop {
            if self.abort.failed() {
                return None;
            }
            let got = match read_full(fd, &mut header) {
                Ok(got) => got,
                Err(source) => {
                    return self.recv_failed(DataPlaneError::Recv {
                        channel: n,
                        offset,
                        source,
                    })
                }
            };
            if got == 0 {
                if self.abort.failed() {
                    return None; // our own shutdown, not the peer's end
                }
                break;
            }
            if got < header.len() {
                return self.recv_failed(DataPlaneError::TruncatedPacket { channel: n, offset });
            }
            let view = match DeviceStatePacketHeader::decode(&header, self.max_packet_size) {
                Ok(view) => view,
                Err(source) => {
                    return self.recv_failed(DataPlaneError::Wire {
                        channel: n,
                        offset,
                        source,
                    })
                }
            };
            let Some(device) = self.devices.iter().position(|d| {
                d.id.idstr.as_bytes() == view.idstr && d.id.instance_id == view.instance_id
            }) else {
                return self.recv_failed(DataPlaneError::UnknownDevice {
                    channel: n,
                    idstr: String::from_utf8_lossy(view.idstr).into_owned(),
                    instance_id: view.instance_id,
                    offset,
                });
            };
            // Bounded by max_packet_size in decode() before this allocation.
            let size = view.next_packet_size as usize;
            let mut payload = vec![0u8; size];
            match read_full(fd, &mut payload) {
                Ok(got) if got == size => {}
                Ok(got) => {
                    // The idx is known if its VFIO header came.
                    let idx = payload[..got]
                        .first_chunk::<VFIO_HEADER_LEN>()
                        .and_then(|h| {
                            VfioDeviceStatePacketHeader::decode(h, DEVICE_STATE_HEADER_LEN).ok()
                        })
                        .map(|h| h.idx);
                    return self.recv_failed(DataPlaneError::TruncatedPayload {
                        channel: n,
                        device: self.devices[device].id.clone(),
                        idx,
                        offset,
                    });
                }
                Err(source) => {
                    return self.recv_failed(DataPlaneError::RecvPayload {
                        channel: n,
                        device: self.devices[device].id.clone(),
                        idx: None,
                        offset,
                        source,
                    })
                }
            }
            let vfio: &[u8; VFIO_HEADER_LEN] = payload[..VFIO_HEADER_LEN]
                .try_into()
                .expect("decode() checked next_packet_size >= VFIO_HEADER_LEN");
            let vfio = match VfioDeviceStatePacketHeader::decode(vfio, DEVICE_STATE_HEADER_LEN) {
                Ok(vfio) => vfio,
                Err(source) => {
                    return self.recv_failed(DataPlaneError::Wire {
                        channel: n,
                        offset,
                        source,
                    })
                }
            };
            let len = view.next_packet_size - VFIO_HEADER_LEN as u32;
            let packet = Payload {
                bytes: payload,
                channel: n,
            };
            self.place(n, device, vfio.idx, vfio.config, len, packet)?;
            let wire = (DEVICE_STATE_HEADER_LEN + size) as u64;
            report.bytes += wire;
            report.packets += 1;
            offset += wire;
        }
        // Clean EOF at a packet boundary.
        let mut status = lock(&self.status);
        status[n] = ChanStatus::Closed;
        if status.iter().all(|s| *s == ChanStatus::Closed) {
            drop(status);
            self.channels_closed.store(true, Ordering::Release);
            self.wake_devices();
        } else {
            self.check_stall(&status);
        }
        Some(report)
    }

    /// An error seen by a receiver; after a failure elsewhere (our own shutdown makes reads
    /// end) it is only a consequence and is not reported.
    fn recv_failed<T>(&self, err: DataPlaneError) -> Option<T> {
        if !self.abort.failed() {
            self.fail(err);
        }
        None
    }

    /// `vfio_multifd_load_state_buffer`: queue the packet, or hold it (and stop reading the
    /// channel) until the device has room.
    fn place(
        &self,
        n: usize,
        device: usize,
        idx: u32,
        config: bool,
        len: u32,
        packet: Payload,
    ) -> Option<()> {
        let slot = &self.devices[device];
        let mut state = lock(&slot.state);
        let mut checked = false;
        let mut waited = false;
        loop {
            if self.abort.failed() {
                return None;
            }
            // None: the device has no room. Some: it has, but all devices together have not.
            let total_full = match state.admit(idx, config, len) {
                Err(source) => {
                    drop(state);
                    self.fail(DataPlaneError::Reassembly {
                        channel: n,
                        device: slot.id.clone(),
                        idx,
                        source,
                    });
                    return None;
                }
                Ok(Admission::Accept) => {
                    let mut total = lock(&self.total);
                    let room = total.bytes + u64::from(len) <= self.max_total_queued_bytes;
                    if state.is_next(idx) || room {
                        total.bytes += u64::from(len);
                        drop(total);
                        state.insert(idx, config, len, packet);
                        drop(state);
                        slot.cv.notify_all();
                        if waited {
                            lock(&self.status)[n] = ChanStatus::Reading;
                        }
                        return Some(());
                    }
                    Some(total)
                }
                Ok(Admission::Wait) => None,
            };
            if !checked {
                // Lock order: status before any device.
                drop(total_full);
                drop(state);
                waited = true;
                let mut status = lock(&self.status);
                status[n] = ChanStatus::Waiting {
                    device,
                    idx,
                    config,
                    len,
                };
                if self.check_stall(&status) {
                    return None;
                }
                drop(status);
                checked = true;
                state = lock(&slot.state);
                continue;
            }
            match total_full {
                None => state = wait(&slot.cv, state),
                Some(mut total) => {
                    // Counted before the device mutex is let go, so no freeing write is missed.
                    total.waiters += 1;
                    drop(total);
                    state = wait(&slot.cv, state);
                    lock(&self.total).waiters -= 1;
                }
            }
            // Something changed: whether the run can still progress must be asked again.
            checked = false;
        }
    }

    /// A device whose mutex the caller holds no longer queues `len` bytes. True when receivers
    /// wait for room under the process-wide cap: the caller must then wake every device.
    fn release_total(&self, len: u32) -> bool {
        let mut total = lock(&self.total);
        total.bytes = total.bytes.saturating_sub(u64::from(len));
        total.waiters > 0
    }

    /// With the status lock held: fails the run when every open channel holds a packet there is
    /// no room for and no write that would make room can happen: for a device's own limit, that
    /// device cannot write; for the process-wide cap, no device can. Returns true if it did.
    fn check_stall(&self, status: &[ChanStatus]) -> bool {
        let mut waiting = Vec::new();
        for (channel, s) in status.iter().enumerate() {
            match *s {
                ChanStatus::Reading => return false,
                ChanStatus::Closed => {}
                ChanStatus::Waiting {
                    device,
                    idx,
                    config,
                    len,
                } => waiting.push((channel, device, idx, config, len)),
            }
        }
        if waiting.is_empty() {
            return false;
        }
        // Every device at once, in index order (nothing else holds two): the process-wide total
        // changes only under a device's mutex, so it and every device agree.
        let states: Vec<_> = self.devices.iter().map(|slot| lock(&slot.state)).collect();
        let total = lock(&self.total).bytes;
        let any_can_write = states.iter().any(|s| can_write(s));
        let mut detail = Vec::new();
        for &(channel, device, idx, config, len) in &waiting {
            let state = &states[device];
            if can_write(state) {
                return false;
            }
            let queued = match state.admit(idx, config, len) {
                Ok(Admission::Wait) => format!(
                    "{} of max {} bytes queued",
                    state.queued_bytes(),
                    state.max_queued_bytes()
                ),
                Ok(Admission::Accept)
                    if !state.is_next(idx)
                        && total + u64::from(len) > self.max_total_queued_bytes
                        && !any_can_write =>
                {
                    format!(
                        "held by the process-wide cap, not the device's limit: {total} of max {} bytes queued by all devices, {} by this one",
                        self.max_total_queued_bytes,
                        state.queued_bytes()
                    )
                }
                _ => return false,
            };
            detail.push(format!(
                "channel {channel} holds idx {idx} ({len} bytes) of device {} whose next idx {} has not arrived ({queued})",
                self.devices[device].id,
                state.next_idx(),
            ));
        }
        drop(states);
        let closed: Vec<String> = status
            .iter()
            .enumerate()
            .filter(|(_, s)| **s == ChanStatus::Closed)
            .map(|(c, _)| c.to_string())
            .collect();
        if !closed.is_empty() {
            detail.push(format!("closed channels: {}", closed.join(", ")));
        }
        self.fail(DataPlaneError::Stalled {
            detail: detail.join("; "),
        });
        true
    }

    /// `vfio_load_bufs_thread`: writes buffers in idx order, then hands the config over.
    fn load_thread(&self, i: usize, device: &DestDevice) -> Option<DestDeviceReport> {
        let slot = &self.devices[i];
        let mut report = DestDeviceReport::default();
        loop {
            let ready = {
                let mut state = lock(&slot.state);
                loop {
                    if self.abort.failed() {
                        return None;
                    }
                    if let Some(ready) = state.pop_ready() {
                        break ready;
                    }
                    if self.channels_closed.load(Ordering::Acquire) {
                        let err = DataPlaneError::Incomplete {
                            device: slot.id.clone(),
                            next_idx: state.next_idx(),
                            config_idx: state.config_idx(),
                        };
                        drop(state);
                        self.fail(err);
                        return None;
                    }
                    state = wait(&slot.cv, state);
                }
            };
            let Payload { mut bytes, channel } = ready.buf;
            if ready.config {
                bytes.drain(..VFIO_HEADER_LEN);
                report.config = bytes;
                report.data_packets = ready.idx;
                let mut state = lock(&slot.state);
                state.complete(ready.len);
                let wake_all = self.release_total(ready.len);
                report.loaded_ns = monotonic_ns();
                report.peak_queued_bytes = state.peak_queued_bytes();
                drop(state);
                slot.cv.notify_all();
                if wake_all {
                    self.wake_devices();
                }
                return Some(report);
            }
            if let Err(source) = write_device(
                device.data_fd.as_fd(),
                &bytes[VFIO_HEADER_LEN..],
                &self.abort,
            ) {
                self.fail(DataPlaneError::WriteDevice {
                    device: slot.id.clone(),
                    idx: ready.idx,
                    channel,
                    source,
                });
                return None;
            }
            record_packet_ns(&mut report.written_ns, ready.idx, monotonic_ns());
            report.bytes += u64::from(ready.len);
            self.progress.add(ready.len as usize);
            drop(bytes);
            let mut state = lock(&slot.state);
            state.complete(ready.len);
            let wake_all = self.release_total(ready.len);
            drop(state);
            slot.cv.notify_all();
            if wake_all {
                self.wake_devices();
            }
        }
    }
}
