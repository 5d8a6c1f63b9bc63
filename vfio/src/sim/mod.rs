//! Simulated devices behind [`MigrationDevice`](crate::MigrationDevice), each with a real
//! kernel fd as its data_fd:
//!
//! | device | data_fd | reads / writes |
//! |---|---|---|
//! | [`SimSource`], no speed | memfd (read-only open), content pre-generated in `new` | one kernel copy; a read returns all it asks for |
//! | [`SimSource`] with [`DeviceSpeed`] | pipe (1 MiB) fed by a pacing thread, which splices from the image pre-generated in `new` | what is buffered: short reads, a read blocks until data comes |
//! | [`SimSink`], no speed | memfd (write-only open), sized to the state + 4 KiB and sealed against growing | one kernel copy; a write past that bound fails (EPERM); verified at RESUMING -> STOP |
//! | [`SimSink`] with load speed | pipe drained at the device's rate by a pacing thread, which splices its pages into held pipes (no copy) or, past the fd budget, into a memfd; verified at RESUMING -> STOP | a write blocks while the pipe is full; the last write returns before the drain consumed the last byte ([`crate::MigrationDevice::load_done_ns`] says when) |
//! | [`fault`] devices | FUSE file (errno) or pipe (short reads, stall, early end) | see [`fault::Fault`] |
//!
//! Content is deterministic from `(seed, byte offset)` ([`fill`]); a source and a sink built
//! from one [`SimSpec`] agree on every byte. The stream's first `precopy_initial +
//! precopy_dirty` bytes are the precopy part: readable in PRE_COPY, after which a read gives 0
//! (memfd; a pipe device's read blocks until STOP_COPY, a FUSE fault device gives ENOMSG). STOP_COPY
//! continues on the same fd; reading to EOF gives exactly `size` bytes in all.

mod content;
pub mod fault;
mod fuse;
mod held;
mod sink;
mod source;

use std::io;
use std::os::fd::OwnedFd;
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

pub use content::{check_uses_avx512, fill, first_mismatch, word};
pub use sink::SimSink;
pub use source::SimSource;

use crate::planner::plan;
use crate::{MigState, MigrationFlags, StreamMismatch, VfioError};

/// QEMU's `VFIO_MIG_FLAG_DEV_CONFIG_STATE`.
pub const VFIO_MIG_FLAG_DEV_CONFIG_STATE: u64 = 0xffff_ffff_ef10_0002;
/// QEMU's `VFIO_MIG_FLAG_END_OF_STATE`.
pub const VFIO_MIG_FLAG_END_OF_STATE: u64 = 0xffff_ffff_ef10_0001;

/// A device's own save and load speed, for benchmarks where the device, not the transport,
/// sets the downtime. A rate of 0 is unlimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DeviceSpeed {
    /// Bytes per second the source produces.
    pub save_bytes_per_sec: u64,
    /// Bytes per second the sink consumes.
    pub load_bytes_per_sec: u64,
    /// Cost of each device chunk (up to 1 MiB, one QEMU-buffer-sized read or write).
    pub per_read_latency: Duration,
}

impl DeviceSpeed {
    fn paces_save(&self) -> bool {
        self.save_bytes_per_sec > 0 || !self.per_read_latency.is_zero()
    }

    fn paces_load(&self) -> bool {
        self.load_bytes_per_sec > 0 || !self.per_read_latency.is_zero()
    }
}

/// What a simulated device holds and how it behaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SimSpec {
    /// Total stream bytes (precopy part included).
    pub size: u64,
    /// Content seed: use a different one per device.
    pub seed: u64,
    /// Initial precopy bytes (PRE_COPY is offered when > 0).
    pub precopy_initial: u64,
    /// Dirty precopy bytes after the initial ones.
    pub precopy_dirty: u64,
    /// None: unlimited (only the kernel copy).
    pub speed: Option<DeviceSpeed>,
    /// Bytes of config-space payload in [`config_blob`].
    pub config_len: usize,
}

