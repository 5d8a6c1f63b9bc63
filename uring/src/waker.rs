//! The waker other threads use to interrupt a ring's wait.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;

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
        // SAFETY: writes 8 bytes from a live local to an eventfd owned by `self`. The eventfd
        // is blocking: a write would block (not fail) only if the counter would pass
        // 2^64 - 2, i.e. after that many wakes with none read, and the ring keeps a read armed
        // that resets it. The result is ignored: no other failure is expected for an eventfd.
        unsafe { libc::write(self.raw_fd(), (&one as *const u64).cast(), 8) };
    }
}
