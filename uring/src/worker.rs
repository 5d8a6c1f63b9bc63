//! Worker threads: named, pinned to a core where the affinity mask allows, each owning one
//! ring; and the waker other threads use to interrupt a worker's wait.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::thread::JoinHandle;

/// Wakes a ring's waiter from another thread (an eventfd the ring keeps a read armed on).
#[derive(Debug, Clone)]
pub struct Waker(Arc<OwnedFd>);

impl Waker {
    pub(crate) fn new() -> io::Result<Self> {
        // SAFETY: eventfd has no pointer arguments; a non-negative result is a new fd we own.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned by eventfd and is owned by nobody else.
        Ok(Self(Arc::new(unsafe { OwnedFd::from_raw_fd(fd) })))
    }

    pub(crate) fn raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }

    /// Makes the ring's next (or current) wait return with a `Wake` completion.
    pub fn wake(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live local to an eventfd owned by `self`. An eventfd
        // write fails only when the counter would overflow, and then a wake is pending anyway.
        unsafe { libc::write(self.raw_fd(), (&one as *const u64).cast(), 8) };
    }
}

/// The CPUs this process may run on.
pub fn allowed_cpus() -> Vec<usize> {
    // SAFETY: cpu_set_t is plain data; zeroed is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a live cpu_set_t of the size passed.
    let rc =
        unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
    if rc != 0 {
        return vec![0];
    }
    (0..libc::CPU_SETSIZE as usize)
        // SAFETY: cpu < CPU_SETSIZE, within the set.
        .filter(|&cpu| unsafe { libc::CPU_ISSET(cpu, &set) })
        .collect()
}

/// Pins the calling thread to `cpu`; false (and nothing changed) where the mask forbids it.
pub fn pin_current_thread(cpu: usize) -> bool {
    if cpu >= libc::CPU_SETSIZE as usize {
        return false;
    }
    // SAFETY: cpu_set_t is plain data; zeroed is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: cpu < CPU_SETSIZE, within the set.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: `set` is a live cpu_set_t of the size passed; 0 = the calling thread.
    unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) == 0 }
}

/// Spawns worker `index` as thread `uring-<index>`, pinned to the index-th allowed CPU (round
/// robin) when `pin` is set. The ring must be created inside `body`: a SINGLE_ISSUER ring
/// belongs to the thread that made it.
pub fn spawn_worker<T: Send + 'static>(
    index: usize,
    pin: bool,
    body: impl FnOnce() -> T + Send + 'static,
) -> io::Result<JoinHandle<T>> {
    let cpus = allowed_cpus();
    let cpu = cpus[index % cpus.len().max(1)];
    std::thread::Builder::new()
        .name(format!("uring-{index}"))
        .spawn(move || {
            if pin && !pin_current_thread(cpu) {
                log::debug!("uring-{index}: could not pin to cpu {cpu}");
            }
            body()
        })
}
