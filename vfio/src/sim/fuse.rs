//! A minimal in-process FUSE server for one file: the mount's root *is* the file (a regular
//! file mountpoint, `rootmode=100000`), so there is no lookup. It answers INIT, GETATTR, OPEN
//! (`FOPEN_DIRECT_IO | FOPEN_NONSEEKABLE | FOPEN_STREAM`), READ, WRITE, FLUSH, RELEASE and
//! DESTROY; everything else gets ENOSYS. Reads and writes go to a [`FuseHandler`], which
//! chooses the bytes or the errno. Requests are up to 1 MiB (`max_pages` 256).
//!
//! Shutdown: unmount (MNT_DETACH), then a stop pipe wakes the server thread, which closes
//! `/dev/fuse`; that aborts the connection, so a reader still holding the file gets ENOTCONN
//! instead of hanging.

use std::ffi::CString;
use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use crate::os;

/// Chooses what reads and writes of the FUSE file do.
pub(crate) trait FuseHandler: Send {
    /// Fill up to `buf.len()` bytes; Ok(0) is EOF; Err(errno) fails the read.
    fn read(&mut self, buf: &mut [u8]) -> Result<usize, i32>;
    /// Take up to `data.len()` bytes; fewer is a short write; Err(errno) fails the write.
    fn write(&mut self, data: &[u8]) -> Result<usize, i32>;
}

const FUSE_LOOKUP: u32 = 1;
const FUSE_FORGET: u32 = 2;
const FUSE_GETATTR: u32 = 3;
const FUSE_OPEN: u32 = 14;
const FUSE_READ: u32 = 15;
const FUSE_WRITE: u32 = 16;
const FUSE_RELEASE: u32 = 18;
const FUSE_FSYNC: u32 = 20;
const FUSE_FLUSH: u32 = 25;
const FUSE_INIT: u32 = 26;
const FUSE_INTERRUPT: u32 = 36;
const FUSE_DESTROY: u32 = 38;
const FUSE_BATCH_FORGET: u32 = 42;

const FUSE_KERNEL_VERSION: u32 = 7;
const FUSE_KERNEL_MINOR: u32 = 31;
const FUSE_BIG_WRITES: u32 = 1 << 5;
const FUSE_MAX_PAGES: u32 = 1 << 22;
const FOPEN_DIRECT_IO: u32 = 1 << 0;
const FOPEN_NONSEEKABLE: u32 = 1 << 2;
const FOPEN_STREAM: u32 = 1 << 4;

const IN_HEADER: usize = 40;
const OUT_HEADER: usize = 16;
const MAX_IO: usize = 1 << 20;
/// Room for a 1 MiB write request with its headers (the kernel checks the reader's size).
const DEV_BUF: usize = MAX_IO + 8192;

static MOUNTS: AtomicU64 = AtomicU64::new(0);

fn le_u32(b: &[u8], at: usize) -> u32 {
    b.get(at..at + 4)
        .and_then(|s| s.try_into().ok())
        .map_or(0, u32::from_le_bytes)
}

fn le_u64(b: &[u8], at: usize) -> u64 {
    b.get(at..at + 8)
        .and_then(|s| s.try_into().ok())
        .map_or(0, u64::from_le_bytes)
}

/// One mounted FUSE file and its server thread.
pub(crate) struct FuseMount {
    path: PathBuf,
    cpath: CString,
    stop: Option<OwnedFd>,
    thread: Option<JoinHandle<()>>,
}

