//! Adopting file descriptors handed to the helper, type-checked before use, owned from arrival.
//!
//! - `--fd N` numbers: [`adopt_unix_listener`], [`adopt_stream_socket`], [`adopt_data_fd`],
//!   [`adopt_device_fd`]. A number is adopted only if it is open, is of the right type, and does
//!   **not** have FD_CLOEXEC: a descriptor inherited over exec never has it, while everything
//!   this process opens itself (std, this crate) does. Adoption sets FD_CLOEXEC, so the same
//!   number cannot be adopted twice and no descriptor owned elsewhere in the process is taken.
//! - SCM_RIGHTS: [`recv_with_fds`] returns the received fds as `OwnedFd` (MSG_CMSG_CLOEXEC);
//!   check them with the `check_*` functions. [`send_with_fds`] is the sending side.
//! - [`memfd`] and [`pipe`]: safe constructors for tests and tools.

use std::ffi::CStr;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Mutex;

use crate::{os, VfioError};

/// Which way a data_fd moves bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DataDirection {
    /// A saving data_fd (PRE_COPY / STOP_COPY): read from it.
    Save,
    /// A resuming data_fd (RESUMING): write to it.
    Resume,
}

/// Serialises check-then-adopt so two threads cannot adopt one number.
static ADOPT: Mutex<()> = Mutex::new(());

fn file_type_name(mode: libc::mode_t) -> &'static str {
    match mode & libc::S_IFMT {
        libc::S_IFSOCK => "a socket",
        libc::S_IFREG => "a regular file",
        libc::S_IFDIR => "a directory",
        libc::S_IFIFO => "a pipe",
        libc::S_IFCHR => "a character device",
        libc::S_IFBLK => "a block device",
        libc::S_IFLNK => "a symlink",
        0 => "an anonymous inode",
        _ => "an unknown file type",
    }
}

fn fstat_checked(fd: RawFd) -> Result<libc::stat, VfioError> {
    os::fstat_raw(fd).map_err(|source| VfioError::FdCheck {
        fd,
        step: "fstat",
        source,
    })
}

fn sockopt(fd: RawFd, opt: libc::c_int, step: &'static str) -> Result<i32, VfioError> {
    os::getsockopt_int(fd, libc::SOL_SOCKET, opt).map_err(|source| VfioError::FdCheck {
        fd,
        step,
        source,
    })
}

fn check_socket(fd: RawFd, listening: bool) -> Result<(), VfioError> {
    let expected = if listening {
        "a listening unix stream socket"
    } else {
        "a connected stream socket"
    };
    let st = fstat_checked(fd)?;
    if st.st_mode & libc::S_IFMT != libc::S_IFSOCK {
        return Err(VfioError::BadFd {
            fd,
            expected,
            found: file_type_name(st.st_mode).to_owned(),
        });
    }
    let ty = sockopt(fd, libc::SO_TYPE, "getsockopt(SO_TYPE)")?;
    if ty != libc::SOCK_STREAM {
        return Err(VfioError::BadFd {
            fd,
            expected,
            found: format!("a socket of type {ty}"),
        });
    }
    let accepting = sockopt(fd, libc::SO_ACCEPTCONN, "getsockopt(SO_ACCEPTCONN)")? != 0;
    if accepting != listening {
        return Err(VfioError::BadFd {
            fd,
            expected,
            found: if accepting {
                "a listening socket".to_owned()
            } else {
                "a socket that is not listening".to_owned()
            },
        });
    }
    if listening {
        let domain = sockopt(fd, libc::SO_DOMAIN, "getsockopt(SO_DOMAIN)")?;
        if domain != libc::AF_UNIX {
            return Err(VfioError::BadFd {
                fd,
                expected,
                found: format!("a listening socket of domain {domain}"),
            });
        }
    }
    Ok(())
}

/// Checks a listening AF_UNIX SOCK_STREAM socket.
pub fn check_unix_listener(fd: BorrowedFd<'_>) -> Result<(), VfioError> {
    check_socket(fd.as_raw_fd(), true)
}

