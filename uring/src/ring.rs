//! One io_uring with its buffer pool and op table. Created on, and used from, one thread (the
//! ring is set up SINGLE_ISSUER + DEFER_TASKRUN where the kernel allows).

use std::collections::VecDeque;
use std::io;
use std::mem::ManuallyDrop;
use std::ops::Range;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use io_uring::{cqueue, opcode, squeue, types, IoUring};

use crate::ops::{
    split_user_data, user_data, with_part, Completion, Op, OpKind, OpTable, CANCEL_USER_DATA,
    PART_CHAIN_SEND, PART_MAIN, WAKE_USER_DATA,
};
use crate::pool::{BufId, Buffer, BufferPool, LentSlot};
use crate::probe::{linked_chains_work, Feature, FeatureMask};
use crate::waker::Waker;

/// `IORING_SEND_ZC_REPORT_USAGE` (Linux 6.2): the notification says whether the kernel copied.
const SEND_ZC_REPORT_USAGE: u16 = 8;
/// `IORING_NOTIF_USAGE_ZC_COPIED` in a notification's result.
const NOTIF_USAGE_ZC_COPIED: i32 = i32::MIN;
/// How long dropping a ring waits for cancelled ops before it leaks their buffers instead.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// How to build a ring.
#[derive(Debug, Clone)]
pub struct RingConfig {
    /// Submission queue entries.
    pub entries: u32,
    /// Features not to use.
    pub forbid: FeatureMask,
}

/// Errors setting a ring up.
#[derive(Debug, thiserror::Error)]
pub enum RingError {
    /// io_uring is forbidden by the feature mask.
    #[error("io_uring is forbidden by the feature mask")]
    Forbidden,
    /// io_uring_setup failed (ENOSYS: no io_uring; EPERM: disabled by sysctl or seccomp).
    #[error("io_uring_setup failed")]
    Setup(#[source] io::Error),
    /// The waker's eventfd could not be created.
    #[error("creating the ring's eventfd")]
    Waker(#[source] io::Error),
}

/// A file held by one ring ([`Ring::adopt_fd`], [`Ring::dup_fd`]), named by its operations
/// instead of a raw fd: the ring keeps the fd open until it has closed itself, so the number an
/// SQE carries names that file whenever the kernel resolves it (at the next submit).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileId {
    index: u32,
    ring: u64,
}

/// Raises this process's soft RLIMIT_NOFILE to its hard limit and returns the new limit, as
/// Go's runtime does at start: the soft limit's usual 1024 exists for `select()`, which nothing
/// here uses, and a destination holds a duplicate of every device's data_fd per worker
/// (256 devices x 16 workers is 4096).
pub fn raise_open_file_limit() -> io::Result<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one `rlimit` into `limit`, which outlives the call.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    if limit.rlim_cur < limit.rlim_max {
        limit.rlim_cur = limit.rlim_max;
        // SAFETY: setrlimit reads one `rlimit` from `limit`, which outlives the call.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(limit.rlim_cur)
}

/// Which ring a [`FileId`] belongs to: unique for the life of the process.
fn fresh_ring_id() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// A ring, its buffer pool, its files and its in-flight operations.
///
/// Teardown (`Drop`): in-flight ops are cancelled and drained first; then the io_uring is
/// closed, and only then are the pool (whose slots it registered) and the files freed. If the
/// drain times out, the op table, pool and files are leaked instead.
pub struct Ring {
    ring: ManuallyDrop<IoUring>,
    id: u64,
    ops: OpTable,
    /// Owned, and reachable only through the forwarding methods below (never `&mut`), so it
    /// cannot be swapped for another pool while ops use its slots.
    pool: ManuallyDrop<BufferPool>,
    /// The fds ops name by [`FileId`]; closed only after the io_uring (see `Drop`).
    files: ManuallyDrop<Vec<OwnedFd>>,
    ready: VecDeque<Completion>,
    waker: Waker,
    /// Leaked on purpose: a cancelled eventfd read may still land after the ring closes.
    wake_buf: &'static mut [u8; 8],
    wake_armed: bool,
    fixed_buffers: bool,
    linked_chains: bool,
    send_zc: bool,
    setup: &'static str,
    notes: Vec<String>,
    /// A [`Ring::cancel_all`] ran out of time: `Drop` only reaps what has finished since
    /// instead of waiting its own [`DRAIN_TIMEOUT`] again for ops already given up on.
    drain_gave_up: bool,
}

impl std::fmt::Debug for Ring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ring")
            .field("setup", &self.setup)
            .field("fixed_buffers", &self.fixed_buffers)
            .field("linked_chains", &self.linked_chains)
            .field("send_zc", &self.send_zc)
            .field("in_flight", &self.ops.live())
            .finish()
    }
}