impl FuseMount {
    /// Mounts a file served by `handler` at a fresh path in the temp dir.
    pub(crate) fn mount(name: &str, handler: Arc<Mutex<dyn FuseHandler>>) -> io::Result<FuseMount> {
        let dev = OwnedFd::from(
            OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_NONBLOCK)
                .open("/dev/fuse")?,
        );
        let n = MOUNTS.fetch_add(1, Ordering::Relaxed);
        let path =
            std::env::temp_dir().join(format!("vfio-multifd-fault-{}-{n}", std::process::id()));
        OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&path)?;
        let cpath = CString::new(path.as_os_str().as_encoded_bytes())
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        let (uid, gid) = os::euid_egid();
        let data = CString::new(format!(
            "fd={},rootmode=100000,user_id={uid},group_id={gid},max_read={MAX_IO}",
            dev.as_raw_fd()
        ))
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        if let Err(e) = os::mount(
            c"vfio-multifd-fault",
            &cpath,
            c"fuse",
            libc::MS_NOSUID | libc::MS_NODEV,
            &data,
        ) {
            let _ = std::fs::remove_file(&path);
            return Err(e);
        }
        let (stop_r, stop_w) = match os::pipe() {
            Ok(p) => p,
            Err(e) => {
                let _ = os::umount_detach(&cpath);
                let _ = std::fs::remove_file(&path);
                return Err(e);
            }
        };
        let thread = std::thread::Builder::new()
            .name(format!("sim-fuse-{name}"))
            .spawn(move || serve(dev, stop_r, handler));
        let thread = match thread {
            Ok(t) => t,
            Err(e) => {
                let _ = os::umount_detach(&cpath);
                let _ = std::fs::remove_file(&path);
                return Err(e);
            }
        };
        Ok(FuseMount {
            path,
            cpath,
            stop: Some(stop_w),
            thread: Some(thread),
        })
    }

    /// Opens the file read-only (saving) or write-only (resuming).
    pub(crate) fn open(&self, write: bool) -> io::Result<OwnedFd> {
        let file = OpenOptions::new()
            .read(!write)
            .write(write)
            .open(&self.path)?;
        // The mount's root starts with size 0 and FUSE cuts async (io_uring) direct reads to
        // i_size: a stat fetches the size GETATTR reports.
        file.metadata()?;
        Ok(OwnedFd::from(file))
    }
}

