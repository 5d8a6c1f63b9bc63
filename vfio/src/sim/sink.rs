//! The simulated destination device: RUNNING -> STOP -> RESUMING hands out a writable data_fd;
//! RESUMING -> STOP checks every byte in order against `(seed, size)` and, like a real driver,
//! fails that transition (device -> ERROR) when data is missing, extra or corrupt.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::fault::Fault;
use super::fuse::{FuseHandler, FuseMount};
use super::held::HeldPipes;
use super::{
    compare_blob, config_blob, drive, first_bad_in_parallel, first_mismatch, size_pipe, ArcError,
    Pacer, Signal, SimArcs, SimSpec, Verifier,
};
use crate::os;
use crate::{MigState, MigrationDevice, MigrationFlags, Owner, PrecopyInfo, VfioError};

const VERIFY_CHUNK: usize = 1 << 20;

/// Bytes an unpaced sink accepts past the device's size before its writes fail.
pub(crate) const EXTRA_SLACK: u64 = 4096;

/// What a finished load session gives back.
struct Loaded {
    /// Everything written, checked.
    verifier: Verifier,
    /// CLOCK_MONOTONIC when the device consumed the last byte of its state, where that is later
    /// than the write that handed it over (a paced sink's pipe); None when each write is the
    /// load itself (memfd, FUSE) or the device never got all its bytes.
    consumed_ns: Option<u64>,
}

trait LoadSession: Send {
    /// RESUMING -> STOP: everything written so far, checked.
    fn finish(self: Box<Self>) -> io::Result<Loaded>;
}

/// A simulated sink device (resuming side).
pub struct SimSink {
    name: String,
    spec: SimSpec,
    owner: Owner,
    state: MigState,
    fault: Option<Fault>,
    session: Option<Box<dyn LoadSession>>,
    loaded: Option<u64>,
    consumed_ns: Option<u64>,
}

impl std::fmt::Debug for SimSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimSink")
            .field("name", &self.name)
            .field("spec", &self.spec)
            .field("state", &self.state)
            .field("fault", &self.fault)
            .field("loaded", &self.loaded)
            .field("consumed_ns", &self.consumed_ns)
            .finish_non_exhaustive()
    }
}

impl SimSink {
    /// A sink in RUNNING expecting the stream a [`super::SimSource`] of the same spec produces.
    pub fn new(name: &str, spec: SimSpec) -> Result<SimSink, VfioError> {
        Self::build(name, spec, None)
    }

    /// A sink whose data_fd misbehaves as `fault` says (`Errno` or `Stall`).
    pub fn with_fault(name: &str, spec: SimSpec, fault: Fault) -> Result<SimSink, VfioError> {
        fault.validate_sink(name, &spec)?;
        Self::build(name, spec, Some(fault))
    }

    fn build(name: &str, spec: SimSpec, fault: Option<Fault>) -> Result<SimSink, VfioError> {
        spec.validate(name)?;
        Ok(SimSink {
            name: name.to_owned(),
            spec,
            owner: Owner::Helper,
            state: MigState::Running,
            fault,
            session: None,
            loaded: None,
            consumed_ns: None,
        })
    }

    /// Marks the device as the VMM's (RESET is then refused).
    pub fn with_owner(mut self, owner: Owner) -> SimSink {
        self.owner = owner;
        self
    }

    /// The spec it was built from.
    pub fn spec(&self) -> &SimSpec {
        &self.spec
    }

    /// Bytes of the last stream that loaded successfully (RESUMING -> STOP passed).
    pub fn loaded_bytes(&self) -> Option<u64> {
        self.loaded
    }

    /// Checks the config blob the VMM would apply against the source's ([`config_blob`]).
    pub fn verify_config(&self, blob: &[u8]) -> Result<(), VfioError> {
        compare_blob(&config_blob(&self.spec), blob).map_err(|source| VfioError::ConfigRejected {
            device: self.name.clone(),
            source,
        })
    }

