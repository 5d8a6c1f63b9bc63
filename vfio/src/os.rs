//! Plain syscalls the crate needs beyond `std`, each a thin safe wrapper with one `SAFETY` line.
//! Every fd that comes back is an `OwnedFd` from the moment the kernel returns it.

use std::ffi::CStr;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn check_size(ret: libc::ssize_t) -> io::Result<usize> {
    usize::try_from(ret).map_err(|_| io::Error::last_os_error())
}

/// (effective uid, effective gid).
pub(crate) fn euid_egid() -> (u32, u32) {
    // SAFETY: geteuid/getegid cannot fail and touch no memory.
    unsafe { (libc::geteuid(), libc::getegid()) }
}

/// `memfd_create(name, MFD_CLOEXEC | MFD_ALLOW_SEALING)`.
pub(crate) fn memfd(name: &CStr) -> io::Result<OwnedFd> {
    // SAFETY: `name` is NUL-terminated and outlives the call.
    let fd = check(unsafe {
        libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING)
    })?;
    // SAFETY: a new descriptor installed by this call; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `clock_gettime(CLOCK_MONOTONIC)` in nanoseconds (0 if the clock cannot be read).
pub(crate) fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: the kernel writes one timespec into `ts`, which lives across the call.
    if unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) } != 0 {
        return 0;
    }
    u64::try_from(ts.tv_sec)
        .unwrap_or(0)
        .saturating_mul(1_000_000_000)
        .saturating_add(u64::try_from(ts.tv_nsec).unwrap_or(0))
}

/// `pipe2(O_CLOEXEC)`: (read end, write end).
pub(crate) fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [-1 as libc::c_int; 2];
    // SAFETY: `fds` has room for the two ints the kernel writes.
    check(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) })?;
    // SAFETY: both are new descriptors installed by this call; nothing else owns them.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// `socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC)`.
pub(crate) fn socketpair() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [-1 as libc::c_int; 2];
    // SAFETY: `fds` has room for the two ints the kernel writes.
    check(unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    })?;
    // SAFETY: both are new descriptors installed by this call; nothing else owns them.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// `fcntl(F_SETPIPE_SZ)`: returns the size the kernel chose.
pub(crate) fn set_pipe_size(fd: BorrowedFd<'_>, size: usize) -> io::Result<usize> {
    let size = libc::c_int::try_from(size).unwrap_or(libc::c_int::MAX);
    // SAFETY: integer argument; the fd is open for the call.
    let got = check(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETPIPE_SZ, size) })?;
    Ok(usize::try_from(got).unwrap_or(0))
}

/// This process's soft RLIMIT_NOFILE.
pub(crate) fn open_file_limit() -> io::Result<usize> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one `rlimit` into `limit`, which outlives the call.
    check(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) })?;
    Ok(usize::try_from(limit.rlim_cur).unwrap_or(usize::MAX))
}

/// `ioctl(FIONREAD)`: bytes buffered in a pipe or socket.
pub(crate) fn fionread(fd: BorrowedFd<'_>) -> io::Result<usize> {
    let mut n: libc::c_int = 0;
    // SAFETY: the kernel writes one int into `n`, which lives across the call.
    check(unsafe { libc::ioctl(fd.as_raw_fd(), libc::FIONREAD, &mut n as *mut libc::c_int) })?;
    Ok(usize::try_from(n).unwrap_or(0))
}

/// `fcntl(F_ADD_SEALS)`.
pub(crate) fn add_seals(fd: BorrowedFd<'_>, seals: libc::c_int) -> io::Result<()> {
    // SAFETY: integer argument; the fd is open for the call.
    check(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, seals) }).map(drop)
}

/// `fcntl(F_GETFL)`: status flags and access mode.
pub(crate) fn get_status_flags(fd: BorrowedFd<'_>) -> io::Result<libc::c_int> {
    // SAFETY: no pointer argument; the fd is open for the call.
    check(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) })
}

/// `fcntl(F_SETFL)`.
pub(crate) fn set_status_flags(fd: BorrowedFd<'_>, flags: libc::c_int) -> io::Result<()> {
    // SAFETY: integer argument; the fd is open for the call.
    check(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags) }).map(drop)
}

/// `fcntl(F_GETFD)` on a bare number: fails with EBADF when nothing is open there.
pub(crate) fn get_fd_flags(fd: RawFd) -> io::Result<libc::c_int> {
    // SAFETY: F_GETFD only reads the descriptor table; a closed number gives EBADF.
    check(unsafe { libc::fcntl(fd, libc::F_GETFD) })
}