impl Drop for FuseMount {
    fn drop(&mut self) {
        if let Err(e) = os::umount_detach(&self.cpath) {
            log::warn!("unmounting fault device {}: {e}", self.path.display());
        }
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                log::warn!("a FUSE fault server thread panicked");
            }
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

fn reply(dev: &OwnedFd, unique: u64, error: i32, payload: &[u8]) {
    let len = OUT_HEADER + payload.len();
    let mut msg = Vec::with_capacity(len);
    msg.extend_from_slice(&u32::try_from(len).unwrap_or(0).to_le_bytes());
    msg.extend_from_slice(&(-error).to_le_bytes());
    msg.extend_from_slice(&unique.to_le_bytes());
    msg.extend_from_slice(payload);
    if let Err(e) = os::write(dev.as_fd(), &msg) {
        // ENOENT: the request was interrupted and is gone.
        if e.raw_os_error() != Some(libc::ENOENT) {
            log::debug!("FUSE reply failed: {e}");
        }
    }
}

fn init_out(body: &[u8]) -> Vec<u8> {
    let max_readahead = le_u32(body, 8);
    let flags = le_u32(body, 12) & (FUSE_BIG_WRITES | FUSE_MAX_PAGES);
    let mut out = vec![0u8; 64];
    out[0..4].copy_from_slice(&FUSE_KERNEL_VERSION.to_le_bytes());
    out[4..8].copy_from_slice(&FUSE_KERNEL_MINOR.to_le_bytes());
    out[8..12].copy_from_slice(&max_readahead.to_le_bytes());
    out[12..16].copy_from_slice(&flags.to_le_bytes());
    out[16..18].copy_from_slice(&16u16.to_le_bytes()); // max_background
    out[18..20].copy_from_slice(&12u16.to_le_bytes()); // congestion_threshold
    out[20..24].copy_from_slice(&u32::try_from(MAX_IO).unwrap_or(0).to_le_bytes()); // max_write
    out[24..28].copy_from_slice(&1u32.to_le_bytes()); // time_gran
    out[28..30].copy_from_slice(&256u16.to_le_bytes()); // max_pages
    out
}

fn attr_out() -> Vec<u8> {
    let (uid, gid) = os::euid_egid();
    let mut out = vec![0u8; 16 + 88];
    let attr = &mut out[16..];
    attr[0..8].copy_from_slice(&1u64.to_le_bytes()); // ino
                                                     // A data_fd has no size, but FUSE cuts an async (io_uring) direct read to i_size: report
                                                     // the largest stream a simulated device may have.
    attr[8..16].copy_from_slice(&(1u64 << 40).to_le_bytes()); // size
    attr[60..64].copy_from_slice(&(libc::S_IFREG | 0o600).to_le_bytes()); // mode
    attr[64..68].copy_from_slice(&1u32.to_le_bytes()); // nlink
    attr[68..72].copy_from_slice(&uid.to_le_bytes());
    attr[72..76].copy_from_slice(&gid.to_le_bytes());
    attr[80..84].copy_from_slice(&4096u32.to_le_bytes()); // blksize
    out
}

fn open_out() -> Vec<u8> {
    let mut out = vec![0u8; 16];
    out[0..8].copy_from_slice(&1u64.to_le_bytes()); // fh
    out[8..12].copy_from_slice(&(FOPEN_DIRECT_IO | FOPEN_NONSEEKABLE | FOPEN_STREAM).to_le_bytes());
    out
}

fn serve(dev: OwnedFd, stop: OwnedFd, handler: Arc<Mutex<dyn FuseHandler>>) {
    let mut buf = vec![0u8; DEV_BUF];
    let mut data = vec![0u8; MAX_IO];
    loop {
        match os::poll(
            &[(dev.as_fd(), libc::POLLIN), (stop.as_fd(), libc::POLLIN)],
            -1,
        ) {
            Ok(ready) if ready.get(1).copied().unwrap_or(true) => return,
            Ok(_) => {}
            Err(e) => {
                log::debug!("FUSE server poll failed: {e}");
                return;
            }
        }
        let n = match os::read(dev.as_fd(), &mut buf) {
            Ok(n) => n,
            Err(e) => match e.raw_os_error() {
                Some(libc::EAGAIN) | Some(libc::EINTR) | Some(libc::ENOENT) => continue,
                _ => return, // ENODEV: unmounted and aborted
            },
        };
        let msg = &buf[..n];
        if msg.len() < IN_HEADER {
            continue;
        }
        let opcode = le_u32(msg, 4);
        let unique = le_u64(msg, 8);
        let body = &msg[IN_HEADER..];
        let lock = || handler.lock().unwrap_or_else(|p| p.into_inner());
        match opcode {
            FUSE_INIT => reply(&dev, unique, 0, &init_out(body)),
            FUSE_GETATTR => reply(&dev, unique, 0, &attr_out()),
            FUSE_OPEN => reply(&dev, unique, 0, &open_out()),
            FUSE_READ => {
                let size = usize::try_from(le_u32(body, 16)).unwrap_or(0).min(MAX_IO);
                let result = lock().read(&mut data[..size]);
                match result {
                    Ok(got) => reply(&dev, unique, 0, &data[..got.min(size)]),
                    Err(errno) => reply(&dev, unique, errno, &[]),
                }
            }
            FUSE_WRITE => {
                let size = usize::try_from(le_u32(body, 16)).unwrap_or(0);
                let payload = body.get(40..40 + size).unwrap_or_default();
                let result = lock().write(payload);
                match result {
                    Ok(took) => {
                        let mut out = [0u8; 8];
                        out[0..4].copy_from_slice(
                            &u32::try_from(took.min(size)).unwrap_or(0).to_le_bytes(),
                        );
                        reply(&dev, unique, 0, &out);
                    }
                    Err(errno) => reply(&dev, unique, errno, &[]),
                }
            }
            FUSE_FLUSH | FUSE_RELEASE | FUSE_FSYNC => reply(&dev, unique, 0, &[]),
            FUSE_FORGET | FUSE_BATCH_FORGET | FUSE_INTERRUPT => {}
            FUSE_DESTROY => {
                reply(&dev, unique, 0, &[]);
                return;
            }
            FUSE_LOOKUP => reply(&dev, unique, libc::ENOENT, &[]),
            _ => reply(&dev, unique, libc::ENOSYS, &[]),
        }
    }
}

/// Mounts a tiny FUSE file, reads it, unmounts: whether fault devices work here.
pub(crate) fn probe_fuse() -> Result<(), (&'static str, io::Error)> {
    struct Probe;
    impl FuseHandler for Probe {
        fn read(&mut self, buf: &mut [u8]) -> Result<usize, i32> {
            Err(if buf.is_empty() {
                libc::EIO
            } else {
                libc::EPROTO
            })
        }
        fn write(&mut self, _data: &[u8]) -> Result<usize, i32> {
            Err(libc::EBADF)
        }
    }
    let mount = FuseMount::mount("probe", Arc::new(Mutex::new(Probe)))
        .map_err(|e| ("mounting a FUSE file", e))?;
    let fd = mount
        .open(false)
        .map_err(|e| ("opening the FUSE file", e))?;
    let mut b = [0u8; 16];
    match os::read(fd.as_fd(), &mut b) {
        Err(e) if e.raw_os_error() == Some(libc::EPROTO) => Ok(()),
        Err(e) => Err(("reading the FUSE file", e)),
        Ok(_) => Err((
            "reading the FUSE file",
            io::Error::from_raw_os_error(libc::EPROTO),
        )),
    }
}