    fn open_session(&mut self) -> io::Result<OwnedFd> {
        let (fd, session): (OwnedFd, Box<dyn LoadSession>) = match self.fault {
            Some(Fault::Errno { at, errno }) => {
                let (fd, s) = FuseLoad::open(&self.name, self.spec, at, errno)?;
                (fd, Box::new(s))
            }
            Some(Fault::Stall { at, duration }) => {
                let (fd, s) = PipeLoad::open(&self.name, self.spec, Some((at, duration)))?;
                (fd, Box::new(s))
            }
            _ if self.spec.speed.is_some_and(|s| s.paces_load()) => {
                let (fd, s) = PipeLoad::open(&self.name, self.spec, None)?;
                (fd, Box::new(s))
            }
            _ => {
                let (fd, s) = MemLoad::open(&self.name, self.spec)?;
                (fd, Box::new(s))
            }
        };
        self.session = Some(session);
        Ok(fd)
    }
}

impl SimArcs for SimSink {
    fn name(&self) -> &str {
        &self.name
    }

    fn arc(&mut self, from: MigState, to: MigState) -> Result<Option<OwnedFd>, ArcError> {
        use MigState::*;
        match (from, to) {
            (Stop, Resuming) => {
                self.loaded = None;
                self.consumed_ns = None;
                self.open_session().map(Some).map_err(ArcError::Kernel)
            }
            (Resuming, Stop) => {
                let Some(session) = self.session.take() else {
                    return Err(ArcError::Kernel(io::Error::from_raw_os_error(libc::EINVAL)));
                };
                // The session is gone either way: a failure here cannot leave the device in
                // RESUMING (with no session every later RESUMING -> STOP would be EINVAL), so
                // it goes to ERROR, which RESET (or the VMM's reset) recovers.
                let Loaded {
                    verifier,
                    consumed_ns,
                } = session.finish().map_err(ArcError::Broken)?;
                verifier.verdict().map_err(ArcError::Rejected)?;
                self.loaded = Some(verifier.received());
                self.consumed_ns = consumed_ns;
                Ok(None)
            }
            (Running, PreCopy) | (RunningP2p, PreCopyP2p) | (Stop, StopCopy) => {
                Err(ArcError::Kernel(io::Error::new(
                    io::ErrorKind::Unsupported,
                    "a simulated sink does not save; use SimSource",
                )))
            }
            _ => Ok(None),
        }
    }
}

impl MigrationDevice for SimSink {
    fn name(&self) -> &str {
        &self.name
    }

    fn owner(&self) -> Owner {
        self.owner
    }

    fn migration_flags(&self) -> Result<MigrationFlags, VfioError> {
        Ok(self.spec.flags())
    }

    fn state(&self) -> Result<MigState, VfioError> {
        Ok(self.state)
    }

    fn set_state(&mut self, target: MigState) -> Result<Option<OwnedFd>, VfioError> {
        let mut state = self.state;
        let flags = self.spec.flags();
        let result = drive(self, &mut state, flags, target);
        self.state = state;
        if state == MigState::Error {
            self.session = None;
        }
        result
    }

    fn precopy_info(&self) -> Result<PrecopyInfo, VfioError> {
        Err(VfioError::NotInPrecopy {
            device: self.name.clone(),
            action: "VFIO_MIG_GET_PRECOPY_INFO",
            state: self.state,
        })
    }

    /// The device's state size (a sink never saves).
    fn stop_copy_size(&self) -> Result<u64, VfioError> {
        Ok(self.spec.size)
    }

    fn reset(&mut self) -> Result<(), VfioError> {
        if self.owner != Owner::Helper {
            return Err(VfioError::NotOwner {
                device: self.name.clone(),
                action: "VFIO_DEVICE_RESET",
            });
        }
        self.session = None;
        self.state = MigState::Running;
        Ok(())
    }

    /// Of the last stream that loaded successfully: a paced sink drains its pipe (up to 1 MiB)
    /// at the device's rate after the helper's last write returned; an unpaced sink's writes
    /// are the load itself (None).
    fn load_done_ns(&self) -> Option<u64> {
        self.consumed_ns
    }
}

/// The memory a simulated sink loads into: a memfd of the device's size, checked at
/// RESUMING -> STOP.
///
/// Its pages are written once when the device starts RESUMING, as a real device's memory exists
/// before it loads: otherwise every page of the image is allocated and zeroed inside the
/// downtime, a cost no VFIO device puts on the helper's write (on this VM that was most of the
/// destination's CPU time with 8 MiB packets).
struct Image {
    mem: OwnedFd,
    spec: SimSpec,
}