/// `fcntl(F_SETFD, flags)` on a bare number.
pub(crate) fn set_fd_flags(fd: RawFd, flags: libc::c_int) -> io::Result<()> {
    // SAFETY: changes only the close-on-exec bit of the number; a closed number gives EBADF.
    check(unsafe { libc::fcntl(fd, libc::F_SETFD, flags) }).map(drop)
}

/// `lseek`.
pub(crate) fn lseek(fd: BorrowedFd<'_>, offset: i64, whence: libc::c_int) -> io::Result<u64> {
    // SAFETY: integer arguments; the fd is open for the call.
    let pos = unsafe { libc::lseek(fd.as_raw_fd(), offset, whence) };
    u64::try_from(pos).map_err(|_| io::Error::last_os_error())
}

/// `ftruncate`.
pub(crate) fn ftruncate(fd: BorrowedFd<'_>, len: u64) -> io::Result<()> {
    let len = i64::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))?;
    // SAFETY: integer argument; the fd is open for the call.
    check(unsafe { libc::ftruncate(fd.as_raw_fd(), len) }).map(drop)
}

/// `fallocate(PUNCH_HOLE | KEEP_SIZE)`: frees the pages of a range.
pub(crate) fn punch_hole(fd: BorrowedFd<'_>, offset: u64, len: u64) -> io::Result<()> {
    let (Ok(offset), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else {
        return Err(io::Error::from_raw_os_error(libc::EFBIG));
    };
    // SAFETY: integer arguments; the fd is open for the call.
    check(unsafe {
        libc::fallocate(
            fd.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        )
    })
    .map(drop)
}

/// `fstat` on a bare number (EBADF when nothing is open there).
pub(crate) fn fstat_raw(fd: RawFd) -> io::Result<libc::stat> {
    // SAFETY: all-zero is a valid `struct stat` (plain integers).
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: the kernel writes one struct stat into `st`, which lives across the call.
    check(unsafe { libc::fstat(fd, &mut st) })?;
    Ok(st)
}

/// `getsockopt` of an int option on a bare number.
pub(crate) fn getsockopt_int(fd: RawFd, level: libc::c_int, opt: libc::c_int) -> io::Result<i32> {
    let mut val: libc::c_int = 0;
    let mut len = libc::socklen_t::try_from(std::mem::size_of::<libc::c_int>()).unwrap_or(4);
    // SAFETY: the kernel writes at most `len` bytes into `val`; both live across the call.
    check(unsafe {
        libc::getsockopt(
            fd,
            level,
            opt,
            (&mut val as *mut libc::c_int).cast(),
            &mut len,
        )
    })?;
    Ok(val)
}

/// `read` into `buf`.
pub(crate) fn read(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: the kernel writes at most buf.len() bytes into `buf`, exclusively borrowed here.
    check_size(unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) })
}

/// `splice` of up to `len` bytes from `src` at `src_offset` into the pipe `pipe`, without
/// blocking on the pipe: page references move, no byte is copied.
pub(crate) fn splice_into_pipe(
    src: BorrowedFd<'_>,
    src_offset: u64,
    pipe: BorrowedFd<'_>,
    len: usize,
) -> io::Result<usize> {
    splice(
        (src, Some(src_offset)),
        (pipe, None),
        len,
        libc::SPLICE_F_MOVE,
    )
}

/// `splice` of up to `len` bytes from the pipe `pipe` into `dst` at `dst_offset`, without
/// blocking on the pipe: the kernel copies between its own pages, no user buffer between.
pub(crate) fn splice_from_pipe(
    pipe: BorrowedFd<'_>,
    dst: BorrowedFd<'_>,
    dst_offset: u64,
    len: usize,
) -> io::Result<usize> {
    splice((pipe, None), (dst, Some(dst_offset)), len, 0)
}

/// `splice` of up to `len` bytes from the pipe `from` into the pipe `to`, blocking on neither:
/// the pages themselves move (a part of one is shared by reference), no byte is copied.
pub(crate) fn splice_between_pipes(
    from: BorrowedFd<'_>,
    to: BorrowedFd<'_>,
    len: usize,
) -> io::Result<usize> {
    splice((from, None), (to, None), len, 0)
}

