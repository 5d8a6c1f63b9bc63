//! Ending another thread's blocking read or write of a device fd.
//!
//! A socket's blocked call ends when the socket is shut down; a data_fd's does not: a driver
//! stuck in STOP_COPY or RESUMING, or a pipe nobody drains, keeps its reader or writer in the
//! kernel for good. A signal with a handler installed without `SA_RESTART` makes that call
//! return EINTR (wherever the wait is interruptible, as pipe waits and a driver's
//! `wait_event_interruptible` are), and the caller then sees its run has failed and stops.
//!
//! The signal is SIGURG: its default action is to ignore it, so a no-op handler changes nothing
//! else, and this process asks no socket for urgent-data signals (`F_SETOWN`).

use std::io;
use std::sync::OnceLock;

const SIGNAL: libc::c_int = libc::SIGURG;

extern "C" fn ignore(_: libc::c_int) {}

/// Installs the handler once per process; later calls return the first outcome.
fn install() -> io::Result<()> {
    static INSTALLED: OnceLock<Result<(), i32>> = OnceLock::new();
    let outcome = INSTALLED.get_or_init(|| {
        // SAFETY: a zeroed sigaction is valid (no flags, empty mask) before the fields below
        // are set; the handler is an `extern "C" fn(c_int)` that touches nothing, so it is
        // async-signal-safe; the old action is not asked for (null).
        let ret = unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = ignore as extern "C" fn(libc::c_int) as libc::sighandler_t;
            libc::sigemptyset(&mut action.sa_mask);
            // No SA_RESTART: the point is that the blocked call returns EINTR.
            action.sa_flags = 0;
            libc::sigaction(SIGNAL, &action, std::ptr::null_mut())
        };
        if ret == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EINVAL))
        }
    });
    outcome.map_err(io::Error::from_raw_os_error)
}

/// A thread of this process that another may interrupt: named by its kernel thread id, so an
/// interrupt sent after it exited is refused by the kernel (ESRCH) instead of reaching freed
/// thread state, as a `pthread_t` could.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IoThread {
    tid: libc::pid_t,
}

impl IoThread {
    /// The calling thread. Installs the process's handler first: an error means interrupts
    /// could not end blocking calls, and none is promised.
    pub fn current() -> io::Result<IoThread> {
        install()?;
        // SAFETY: gettid has no arguments and cannot fail.
        let tid = unsafe { libc::gettid() };
        Ok(IoThread { tid })
    }

    /// Makes the blocking device call the thread is in (if any, at this moment) return EINTR;
    /// a thread between calls runs the no-op handler and goes on, so a caller that wants the
    /// thread out repeats this until it has left. Returns false if the thread is gone.
    pub fn interrupt(&self) -> bool {
        // SAFETY: tgkill takes plain integers and touches no memory of ours; it signals only a
        // thread of this process (this thread group): one that exited is refused with ESRCH,
        // and a later thread given the same id takes a no-op handler and an EINTR, which
        // every blocking call here already retries or reports.
        let ret = unsafe { libc::syscall(libc::SYS_tgkill, libc::getpid(), self.tid, SIGNAL) };
        ret == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::sync::mpsc;
    use std::time::{Duration, Instant};

    #[test]
    fn an_interrupt_ends_a_read_of_a_pipe_nobody_writes() {
        let (read, _write_kept_open) = crate::fd::pipe().expect("pipe");
        let (tx, rx) = mpsc::channel();
        let reader = std::thread::spawn(move || {
            tx.send(IoThread::current().expect("the handler"))
                .expect("sending the thread id");
            let mut read = std::fs::File::from(read);
            read.read(&mut [0u8; 16]).map_err(|e| e.kind())
        });
        let thread = rx.recv().expect("the reader's id");
        let deadline = Instant::now() + Duration::from_secs(5);
        while !reader.is_finished() {
            assert!(Instant::now() < deadline, "the read was not interrupted");
            assert!(thread.interrupt(), "the reader is alive");
            std::thread::sleep(Duration::from_millis(10));
        }
        let result = reader.join().expect("the reader");
        assert_eq!(result, Err(io::ErrorKind::Interrupted));
        assert!(!thread.interrupt(), "an exited thread is not signalled");
    }
}