impl Image {
    fn new(name: &str, spec: SimSpec) -> io::Result<Image> {
        let cname = CString::new(format!("vfio-sink-{name}")).unwrap_or_default();
        let mem = os::memfd(&cname)?;
        let mut zeros = vec![0u8; 1 << 20];
        let mut at = 0u64;
        while at < spec.size {
            let n = usize::try_from(spec.size - at)
                .unwrap_or(zeros.len())
                .min(zeros.len());
            super::write_active(mem.as_fd(), &mut zeros[..n], at)?;
            at += n as u64;
        }
        Ok(Image { mem, spec })
    }

    /// Checks the first `len` bytes loaded (at most the device's size) against the stream.
    fn verify(&self, len: u64) -> io::Result<Verifier> {
        let checked = len.min(self.spec.size);
        // Split the check over up to 8 threads: it runs inside RESUMING -> STOP.
        let threads = std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .clamp(1, 8) as u64;
        let threads = if checked < 64 << 20 { 1 } else { threads };
        let per = checked
            .div_ceil(threads)
            .next_multiple_of(VERIFY_CHUNK as u64)
            .max(1);
        let seed = self.spec.seed;
        let mem = &self.mem;
        let check_span = |start: u64, end: u64| -> io::Result<Option<u64>> {
            let mut buf = vec![0u8; VERIFY_CHUNK];
            let mut off = start;
            while off < end {
                let want = usize::try_from(end - off)
                    .unwrap_or(VERIFY_CHUNK)
                    .min(VERIFY_CHUNK);
                let n = os::pread(mem.as_fd(), &mut buf[..want], off)?;
                if n == 0 {
                    return Err(io::Error::from(io::ErrorKind::UnexpectedEof));
                }
                if let Some(bad) = first_mismatch(seed, off, &buf[..n]) {
                    return Ok(Some(bad));
                }
                off += n as u64;
            }
            Ok(None)
        };
        let spans = (0..threads)
            .map(|i| (i * per, ((i + 1) * per).min(checked)))
            .filter(|(a, b)| a < b);
        let first_bad = first_bad_in_parallel(spans, |(a, b)| check_span(a, b))?;
        Ok(Verifier::checked(&self.spec, len, first_bad))
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        if let Err(e) = os::ftruncate(self.mem.as_fd(), 0) {
            log::debug!("freeing a simulated sink image: {e}");
        }
    }
}

/// Unlimited speed: the helper writes straight into the image.
///
/// The image is bounded: it is sized to the device's state plus one page and sealed against
/// growing, so a source that never stops sending gets a write error past that (EPERM; a real
/// driver's is ENOMEM past its `state_size`), not an ever larger tmpfs file. The page of slack
/// lets RESUMING -> STOP still report a few extra bytes as [`crate::StreamMismatch::Extra`].
struct MemLoad {
    image: Image,
    /// A dup of the handed-out fd: same open file, so its position is the bytes written.
    writer: OwnedFd,
}

impl MemLoad {
    fn open(name: &str, spec: SimSpec) -> io::Result<(OwnedFd, MemLoad)> {
        let image = Image::new(name, spec)?;
        os::ftruncate(image.mem.as_fd(), spec.size.saturating_add(EXTRA_SLACK))?;
        os::add_seals(image.mem.as_fd(), libc::F_SEAL_GROW)?;
        let handed = match os::reopen(image.mem.as_fd(), true) {
            Ok(fd) => fd,
            Err(e) => {
                log::debug!("reopening the sink memfd write-only failed ({e}); handing out a dup");
                image.mem.try_clone()?
            }
        };
        let writer = handed.try_clone()?;
        Ok((handed, MemLoad { image, writer }))
    }
}

impl LoadSession for MemLoad {
    fn finish(self: Box<Self>) -> io::Result<Loaded> {
        let len = os::lseek(self.writer.as_fd(), 0, libc::SEEK_CUR)?;
        Ok(Loaded {
            verifier: self.image.verify(len)?,
            consumed_ns: None,
        })
    }
}

/// A paced load: a pipe that a thread (`sim-load-<name>`) drains at the device's rate,
/// splicing into held pipes (no copy at all, see [`HeldPipes`]) or into the image (a kernel
/// copy), so the simulator adds no copy through a user buffer and no check to the cores the
/// data plane runs on while it loads (a real device loads on its own silicon). What it kept is
/// checked at RESUMING -> STOP, as an unpaced sink's image is.
struct PipeLoad {
    signal: Arc<Signal>,
    thread: Option<JoinHandle<io::Result<Drained>>>,
    spec: SimSpec,
}

