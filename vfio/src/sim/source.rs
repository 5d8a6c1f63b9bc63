//! The simulated saving device.
//!
//! Unlimited speed: the stream lives in a memfd generated in `new`, and the data_fd is a
//! read-only open of it, so a read is one kernel copy. With a precopy part `P`, the memfd holds
//! `[stream[P..size) | stream[0..P)]` and the data_fd starts at `size - P`: PRE_COPY reads the
//! precopy part and then gets 0 (drained); at PRE_COPY -> STOP_COPY the file is cut to
//! `size - P` and the shared position rewound to 0, so STOP_COPY reads the rest on the same fd.
//! (Leaving precopy undrained, or a precopy device going straight to STOP_COPY, costs one copy
//! of the stop-copy part at that transition.)
//!
//! With a speed: a 1 MiB pipe fed by a pacing thread (`sim-save-<name>`) that splices pages of
//! the same pre-generated image (kept for the next session); fault devices generate as they go.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::fault::Fault;
use super::fuse::{FuseHandler, FuseMount};
use super::{
    config_blob, drive, fill, size_pipe, ArcError, DeviceSpeed, Pacer, Signal, SimArcs, SimSpec,
};
use crate::os;
use crate::{MigState, MigrationDevice, MigrationFlags, Owner, PrecopyInfo, VfioError};

/// Bytes generated per write while building a memfd image.
const GEN_CHUNK: usize = 4 << 20;
/// The device's chunk: one QEMU-buffer-sized read.
const DEVICE_CHUNK: usize = 1 << 20;

/// One open saving session (the data_fd's other side).
trait SaveSession: Send {
    /// Stream bytes the reader has taken so far.
    fn consumed(&self) -> io::Result<u64>;
    /// PRE_COPY -> STOP_COPY: the rest of the stream becomes readable on the same fd.
    fn stop_copy(&mut self) -> io::Result<()>;
    /// At the session's end: the memfd image, if it is still as generated (reused by the next
    /// session instead of generating again).
    fn take_image(&mut self) -> Option<OwnedFd> {
        None
    }
}

/// A simulated source device (saving side).
pub struct SimSource {
    name: String,
    spec: SimSpec,
    owner: Owner,
    state: MigState,
    fault: Option<Fault>,
    /// A generated memfd image ready for the next memfd session.
    image: Option<OwnedFd>,
    session: Option<Box<dyn SaveSession>>,
}

impl std::fmt::Debug for SimSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimSource")
            .field("name", &self.name)
            .field("spec", &self.spec)
            .field("state", &self.state)
            .field("fault", &self.fault)
            .finish_non_exhaustive()
    }
}

impl SimSource {
    /// A source in RUNNING. Unless it is a fault device, the whole stream is generated now (setup
    /// time, not downtime); a paced device's feeder splices from it.
    pub fn new(name: &str, spec: SimSpec) -> Result<SimSource, VfioError> {
        Self::build(name, spec, None)
    }

    /// A source whose data_fd misbehaves as `fault` says (see [`Fault`]).
    pub fn with_fault(name: &str, spec: SimSpec, fault: Fault) -> Result<SimSource, VfioError> {
        fault.validate_source(name, &spec)?;
        Self::build(name, spec, Some(fault))
    }

    fn build(name: &str, spec: SimSpec, fault: Option<Fault>) -> Result<SimSource, VfioError> {
        spec.validate(name)?;
        let mut dev = SimSource {
            name: name.to_owned(),
            spec,
            owner: Owner::Helper,
            state: MigState::Running,
            fault,
            image: None,
            session: None,
        };
        // Paced devices get the image too: their feeder splices its pages into the pipe, so
        // the device's own cost during downtime is pacing, not generating and copying bytes.
        if dev.fault.is_none() {
            dev.image = Some(
                generate(&dev.name, &spec)
                    .map_err(|e| VfioError::io(name, "generating the memfd image", e))?,
            );
        }
        Ok(dev)
    }

    /// Marks the device as the VMM's (RESET is then refused), for tests of borrowed devices.
    pub fn with_owner(mut self, owner: Owner) -> SimSource {
        self.owner = owner;
        self
    }

    /// The spec it was built from.
    pub fn spec(&self) -> &SimSpec {
        &self.spec
    }

    /// The config blob the VMM would send after the device state ([`config_blob`]).
    pub fn config_blob(&self) -> Vec<u8> {
        config_blob(&self.spec)
    }