impl Default for SimSpec {
    fn default() -> Self {
        SimSpec {
            size: 16 << 20,
            seed: 1,
            precopy_initial: 0,
            precopy_dirty: 0,
            speed: None,
            config_len: 256,
        }
    }
}

impl SimSpec {
    /// A stop-copy-only device of `size` bytes, unlimited speed.
    pub fn new(size: u64, seed: u64) -> SimSpec {
        SimSpec {
            size,
            seed,
            ..SimSpec::default()
        }
    }

    /// Bytes readable in PRE_COPY.
    pub fn precopy_total(&self) -> u64 {
        self.precopy_initial.saturating_add(self.precopy_dirty)
    }

    /// The migration flags this device offers: STOP_COPY | P2P, plus PRE_COPY with precopy bytes.
    pub fn flags(&self) -> MigrationFlags {
        let base = MigrationFlags::STOP_COPY | MigrationFlags::P2P;
        if self.precopy_initial > 0 {
            base | MigrationFlags::PRE_COPY
        } else {
            base
        }
    }

    pub(crate) fn validate(&self, device: &str) -> Result<(), VfioError> {
        let bad = |reason| {
            Err(VfioError::InvalidSpec {
                device: device.to_owned(),
                reason,
            })
        };
        if self.precopy_total() > self.size {
            return bad("precopy_initial + precopy_dirty exceeds size");
        }
        if self.precopy_initial == 0 && self.precopy_dirty > 0 {
            return bad("precopy_dirty needs precopy_initial > 0");
        }
        if i64::try_from(self.size.saturating_mul(2)).is_err() {
            return bad("size too large");
        }
        Ok(())
    }
}

/// The device's config blob shaped like QEMU's: BE u64 0xffffffffef100002, `config_len`
/// deterministic bytes, BE u64 0xffffffffef100001.
pub fn config_blob(spec: &SimSpec) -> Vec<u8> {
    let mut blob = Vec::with_capacity(spec.config_len + 16);
    blob.extend_from_slice(&VFIO_MIG_FLAG_DEV_CONFIG_STATE.to_be_bytes());
    let start = blob.len();
    blob.resize(start + spec.config_len, 0);
    fill(spec.seed ^ 0xc0f1_9c0f_19c0_f19c, 0, &mut blob[start..]);
    blob.extend_from_slice(&VFIO_MIG_FLAG_END_OF_STATE.to_be_bytes());
    blob
}

/// A matched pair: the source to save from and the sink that verifies what it receives.
pub fn sim_pair(name: &str, spec: SimSpec) -> Result<(SimSource, SimSink), VfioError> {
    Ok((SimSource::new(name, spec)?, SimSink::new(name, spec)?))
}

/// Checks a received stream incrementally against the seeded content.
#[derive(Debug, Clone)]
pub(crate) struct Verifier {
    seed: u64,
    size: u64,
    received: u64,
    first_bad: Option<u64>,
}

impl Verifier {
    pub(crate) fn new(spec: &SimSpec) -> Verifier {
        Verifier {
            seed: spec.seed,
            size: spec.size,
            received: 0,
            first_bad: None,
        }
    }

    /// The verdict of a check done elsewhere: `received` bytes, the first bad one if any.
    pub(crate) fn checked(spec: &SimSpec, received: u64, first_bad: Option<u64>) -> Verifier {
        Verifier {
            seed: spec.seed,
            size: spec.size,
            received,
            first_bad,
        }
    }

    pub(crate) fn feed(&mut self, data: &[u8]) {
        if self.first_bad.is_none() && self.received < self.size {
            let n = usize::try_from(self.size - self.received)
                .unwrap_or(usize::MAX)
                .min(data.len());
            self.first_bad = first_mismatch(self.seed, self.received, &data[..n]);
        }
        self.received += data.len() as u64;
    }

    pub(crate) fn received(&self) -> u64 {
        self.received
    }

    pub(crate) fn verdict(&self) -> Result<(), StreamMismatch> {
        if let Some(offset) = self.first_bad {
            return Err(StreamMismatch::Corrupt { offset });
        }
        if self.received > self.size {
            return Err(StreamMismatch::Extra {
                extra: self.received - self.size,
                expected: self.size,
            });
        }
        if self.received < self.size {
            return Err(StreamMismatch::Missing {
                missing: self.size - self.received,
                got: self.received,
                expected: self.size,
            });
        }
        Ok(())
    }
}