/// Checks a connected (not listening) SOCK_STREAM socket (unix or TCP).
pub fn check_stream_socket(fd: BorrowedFd<'_>) -> Result<(), VfioError> {
    check_socket(fd.as_raw_fd(), false)
}

fn check_data_raw(fd: RawFd, direction: DataDirection) -> Result<(), VfioError> {
    let expected = match direction {
        DataDirection::Save => "a readable VFIO data_fd (anonymous inode, pipe or file)",
        DataDirection::Resume => "a writable VFIO data_fd (anonymous inode, pipe or file)",
    };
    let st = fstat_checked(fd)?;
    let fmt = st.st_mode & libc::S_IFMT;
    if !matches!(fmt, 0 | libc::S_IFREG | libc::S_IFIFO) {
        return Err(VfioError::BadFd {
            fd,
            expected,
            found: file_type_name(st.st_mode).to_owned(),
        });
    }
    // SAFETY: only used for the duration of this check while the caller keeps `fd` open.
    let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
    let fl = os::get_status_flags(borrowed).map_err(|source| VfioError::FdCheck {
        fd,
        step: "fcntl(F_GETFL)",
        source,
    })?;
    if fl & libc::O_PATH != 0 {
        // O_PATH reads as O_RDONLY in the access mode, but nothing can be read or written.
        return Err(VfioError::BadFd {
            fd,
            expected,
            found: format!("{} opened with O_PATH", file_type_name(st.st_mode)),
        });
    }
    let mode = fl & libc::O_ACCMODE;
    let ok = match direction {
        DataDirection::Save => mode == libc::O_RDONLY || mode == libc::O_RDWR,
        DataDirection::Resume => mode == libc::O_WRONLY || mode == libc::O_RDWR,
    };
    if !ok {
        return Err(VfioError::BadFd {
            fd,
            expected,
            found: format!(
                "{} opened with the wrong access mode",
                file_type_name(st.st_mode)
            ),
        });
    }
    Ok(())
}

/// Checks a data_fd: an anonymous inode (a real driver's), a pipe or a regular file (simulated
/// devices), readable for saving or writable for resuming.
pub fn check_data_fd(fd: BorrowedFd<'_>, direction: DataDirection) -> Result<(), VfioError> {
    check_data_raw(fd.as_raw_fd(), direction)
}

/// What `/proc/self/fd/N` reads for a device fd from VFIO_GROUP_GET_DEVICE_FD: the name
/// `anon_inode_getfile("[vfio-device]", ...)` gives it, the same from 6.1 (vfio_main.c) through
/// 6.2+ (group.c, `anon_inode_getfile_fmode` since 6.12).
pub const VFIO_DEVICE_ANON_NAME: &str = "anon_inode:[vfio-device]";

/// The chrdev region of iommufd-style device cdevs (`/dev/vfio/devices/vfioN`), as
/// `alloc_chrdev_region(..., "vfio-dev")` in device_cdev.c lists it in `/proc/devices`.
pub const VFIO_DEV_CHRDEV_NAME: &str = "vfio-dev";

const DEVICE_EXPECTED: &str = "a VFIO device fd (anon_inode:[vfio-device] or a vfio-dev cdev)";

/// The majors `/proc/devices` lists for character devices named `name`.
fn char_majors(proc_devices: &str, name: &str) -> Vec<u32> {
    proc_devices
        .lines()
        .skip_while(|l| l.trim() != "Character devices:")
        .skip(1)
        .take_while(|l| !l.trim().is_empty() && !l.ends_with(':'))
        .filter_map(|l| {
            let (major, n) = l.trim().split_once(' ')?;
            if n.trim() == name {
                major.parse().ok()
            } else {
                None
            }
        })
        .collect()
}

/// A cdev is VFIO's only if its major is one the kernel registered as vfio-dev: the path it was
/// opened by proves nothing (a container may bind-mount or mknod it anywhere).
fn check_vfio_cdev(rdev: libc::dev_t, vfio_majors: &[u32]) -> Result<(), String> {
    let (major, minor) = (libc::major(rdev), libc::minor(rdev));
    if vfio_majors.contains(&major) {
        return Ok(());
    }
    let registered = match vfio_majors {
        [] => "which /proc/devices does not list".to_owned(),
        [one] => format!("major {one}"),
        many => format!("majors {many:?}"),
    };
    Err(format!(
        "character device {major}:{minor} (not {VFIO_DEV_CHRDEV_NAME}, {registered})"
    ))
}