    fn uses_memfd(&self) -> bool {
        self.fault.is_none() && !self.spec.speed.is_some_and(|s| s.paces_save())
    }

    fn open_session(&mut self, precopy: bool) -> io::Result<OwnedFd> {
        if let Some(fault) = self.fault {
            return match fault {
                Fault::Errno { at, errno } => {
                    let (fd, s) =
                        FuseSave::open(&self.name, self.spec, at, (errno, None), precopy)?;
                    self.session = Some(Box::new(s));
                    Ok(fd)
                }
                Fault::NotReady { at, reads } => {
                    let fail = (libc::EAGAIN, Some(reads));
                    let (fd, s) = FuseSave::open(&self.name, self.spec, at, fail, precopy)?;
                    self.session = Some(Box::new(s));
                    Ok(fd)
                }
                _ => {
                    let (fd, s) =
                        PipeSave::open(&self.name, self.spec, Some(fault), precopy, None)?;
                    self.session = Some(Box::new(s));
                    Ok(fd)
                }
            };
        }
        let image = match self.image.take() {
            Some(image) => image,
            None => {
                log::debug!(
                    "{}: regenerating the memfd image for a new session",
                    self.name
                );
                generate(&self.name, &self.spec)?
            }
        };
        if !self.uses_memfd() {
            let (fd, s) = PipeSave::open(&self.name, self.spec, None, precopy, Some(image))?;
            self.session = Some(Box::new(s));
            return Ok(fd);
        }
        let (fd, mut s) = MemSave::open(image, self.spec)?;
        if !precopy {
            s.stop_copy()?;
        }
        self.session = Some(Box::new(s));
        Ok(fd)
    }

    fn end_session(&mut self) {
        if let Some(mut session) = self.session.take() {
            if self.image.is_none() {
                self.image = session.take_image();
            }
        }
    }

    fn consumed(&self) -> Result<u64, VfioError> {
        match &self.session {
            Some(s) => s.consumed().map_err(|e| {
                VfioError::io(&self.name, "reading the simulated data_fd position", e)
            }),
            None => Ok(0),
        }
    }
}

impl SimArcs for SimSource {
    fn name(&self) -> &str {
        &self.name
    }

    fn arc(&mut self, from: MigState, to: MigState) -> Result<Option<OwnedFd>, ArcError> {
        use MigState::*;
        match (from, to) {
            (Running, PreCopy) | (RunningP2p, PreCopyP2p) => {
                self.open_session(true).map(Some).map_err(ArcError::Kernel)
            }
            (Stop, StopCopy) => self.open_session(false).map(Some).map_err(ArcError::Kernel),
            (PreCopy, StopCopy) | (PreCopyP2p, StopCopy) => match self.session.as_mut() {
                Some(s) => s.stop_copy().map(|()| None).map_err(ArcError::Kernel),
                None => Err(ArcError::Kernel(io::Error::from_raw_os_error(libc::EINVAL))),
            },
            (Stop, Resuming) => Err(ArcError::Kernel(io::Error::new(
                io::ErrorKind::Unsupported,
                "a simulated source does not resume; use SimSink",
            ))),
            (f, t) => {
                if f.is_saving() && !t.is_saving() {
                    self.end_session();
                }
                Ok(None)
            }
        }
    }
}

impl MigrationDevice for SimSource {
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
        result
    }

    fn precopy_info(&self) -> Result<PrecopyInfo, VfioError> {
        if !self.state.is_precopy() || self.session.is_none() {
            return Err(VfioError::NotInPrecopy {
                device: self.name.clone(),
                action: "VFIO_MIG_GET_PRECOPY_INFO",
                state: self.state,
            });
        }
        let consumed = self.consumed()?;
        let initial = self.spec.precopy_initial;
        let total = self.spec.precopy_total();
        Ok(PrecopyInfo {
            initial_bytes: initial.saturating_sub(consumed),
            dirty_bytes: total.saturating_sub(consumed.max(initial)),
            reinit: false,
        })
    }

    fn stop_copy_size(&self) -> Result<u64, VfioError> {
        Ok(self.spec.size.saturating_sub(self.consumed()?))
    }

    fn reset(&mut self) -> Result<(), VfioError> {
        if self.owner != Owner::Helper {
            return Err(VfioError::NotOwner {
                device: self.name.clone(),
                action: "VFIO_DEVICE_RESET",
            });
        }
        self.end_session();
        self.state = MigState::Running;
        Ok(())
    }
}