/// Where a paced sink's drain keeps what the device consumed.
enum Store {
    Pipes(HeldPipes),
    Image(Image),
}

impl Store {
    /// Moves up to `len` bytes, the stream's bytes from `at`, out of the pipe `from`.
    fn take_from(&mut self, from: BorrowedFd<'_>, at: u64, len: usize) -> io::Result<usize> {
        match self {
            Store::Pipes(pipes) => pipes.take_from(from, len),
            Store::Image(image) => os::splice_from_pipe(from, image.mem.as_fd(), at, len),
        }
    }

    fn verify(self, spec: &SimSpec, received: u64) -> io::Result<Verifier> {
        match self {
            Store::Pipes(pipes) => pipes.verify(spec, received),
            Store::Image(image) => image.verify(received),
        }
    }
}

impl PipeLoad {
    fn open(
        name: &str,
        spec: SimSpec,
        stall: Option<(u64, Duration)>,
    ) -> io::Result<(OwnedFd, PipeLoad)> {
        let store = match HeldPipes::reserve(spec.size) {
            Some(pipes) => Store::Pipes(pipes),
            None => Store::Image(Image::new(name, spec)?),
        };
        let (r, w) = os::pipe()?;
        let pipe_size = size_pipe(w.as_fd());
        let fl = os::get_status_flags(r.as_fd())?;
        os::set_status_flags(r.as_fd(), fl | libc::O_NONBLOCK)?;
        let signal = Arc::new(Signal::default());
        let thread_signal = Arc::clone(&signal);
        let speed = spec.speed.unwrap_or_default();
        let thread_name = name.to_owned();
        let thread = std::thread::Builder::new()
            .name(format!("sim-load-{name}"))
            .spawn(move || {
                let load = Load {
                    size: spec.size,
                    rate: speed.load_bytes_per_sec,
                    latency: speed.per_read_latency,
                    pipe_size,
                };
                let drained = load.drain(stall, &thread_signal, r, store);
                if let Err(e) = &drained {
                    // The helper sees only EPIPE on its next write; this says why.
                    log::warn!("simulated sink {thread_name}: stopped loading: {e}");
                }
                drained
            })?;
        Ok((
            w,
            PipeLoad {
                signal,
                thread: Some(thread),
                spec,
            },
        ))
    }
}

/// What a paced sink's drain did: bytes received, when the device's last byte was consumed
/// (None if the stream never reached the device's size), and what it kept of them.
struct Drained {
    received: u64,
    last_byte_ns: Option<u64>,
    store: Store,
}

/// How a paced sink drains its pipe.
struct Load {
    size: u64,
    rate: u64,
    latency: Duration,
    pipe_size: usize,
}

impl Load {
    /// Moves the pipe's bytes into `store` at the device's pace until the writer closes or the
    /// session ends; returns the bytes received and when the device's last byte went in. Bytes
    /// past the device's size are counted and dropped, so a stream that never ends costs no
    /// memory.
    fn drain(
        &self,
        stall: Option<(u64, Duration)>,
        signal: &Signal,
        r: OwnedFd,
        mut store: Store,
    ) -> io::Result<Drained> {
        let mut last_byte_ns = None;
        let received = self.drain_into(stall, signal, r, &mut store, &mut last_byte_ns)?;
        Ok(Drained {
            received,
            last_byte_ns,
            store,
        })
    }