/// An anonymous inode is VFIO's only under VFIO's name: eventfds, timerfds, KVM and other
/// drivers' anon inodes answer ioctls too, and type ';' is VFIO's only by convention.
fn check_vfio_anon(link: &str) -> Result<(), String> {
    if link == VFIO_DEVICE_ANON_NAME {
        Ok(())
    } else {
        Err(link.to_owned())
    }
}

fn fd_link(fd: RawFd) -> Result<String, VfioError> {
    std::fs::read_link(format!("/proc/self/fd/{fd}"))
        .map(|l| l.to_string_lossy().into_owned())
        .map_err(|source| VfioError::FdCheck {
            fd,
            step: "readlink(/proc/self/fd/N)",
            source,
        })
}

fn check_device_raw(fd: RawFd) -> Result<(), VfioError> {
    let st = fstat_checked(fd)?;
    let verdict = match st.st_mode & libc::S_IFMT {
        libc::S_IFCHR => {
            let devices =
                std::fs::read_to_string("/proc/devices").map_err(|source| VfioError::FdCheck {
                    fd,
                    step: "reading /proc/devices",
                    source,
                })?;
            check_vfio_cdev(st.st_rdev, &char_majors(&devices, VFIO_DEV_CHRDEV_NAME))
        }
        // The name, not the mode, marks VFIO's anon inode: 6.15 briefly made anon inodes
        // S_IFREG inside the kernel (cfd86ef7e8e7, reverted by 1e7ab6f67824), and no file
        // with a path reads back as "anon_inode:...".
        0 => check_vfio_anon(&fd_link(fd)?),
        _ => {
            let link = fd_link(fd)?;
            check_vfio_anon(&link)
                .map_err(|link| format!("{} ({link})", file_type_name(st.st_mode)))
        }
    };
    verdict.map_err(|found| VfioError::BadFd {
        fd,
        expected: DEVICE_EXPECTED,
        found,
    })
}

/// Checks that an fd is a VFIO device fd before any VFIO ioctl is issued on it: an anonymous
/// inode named [`VFIO_DEVICE_ANON_NAME`] (VFIO_GROUP_GET_DEVICE_FD), or a character device
/// whose major `/proc/devices` lists as [`VFIO_DEV_CHRDEV_NAME`]. [`crate::VfioDevice`] then
/// asks for the migration feature.
pub fn check_device_fd(fd: BorrowedFd<'_>) -> Result<(), VfioError> {
    check_device_raw(fd.as_raw_fd())
}