/// The seals that make a written image read-only. F_SEAL_FUTURE_WRITE, not F_SEAL_WRITE:
/// F_SEAL_WRITE fails with EBUSY while any page holds an extra reference, and a page just written
/// can sit in another CPU's LRU batch for a while (seen once in CI on a busy host); nothing
/// here maps the image writable, so refusing every later write is the same guarantee.
const IMMUTABLE: libc::c_int = libc::F_SEAL_GROW | libc::F_SEAL_FUTURE_WRITE;

/// File offset -> stream offset in a memfd image: the stop-copy part first when there is a
/// precopy part (see the module doc).
fn generate(name: &str, spec: &SimSpec) -> io::Result<OwnedFd> {
    let cname = CString::new(format!("vfio-sim-{name}")).unwrap_or_default();
    let mem = os::memfd(&cname)?;
    os::ftruncate(mem.as_fd(), spec.size)?;
    let p = spec.precopy_total();
    let stop_part = spec.size - p;
    // (file offset, stream offset, length) pieces.
    write_stream(&mem, spec.seed, &[(0, p, stop_part), (stop_part, 0, p)])?;
    if p == 0 {
        os::add_seals(mem.as_fd(), IMMUTABLE)?;
    }
    Ok(mem)
}

/// Writes seeded stream bytes into `mem`: each piece is (file offset, stream offset, length).
/// Split over up to 8 threads: page allocation in the memfd, not the hash, is the cost.
fn write_stream(mem: &OwnedFd, seed: u64, pieces: &[(u64, u64, u64)]) -> io::Result<()> {
    let total: u64 = pieces.iter().map(|p| p.2).sum();
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, 8) as u64;
    let threads = if total < 64 << 20 { 1 } else { threads };
    // Cut every piece into per-thread spans aligned to GEN_CHUNK.
    let per = total
        .div_ceil(threads)
        .next_multiple_of(GEN_CHUNK as u64)
        .max(GEN_CHUNK as u64);
    let mut spans: Vec<Vec<(u64, u64, u64)>> = vec![Vec::new()];
    let mut room = per;
    for &(file_off, stream_off, len) in pieces {
        let mut done = 0;
        while done < len {
            let take = (len - done).min(room);
            if let Some(last) = spans.last_mut() {
                last.push((file_off + done, stream_off + done, take));
            }
            done += take;
            room -= take;
            if room == 0 {
                spans.push(Vec::new());
                room = per;
            }
        }
    }
    let write_span = |span: &[(u64, u64, u64)]| -> io::Result<()> {
        let mut buf = vec![0u8; GEN_CHUNK];
        for &(file_off, stream_off, len) in span {
            let mut done = 0u64;
            while done < len {
                let n = usize::try_from(len - done)
                    .unwrap_or(GEN_CHUNK)
                    .min(GEN_CHUNK);
                let chunk = &mut buf[..n];
                fill(seed, stream_off + done, chunk);
                super::write_active(mem.as_fd(), chunk, file_off + done)?;
                done += n as u64;
            }
        }
        Ok(())
    };
    std::thread::scope(|scope| {
        let handles: Vec<_> = spans
            .iter()
            .filter(|s| !s.is_empty())
            .map(|span| {
                std::thread::Builder::new()
                    .name("sim-gen".into())
                    .spawn_scoped(scope, move || write_span(span))
            })
            .collect();
        handles.into_iter().try_for_each(|h| {
            h?.join()
                .unwrap_or_else(|_| Err(io::Error::other("a generator thread panicked")))
        })
    })
}

struct MemSave {
    mem: OwnedFd,
    /// The image was rearranged for STOP_COPY (precopy layout): not reusable.
    modified: bool,
    /// Handed back by `take_image`.
    taken: bool,
    /// A dup of the handed-out fd: same open file, same position.
    reader: OwnedFd,
    /// stream offset = file position + delta.
    delta: i64,
    spec: SimSpec,
    in_stop_copy: bool,
}