/// `splice` from one `(fd, offset)` to another, non-blocking on the pipe end (the one with no
/// offset: a pipe has none).
fn splice(
    (from, from_offset): (BorrowedFd<'_>, Option<u64>),
    (to, to_offset): (BorrowedFd<'_>, Option<u64>),
    len: usize,
    flags: libc::c_uint,
) -> io::Result<usize> {
    let loff = |offset: Option<u64>| {
        offset
            .map(|o| {
                libc::loff_t::try_from(o).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
            })
            .transpose()
    };
    let (mut from_off, mut to_off) = (loff(from_offset)?, loff(to_offset)?);
    let ptr = |off: &mut Option<libc::loff_t>| {
        off.as_mut()
            .map_or(std::ptr::null_mut(), std::ptr::from_mut)
    };
    // SAFETY: each offset pointer is null or points at a live local the kernel updates; both
    // fds are borrowed for the call.
    check_size(unsafe {
        libc::splice(
            from.as_raw_fd(),
            ptr(&mut from_off),
            to.as_raw_fd(),
            ptr(&mut to_off),
            len,
            flags | libc::SPLICE_F_NONBLOCK,
        )
    })
}

/// `write` from `buf`.
pub(crate) fn write(fd: BorrowedFd<'_>, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: the kernel reads at most buf.len() bytes from `buf`, borrowed for the call.
    check_size(unsafe { libc::write(fd.as_raw_fd(), buf.as_ptr().cast(), buf.len()) })
}

/// `pwrite` of all of `buf` at `offset`.
pub(crate) fn pwrite_all(fd: BorrowedFd<'_>, mut buf: &[u8], mut offset: u64) -> io::Result<()> {
    while !buf.is_empty() {
        let off = i64::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))?;
        // SAFETY: the kernel reads at most buf.len() bytes from `buf`, borrowed for the call.
        let ret = unsafe { libc::pwrite(fd.as_raw_fd(), buf.as_ptr().cast(), buf.len(), off) };
        match check_size(ret) {
            Ok(0) => return Err(io::Error::from(io::ErrorKind::WriteZero)),
            Ok(n) => {
                buf = buf.get(n..).unwrap_or_default();
                offset += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// `pread` into `buf` at `offset`.
pub(crate) fn pread(fd: BorrowedFd<'_>, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let off = i64::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))?;
    // SAFETY: the kernel writes at most buf.len() bytes into `buf`, exclusively borrowed here.
    check_size(unsafe { libc::pread(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), off) })
}

/// `poll` on `(fd, events)` pairs with a timeout; returns which fds reported any event
/// (including hang-up and error).
pub(crate) fn poll(
    fds: &[(BorrowedFd<'_>, libc::c_short)],
    timeout_ms: i32,
) -> io::Result<Vec<bool>> {
    let mut pfds: Vec<libc::pollfd> = fds
        .iter()
        .map(|(fd, events)| libc::pollfd {
            fd: fd.as_raw_fd(),
            events: *events,
            revents: 0,
        })
        .collect();
    let nfds = libc::nfds_t::try_from(pfds.len()).unwrap_or(0);
    // SAFETY: `pfds` holds `nfds` pollfd entries the kernel updates during the call; each fd
    // is borrowed, so open.
    match check(unsafe { libc::poll(pfds.as_mut_ptr(), nfds, timeout_ms) }) {
        Ok(_) => Ok(pfds.iter().map(|p| p.revents != 0).collect()),
        Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(vec![false; pfds.len()]),
        Err(e) => Err(e),
    }
}

/// Reopens an open file through `/proc/self/fd` with a new access mode: a new open file
/// description (its own position) on the same inode.
pub(crate) fn reopen(fd: BorrowedFd<'_>, write: bool) -> io::Result<OwnedFd> {
    let path = format!("/proc/self/fd/{}", fd.as_raw_fd());
    let file = std::fs::OpenOptions::new()
        .read(!write)
        .write(write)
        .open(path)?;
    Ok(OwnedFd::from(file))
}

/// `mount(2)`.
pub(crate) fn mount(
    source: &CStr,
    target: &CStr,
    fstype: &CStr,
    flags: u64,
    data: &CStr,
) -> io::Result<()> {
    // SAFETY: every pointer is a NUL-terminated string borrowed for the call.
    check(unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            flags as libc::c_ulong,
            data.as_ptr().cast(),
        )
    })
    .map(drop)
}

/// `umount2(target, MNT_DETACH)`.
pub(crate) fn umount_detach(target: &CStr) -> io::Result<()> {
    // SAFETY: `target` is NUL-terminated and borrowed for the call.
    check(unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) }).map(drop)
}