/// The path one ring took, in [`crate::DataPath`]'s terms: what a helper reports so that its
/// taken path can be checked against probe's prediction instead of being assumed equal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RingPath {
    /// As [`Ring::setup`].
    pub setup: &'static str,
    /// As [`Ring::fixed_buffers`].
    pub fixed_buffers: bool,
    /// As [`Ring::linked_chains`].
    pub linked_chains: bool,
    /// As [`Ring::send_zc`].
    pub send_zc: bool,
}

fn build_ring(entries: u32, forbid: FeatureMask) -> Result<(IoUring, &'static str), io::Error> {
    let cq = entries.saturating_mul(4);
    if !forbid.contains(Feature::DeferTaskrun) {
        let ring = IoUring::builder()
            .setup_single_issuer()
            .setup_defer_taskrun()
            .setup_cqsize(cq)
            .build(entries);
        if let Ok(ring) = ring {
            return Ok((ring, "single-issuer+defer-taskrun"));
        }
    }
    if !forbid.contains(Feature::CoopTaskrun) {
        let ring = IoUring::builder()
            .setup_coop_taskrun()
            .setup_taskrun_flag()
            .setup_cqsize(cq)
            .build(entries);
        if let Ok(ring) = ring {
            return Ok((ring, "coop-taskrun"));
        }
    }
    if !forbid.contains(Feature::Sqpoll) && crate::probe::sqpoll_opt_in() {
        if let Ok(ring) = IoUring::builder()
            .setup_sqpoll(1000)
            .setup_cqsize(cq)
            .build(entries)
        {
            return Ok((ring, "sqpoll"));
        }
    }
    let ring = IoUring::builder().setup_cqsize(cq).build(entries)?;
    Ok((ring, "plain"))
}

/// A read at the file's current position (offset -1: a data_fd is a stream), from a registered
/// buffer when `fixed` names one.
fn read_entry(fd: types::Fd, ptr: *mut u8, len: u32, fixed: Option<u16>) -> squeue::Entry {
    match fixed {
        Some(index) => opcode::ReadFixed::new(fd, ptr, len, index)
            .offset(u64::MAX)
            .build(),
        None => opcode::Read::new(fd, ptr, len).offset(u64::MAX).build(),
    }
}

impl Ring {
    /// Sets up a ring: setup flags by probing (SINGLE_ISSUER + DEFER_TASKRUN, else
    /// COOP_TASKRUN, else plain), `pool` registered where memlock allows, opcodes probed.
    pub fn new(config: &RingConfig, mut pool: BufferPool) -> Result<Self, RingError> {
        if config.forbid.contains(Feature::IoUring) {
            return Err(RingError::Forbidden);
        }
        let (ring, setup) = build_ring(config.entries, config.forbid).map_err(RingError::Setup)?;
        let mut probe = io_uring::Probe::new();
        let probed = ring.submitter().register_probe(&mut probe).is_ok();
        let supported = |code: u8| probed && probe.is_supported(code);
        let mut notes = Vec::new();

        let mut fixed_buffers = false;
        if !config.forbid.contains(Feature::FixedBuffers) && supported(opcode::ReadFixed::CODE) {
            let iovecs = pool.iovecs();
            // SAFETY: every iovec points into `pool`, which the ring owns from here on and never
            // hands out by `&mut` or by value; `Drop` frees it only after the io_uring is closed
            // (its ops drained first), or leaks it. The kernel pins the pages besides.
            match unsafe { ring.submitter().register_buffers(&iovecs) } {
                Ok(()) => fixed_buffers = true,
                Err(err) => {
                    // The same reason probe gives: EINVAL (too many buffers) is no memlock
                    // problem, nor is ENOMEM with CAP_IPC_LOCK held.
                    let why = crate::probe::pin_reason(
                        err.raw_os_error(),
                        crate::probe::memlock_limit(),
                        crate::probe::has_cap_ipc_lock(),
                    )
                    .map(|why| format!("; {why}"))
                    .unwrap_or_default();
                    notes.push(format!(
                        "registered buffers unavailable ({} x {} bytes: {err}{why}): using plain \
                         buffers",
                        pool.slots(),
                        pool.slot_size()
                    ))
                }
            }
        }
        pool.set_registered(fixed_buffers);
        let waker = Waker::new().map_err(RingError::Waker)?;
        let mut linked_chains = !config.forbid.contains(Feature::LinkedChains);
        if linked_chains {
            if let Err(why) = linked_chains_work() {
                linked_chains = false;
                notes.push(format!(
                    "linked chains unavailable ({why}): read, then send"
                ));
            }
        }
        let mut ring = Self {
            ring: ManuallyDrop::new(ring),
            id: fresh_ring_id(),
            ops: OpTable::default(),
            pool: ManuallyDrop::new(pool),
            files: ManuallyDrop::new(Vec::new()),
            ready: VecDeque::new(),
            waker,
            wake_buf: Box::leak(Box::new([0; 8])),
            wake_armed: false,
            fixed_buffers,
            linked_chains,
            send_zc: !config.forbid.contains(Feature::SendZc) && supported(opcode::SendZc::CODE),
            setup,
            notes,
            drain_gave_up: false,
        };
        for note in &ring.notes {
            log::warn!("{note}");
        }
        ring.arm_waker();
        Ok(ring)
    }