impl MemSave {
    fn open(mem: OwnedFd, spec: SimSpec) -> io::Result<(OwnedFd, MemSave)> {
        let handed = match os::reopen(mem.as_fd(), false) {
            Ok(fd) => fd,
            Err(e) => {
                log::debug!("reopening the memfd read-only failed ({e}); handing out a dup");
                mem.try_clone()?
            }
        };
        let reader = handed.try_clone()?;
        let p = spec.precopy_total();
        // With a precopy part the session starts on it (the image's tail); without, at 0.
        let start = if p == 0 { 0 } else { spec.size - p };
        os::lseek(
            reader.as_fd(),
            i64::try_from(start).unwrap_or(0),
            libc::SEEK_SET,
        )?;
        let delta = -i64::try_from(start).unwrap_or(0);
        Ok((
            handed,
            MemSave {
                mem,
                modified: false,
                taken: false,
                reader,
                delta,
                spec,
                in_stop_copy: p == 0,
            },
        ))
    }

    fn position(&self) -> io::Result<u64> {
        os::lseek(self.reader.as_fd(), 0, libc::SEEK_CUR)
    }
}

impl SaveSession for MemSave {
    fn take_image(&mut self) -> Option<OwnedFd> {
        if self.modified {
            return None;
        }
        let image = self.mem.try_clone().ok()?;
        self.taken = true;
        Some(image)
    }

    fn consumed(&self) -> io::Result<u64> {
        let pos = i64::try_from(self.position()?).unwrap_or(i64::MAX);
        Ok(u64::try_from(pos.saturating_add(self.delta)).unwrap_or(0))
    }

    fn stop_copy(&mut self) -> io::Result<()> {
        if self.in_stop_copy {
            return Ok(());
        }
        self.in_stop_copy = true;
        self.modified = true;
        let p = self.spec.precopy_total();
        let size = self.spec.size;
        let stop_part = size - p;
        let consumed = self.consumed()?;
        if consumed >= p {
            // Drained: drop the precopy part, rewind the shared position to the stop-copy part.
            os::ftruncate(self.mem.as_fd(), stop_part)?;
            os::lseek(self.reader.as_fd(), 0, libc::SEEK_SET)?;
            self.delta = i64::try_from(p).unwrap_or(0);
        } else {
            // Undrained: the rest of the precopy part stays where the reader is; append the
            // stop-copy part after it (stream offset = file offset - stop_part still holds)
            // and free the front.
            log::debug!(
                "simulated source: precopy left {} bytes unread; copying the stop-copy part",
                p - consumed
            );
            write_stream(&self.mem, self.spec.seed, &[(size, p, stop_part)])?;
            if stop_part > 0 {
                os::punch_hole(self.mem.as_fd(), 0, stop_part)?;
            }
        }
        os::add_seals(self.mem.as_fd(), IMMUTABLE)
    }
}

impl Drop for MemSave {
    fn drop(&mut self) {
        if self.taken {
            return;
        }
        // A rearranged image is spent: free it (a reader now sees 0, as after a disable).
        if let Err(e) = os::ftruncate(self.mem.as_fd(), 0) {
            log::debug!("freeing a simulated source image: {e}");
        }
    }
}

/// What a paced or faulty pipe feeder does.
#[derive(Debug, Clone, Copy)]
struct FeedPlan {
    spec: SimSpec,
    speed: DeviceSpeed,
    fault: Option<Fault>,
    precopy: bool,
    pipe_size: usize,
}

struct PipeShared {
    signal: Signal,
    /// Bytes written into the pipe so far (updated under this lock with each write).
    fed: Mutex<u64>,
}

struct PipeSave {
    shared: Arc<PipeShared>,
    reader: OwnedFd,
    thread: Option<JoinHandle<()>>,
    /// The session's hold on the image the feeder splices from (it only reads it): handed
    /// back for the next session, so the feeder's close at the stream's end is a plain close
    /// and not the freeing of the whole image during the downtime it measures.
    image: Option<OwnedFd>,
}

