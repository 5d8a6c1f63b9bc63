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

/// Unlimited speed: writes land in a memfd, checked at RESUMING -> STOP.
///
/// The memfd's pages are written once when the device starts RESUMING, as a real device's
/// memory exists before it loads: otherwise every page of the image is allocated and zeroed
/// inside the downtime, a cost no VFIO device puts on the helper's write (on this VM that
/// was most of the destination's CPU time with 8 MiB packets).
struct MemLoad {
    mem: OwnedFd,
    /// A dup of the handed-out fd: same open file, so its position is the bytes written.
    writer: OwnedFd,
    spec: SimSpec,
}

impl MemLoad {
    fn open(name: &str, spec: SimSpec) -> io::Result<(OwnedFd, MemLoad)> {
        let cname = CString::new(format!("vfio-sink-{name}")).unwrap_or_default();
        let mem = os::memfd(&cname)?;
        let handed = match os::reopen(mem.as_fd(), true) {
            Ok(fd) => fd,
            Err(e) => {
                log::debug!("reopening the sink memfd write-only failed ({e}); handing out a dup");
                mem.try_clone()?
            }
        };
        let mut zeros = vec![0u8; 1 << 20];
        let mut at = 0u64;
        while at < spec.size {
            let n = usize::try_from(spec.size - at)
                .unwrap_or(zeros.len())
                .min(zeros.len());
            super::write_active(mem.as_fd(), &mut zeros[..n], at)?;
            at += n as u64;
        }
        let writer = handed.try_clone()?;
        Ok((handed, MemLoad { mem, writer, spec }))
    }
}

impl LoadSession for MemLoad {
    fn finish(self: Box<Self>) -> io::Result<Verifier> {
        let len = os::lseek(self.writer.as_fd(), 0, libc::SEEK_CUR)?;
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

impl Drop for MemLoad {
    fn drop(&mut self) {
        if let Err(e) = os::ftruncate(self.mem.as_fd(), 0) {
            log::debug!("freeing a simulated sink image: {e}");
        }
    }
}

/// A paced load: a pipe drained by a verifying thread (`sim-load-<name>`).
struct PipeLoad {
    signal: Arc<Signal>,
    thread: Option<JoinHandle<io::Result<Verifier>>>,
}

impl PipeLoad {
    fn open(
        name: &str,
        spec: SimSpec,
        stall: Option<(u64, Duration)>,
    ) -> io::Result<(OwnedFd, PipeLoad)> {
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
                drain(
                    spec,
                    speed.load_bytes_per_sec,
                    speed.per_read_latency,
                    stall,
                    pipe_size,
                    &thread_signal,
                    r,
                )
            })?;
        Ok((
            w,
            PipeLoad {
                signal,
                thread: Some(thread),
            },
        ))
    }
}

fn drain(
    spec: SimSpec,
    rate: u64,
    latency: Duration,
    mut stall: Option<(u64, Duration)>,
    pipe_size: usize,
    signal: &Signal,
    r: OwnedFd,
) -> io::Result<Verifier> {
    let mut verifier = Verifier::new(&spec);
    let chunk = pipe_size.clamp(4096, 1 << 20);
    let mut buf = vec![0u8; chunk];
    let mut pacer = Pacer::new(rate);
    let mut in_chunk = 0usize;
    loop {
        if let Some((at, duration)) = stall {
            if verifier.received() >= at {
                stall = None;
                if !signal.sleep_until(Instant::now() + duration) {
                    return Ok(verifier);
                }
                pacer = Pacer::new(rate);
            }
        }
        let mut piece = pacer.piece(chunk - in_chunk);
        if let Some((at, _)) = stall {
            piece = piece.min(
                usize::try_from(at - verifier.received())
                    .unwrap_or(piece)
                    .max(1),
            );
        }
        if in_chunk == 0 && !latency.is_zero() {
            pacer.delay(latency);
        }
        if !signal.sleep_until(pacer.deadline(piece as u64)) {
            return Ok(verifier);
        }
        match os::read(r.as_fd(), &mut buf[..piece]) {
            Ok(0) => return Ok(verifier),
            Ok(n) => {
                verifier.feed(&buf[..n]);
                pacer.account(n as u64);
                in_chunk = (in_chunk + n) % chunk;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if signal.get().finish {
                    return Ok(verifier);
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
                pacer = Pacer::new(rate);
                in_chunk = 0;
            }
            Err(e) => return Err(e),
        }
    }
}

impl LoadSession for PipeLoad {
    fn finish(mut self: Box<Self>) -> io::Result<Verifier> {
        self.signal.update(|s| s.finish = true);
        match self.thread.take().map(|t| t.join()) {
            Some(Ok(result)) => result,
            Some(Err(_)) => Err(io::Error::other("the simulated load thread panicked")),
            None => Err(io::Error::from_raw_os_error(libc::EINVAL)),
        }
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
