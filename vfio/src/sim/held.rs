//! Where a paced sink keeps the stream it consumed until RESUMING -> STOP checks it: pipes that
//! take the bytes by page reference.
//!
//! A real device loads on its own silicon. Splicing a paced sink's pipe into a memfd image is
//! a kernel copy of every byte on the cores the data plane runs on, inside the downtime: in a
//! `seed` profile (2026-12-07 23:0x, `perf record -a` over `--rows uring --repeats 3`) the
//! sinks' drain threads took 26 % of what the threads running in the switchover took: that
//! copy, and freeing the pipe's pages. Splicing from one pipe into another moves page
//! references and copies nothing, so the drain costs the data plane's cores almost nothing;
//! the pages are read and checked (and freed) at RESUMING -> STOP, as the image is.
//!
//! A pipe holds at most `/proc/sys/fs/pipe-max-size` (1 MiB by default) without
//! CAP_SYS_RESOURCE, so a device takes one pipe, one fd, per MiB. The pipes of every sink in
//! the process together stay under a quarter of RLIMIT_NOFILE; a device that would pass it,
//! or whose pipes the kernel refuses at full size (an unprivileged user past
//! `pipe-user-pages-soft`), keeps the memfd image instead.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicUsize, Ordering};

use super::{first_bad_in_parallel, first_mismatch, SimSpec, Verifier};
use crate::os;

/// What each held pipe is sized to.
const HELD_PIPE_BYTES: usize = 1 << 20;

/// Held pipes open in this process, over every sink.
static HELD_PIPES: AtomicUsize = AtomicUsize::new(0);

/// Held by the tests that need the budget to themselves.
#[cfg(test)]
pub(crate) static BUDGET_TESTS: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// The stream so far, in pipes, in order.
pub(crate) struct HeldPipes {
    /// Read ends and the bytes each holds; the last one is still being filled.
    held: Vec<(OwnedFd, u64)>,
    /// The write end of the last held pipe, until it is full.
    filling: Option<OwnedFd>,
    /// Pipes counted in [`HELD_PIPES`] for this device.
    budget: usize,
}

impl HeldPipes {
    /// Room for `size` bytes, or None when this device keeps an image instead (see the module
    /// doc). One pipe is made now, so a refusal shows before the device loads.
    pub(crate) fn reserve(size: u64) -> Option<HeldPipes> {
        // A splice that takes part of a page takes a slot of its own: at the slowest pace
        // (4 KiB pieces) a pipe may hold half its size.
        let budget = usize::try_from(size.div_ceil(HELD_PIPE_BYTES as u64 / 2)).ok()? + 1;
        let limit = os::open_file_limit().ok()? / 4;
        let taken = HELD_PIPES.fetch_add(budget, Ordering::Relaxed);
        // Built before the check, so that every way out gives the budget back (Drop).
        let mut pipes = HeldPipes {
            held: Vec::new(),
            filling: None,
            budget,
        };
        if taken + budget > limit {
            return None;
        }
        pipes.next_pipe().ok()?;
        Some(pipes)
    }

