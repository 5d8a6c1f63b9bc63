//! The simulated destination device: RUNNING -> STOP -> RESUMING hands out a writable data_fd;
//! RESUMING -> STOP checks every byte in order against `(seed, size)` and, like a real driver,
//! fails that transition (device -> ERROR) when data is missing, extra or corrupt.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::fault::Fault;
use super::fuse::{FuseHandler, FuseMount};
use super::{
    compare_blob, config_blob, drive, first_mismatch, size_pipe, ArcError, Pacer, Signal, SimArcs,
    SimSpec, Verifier,
};
use crate::os;
use crate::{MigState, MigrationDevice, MigrationFlags, Owner, PrecopyInfo, VfioError};

const VERIFY_CHUNK: usize = 1 << 20;

trait LoadSession: Send {
    /// RESUMING -> STOP: everything written so far, checked.
    fn finish(self: Box<Self>) -> io::Result<Verifier>;
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
}

impl std::fmt::Debug for SimSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimSink")
            .field("name", &self.name)
            .field("spec", &self.spec)
            .field("state", &self.state)
            .field("fault", &self.fault)
            .field("loaded", &self.loaded)
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
                self.open_session().map(Some).map_err(ArcError::Kernel)
            }
            (Resuming, Stop) => {
                let Some(session) = self.session.take() else {
                    return Err(ArcError::Kernel(io::Error::from_raw_os_error(libc::EINVAL)));
                };
                let verifier = session.finish().map_err(ArcError::Kernel)?;
                verifier.verdict().map_err(ArcError::Rejected)?;
                self.loaded = Some(verifier.received());
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
        let first_bad = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..threads)
                .map(|i| (i * per, ((i + 1) * per).min(checked)))
                .filter(|(a, b)| a < b)
                .map(|(a, b)| {
                    std::thread::Builder::new()
                        .name("sim-verify".into())
                        .spawn_scoped(scope, move || check_span(a, b))
                })
                .collect();
            let mut first: Option<u64> = None;
            for h in handles {
                let found = h?
                    .join()
                    .unwrap_or_else(|_| Err(io::Error::other("a verifier thread panicked")))?;
                if let Some(bad) = found {
                    first = Some(first.map_or(bad, |f| f.min(bad)));
                }
            }
            Ok::<_, io::Error>(first)
        })?;
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
struct MemLoad {
    image: Image,
    /// A dup of the handed-out fd: same open file, so its position is the bytes written.
    writer: OwnedFd,
}

impl MemLoad {
    fn open(name: &str, spec: SimSpec) -> io::Result<(OwnedFd, MemLoad)> {
        let image = Image::new(name, spec)?;
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
    fn finish(self: Box<Self>) -> io::Result<Verifier> {
        let len = os::lseek(self.writer.as_fd(), 0, libc::SEEK_CUR)?;
        self.image.verify(len)
    }
}

/// A paced load: a pipe that a thread (`sim-load-<name>`) drains into the image at the
/// device's rate, splicing, so the simulator adds no copy through a user buffer and no check
/// to the cores the data plane runs on while it loads (a real device loads on its own silicon).
/// The image is checked at RESUMING -> STOP, as an unpaced one.
struct PipeLoad {
    signal: Arc<Signal>,
    thread: Option<JoinHandle<io::Result<u64>>>,
    image: Image,
}

impl PipeLoad {
    fn open(
        name: &str,
        spec: SimSpec,
        stall: Option<(u64, Duration)>,
    ) -> io::Result<(OwnedFd, PipeLoad)> {
        let image = Image::new(name, spec)?;
        let target = image.mem.try_clone()?;
        let (r, w) = os::pipe()?;
        let pipe_size = size_pipe(w.as_fd());
        let fl = os::get_status_flags(r.as_fd())?;
        os::set_status_flags(r.as_fd(), fl | libc::O_NONBLOCK)?;
        let signal = Arc::new(Signal::default());
        let thread_signal = Arc::clone(&signal);
        let speed = spec.speed.unwrap_or_default();
        let thread = std::thread::Builder::new()
            .name(format!("sim-load-{name}"))
            .spawn(move || {
                let load = Load {
                    size: spec.size,
                    rate: speed.load_bytes_per_sec,
                    latency: speed.per_read_latency,
                    pipe_size,
                };
                load.drain(stall, &thread_signal, r, target)
            })?;
        Ok((
            w,
            PipeLoad {
                signal,
                thread: Some(thread),
                image,
            },
        ))
    }
}

/// How a paced sink drains its pipe.
struct Load {
    size: u64,
    rate: u64,
    latency: Duration,
    pipe_size: usize,
}

impl Load {
    /// Moves the pipe's bytes into `image` at the device's pace until the writer closes or the
    /// session ends; returns the bytes received. Bytes past the device's size are counted and
    /// dropped, so a stream that never ends costs no memory.
    fn drain(
        &self,
        mut stall: Option<(u64, Duration)>,
        signal: &Signal,
        r: OwnedFd,
        image: OwnedFd,
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
                    os::splice_from_pipe(r.as_fd(), image.as_fd(), received, n)
                }
            };
            match moved {
                Ok(0) => return Ok(received),
                Ok(n) => {
                    received += n as u64;
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
    fn finish(mut self: Box<Self>) -> io::Result<Verifier> {
        self.signal.update(|s| s.finish = true);
        let received = match self.thread.take().map(|t| t.join()) {
            Some(Ok(result)) => result?,
            Some(Err(_)) => return Err(io::Error::other("the simulated load thread panicked")),
            None => return Err(io::Error::from_raw_os_error(libc::EINVAL)),
        };
        self.image.verify(received)
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
    fn finish(self: Box<Self>) -> io::Result<Verifier> {
        Ok(self
            .state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .verifier
            .clone())
    }
}