impl PipeSave {
    fn open(
        name: &str,
        spec: SimSpec,
        fault: Option<Fault>,
        precopy: bool,
        image: Option<OwnedFd>,
    ) -> io::Result<(OwnedFd, PipeSave)> {
        let (r, w) = os::pipe()?;
        let pipe_size = size_pipe(w.as_fd());
        let fl = os::get_status_flags(w.as_fd())?;
        os::set_status_flags(w.as_fd(), fl | libc::O_NONBLOCK)?;
        let reader = r.try_clone()?;
        let probe = r.try_clone()?;
        let held_image = image.as_ref().map(OwnedFd::try_clone).transpose()?;
        let shared = Arc::new(PipeShared {
            signal: Signal::default(),
            fed: Mutex::new(0),
        });
        shared.signal.update(|s| s.stop_copy = !precopy);
        let plan = FeedPlan {
            spec,
            speed: spec.speed.unwrap_or_default(),
            fault,
            precopy,
            pipe_size,
        };
        let thread_shared = Arc::clone(&shared);
        let thread_name = format!("sim-save-{name}");
        let name = name.to_owned();
        let thread = std::thread::Builder::new()
            .name(thread_name)
            .spawn(move || {
                if let Err(e) = feed(&plan, &thread_shared, w, &probe, image.as_ref()) {
                    log::debug!("{name}: simulated save feeder stopped: {e}");
                }
            })?;
        Ok((
            r,
            PipeSave {
                shared,
                reader,
                thread: Some(thread),
                image: held_image,
            },
        ))
    }
}

/// Where stream offset `pos` sits in a [`generate`]d image (stop-copy part first).
fn image_offset(spec: &SimSpec, pos: u64) -> u64 {
    let p = spec.precopy_total();
    if pos < p {
        spec.size - p + pos
    } else {
        pos - p
    }
}

/// Feeds the pipe at the device's pace: spliced from `image` when there is one, else generated
/// here (fault devices).
fn feed(
    plan: &FeedPlan,
    shared: &PipeShared,
    w: OwnedFd,
    probe: &OwnedFd,
    image: Option<&OwnedFd>,
) -> io::Result<()> {
    let spec = plan.spec;
    let size = spec.size;
    let p = spec.precopy_total();
    let end = match plan.fault {
        Some(Fault::EndEarly { at }) => at.min(size),
        _ => size,
    };
    let short_max = match plan.fault {
        Some(Fault::ShortReads { max }) => Some(max.max(1)),
        _ => None,
    };
    let mut stall = match plan.fault {
        Some(Fault::Stall { at, duration }) => Some((at, duration)),
        _ => None,
    };
    let rate = plan.speed.save_bytes_per_sec;
    let chunk_max = DEVICE_CHUNK.min(plan.pipe_size.max(4096));
    let mut buf = vec![0u8; chunk_max];
    let mut pacer = Pacer::new(rate);
    let mut pos = 0u64;
    while pos < end {
        if plan.precopy && pos == p && !shared.signal.get().stop_copy {
            if !shared.signal.wait_for(|s| s.stop_copy) {
                return Ok(());
            }
            pacer = Pacer::new(rate);
        }
        if let Some((at, duration)) = stall {
            if pos == at {
                stall = None;
                if !shared.signal.sleep_until(Instant::now() + duration) {
                    return Ok(());
                }
                pacer = Pacer::new(rate);
            }
        }
        let mut limit = end - pos;
        if plan.precopy && pos < p && !shared.signal.get().stop_copy {
            limit = limit.min(p - pos);
        }
        if let Some((at, _)) = stall {
            if pos < at {
                limit = limit.min(at - pos);
            }
        }
        if image.is_some() && pos < p {
            // The image keeps the precopy part after the stop-copy part: a piece must not
            // cross from one into the other.
            limit = limit.min(p - pos);
        }
        let n = usize::try_from(limit).unwrap_or(chunk_max).min(chunk_max);
        if !plan.speed.per_read_latency.is_zero() {
            pacer.delay(plan.speed.per_read_latency);
        }
        if image.is_none() {
            fill(spec.seed, pos, &mut buf[..n]);
        }
        let mut off = 0usize;
        while off < n {
            let mut piece = pacer.piece(n - off);
            if let Some(max) = short_max {
                piece = piece.min(max);
                // Publish the next piece only once the reader took the last one.
                while os::fionread(probe.as_fd()).unwrap_or(0) > 0 {
                    if !shared
                        .signal
                        .sleep_until(Instant::now() + Duration::from_micros(200))
                    {
                        return Ok(());
                    }
                }
            }
            if !shared.signal.sleep_until(pacer.deadline(piece as u64)) {
                return Ok(());
            }
            let wrote = {
                let mut fed = shared.fed.lock().unwrap_or_else(|p| p.into_inner());
                let written = match image {
                    Some(image) => os::splice_into_pipe(
                        image.as_fd(),
                        image_offset(&spec, pos + off as u64),
                        w.as_fd(),
                        piece,
                    ),
                    None => os::write(w.as_fd(), &buf[off..off + piece]),
                };
                match written {
                    Ok(k) => {
                        *fed += k as u64;
                        k
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => 0,
                    Err(e) => return Err(e),
                }
            };
            if wrote == 0 {
                // Pipe full (the device's buffer): wait for the reader, then produce at the
                // device's rate again (no burst to catch up).
                loop {
                    if shared.signal.get().cancel {
                        return Ok(());
                    }
                    if os::poll(&[(w.as_fd(), libc::POLLOUT)], 50)?[0] {
                        break;
                    }
                }
                pacer = Pacer::new(rate);
                continue;
            }
            pacer.account(wrote as u64);
            off += wrote;
        }
        pos += n as u64;
    }
    // Dropping `w` ends the stream: the reader sees EOF once the pipe is empty.
    Ok(())
}

impl SaveSession for PipeSave {
    fn take_image(&mut self) -> Option<OwnedFd> {
        self.image.take()
    }

    fn consumed(&self) -> io::Result<u64> {
        let fed = self.shared.fed.lock().unwrap_or_else(|p| p.into_inner());
        let buffered = os::fionread(self.reader.as_fd())? as u64;
        Ok(fed.saturating_sub(buffered))
    }

    fn stop_copy(&mut self) -> io::Result<()> {
        self.shared.signal.update(|s| s.stop_copy = true);
        Ok(())
    }
}

impl Drop for PipeSave {
    fn drop(&mut self) {
        self.shared.signal.update(|s| s.cancel = true);
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                log::warn!("a simulated save feeder panicked");
            }
        }
    }
}