/// Adopts an inherited number after `check` passes: open, without FD_CLOEXEC, then marked.
///
/// Sound because every fd this workspace creates carries FD_CLOEXEC (std, and `os`: memfd,
/// pipe2, socketpair, eventfd, the VFIO ioctls' O_CLOEXEC), tests included, so a number
/// without it was inherited over exec and has no owner here. A program linking this crate
/// that makes fds without FD_CLOEXEC must not pass their numbers to the `adopt_*` functions.
fn adopt(
    fd: RawFd,
    check: impl FnOnce(RawFd) -> Result<(), VfioError>,
) -> Result<OwnedFd, VfioError> {
    let _guard = ADOPT.lock().unwrap_or_else(|p| p.into_inner());
    let flags = os::get_fd_flags(fd).map_err(|source| VfioError::FdCheck {
        fd,
        step: "fcntl(F_GETFD): is the number open",
        source,
    })?;
    if flags & libc::FD_CLOEXEC != 0 {
        return Err(VfioError::BadFd {
            fd,
            expected: "a descriptor inherited from the parent (no FD_CLOEXEC)",
            found: "a descriptor this process opened or already adopted".to_owned(),
        });
    }
    check(fd)?;
    os::set_fd_flags(fd, flags | libc::FD_CLOEXEC).map_err(|source| VfioError::FdCheck {
        fd,
        step: "fcntl(F_SETFD, FD_CLOEXEC)",
        source,
    })?;
    // SAFETY: the number is open (F_GETFD succeeded), was inherited over exec (no FD_CLOEXEC,
    // which everything this process opens carries) and is now marked, under the adopt lock, so
    // no other owner exists in this process and it cannot be adopted again.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Adopts `--fd N` as a listening unix stream socket (S_ISSOCK, SO_TYPE, SO_ACCEPTCONN, AF_UNIX).
pub fn adopt_unix_listener(fd: RawFd) -> Result<OwnedFd, VfioError> {
    adopt(fd, |fd| check_socket(fd, true))
}

/// Adopts `--fd N` as a connected stream socket.
pub fn adopt_stream_socket(fd: RawFd) -> Result<OwnedFd, VfioError> {
    adopt(fd, |fd| check_socket(fd, false))
}

/// Adopts `--fd N` as a data_fd.
pub fn adopt_data_fd(fd: RawFd, direction: DataDirection) -> Result<OwnedFd, VfioError> {
    adopt(fd, |fd| check_data_raw(fd, direction))
}

/// Adopts `--fd N` as a VFIO device fd.
pub fn adopt_device_fd(fd: RawFd) -> Result<OwnedFd, VfioError> {
    adopt(fd, check_device_raw)
}

/// What one `recvmsg` brought.
#[derive(Debug)]
pub struct Received {
    /// Bytes read into the buffer.
    pub len: usize,
    /// The fds passed with them, each owned from arrival.
    pub fds: Vec<OwnedFd>,
    /// The kernel dropped fds (MSG_CTRUNC: more than `max_fds`, or the fd table is full); then
    /// `fds` is empty, the ones that did arrive closed, as the message's fds are not whole.
    pub fds_dropped: bool,
}

/// Receives one message and the fds passed with it (SCM_RIGHTS, MSG_CMSG_CLOEXEC). A truncated
/// control message still returns its bytes, with `fds_dropped` set.
pub fn recv_with_fds(sock: BorrowedFd<'_>, buf: &mut [u8], max_fds: usize) -> io::Result<Received> {
    let fd_bytes = max_fds.saturating_mul(std::mem::size_of::<RawFd>());
    let fd_bytes32 =
        u32::try_from(fd_bytes).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE(fd_bytes32) } as usize;
    // u64 words keep the control buffer aligned for cmsghdr.
    let mut control = vec![0u64; space.div_ceil(8).max(1)];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: all-zero is a valid msghdr (null pointers, zero lengths).
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if max_fds > 0 {
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
    }
    // SAFETY: `msg` points at `iov` (into `buf`) and `control`, all live and exclusively
    // borrowed for the call; the kernel writes at most their stated lengths.
    let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
    let n = usize::try_from(n).map_err(|_| io::Error::last_os_error())?;
    let mut fds = Vec::new();
    if max_fds > 0 {
        // SAFETY: `msg` was filled by recvmsg; CMSG_FIRSTHDR/NXTHDR stay within msg_control.
        let mut cmsg = unsafe { libc::CMSG_FIRSTHDR(&msg) };
        while !cmsg.is_null() {
            // SAFETY: `cmsg` is non-null and points at a header inside `control`.
            let hdr = unsafe { &*cmsg };
            if hdr.cmsg_level == libc::SOL_SOCKET && hdr.cmsg_type == libc::SCM_RIGHTS {
                // SAFETY: CMSG_LEN(0) only computes a size.
                let header = unsafe { libc::CMSG_LEN(0) } as usize;
                let count =
                    (hdr.cmsg_len as usize).saturating_sub(header) / std::mem::size_of::<RawFd>();
                // SAFETY: the data of an SCM_RIGHTS header holds `count` ints inside `control`.
                let data = unsafe { libc::CMSG_DATA(cmsg) }.cast::<RawFd>();
                for i in 0..count {
                    // SAFETY: `i < count` ints lie inside the control buffer; read unaligned.
                    let raw = unsafe { data.add(i).read_unaligned() };
                    // SAFETY: the kernel installed `raw` in our table during this recvmsg;
                    // nothing else in the process knows it.
                    fds.push(unsafe { OwnedFd::from_raw_fd(raw) });
                }
            }
            // SAFETY: `msg` and `cmsg` are from this recvmsg; NXTHDR returns null at the end.
            cmsg = unsafe { libc::CMSG_NXTHDR(&msg, cmsg) };
        }
    }
    let fds_dropped = msg.msg_flags & libc::MSG_CTRUNC != 0;
    if fds_dropped {
        fds.clear();
    }
    Ok(Received {
        len: n,
        fds,
        fds_dropped,
    })
}