    /// Moves up to `len` bytes out of the pipe `from` into the held pipes, without blocking:
    /// `WouldBlock` when `from` is empty, 0 when its writer has closed it.
    pub(crate) fn take_from(&mut self, from: BorrowedFd<'_>, len: usize) -> io::Result<usize> {
        // Asked before the splice, so that its WouldBlock can only mean a full held pipe: only
        // this thread takes bytes out of `from`. (Asked after, a write landing in between
        // would make an empty `from` look like a full pipe.)
        let buffered = os::fionread(from)?;
        loop {
            let Some(into) = self.filling.as_ref() else {
                self.next_pipe()?;
                continue;
            };
            match os::splice_between_pipes(from, into.as_fd(), len) {
                Ok(n) => {
                    if let Some((_, bytes)) = self.held.last_mut() {
                        *bytes += n as u64;
                    }
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && buffered > 0 => {
                    self.filling = None;
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn next_pipe(&mut self) -> io::Result<()> {
        if self.held.len() >= self.budget {
            return Err(io::Error::other(format!(
                "a simulated sink used all {} pipes it reserved to hold its stream",
                self.budget
            )));
        }
        let (r, w) = os::pipe()?;
        let got = os::set_pipe_size(w.as_fd(), HELD_PIPE_BYTES)?;
        if got < HELD_PIPE_BYTES {
            return Err(io::Error::other(format!(
                "a pipe to hold a simulated sink's stream got {got} bytes, not {HELD_PIPE_BYTES}"
            )));
        }
        self.held.push((r, 0));
        self.filling = Some(w);
        Ok(())
    }

    /// Reads every held byte back and checks it against the stream `spec` produces, split over
    /// up to 8 threads. `received` counts bytes past the device's size too, which were
    /// dropped, not held.
    pub(crate) fn verify(mut self, spec: &SimSpec, received: u64) -> io::Result<Verifier> {
        // With every write end closed, a pipe that holds less than its count reads 0, not a
        // hang.
        self.filling = None;
        let mut starts = Vec::with_capacity(self.held.len());
        let mut at = 0u64;
        for (fd, bytes) in &self.held {
            starts.push((fd.as_fd(), at, *bytes));
            at += bytes;
        }
        if at != received.min(spec.size) {
            return Err(io::Error::other(format!(
                "a simulated sink holds {at} bytes of the {received} it received"
            )));
        }
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get().clamp(1, 8));
        let per = starts.len().div_ceil(threads).max(1);
        let seed = spec.seed;
        let first_bad =
            first_bad_in_parallel(starts.chunks(per), |group| check_pipes(seed, group))?;
        Ok(Verifier::checked(spec, received, first_bad))
    }
}

impl Drop for HeldPipes {
    fn drop(&mut self) {
        HELD_PIPES.fetch_sub(self.budget, Ordering::Relaxed);
    }
}

/// The first bad offset in `pipes`, each `(read end, stream offset, bytes)`.
fn check_pipes(seed: u64, pipes: &[(BorrowedFd<'_>, u64, u64)]) -> io::Result<Option<u64>> {
    let mut buf = vec![0u8; HELD_PIPE_BYTES];
    for &(fd, start, bytes) in pipes {
        let mut done = 0u64;
        while done < bytes {
            let want = usize::try_from(bytes - done)
                .unwrap_or(buf.len())
                .min(buf.len());
            let n = os::read(fd, &mut buf[..want])?;
            if n == 0 {
                return Err(io::Error::from(io::ErrorKind::UnexpectedEof));
            }
            if let Some(bad) = first_mismatch(seed, start + done, &buf[..n]) {
                return Ok(Some(bad));
            }
            done += n as u64;
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::fill;
    use crate::StreamMismatch;

    /// Writes `stream` into a fresh non-blocking pipe from another thread while `pipes` takes
    /// it out in `piece`-byte splices; returns the bytes taken.
    fn pass_through(pipes: &mut HeldPipes, stream: Vec<u8>, piece: usize) -> io::Result<u64> {
        let (r, w) = os::pipe()?;
        os::set_pipe_size(w.as_fd(), 256 << 10)?;
        let flags = os::get_status_flags(r.as_fd())?;
        os::set_status_flags(r.as_fd(), flags | libc::O_NONBLOCK)?;
        let writer = std::thread::spawn(move || -> io::Result<()> {
            // Odd-sized writes, so pages arrive part-filled and merged.
            for part in stream.chunks(100_003) {
                let mut done = 0;
                while done < part.len() {
                    done += os::write(w.as_fd(), &part[done..])?;
                }
            }
            Ok(())
        });
        let mut taken = 0u64;
        loop {
            match pipes.take_from(r.as_fd(), piece) {
                Ok(0) => break,
                Ok(n) => taken += n as u64,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    std::thread::sleep(std::time::Duration::from_micros(200));
                }
                Err(e) => return Err(e),
            }
        }
        writer
            .join()
            .map_err(|_| io::Error::other("writer panicked"))??;
        Ok(taken)
    }

    #[test]
    fn held_pipes_keep_the_stream_in_order_and_name_its_first_bad_byte() -> io::Result<()> {
        let _alone = BUDGET_TESTS
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let spec = SimSpec::new(3 << 20, 5);
        let mut stream = vec![0u8; 3 << 20];
        fill(spec.seed, 0, &mut stream);
        for (bad, piece) in [(None, 300_001), (Some(2_500_000u64), 4096)] {
            let mut stream = stream.clone();
            if let Some(at) = bad {
                stream[at as usize] ^= 0x40;
            }
            let mut pipes = HeldPipes::reserve(spec.size)
                .ok_or_else(|| io::Error::other("no pipes to hold 3 MiB"))?;
            let taken = pass_through(&mut pipes, stream, piece)?;
            assert_eq!(taken, spec.size);
            assert!(
                pipes.held.len() >= 3,
                "3 MiB in 1 MiB pipes, got {}",
                pipes.held.len()
            );
            let verdict = pipes.verify(&spec, taken)?.verdict();
            match bad {
                None => assert_eq!(verdict, Ok(())),
                Some(offset) => assert_eq!(verdict, Err(StreamMismatch::Corrupt { offset })),
            }
        }
        Ok(())
    }

    /// A writer that is slower than the drain leaves `from` empty at most splices; a write
    /// that lands just after one must not read as a full held pipe. (Each such mistake
    /// used to cost a pipe of the reservation: under `strace -f`, which widens the window, 12
    /// of 12 paced demos failed with EPIPE once a 300 KB device's two pipes were used up.)
    #[test]
    fn an_empty_source_is_not_taken_for_a_full_pipe() -> io::Result<()> {
        let _alone = BUDGET_TESTS
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let spec = SimSpec::new(300_007, 6);
        let mut pipes = HeldPipes::reserve(spec.size)
            .ok_or_else(|| io::Error::other("no pipes to hold 300 KB"))?;
        let (r, w) = os::pipe()?;
        let flags = os::get_status_flags(r.as_fd())?;
        os::set_status_flags(r.as_fd(), flags | libc::O_NONBLOCK)?;
        let mut stream = vec![0u8; 300_007];
        fill(spec.seed, 0, &mut stream);
        let writer = std::thread::spawn(move || -> io::Result<()> {
            for part in stream.chunks(4099) {
                let mut done = 0;
                while done < part.len() {
                    done += os::write(w.as_fd(), &part[done..])?;
                }
                std::thread::sleep(std::time::Duration::from_micros(50));
            }
            Ok(())
        });
        let mut taken = 0u64;
        loop {
            match pipes.take_from(r.as_fd(), 33_000) {
                Ok(0) => break,
                Ok(n) => taken += n as u64,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::hint::spin_loop(),
                Err(e) => return Err(e),
            }
        }
        writer
            .join()
            .map_err(|_| io::Error::other("writer panicked"))??;
        assert_eq!(taken, spec.size);
        assert_eq!(pipes.held.len(), 1, "300 KB fits one 1 MiB pipe");
        assert_eq!(pipes.verify(&spec, taken)?.verdict(), Ok(()));
        Ok(())
    }

    #[test]
    fn a_device_past_the_fd_budget_keeps_an_image_instead() -> io::Result<()> {
        let _alone = BUDGET_TESTS
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let quarter = u64::try_from(os::open_file_limit()? / 4).map_err(io::Error::other)?;
        assert!(HeldPipes::reserve(quarter << 20).is_none(), "2 pipes a MiB");
        // Most of the budget, twice: the first reservation gives its share back when dropped.
        let most = (quarter - 4) * (HELD_PIPE_BYTES as u64 / 2);
        for round in 0..2 {
            let pipes = HeldPipes::reserve(most);
            assert!(pipes.is_some(), "round {round}: {most} bytes");
            assert!(
                HeldPipes::reserve(most).is_none(),
                "round {round}: twice at once"
            );
        }
        Ok(())
    }
}