/// A FUSE-backed saving fd whose read fails with `errno` once the stream reaches `at`: for
/// good, or for `times` reads.
struct FuseSave {
    state: Arc<Mutex<FuseSourceFile>>,
    _mount: FuseMount,
}

struct FuseSourceFile {
    spec: SimSpec,
    pos: u64,
    at: u64,
    errno: i32,
    /// Reads still to fail at `at` (None: every read from there on).
    times: Option<u32>,
    stop_copy: bool,
    failed: bool,
}

impl FuseHandler for FuseSourceFile {
    fn read(&mut self, buf: &mut [u8]) -> Result<usize, i32> {
        if self.failed || self.pos == self.at && self.at < self.spec.size {
            match &mut self.times {
                None => {
                    self.failed = true;
                    return Err(self.errno);
                }
                Some(0) => {}
                Some(left) => {
                    *left -= 1;
                    return Err(self.errno);
                }
            }
        }
        let mut end = self.spec.size;
        if !self.stop_copy {
            let p = self.spec.precopy_total();
            if self.pos >= p {
                return Err(libc::ENOMSG);
            }
            end = end.min(p);
        }
        if self.pos < self.at {
            end = end.min(self.at);
        }
        let n = usize::try_from(end.saturating_sub(self.pos))
            .unwrap_or(usize::MAX)
            .min(buf.len());
        fill(self.spec.seed, self.pos, &mut buf[..n]);
        self.pos += n as u64;
        Ok(n)
    }

    fn write(&mut self, _data: &[u8]) -> Result<usize, i32> {
        Err(libc::EBADF)
    }
}

impl FuseSave {
    fn open(
        name: &str,
        spec: SimSpec,
        at: u64,
        (errno, times): (i32, Option<u32>),
        precopy: bool,
    ) -> io::Result<(OwnedFd, FuseSave)> {
        let state = Arc::new(Mutex::new(FuseSourceFile {
            spec,
            pos: 0,
            at,
            errno,
            times,
            stop_copy: !precopy,
            failed: false,
        }));
        let handler: Arc<Mutex<dyn FuseHandler>> = state.clone();
        let mount = FuseMount::mount(name, handler)?;
        let fd = mount.open(false)?;
        Ok((
            fd,
            FuseSave {
                state,
                _mount: mount,
            },
        ))
    }
}

impl SaveSession for FuseSave {
    fn consumed(&self) -> io::Result<u64> {
        Ok(self.state.lock().unwrap_or_else(|p| p.into_inner()).pos)
    }

    fn stop_copy(&mut self) -> io::Result<()> {
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .stop_copy = true;
        Ok(())
    }
}