/// Sends `buf` with `fds` attached (SCM_RIGHTS). Returns the bytes sent.
pub fn send_with_fds(
    sock: BorrowedFd<'_>,
    buf: &[u8],
    fds: &[BorrowedFd<'_>],
) -> io::Result<usize> {
    let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let fd_bytes = u32::try_from(std::mem::size_of_val(raw.as_slice()))
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE(fd_bytes) } as usize;
    let mut control = vec![0u64; space.div_ceil(8).max(1)];
    let mut iov = libc::iovec {
        iov_base: buf.as_ptr().cast_mut().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: all-zero is a valid msghdr.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !raw.is_empty() {
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        // SAFETY: msg_control points at `space` bytes, enough for one header with the fds.
        let cmsg = unsafe { libc::CMSG_FIRSTHDR(&msg) };
        if cmsg.is_null() {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        // SAFETY: `cmsg` points at the start of `control`, which has room for the header and
        // `fd_bytes` of data; the copy stays inside it.
        unsafe {
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(fd_bytes) as _;
            std::ptr::copy_nonoverlapping(
                raw.as_ptr().cast::<u8>(),
                libc::CMSG_DATA(cmsg),
                fd_bytes as usize,
            );
        }
    }
    // SAFETY: `msg` points at `iov` (into `buf`, only read) and `control`, live for the call;
    // the fds are borrowed, so open while the kernel takes its references.
    let n = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}

/// A new memfd (MFD_CLOEXEC | MFD_ALLOW_SEALING).
pub fn memfd(name: &CStr) -> io::Result<OwnedFd> {
    os::memfd(name)
}

/// A new pipe (O_CLOEXEC): (read end, write end).
pub fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    os::pipe()
}

/// A connected unix stream socket pair (SOCK_CLOEXEC).
pub fn socketpair() -> io::Result<(OwnedFd, OwnedFd)> {
    os::socketpair()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::{AsFd, IntoRawFd};
    use std::os::unix::fs::OpenOptionsExt;
    use std::os::unix::net::{UnixListener, UnixStream};

    /// Makes `fd` look inherited over exec (no FD_CLOEXEC) and gives up ownership of it.
    fn inherited(fd: impl IntoRawFd) -> RawFd {
        let raw = fd.into_raw_fd();
        os::set_fd_flags(raw, 0).unwrap();
        raw
    }

    fn listener() -> UnixListener {
        let path = std::env::temp_dir().join(format!(
            "vfio-fd-test-{}-{:?}.sock",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_file(&path);
        let l = UnixListener::bind(&path).unwrap();
        let _ = std::fs::remove_file(&path);
        l
    }

    #[test]
    fn adopts_an_inherited_listener_once() {
        let raw = inherited(listener());
        let owned = adopt_unix_listener(raw).unwrap();
        assert_eq!(
            os::get_fd_flags(raw).unwrap() & libc::FD_CLOEXEC,
            libc::FD_CLOEXEC
        );
        let again = adopt_unix_listener(raw).unwrap_err();
        assert!(matches!(again, VfioError::BadFd { .. }), "{again}");
        assert!(again.to_string().contains("already adopted"), "{again}");
        drop(owned);
    }

    #[test]
    fn refuses_what_this_process_opened() {
        let l = listener();
        let err = adopt_unix_listener(l.as_fd().as_raw_fd()).unwrap_err();
        assert!(matches!(err, VfioError::BadFd { .. }));
        // `l` is still ours and usable.
        assert!(l.local_addr().is_ok());
    }

    #[test]
    fn type_checks_name_what_was_found() {
        let (a, _b) = UnixStream::pair().unwrap();
        let err = adopt_unix_listener(inherited(a)).unwrap_err();
        assert!(err.to_string().contains("not listening"), "{err}");

        let (r, _w) = pipe().unwrap();
        let err = adopt_unix_listener(inherited(r)).unwrap_err();
        assert!(err.to_string().contains("a pipe"), "{err}");

        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let err = adopt_stream_socket(inherited(udp)).unwrap_err();
        assert!(err.to_string().contains("type"), "{err}");

        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let err = adopt_unix_listener(inherited(tcp)).unwrap_err();
        assert!(err.to_string().contains("domain"), "{err}");

        let (a, _b) = UnixStream::pair().unwrap();
        adopt_stream_socket(inherited(a)).unwrap();
    }

    #[test]
    fn closed_numbers_are_refused_with_ebadf() {
        // Numbers nothing can have open (negative, or far above any fd limit here).
        for raw in [-1, 1 << 30] {
            let err = adopt_data_fd(raw, DataDirection::Save).unwrap_err();
            assert_eq!(err.errno(), Some(libc::EBADF), "{err}");
            assert!(err.to_string().contains("is the number open"), "{err}");
        }
    }

    #[test]
    fn data_fd_direction_is_checked() {
        let (r, w) = pipe().unwrap();
        check_data_fd(r.as_fd(), DataDirection::Save).unwrap();
        check_data_fd(w.as_fd(), DataDirection::Resume).unwrap();
        let err = check_data_fd(r.as_fd(), DataDirection::Resume).unwrap_err();
        assert!(err.to_string().contains("access mode"), "{err}");
        assert!(check_data_fd(w.as_fd(), DataDirection::Save).is_err());
        let dir = std::fs::File::open(std::env::temp_dir()).unwrap();
        assert!(check_data_fd(dir.as_fd(), DataDirection::Save).is_err());
        let adopted = adopt_data_fd(inherited(r), DataDirection::Save).unwrap();
        check_data_fd(adopted.as_fd(), DataDirection::Save).unwrap();
    }

    fn eventfd() -> OwnedFd {
        // SAFETY: eventfd takes no pointers; a non-negative result is a new descriptor.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        assert!(fd >= 0, "eventfd: {}", io::Error::last_os_error());
        // SAFETY: `fd` was just installed by eventfd and nothing else owns it.
        unsafe { OwnedFd::from_raw_fd(fd) }
    }

    fn refused_as(fd: BorrowedFd<'_>, found: &str) {
        let err = check_device_fd(fd).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, VfioError::BadFd { .. }), "{msg}");
        let want = format!(
            "fd {}: expected a VFIO device fd (anon_inode:[vfio-device] or a vfio-dev cdev), found {found}",
            fd.as_raw_fd()
        );
        assert!(msg.starts_with(&want), "{msg}\nwant {want}");
    }

    #[test]
    fn device_fd_check_refuses_a_character_device_that_is_not_vfio_dev() {
        let null = std::fs::File::open("/dev/null").unwrap();
        let devices = std::fs::read_to_string("/proc/devices").unwrap();
        let registered = match char_majors(&devices, VFIO_DEV_CHRDEV_NAME).as_slice() {
            [] => "which /proc/devices does not list".to_owned(),
            [one] => format!("major {one}"),
            many => format!("majors {many:?}"),
        };
        refused_as(
            null.as_fd(),
            &format!("character device 1:3 (not vfio-dev, {registered})"),
        );
        let tty = std::fs::File::open("/dev/tty");
        if let Ok(tty) = tty {
            refused_as(tty.as_fd(), "character device 5:0 (not vfio-dev, ");
        }
    }

    #[test]
    fn device_fd_check_refuses_other_anonymous_inodes_and_files() {
        let ev = eventfd();
        refused_as(ev.as_fd(), "anon_inode:[eventfd]");
        let m = memfd(c"x").unwrap();
        refused_as(m.as_fd(), "a regular file (/memfd:x (deleted))");
        let (r, _w) = pipe().unwrap();
        refused_as(r.as_fd(), "a pipe (pipe:[");
        let (s, _p) = socketpair().unwrap();
        let raw = s.as_fd().as_raw_fd();
        let err = adopt_device_fd(inherited(s)).unwrap_err();
        assert!(
            err.to_string()
                .starts_with(&format!("fd {raw}: expected a VFIO device fd")),
            "{err}"
        );
        assert!(err.to_string().contains("a socket (socket:["), "{err}");
        let ev_raw = inherited(eventfd());
        let err = adopt_device_fd(ev_raw).unwrap_err();
        assert!(err.to_string().contains("anon_inode:[eventfd]"), "{err}");
        // Refused, so not adopted: the number is still unowned and closed here.
        // SAFETY: adoption failed, so nothing in this process owns `ev_raw`.
        drop(unsafe { OwnedFd::from_raw_fd(ev_raw) });
    }

    #[test]
    fn device_fd_verdicts_for_what_only_a_vfio_kernel_makes() {
        let devices = "Character devices:\n  1 mem\n 10 misc\n510 vfio\n511 vfio-dev\n\n\
                       Block devices:\n  7 loop\n259 vfio-dev\n";
        assert_eq!(char_majors(devices, "vfio-dev"), vec![511]);
        assert_eq!(char_majors(devices, "vfio"), vec![510]);
        assert_eq!(
            char_majors("Character devices:\n", "vfio-dev"),
            Vec::<u32>::new()
        );
        check_vfio_cdev(libc::makedev(511, 0), &[511]).unwrap();
        assert_eq!(
            check_vfio_cdev(libc::makedev(510, 3), &[511]).unwrap_err(),
            "character device 510:3 (not vfio-dev, major 511)"
        );
        check_vfio_anon("anon_inode:[vfio-device]").unwrap();
        assert_eq!(
            check_vfio_anon("anon_inode:kvm-vcpu:0").unwrap_err(),
            "anon_inode:kvm-vcpu:0"
        );
    }

    #[test]
    fn scm_rights_round_trip_gives_owned_cloexec_fds() {
        let (a, b) = socketpair().unwrap();
        let (r, w) = pipe().unwrap();
        let m = memfd(c"passed").unwrap();
        let sent = send_with_fds(a.as_fd(), b"hello", &[r.as_fd(), m.as_fd()]).unwrap();
        assert_eq!(sent, 5);
        let mut buf = [0u8; 16];
        let got = recv_with_fds(b.as_fd(), &mut buf, 4).unwrap();
        let fds = got.fds;
        assert_eq!(&buf[..got.len], b"hello");
        assert_eq!(fds.len(), 2);
        assert!(!got.fds_dropped);
        for fd in &fds {
            let flags = os::get_fd_flags(fd.as_fd().as_raw_fd()).unwrap();
            assert_eq!(flags & libc::FD_CLOEXEC, libc::FD_CLOEXEC);
        }
        // The received read end is the same pipe.
        os::write(w.as_fd(), b"x").unwrap();
        let mut one = [0u8; 1];
        assert_eq!(os::read(fds[0].as_fd(), &mut one).unwrap(), 1);
        check_data_fd(fds[0].as_fd(), DataDirection::Save).unwrap();
        let path_only: OwnedFd = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_PATH)
            .open("/proc/self/exe")
            .unwrap()
            .into();
        let err = check_data_fd(path_only.as_fd(), DataDirection::Save).unwrap_err();
        assert!(err.to_string().contains("O_PATH"), "{err}");

        // More fds than room: the bytes arrive, the fds are reported dropped, and the one
        // that fit is not handed out as if the message were whole.
        send_with_fds(a.as_fd(), b"x", &[r.as_fd(), m.as_fd(), w.as_fd()]).unwrap();
        let got = recv_with_fds(b.as_fd(), &mut buf, 1).unwrap();
        assert_eq!(
            (&buf[..got.len], got.fds.len(), got.fds_dropped),
            (&b"x"[..], 0, true)
        );

        // No fds at all.
        send_with_fds(a.as_fd(), b"plain", &[]).unwrap();
        let got = recv_with_fds(b.as_fd(), &mut buf, 2).unwrap();
        assert_eq!((got.len, got.fds.len(), got.fds_dropped), (5, 0, false));
    }
}