    fn drain_into(
        &self,
        mut stall: Option<(u64, Duration)>,
        signal: &Signal,
        r: OwnedFd,
        store: &mut Store,
        last_byte_ns: &mut Option<u64>,
    ) -> io::Result<u64> {
        let chunk = self.pipe_size.clamp(4096, 1 << 20);
        let mut extra = vec![0u8; chunk.min(64 << 10)];
        let mut pacer = Pacer::new(self.rate);
        let mut received = 0u64;
        let mut in_chunk = 0usize;
        loop {
            if let Some((at, duration)) = stall {
                if received >= at {
                    stall = None;
                    if !signal.sleep_until(Instant::now() + duration) {
                        return Ok(received);
                    }
                    pacer = Pacer::new(self.rate);
                }
            }
            let mut piece = pacer.piece(chunk - in_chunk);
            if let Some((at, _)) = stall {
                piece = piece.min(usize::try_from(at - received).unwrap_or(piece).max(1));
            }
            if in_chunk == 0 && !self.latency.is_zero() {
                pacer.delay(self.latency);
            }
            if !signal.sleep_until(pacer.deadline(piece as u64)) {
                return Ok(received);
            }
            let moved = match usize::try_from(self.size.saturating_sub(received)) {
                Ok(0) => {
                    let n = piece.min(extra.len());
                    os::read(r.as_fd(), &mut extra[..n])
                }
                room => {
                    let n = piece.min(room.unwrap_or(usize::MAX));
                    store.take_from(r.as_fd(), received, n)
                }
            };
            match moved {
                Ok(0) => return Ok(received),
                Ok(n) => {
                    let before = received;
                    received += n as u64;
                    if before < self.size && received >= self.size {
                        *last_byte_ns = Some(os::monotonic_ns());
                    }
                    pacer.account(n as u64);
                    in_chunk = (in_chunk + n) % chunk;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if signal.get().finish {
                        return Ok(received);
                    }
                    // Idle: wait for data, then load at the device's rate again (no catch-up burst).
                    loop {
                        let s = signal.get();
                        if s.cancel || s.finish {
                            break;
                        }
                        if os::poll(&[(r.as_fd(), libc::POLLIN)], 50)?[0] {
                            break;
                        }
                    }
                    pacer = Pacer::new(self.rate);
                    in_chunk = 0;
                }
                Err(e) => return Err(e),
            }
        }
    }
}

impl LoadSession for PipeLoad {
    fn finish(mut self: Box<Self>) -> io::Result<Loaded> {
        self.signal.update(|s| s.finish = true);
        let drained = match self.thread.take().map(|t| t.join()) {
            Some(Ok(result)) => result?,
            Some(Err(_)) => return Err(io::Error::other("the simulated load thread panicked")),
            None => return Err(io::Error::from_raw_os_error(libc::EINVAL)),
        };
        Ok(Loaded {
            verifier: drained.store.verify(&self.spec, drained.received)?,
            consumed_ns: drained.last_byte_ns,
        })
    }
}

impl Drop for PipeLoad {
    fn drop(&mut self) {
        self.signal.update(|s| s.cancel = true);
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                log::warn!("a simulated load thread panicked");
            }
        }
    }
}

/// A FUSE-backed resuming fd whose write fails with `errno` once the stream reaches `at`.
struct FuseLoad {
    state: Arc<Mutex<FuseSinkFile>>,
    _mount: FuseMount,
}

struct FuseSinkFile {
    verifier: Verifier,
    at: u64,
    errno: i32,
    failed: bool,
}

impl FuseHandler for FuseSinkFile {
    fn read(&mut self, _buf: &mut [u8]) -> Result<usize, i32> {
        Err(libc::EBADF)
    }

    fn write(&mut self, data: &[u8]) -> Result<usize, i32> {
        let pos = self.verifier.received();
        if self.failed || pos == self.at {
            self.failed = true;
            return Err(self.errno);
        }
        let mut n = data.len();
        if pos < self.at {
            n = n.min(usize::try_from(self.at - pos).unwrap_or(usize::MAX));
        }
        self.verifier.feed(&data[..n]);
        Ok(n)
    }
}

impl FuseLoad {
    fn open(name: &str, spec: SimSpec, at: u64, errno: i32) -> io::Result<(OwnedFd, FuseLoad)> {
        let state = Arc::new(Mutex::new(FuseSinkFile {
            verifier: Verifier::new(&spec),
            at,
            errno,
            failed: false,
        }));
        let handler: Arc<Mutex<dyn FuseHandler>> = state.clone();
        let mount = FuseMount::mount(name, handler)?;
        let fd = mount.open(true)?;
        Ok((
            fd,
            FuseLoad {
                state,
                _mount: mount,
            },
        ))
    }
}