    /// The setup flags chosen.
    pub fn setup(&self) -> &'static str {
        self.setup
    }

    /// What this ring was set up with (the path its ops take).
    pub fn path(&self) -> RingPath {
        RingPath {
            setup: self.setup,
            fixed_buffers: self.fixed_buffers,
            linked_chains: self.linked_chains,
            send_zc: self.send_zc,
        }
    }

    /// Fallbacks this ring took, one line each.
    pub fn notes(&self) -> &[String] {
        &self.notes
    }

    /// Whether slots are registered (reads and writes use the fixed-buffer opcodes).
    pub fn fixed_buffers(&self) -> bool {
        self.fixed_buffers
    }

    /// Whether read->send chains may be linked (IOSQE_IO_LINK).
    pub fn linked_chains(&self) -> bool {
        self.linked_chains
    }

    /// Whether SEND_ZC may be tried.
    pub fn send_zc(&self) -> bool {
        self.send_zc
    }

    /// A handle other threads use to wake this ring's waiter.
    pub fn waker(&self) -> Waker {
        self.waker.clone()
    }

    /// The buffer pool, to read its counts.
    pub fn buffers(&self) -> &BufferPool {
        &self.pool
    }

    /// Takes a free slot of the ring's pool.
    pub fn take(&mut self) -> Option<BufId> {
        self.pool.take()
    }

    /// Gives a slot back to the ring's pool.
    ///
    /// # Panics
    /// If the token is another pool's.
    pub fn put(&mut self, id: BufId) {
        self.pool.put(id)
    }

    /// Free slots of the ring's pool.
    pub fn free_slots(&self) -> usize {
        self.pool.free_slots()
    }

    /// The bytes of a slot of the ring's pool the caller holds.
    ///
    /// # Panics
    /// If the token is another pool's.
    pub fn slot_mut(&mut self, id: &BufId) -> &mut [u8] {
        self.pool.slot_mut(id)
    }

    /// Lends a slot of the ring's pool to another ring ([`BufferPool::lend`]).
    ///
    /// # Panics
    /// If the token is another pool's.
    pub fn lend(&mut self, id: BufId) -> LentSlot {
        self.pool.lend(id)
    }

    /// A slot this ring's pool lent comes back ([`BufferPool::take_back`]).
    ///
    /// # Panics
    /// If another pool lent it.
    pub fn take_back(&mut self, slot: LentSlot) {
        self.pool.take_back(slot)
    }

    /// Hands `fd` to the ring, which keeps it open until the ring has closed (after its last
    /// op); operations name it by the returned id. No syscall.
    pub fn adopt_fd(&mut self, fd: OwnedFd) -> FileId {
        // A process has far fewer than 2^32 fds.
        let index = self.files.len() as u32;
        self.files.push(fd);
        FileId {
            index,
            ring: self.id,
        }
    }

    /// [`Self::adopt_fd`] of a duplicate of `fd` (one `fcntl(F_DUPFD_CLOEXEC)`): for an fd
    /// the caller keeps, and may close, while the ring uses it. (A destination ring holds one
    /// of every device's data_fd: see [`raise_open_file_limit`].)
    pub fn dup_fd(&mut self, fd: BorrowedFd<'_>) -> io::Result<FileId> {
        Ok(self.adopt_fd(fd.try_clone_to_owned()?))
    }

    /// The fd a file id names: held by this ring until it has closed.
    ///
    /// # Panics
    /// If the id is another ring's: a bug in the caller (it would name some other file here).
    fn fd(&self, file: FileId) -> types::Fd {
        assert!(
            file.ring == self.id,
            "file id of another ring used on this one"
        );
        types::Fd(self.files[file.index as usize].as_raw_fd())
    }

    /// Operations submitted and not yet completed.
    pub fn in_flight(&self) -> usize {
        self.ops.live()
    }

    /// Aborts the TCP connection of socket `file` (`connect` to `AF_UNSPEC`: the kernel's
    /// `tcp_disconnect`): the data still queued on it is dropped and the peer gets a reset.
    /// For a run that failed, before [`Self::cancel_all`]: a SEND_ZC's notification posts only
    /// once the socket frees the data it queued, which never happens while a stopped peer
    /// advertises a zero window, and neither `shutdown` nor `SO_LINGER` 0 frees it (a
    /// cancelled SEND_ZC on such a socket was still outstanding after 3 s; after this, 8 ms).
    /// The fd stays open, held by the ring as before. Fails on what is not an inet socket
    /// (`EINVAL` on a Unix stream, which has no SEND_ZC to free; `ENOTSOCK` on a file).
    pub fn abort_socket(&self, file: FileId) -> io::Result<()> {
        let fd = self.fd(file).0;
        let addr = libc::sockaddr {
            sa_family: libc::AF_UNSPEC as libc::sa_family_t,
            sa_data: [0; 14],
        };
        // SAFETY: `addr` is a live `sockaddr` and the length passed is its size; the kernel
        // only reads it during the call. `fd` is one of `files`, open while the ring is.
        let done = unsafe {
            libc::connect(
                fd,
                &addr,
                std::mem::size_of::<libc::sockaddr>() as libc::socklen_t,
            )
        };
        if done == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    /// Takes `buf` mutably: the kernel may write through the pointer (a receive into a heap
    /// box must not come from a shared borrow).
    fn buf_range(&mut self, buf: &mut Buffer, range: &Range<usize>) -> *mut u8 {
        let (base, len) = match buf {
            Buffer::Pool(id) => (self.pool.token_ptr(id), self.pool.slot_size()),
            Buffer::Heap(heap) => (heap.as_mut_ptr(), heap.len()),
            Buffer::Lent(slot) => (slot.ptr(), slot.size()),
        };
        assert!(
            range.start <= range.end && range.end <= len,
            "op range outside its buffer"
        );
        // SAFETY: range.start <= len, so the pointer stays inside (or one past) the buffer.
        unsafe { base.add(range.start) }
    }

    fn push(&mut self, entries: &[squeue::Entry]) -> io::Result<()> {
        // However often the SQ is emptied, an op with more entries than it holds never fits.
        let capacity = self.ring.params().sq_entries() as usize;
        if entries.len() > capacity {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "an op of {} entries cannot fit a submission queue of {capacity}",
                    entries.len()
                ),
            ));
        }
        loop {
            // SAFETY: every entry's buffer is owned by the op table entry inserted before this
            // push (a slot of the ring's own pool, which cannot be swapped out or freed before
            // the io_uring closes; a heap box; or a lent slot, which keeps its arena mapped) and
            // comes back only with the op's last completion. Its fd is one of `files` (or the
            // waker's eventfd, or none), which the ring keeps open until after the io_uring has
            // closed, so whenever the kernel resolves the number (at this or a later submit) it
            // names the file the op was built for.
            let pushed = unsafe { self.ring.submission().push_multiple(entries) };
            match pushed {
                Ok(()) => return Ok(()),
                Err(_) => {
                    self.ring.submit()?;
                }
            }
        }
    }

    fn insert(&mut self, kind: OpKind, tag: u64, buf: Option<Buffer>, pending: u8) -> (u32, u32) {
        self.ops.insert(Op {
            kind,
            tag,
            buf,
            pending,
            send_result: None,
            zc_copied: false,
        })
    }

    /// Undoes [`Self::insert`] for an op whose SQEs never reached the SQ (a push fails whole):
    /// no completion will bring its buffer back, so its pool slot goes back to the pool here (a
    /// heap box is freed).
    fn forget_unpushed(&mut self, index: u32) {
        if let Some(Op {
            buf: Some(Buffer::Pool(id)),
            ..
        }) = self.ops.remove(index)
        {
            self.pool.put(id);
        }
    }

    fn submit_single(
        &mut self,
        kind: OpKind,
        tag: u64,
        mut buf: Buffer,
        build: impl FnOnce(*mut u8, Option<u16>) -> squeue::Entry,
        range: Range<usize>,
    ) -> io::Result<()> {
        let ptr = self.buf_range(&mut buf, &range);
        let fixed = match &buf {
            Buffer::Pool(id) if self.fixed_buffers => Some(id.index()),
            _ => None,
        };
        let entry = build(ptr, fixed);
        let (index, generation) = self.insert(kind, tag, Some(buf), 1);
        let entry = entry.user_data(user_data(index, generation, PART_MAIN));
        if let Err(err) = self.push(&[entry]) {
            self.forget_unpushed(index);
            return Err(err);
        }
        Ok(())
    }

    /// Reads `range` of `buf` from `file` at its current position (offset -1: a data_fd is a
    /// stream).
    pub fn read(
        &mut self,
        tag: u64,
        file: FileId,
        buf: Buffer,
        range: Range<usize>,
    ) -> io::Result<()> {
        let fd = self.fd(file);
        let len = range.len() as u32;
        self.submit_single(
            OpKind::Read,
            tag,
            buf,
            |ptr, fixed| read_entry(fd, ptr, len, fixed),
            range,
        )
    }

    /// Writes `range` of `buf` to `file` at its current position.
    pub fn write(
        &mut self,
        tag: u64,
        file: FileId,
        buf: Buffer,
        range: Range<usize>,
    ) -> io::Result<()> {
        let fd = self.fd(file);
        let len = range.len() as u32;
        self.submit_single(
            OpKind::Write,
            tag,
            buf,
            |ptr, fixed| match fixed {
                Some(index) => opcode::WriteFixed::new(fd, ptr, len, index)
                    .offset(u64::MAX)
                    .build(),
                None => opcode::Write::new(fd, ptr, len).offset(u64::MAX).build(),
            },
            range,
        )
    }

    /// Writes `range` of `buf` to `file` now, in this thread, and queues the completion as if the
    /// ring had made the write: for files whose buffered writes io_uring can only hand to an
    /// io-wq worker (shmem has no FMODE_BUF_WASYNC), where the handoff costs more than the copy.
    pub fn write_now(&mut self, tag: u64, file: FileId, buf: Buffer, range: Range<usize>) {
        let fd = self.fd(file).0;
        let bytes = match &buf {
            Buffer::Pool(id) => &self.pool.slot_mut(id)[range],
            Buffer::Heap(heap) => &heap[range],
            Buffer::Lent(slot) => &slot.bytes()[range],
        };
        let result = loop {
            // SAFETY: `bytes` is a live slice of a buffer this ring owns for the call; the
            // kernel only reads `bytes.len()` bytes from it. `fd` is one of `files`, open.
            let n = unsafe { libc::write(fd, bytes.as_ptr().cast(), bytes.len()) };
            if n >= 0 {
                break Ok(n as usize);
            }
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::Interrupted {
                break Err(err);
            }
        };
        self.ready.push_back(Completion {
            tag,
            kind: OpKind::Write,
            result,
            buf: Some(buf),
            zc_copied: false,
        });
    }

    /// Receives exactly `range.len()` bytes (MSG_WAITALL) unless the peer ends or fails first.
    pub fn recv(
        &mut self,
        tag: u64,
        sock: FileId,
        buf: Buffer,
        range: Range<usize>,
    ) -> io::Result<()> {
        self.recv_with(tag, sock, buf, range, libc::MSG_WAITALL)
    }

    /// Receives what the socket has, at least one byte, at most `range.len()`.
    pub fn recv_some(
        &mut self,
        tag: u64,
        sock: FileId,
        buf: Buffer,
        range: Range<usize>,
    ) -> io::Result<()> {
        self.recv_with(tag, sock, buf, range, 0)
    }

    fn recv_with(
        &mut self,
        tag: u64,
        sock: FileId,
        buf: Buffer,
        range: Range<usize>,
        flags: i32,
    ) -> io::Result<()> {
        let fd = self.fd(sock);
        let len = range.len() as u32;
        self.submit_single(
            OpKind::Recv,
            tag,
            buf,
            |ptr, _| opcode::Recv::new(fd, ptr, len).flags(flags).build(),
            range,
        )
    }

    /// Sends `range` of `buf` whole (MSG_WAITALL, MSG_NOSIGNAL); with `zc`, as SEND_ZC, and the
    /// buffer comes back only after the zero-copy notification.
    pub fn send(
        &mut self,
        tag: u64,
        sock: FileId,
        mut buf: Buffer,
        range: Range<usize>,
        zc: bool,
    ) -> io::Result<()> {
        let zc = zc && self.send_zc;
        let ptr = self.buf_range(&mut buf, &range);
        let entry = self.send_entry(self.fd(sock), ptr, range.len() as u32, &buf, zc);
        let (index, generation) = self.insert(OpKind::Send, tag, Some(buf), 1);
        let entry = entry.user_data(user_data(index, generation, PART_CHAIN_SEND));
        if let Err(err) = self.push(&[entry]) {
            self.forget_unpushed(index);
            return Err(err);
        }
        Ok(())
    }

    fn send_entry(
        &self,
        fd: types::Fd,
        ptr: *mut u8,
        len: u32,
        buf: &Buffer,
        zc: bool,
    ) -> squeue::Entry {
        let flags = libc::MSG_WAITALL | libc::MSG_NOSIGNAL;
        if zc {
            let fixed = match buf {
                Buffer::Pool(id) if self.fixed_buffers => Some(id.index()),
                _ => None,
            };
            opcode::SendZc::new(fd, ptr, len)
                .buf_index(fixed)
                .flags(flags)
                .zc_flags(SEND_ZC_REPORT_USAGE)
                .build()
        } else {
            opcode::Send::new(fd, ptr, len).flags(flags).build()
        }
    }

    /// Submits a read of `read` (a range of the pool slot) from `src` at its position, linked to
    /// the send of `send` (a range of the same slot, which includes the read range) on `sock`.
    /// Both SQEs go in together or not at all. A short read cancels the send (`ChainSend` comes
    /// back with ECANCELED and the buffer); a full read sends the slot as prepared.
    #[allow(clippy::too_many_arguments)]
    pub fn read_then_send(
        &mut self,
        tag: u64,
        src: FileId,
        sock: FileId,
        buf: BufId,
        read: Range<usize>,
        send: Range<usize>,
        zc: bool,
    ) -> io::Result<()> {
        assert!(
            self.linked_chains,
            "linked chains are forbidden on this ring"
        );
        let zc = zc && self.send_zc;
        let mut buf = Buffer::Pool(buf);
        let read_ptr = self.buf_range(&mut buf, &read);
        let send_ptr = self.buf_range(&mut buf, &send);
        let (index, generation) = self.insert(OpKind::ChainRead, tag, None, 2);
        let fd = self.fd(src);
        let sock = self.fd(sock);
        let read_len = read.len() as u32;
        let fixed = match &buf {
            Buffer::Pool(id) if self.fixed_buffers => Some(id.index()),
            _ => None,
        };
        let read_entry = read_entry(fd, read_ptr, read_len, fixed)
            .flags(squeue::Flags::IO_LINK)
            .user_data(user_data(index, generation, PART_MAIN));
        let send_entry = self
            .send_entry(sock, send_ptr, send.len() as u32, &buf, zc)
            .user_data(user_data(index, generation, PART_CHAIN_SEND));
        if let Some(op) = self.ops.get_mut(index, generation) {
            op.buf = Some(buf);
        }
        if let Err(err) = self.push(&[read_entry, send_entry]) {
            self.forget_unpushed(index);
            return Err(err);
        }
        Ok(())
    }

    /// Submits what is queued and waits until at least `want` completions are ready or
    /// `timeout` passes; interrupted and timed-out waits return normally.
    pub fn wait(&mut self, want: usize, timeout: Option<Duration>) -> io::Result<()> {
        // A waker whose re-arm found the SQ full is armed now, before the ring sleeps.
        self.arm_waker();
        let result = if self.ready.len() >= want.max(1) {
            self.ring.submit()
        } else {
            let want = want.saturating_sub(self.ready.len());
            match timeout {
                Some(timeout) => {
                    let ts = types::Timespec::from(timeout);
                    let args = types::SubmitArgs::new().timespec(&ts);
                    self.ring.submitter().submit_with_args(want, &args)
                }
                None => self.ring.submit_and_wait(want),
            }
        };
        match result {
            Ok(_) => {}
            Err(err)
                if matches!(
                    err.raw_os_error(),
                    Some(libc::ETIME | libc::EINTR | libc::EBUSY)
                ) => {}
            Err(err) => return Err(err),
        }
        self.reap();
        Ok(())
    }

    /// Takes the next completion.
    pub fn next_completion(&mut self) -> Option<Completion> {
        self.ready.pop_front()
    }

    fn arm_waker(&mut self) {
        if self.wake_armed {
            return;
        }
        let entry = opcode::Read::new(
            types::Fd(self.waker.raw_fd()),
            self.wake_buf.as_mut_ptr(),
            8,
        )
        .build()
        .user_data(WAKE_USER_DATA);
        // SAFETY: `wake_buf` is leaked (never freed); the eventfd is owned by `waker`, a field of
        // the ring, and stays open while the ring is.
        if unsafe { self.ring.submission().push(&entry) }.is_ok() {
            self.wake_armed = true;
        }
        // Not armed (SQ full): the next `wait` tries again, so no wake is lost for good.
    }

    fn reap(&mut self) {
        let mut wake = false;
        let cqes: Vec<(u64, i32, u32)> = self
            .ring
            .completion()
            .map(|cqe| (cqe.user_data(), cqe.result(), cqe.flags()))
            .collect();
        for (ud, res, flags) in cqes {
            match ud {
                WAKE_USER_DATA => {
                    self.wake_armed = false;
                    wake = true;
                }
                CANCEL_USER_DATA => {}
                _ => self.complete(ud, res, flags),
            }
        }
        if wake {
            self.arm_waker();
            self.ready.push_back(Completion {
                tag: 0,
                kind: OpKind::Wake,
                result: Ok(0),
                buf: None,
                zc_copied: false,
            });
        }
    }

    fn complete(&mut self, ud: u64, res: i32, flags: u32) {
        let (index, generation, part) = split_user_data(ud);
        let Some(op) = self.ops.get_mut(index, generation) else {
            return; // a late SEND_ZC notification for an op already completed
        };
        let result = |res: i32| {
            if res < 0 {
                Err(io::Error::from_raw_os_error(-res))
            } else {
                Ok(res as usize)
            }
        };
        if part == PART_MAIN && op.kind == OpKind::ChainRead {
            op.pending -= 1;
            let tag = op.tag;
            self.ready.push_back(Completion {
                tag,
                kind: OpKind::ChainRead,
                result: result(res),
                buf: None,
                zc_copied: false,
            });
            return;
        }
        let is_send = part == PART_CHAIN_SEND;
        if is_send && cqueue::notif(flags) {
            op.zc_copied = res & NOTIF_USAGE_ZC_COPIED != 0;
        } else if is_send && cqueue::more(flags) {
            op.send_result = Some(res);
            return; // the notification follows; the buffer is the kernel's until then
        } else {
            op.send_result = Some(res);
        }
        op.pending -= 1;
        if op.pending > 0 {
            return;
        }
        let Some(op) = self.ops.remove(index) else {
            return;
        };
        let kind = match op.kind {
            OpKind::ChainRead => OpKind::ChainSend,
            kind => kind,
        };
        self.ready.push_back(Completion {
            tag: op.tag,
            kind,
            result: result(op.send_result.unwrap_or(res)),
            buf: op.buf,
            zc_copied: op.zc_copied,
        });
    }

    /// Cancels every in-flight op and waits until each has completed (their completions are
    /// discarded and buffers go back to the pool). Returns false if some did not finish in time.
    /// With ops in flight it reaps at least once, so a zero `timeout` still collects what has
    /// already finished.
    pub fn cancel_all(&mut self, timeout: Duration) -> bool {
        for ud in self.ops.live_user_data() {
            let entry = opcode::AsyncCancel::new(ud)
                .build()
                .user_data(CANCEL_USER_DATA);
            let _ = self.push(&[entry]);
            let entry = opcode::AsyncCancel::new(with_part(ud, PART_CHAIN_SEND))
                .build()
                .user_data(CANCEL_USER_DATA);
            let _ = self.push(&[entry]);
        }
        let deadline = Instant::now() + timeout;
        while self.ops.live() > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if self
                .wait(1, Some(left.min(Duration::from_millis(50))))
                .is_err()
            {
                break;
            }
            while let Some(done) = self.ready.pop_front() {
                if let Some(Buffer::Pool(id)) = done.buf {
                    self.pool.put(id);
                }
            }
            if left.is_zero() {
                break;
            }
        }
        let drained = self.ops.live() == 0;
        self.drain_gave_up = !drained;
        drained
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        // After a cancel_all that gave up, only what has finished since is reaped: waiting the
        // full timeout again doubled a failed run's stop (5 s + 5 s per worker).
        let timeout = if self.drain_gave_up {
            Duration::ZERO
        } else {
            DRAIN_TIMEOUT
        };
        let drained = self.ops.live() == 0 || self.cancel_all(timeout);
        // SAFETY: `ring` is not used again (this is drop). Closed first, so the pool it
        // registered and the files its SQEs named outlive it.
        unsafe { ManuallyDrop::drop(&mut self.ring) };
        if drained {
            // SAFETY: no op was in flight and the io_uring is closed, so the kernel no longer
            // uses the pool's memory or resolves the files' numbers; neither is used again.
            unsafe {
                ManuallyDrop::drop(&mut self.pool);
                ManuallyDrop::drop(&mut self.files);
            }
        } else {
            log::error!(
                "{} io_uring ops did not finish after cancel; leaking their buffers rather than \
                 freeing memory the kernel may still write",
                self.ops.live()
            );
            // The pool and files stay in their `ManuallyDrop`s: leaked with the op table.
            std::mem::forget(std::mem::take(&mut self.ops));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `io_uring_enter` flag: wait for completions (and run deferred task work).
    const ENTER_GETEVENTS: u32 = 1;

    /// A ring of `entries` SQ entries with a pool of one 4 KiB slot, holding /dev/zero to read
    /// and one end of a socket pair (returned with it) to send on.
    fn one_slot_ring(entries: u32) -> (Ring, FileId, FileId, std::os::unix::net::UnixStream) {
        let mut ring = Ring::new(
            &RingConfig {
                entries,
                forbid: FeatureMask::empty(),
            },
            BufferPool::new(1, 4096).expect("pool"),
        )
        .expect("ring");
        let zero = ring.adopt_fd(std::fs::File::open("/dev/zero").expect("/dev/zero").into());
        let (sock, peer) = std::os::unix::net::UnixStream::pair().expect("socket pair");
        let sock = ring.adopt_fd(sock.into());
        (ring, zero, sock, peer)
    }

    /// A failed submit of a full SQ fails the push, and the op's pool slot must come back: no
    /// completion will return it. The pool has one slot, so each attempt needs it back.
    #[test]
    fn a_push_that_fails_gives_its_slot_back_to_the_pool() {
        // The seccomp filter stays with the thread that installs it: a thread of its own.
        std::thread::spawn(|| {
            let (mut ring, zero, sock, _peer) = one_slot_ring(4);
            crate::seccomp::deny_io_uring_enter_on_this_thread(libc::EBUSY)
                .expect("installing the seccomp filter");
            let nop = opcode::Nop::new().build().user_data(CANCEL_USER_DATA);
            // SAFETY: a NOP references no memory.
            while unsafe { ring.ring.submission().push(&nop) }.is_ok() {}

            type Attempt = Box<dyn Fn(&mut Ring, BufId) -> io::Result<()>>;
            let mut attempts: Vec<(&str, Attempt)> = vec![
                (
                    "read",
                    Box::new(move |ring, id| ring.read(1, zero, Buffer::Pool(id), 0..4096)),
                ),
                (
                    "send",
                    Box::new(move |ring, id| ring.send(2, sock, Buffer::Pool(id), 0..4096, false)),
                ),
            ];
            if ring.linked_chains() {
                attempts.push((
                    "read_then_send",
                    Box::new(move |ring, id| {
                        ring.read_then_send(3, zero, sock, id, 0..4096, 0..4096, false)
                    }),
                ));
            }
            for (what, attempt) in &attempts {
                let id = ring
                    .take()
                    .unwrap_or_else(|| panic!("before {what}: the pool's slot was lost"));
                let err = attempt(&mut ring, id).expect_err(what);
                assert_eq!(err.raw_os_error(), Some(libc::EBUSY), "{what}: {err}");
                assert_eq!(ring.free_slots(), 1, "{what}: the slot is back");
                assert_eq!(ring.ops.live(), 0, "{what}: no op left in the table");
            }
            let id = ring.take().expect("the slot is reusable");
            ring.slot_mut(&id)[0] = 1;
            ring.put(id);
        })
        .join()
        .expect("the test thread");
    }

    /// A linked read-then-send is two entries: on a one-entry ring it can never be pushed, and
    /// emptying the SQ again and again must not stand in for saying so.
    #[test]
    fn an_op_larger_than_the_submission_queue_is_refused_not_retried() {
        // On a thread of its own, so that the old endless retry fails the test instead of
        // hanging it.
        let (done, finished) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let (mut ring, zero, sock, _peer) = one_slot_ring(1);
            if ring.linked_chains() {
                let id = ring.take().expect("the pool's slot");
                let err = ring
                    .read_then_send(1, zero, sock, id, 0..4096, 0..4096, false)
                    .expect_err("two entries on a one-entry SQ");
                assert_eq!(err.kind(), io::ErrorKind::InvalidInput, "{err}");
                assert_eq!(ring.free_slots(), 1, "the slot is back");
                assert_eq!(ring.ops.live(), 0, "no op left in the table");
            }
            let _ = done.send(());
        });
        finished
            .recv_timeout(Duration::from_secs(10))
            .expect("the push returned within 10 s");
    }

    #[test]
    fn a_wake_reaped_while_the_sq_is_full_rearms_on_a_later_wait() {
        let mut ring = Ring::new(
            &RingConfig {
                entries: 4,
                forbid: FeatureMask::empty(),
            },
            BufferPool::new(1, 4096).expect("pool"),
        )
        .expect("ring");
        assert!(ring.wake_armed, "armed at setup");
        ring.ring.submit().expect("submitting the waker's read");
        // Fill the SQ with NOPs the ring ignores, and leave them unsubmitted.
        let nop = opcode::Nop::new().build().user_data(CANCEL_USER_DATA);
        let mut queued = 0;
        // SAFETY: a NOP references no memory.
        while unsafe { ring.ring.submission().push(&nop) }.is_ok() {
            queued += 1;
        }
        assert!(queued > 0);
        ring.waker().wake();
        // Reap the wake's completion without submitting the NOPs.
        // SAFETY: no argument pointer is passed.
        unsafe {
            ring.ring
                .submitter()
                .enter::<libc::sigset_t>(0, 1, ENTER_GETEVENTS, None)
        }
        .expect("waiting for the wake");
        ring.reap();
        assert!(matches!(
            ring.next_completion().map(|c| c.kind),
            Some(OpKind::Wake)
        ));
        assert!(!ring.wake_armed, "the SQ was full: the re-arm must wait");

        // A wake posted now is not lost: a later wait arms the read once the SQ has room.
        ring.waker().wake();
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            ring.wait(1, Some(Duration::from_millis(50))).expect("wait");
            if let Some(c) = ring.next_completion() {
                assert!(matches!(c.kind, OpKind::Wake));
                break;
            }
            assert!(Instant::now() < deadline, "the second wake was lost");
        }
        assert!(ring.wake_armed, "armed again after the wake");
    }
}