/// Checks each piece on a thread of its own (`sim-verify`: a sink's check runs inside
/// RESUMING -> STOP) and returns the lowest bad offset any of them found.
pub(crate) fn first_bad_in_parallel<P: Send>(
    pieces: impl IntoIterator<Item = P>,
    check: impl Fn(P) -> std::io::Result<Option<u64>> + Sync,
) -> std::io::Result<Option<u64>> {
    let check = &check;
    std::thread::scope(|scope| {
        let handles: Vec<_> = pieces
            .into_iter()
            .map(|piece| {
                std::thread::Builder::new()
                    .name("sim-verify".into())
                    .spawn_scoped(scope, move || check(piece))
            })
            .collect();
        let mut first: Option<u64> = None;
        for handle in handles {
            let found = handle?
                .join()
                .unwrap_or_else(|_| Err(std::io::Error::other("a verifier thread panicked")))?;
            if let Some(bad) = found {
                first = Some(first.map_or(bad, |f| f.min(bad)));
            }
        }
        Ok(first)
    })
}

/// Compares a blob with the expected one.
pub(crate) fn compare_blob(expected: &[u8], got: &[u8]) -> Result<(), StreamMismatch> {
    if let Some(i) = expected.iter().zip(got).position(|(a, b)| a != b) {
        return Err(StreamMismatch::Corrupt { offset: i as u64 });
    }
    let (e, g) = (expected.len() as u64, got.len() as u64);
    if g < e {
        return Err(StreamMismatch::Missing {
            missing: e - g,
            got: g,
            expected: e,
        });
    }
    if g > e {
        return Err(StreamMismatch::Extra {
            extra: g - e,
            expected: e,
        });
    }
    Ok(())
}

/// How one simulated arc failed.
pub(crate) enum ArcError {
    /// Like a kernel errno; the device stays where it was.
    Kernel(io::Error),
    /// The loaded stream is bad; the device goes to ERROR.
    Rejected(StreamMismatch),
    /// The arc failed part-way (an I/O or kernel error inside it, with the session it ends
    /// already gone); the device goes to ERROR, as a real driver's does, so RESET recovers it.
    Broken(io::Error),
}

/// Per-arc behaviour of a simulated device.
pub(crate) trait SimArcs {
    fn name(&self) -> &str;
    fn arc(&mut self, from: MigState, to: MigState) -> Result<Option<OwnedFd>, ArcError>;
}

/// Plans and takes the arcs on a simulated device, as the real device path does.
pub(crate) fn drive(
    dev: &mut impl SimArcs,
    state: &mut MigState,
    flags: MigrationFlags,
    target: MigState,
) -> Result<Option<OwnedFd>, VfioError> {
    let from = *state;
    let path = plan(from, target, flags).map_err(|source| VfioError::Plan {
        device: dev.name().to_owned(),
        from,
        target,
        source,
    })?;
    let mut opened = None;
    for next in path {
        match dev.arc(*state, next) {
            Ok(fd) => {
                if fd.is_some() {
                    opened = fd;
                }
                *state = next;
            }
            Err(ArcError::Kernel(source)) => {
                return Err(VfioError::SetState {
                    device: dev.name().to_owned(),
                    from: *state,
                    to: next,
                    target,
                    now: Some(*state),
                    source,
                })
            }
            Err(ArcError::Broken(source)) => {
                let (from, to) = (*state, next);
                *state = MigState::Error;
                return Err(VfioError::SetState {
                    device: dev.name().to_owned(),
                    from,
                    to,
                    target,
                    now: Some(MigState::Error),
                    source,
                });
            }
            Err(ArcError::Rejected(source)) => {
                *state = MigState::Error;
                return Err(VfioError::LoadRejected {
                    device: dev.name().to_owned(),
                    now: MigState::Error,
                    source,
                });
            }
        }
    }
    Ok(opened)
}