impl LoadSession for FuseLoad {
    fn finish(self: Box<Self>) -> io::Result<Loaded> {
        let verifier = self
            .state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .verifier
            .clone();
        Ok(Loaded {
            verifier,
            consumed_ns: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::StreamMismatch;

    /// A load whose RESUMING -> STOP fails with an I/O error (not a verdict on the data).
    struct BrokenLoad;

    impl LoadSession for BrokenLoad {
        fn finish(self: Box<Self>) -> io::Result<Loaded> {
            Err(io::Error::from_raw_os_error(libc::EIO))
        }
    }

    fn resuming_with_broken_load(owner: Owner) -> Result<SimSink, VfioError> {
        let mut sink = SimSink::new("broken", SimSpec::new(4096, 3))?.with_owner(owner);
        sink.set_state(MigState::Stop)?;
        drop(sink.set_state(MigState::Resuming)?);
        sink.session = Some(Box::new(BrokenLoad));
        Ok(sink)
    }

    #[test]
    fn an_io_error_at_resuming_to_stop_leaves_the_device_in_error() -> Result<(), VfioError> {
        let mut sink = resuming_with_broken_load(Owner::Helper)?;
        let err = sink
            .set_state(MigState::Stop)
            .err()
            .ok_or_else(|| VfioError::io("broken", "test", io::Error::other("STOP passed")))?;
        assert_eq!(err.errno(), Some(libc::EIO), "{err}");
        assert_eq!(err.state_after(), Some(MigState::Error), "{err}");
        assert_eq!(sink.state()?, MigState::Error);
        assert_eq!(sink.loaded_bytes(), None);
        // RESET recovers it, and the next load works.
        sink.reset()?;
        assert_eq!(sink.state()?, MigState::Running);
        sink.set_state(MigState::Stop)?;
        let fd = sink
            .set_state(MigState::Resuming)?
            .ok_or_else(|| VfioError::io("broken", "test", io::Error::other("no data_fd")))?;
        let mut data = vec![0u8; 4096];
        super::super::fill(3, 0, &mut data);
        let mut file = std::fs::File::from(fd);
        std::io::Write::write_all(&mut file, &data)
            .map_err(|e| VfioError::io("broken", "test write", e))?;
        drop(file);
        sink.set_state(MigState::Stop)?;
        assert_eq!(sink.loaded_bytes(), Some(4096));

        // A VMM-owned sink is in ERROR too: the VMM's reset, not a second STOP, is what's left.
        let mut sink = resuming_with_broken_load(Owner::Vmm)?;
        assert!(sink.set_state(MigState::Stop).is_err());
        assert_eq!(sink.state()?, MigState::Error);
        Ok(())
    }

    /// Whether a memfd image named for `name` is open in this process.
    fn has_image(name: &str) -> bool {
        let want = format!("vfio-sink-{name}");
        std::fs::read_dir("/proc/self/fd")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|entry| std::fs::read_link(entry.path()).ok())
            .any(|target| target.to_string_lossy().contains(&want))
    }

    #[test]
    fn a_paced_sink_checks_its_stream_held_in_pipes_or_else_in_its_image() -> Result<(), VfioError>
    {
        let _alone = super::super::held::BUDGET_TESTS
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let spec = SimSpec {
            speed: Some(super::super::DeviceSpeed {
                save_bytes_per_sec: 0,
                load_bytes_per_sec: 512 << 20,
                per_read_latency: Duration::ZERO,
            }),
            ..SimSpec::new((2 << 20) + 5, 8)
        };
        let mut good = vec![0u8; (2 << 20) + 5];
        super::super::fill(spec.seed, 0, &mut good);
        let mut bad = good.clone();
        bad[1_000_000] ^= 0x40;
        let quarter = os::open_file_limit().map_err(|e| VfioError::io("paced", "rlimit", e))? / 4;
        for with_image in [false, true] {
            // Every pipe of the budget held elsewhere leaves the sink its image.
            let _budget =
                with_image.then(|| HeldPipes::reserve((quarter as u64 - 2) * (512 << 10)));
            for (stream, want) in [
                (&good, Ok(())),
                (&bad, Err(StreamMismatch::Corrupt { offset: 1_000_000 })),
            ] {
                let name = format!("paced-{with_image}");
                let mut sink = SimSink::new(&name, spec)?;
                sink.set_state(MigState::Stop)?;
                let fd = sink
                    .set_state(MigState::Resuming)?
                    .ok_or_else(|| VfioError::io("paced", "test", io::Error::other("no fd")))?;
                assert_eq!(has_image(&name), with_image);
                let mut file = std::fs::File::from(fd);
                std::io::Write::write_all(&mut file, stream)
                    .map_err(|e| VfioError::io("paced", "test write", e))?;
                drop(file);
                let got = match sink.set_state(MigState::Stop) {
                    Ok(_) => Ok(()),
                    Err(VfioError::LoadRejected { source, .. }) => Err(source),
                    Err(other) => return Err(other),
                };
                assert_eq!(got, want, "image: {with_image}");
            }
        }
        Ok(())
    }
}