/// A stop flag threads wait on, so a session's end wakes every sleep at once.
#[derive(Debug, Default)]
pub(crate) struct Signal {
    state: Mutex<SignalState>,
    cv: Condvar,
}

#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct SignalState {
    pub(crate) cancel: bool,
    pub(crate) stop_copy: bool,
    pub(crate) finish: bool,
}

impl Signal {
    pub(crate) fn update(&self, f: impl FnOnce(&mut SignalState)) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut s);
        self.cv.notify_all();
    }

    pub(crate) fn get(&self) -> SignalState {
        *self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sleeps until `deadline` or cancel; returns false when cancelled.
    pub(crate) fn sleep_until(&self, deadline: Instant) -> bool {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if s.cancel {
                return false;
            }
            let now = Instant::now();
            if now >= deadline {
                return true;
            }
            s = match self.cv.wait_timeout(s, deadline - now) {
                Ok((g, _)) => g,
                Err(p) => p.into_inner().0,
            };
        }
    }

    /// Waits until `pred` holds or cancel; returns false when cancelled.
    pub(crate) fn wait_for(&self, pred: impl Fn(&SignalState) -> bool) -> bool {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if s.cancel {
                return false;
            }
            if pred(&s) {
                return true;
            }
            s = match self.cv.wait(s) {
                Ok(g) => g,
                Err(p) => p.into_inner(),
            };
        }
    }
}

/// Paces a byte stream at `rate` bytes/s (0 = unlimited).
#[derive(Debug)]
pub(crate) struct Pacer {
    rate: u64,
    start: Instant,
    done: u64,
}

impl Pacer {
    pub(crate) fn new(rate: u64) -> Pacer {
        Pacer {
            rate,
            start: Instant::now(),
            done: 0,
        }
    }

    /// When `bytes` more may go.
    pub(crate) fn deadline(&self, bytes: u64) -> Instant {
        if self.rate == 0 {
            return self.start;
        }
        let total = u128::from(self.done + bytes);
        let nanos = total * 1_000_000_000 / u128::from(self.rate);
        self.start + Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
    }

    pub(crate) fn account(&mut self, bytes: u64) {
        self.done += bytes;
    }

    /// A write size that keeps the stream smooth: about 2 ms of data, 4 KiB to `max`.
    pub(crate) fn piece(&self, max: usize) -> usize {
        if self.rate == 0 {
            return max;
        }
        usize::try_from(self.rate / 500)
            .unwrap_or(max)
            .clamp(4096, max.max(4096))
            .min(max)
    }

    /// Adds a pause (latency) to the schedule.
    pub(crate) fn delay(&mut self, d: Duration) {
        self.start += d;
    }
}

/// Writes `buf` at `offset` of a memfd and reads it back into `buf` (same bytes). A page-cache
/// page is moved to the active LRU, under the LRU lock, on its second access: without the read
/// back, the migration's own read (source) or write (sink) of every page would pay that move,
/// which a device's memory never does. In a 64 KiB-packet profile (2026-12-07) it was 19 % of a
/// source worker's CPU and 11 % of a destination worker's (`folio_mark_accessed` ->
/// `folio_batch_move_lru`, `workingset_activation`).
pub(crate) fn write_active(
    fd: std::os::fd::BorrowedFd<'_>,
    buf: &mut [u8],
    offset: u64,
) -> io::Result<()> {
    crate::os::pwrite_all(fd, buf, offset)?;
    let mut done = 0;
    while done < buf.len() {
        match crate::os::pread(fd, &mut buf[done..], offset + done as u64)? {
            0 => break,
            n => done += n,
        }
    }
    Ok(())
}

/// Sets a pipe to 1 MiB (or the largest size allowed, down to 64 KiB); returns the size.
pub(crate) fn size_pipe(fd: std::os::fd::BorrowedFd<'_>) -> usize {
    for size in [1 << 20, 512 << 10, 256 << 10, 128 << 10, 64 << 10] {
        if let Ok(got) = crate::os::set_pipe_size(fd, size) {
            return got;
        }
    }
    64 << 10
}
