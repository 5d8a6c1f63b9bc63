//! JSON lines with file descriptors on a unix stream socket.
//!
//! A VMM sends each command line and the fds it names in one `sendmsg`. The kernel delivers a
//! batch of SCM_RIGHTS fds with a `recvmsg` that ends inside the bytes of the `sendmsg` that
//! carried them (it never reads past a message that carries fds, but may glue earlier plain
//! bytes before it), so a batch belongs to the line holding the last byte of the `recvmsg` it
//! came with. Each line is handed out with exactly its own fds, and with the number of the
//! `recvmsg` they came in, so that the control thread can refuse fds whose message also held
//! an earlier line that wanted them. The fds of a line that is too long, or of bytes that never
//! end in a newline, are closed with it; a line keeps at most [`MAX_FDS`], the rest close at
//! once and the line is marked.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

/// Longest line accepted (a config blob of a few KiB in base64 fits many times).
pub const MAX_LINE: usize = 1 << 20;
/// Most fds one message may carry (the kernel's SCM_MAX_FD).
pub const MAX_FDS: usize = 253;
/// Bytes read per `recvmsg`.
const READ_SIZE: usize = 64 << 10;

/// One line from the peer.
#[derive(Debug)]
pub enum Line {
    /// A complete line.
    Text(Received),
    /// A line longer than [`MAX_LINE`]: its bytes (and fds) were dropped.
    TooLong,
}

/// A complete line and what came with it.
#[derive(Debug)]
pub struct Received {
    /// Without its newline.
    pub text: Vec<u8>,
    pub fds: Vec<OwnedFd>,
    /// The `recvmsg` (counted from 0) that brought `fds`, if any came.
    pub fds_read: Option<u64>,
    /// The `recvmsg` that brought the newline.
    pub end_read: u64,
    /// Fds sent with this line were closed on arrival: more than [`MAX_FDS`], or the kernel
    /// could not install them all.
    pub fds_dropped: bool,
}

#[derive(Debug)]
struct Batch {
    /// Stream offset of the last byte of the recvmsg it came with.
    at: u64,
    read: u64,
    fds: Vec<OwnedFd>,
    dropped: bool,
}

/// Splits the byte stream into lines and keeps each batch of fds with its line.
#[derive(Debug, Default)]
pub struct LineReader {
    buf: Vec<u8>,
    /// Stream offset of `buf[0]`.
    base: u64,
    batches: Vec<Batch>,
    /// recvmsg calls so far.
    reads: u64,
    /// Dropping the rest of an overlong line, up to its newline.
    skipping: bool,
    ready: std::collections::VecDeque<Line>,
}

impl LineReader {
    pub fn new() -> Self {
        Self::default()
    }

    /// Reads once from `sock` (blocking). Returns false at EOF.
    pub fn fill(&mut self, sock: BorrowedFd<'_>) -> io::Result<bool> {
        let mut chunk = vec![0u8; READ_SIZE];
        let got = vfio::fd::recv_with_fds(sock, &mut chunk, MAX_FDS)?;
        if got.len == 0 {
            return Ok(false);
        }
        self.push(&chunk[..got.len], got.fds, got.fds_dropped);
        Ok(true)
    }

    /// Takes one `recvmsg`'s bytes and fds (`dropped`: the kernel dropped some of them).
    pub fn push(&mut self, bytes: &[u8], mut fds: Vec<OwnedFd>, mut dropped: bool) {
        let read = self.reads;
        self.reads += 1;
        let end = self.base + self.buf.len() as u64 + bytes.len() as u64;
        // Every batch still here belongs to the line not yet ended.
        let pending: usize = self.batches.iter().map(|b| b.fds.len()).sum();
        if pending + fds.len() > MAX_FDS {
            fds.clear();
            dropped = true;
        }
        if (!fds.is_empty() || dropped) && !bytes.is_empty() {
            self.batches.push(Batch {
                at: end - 1,
                read,
                fds,
                dropped,
            });
        }
        self.buf.extend_from_slice(bytes);
        self.split(read);
    }

    fn split(&mut self, read: u64) {
        while let Some(pos) = self.buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.buf.drain(..=pos).collect();
            let start = self.base;
            let newline = start + pos as u64;
            self.base += line.len() as u64;
            let (fds, fds_read, fds_dropped) = self.take_fds(start, newline);
            if std::mem::take(&mut self.skipping) {
                // The end of an overlong line: its fds close here.
                continue;
            }
            let mut text = line;
            text.pop();
            if text.len() > MAX_LINE {
                self.ready.push_back(Line::TooLong);
                continue;
            }
            self.ready.push_back(Line::Text(Received {
                text,
                fds,
                fds_read,
                end_read: read,
                fds_dropped,
            }));
        }
        if self.buf.len() > MAX_LINE {
            if !self.skipping {
                self.ready.push_back(Line::TooLong);
            }
            self.skipping = true;
            self.base += self.buf.len() as u64;
            self.buf.clear();
            let upto = self.base;
            self.batches.retain(|b| b.at >= upto);
        }
    }

    /// The fds of batches that arrived within `[start, end]` (with the first one's recvmsg and
    /// whether any were dropped); older strays close.
    fn take_fds(&mut self, start: u64, end: u64) -> (Vec<OwnedFd>, Option<u64>, bool) {
        let mut taken = Vec::new();
        let mut read = None;
        let mut dropped = false;
        let mut keep = Vec::new();
        for batch in self.batches.drain(..) {
            if batch.at > end {
                keep.push(batch);
            } else if batch.at >= start {
                read = read.or(Some(batch.read));
                dropped |= batch.dropped;
                taken.extend(batch.fds);
            }
        }
        self.batches = keep;
        (taken, read, dropped)
    }

    /// The next complete line, if any.
    pub fn next_line(&mut self) -> Option<Line> {
        self.ready.pop_front()
    }

    /// Whether complete lines wait to be taken.
    pub fn has_ready(&self) -> bool {
        !self.ready.is_empty()
    }
}

/// Writes one line (`text` + newline) on a socket, in full.
pub fn write_line(sock: &impl AsFd, text: &str) -> io::Result<()> {
    let mut line = Vec::with_capacity(text.len() + 1);
    line.extend_from_slice(text.as_bytes());
    line.push(b'\n');
    let mut done = 0;
    while done < line.len() {
        match nix::sys::socket::send(
            std::os::fd::AsRawFd::as_raw_fd(&sock.as_fd()),
            &line[done..],
            nix::sys::socket::MsgFlags::MSG_NOSIGNAL,
        ) {
            Ok(0) => return Err(io::Error::from(io::ErrorKind::WriteZero)),
            Ok(n) => done += n,
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(io::Error::from(e)),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    fn fds(n: usize) -> Vec<OwnedFd> {
        (0..n).map(|_| vfio::fd::pipe().unwrap().0).collect()
    }

    fn text(line: Line) -> (String, usize) {
        match line {
            Line::Text(r) => (String::from_utf8(r.text).unwrap(), r.fds.len()),
            Line::TooLong => ("<too long>".into(), 0),
        }
    }

    fn received(line: Option<Line>) -> Received {
        match line {
            Some(Line::Text(r)) => r,
            other => panic!("expected a line, got {other:?}"),
        }
    }

    #[test]
    fn fds_stay_with_the_line_that_carried_them() {
        let mut r = LineReader::new();
        // The tail of an earlier line arrives with the next line's fds (the kernel glued a
        // plain segment to the one carrying fds).
        r.push(b"{\"a\"", Vec::new(), false);
        r.push(b"}\n{\"b\":1}\n", fds(2), false);
        assert_eq!(text(r.next_line().unwrap()), ("{\"a\"}".into(), 0));
        assert_eq!(text(r.next_line().unwrap()), ("{\"b\":1}".into(), 2));
        assert!(r.next_line().is_none());
        // A message cut short by the buffer: its fds came with its first part.
        r.push(b"{\"c\":", fds(1), false);
        assert!(r.next_line().is_none());
        r.push(b"2}\n", Vec::new(), false);
        assert_eq!(text(r.next_line().unwrap()), ("{\"c\":2}".into(), 1));
    }

    #[test]
    fn each_line_says_which_recvmsg_brought_its_fds_and_its_newline() {
        let mut r = LineReader::new();
        r.push(b"{\"x\":0}\n", Vec::new(), false);
        r.push(b"{\"a\":1}\n{\"b\":2}\n", fds(1), false);
        let x = received(r.next_line());
        assert_eq!((x.fds_read, x.end_read), (None, 0));
        let a = received(r.next_line());
        assert_eq!((a.fds.len(), a.fds_read, a.end_read), (0, None, 1));
        let b = received(r.next_line());
        assert_eq!((b.fds.len(), b.fds_read, b.end_read), (1, Some(1), 1));
    }

    #[test]
    fn a_line_keeps_at_most_max_fds_and_is_marked_when_more_came() {
        let mut r = LineReader::new();
        r.push(b" ", fds(MAX_FDS - 3), false);
        r.push(b" ", fds(4), false);
        r.push(b" ", fds(2), false);
        r.push(b"{}\n{}\n", Vec::new(), false);
        let first = received(r.next_line());
        assert_eq!((first.fds.len(), first.fds_dropped), (MAX_FDS - 1, true));
        let second = received(r.next_line());
        assert_eq!((second.fds.len(), second.fds_dropped), (0, false));
        // Fds the kernel dropped mark the line too.
        r.push(b"{}\n", Vec::new(), true);
        assert!(received(r.next_line()).fds_dropped);
    }

    #[test]
    fn an_overlong_line_is_reported_once_and_skipped_with_its_fds() {
        let mut r = LineReader::new();
        let big = vec![b'x'; MAX_LINE + 10];
        r.push(&big, fds(3), false);
        assert!(matches!(r.next_line(), Some(Line::TooLong)));
        r.push(b"xxx\n{\"ok\":1}\n", Vec::new(), false);
        assert_eq!(text(r.next_line().unwrap()), ("{\"ok\":1}".into(), 0));
        assert!(r.next_line().is_none());
    }

    #[test]
    fn reads_and_writes_over_a_socketpair() {
        let (a, b) = vfio::fd::socketpair().unwrap();
        let (r, _w) = vfio::fd::pipe().unwrap();
        vfio::fd::send_with_fds(a.as_fd(), b"{\"x\":1}\n", &[r.as_fd()]).unwrap();
        write_line(&a, "{\"y\":2}").unwrap();
        let mut reader = LineReader::new();
        let mut lines = Vec::new();
        while lines.len() < 2 {
            assert!(reader.fill(b.as_fd()).unwrap());
            while let Some(line) = reader.next_line() {
                lines.push(text(line));
            }
        }
        assert_eq!(
            lines,
            vec![("{\"x\":1}".into(), 1), ("{\"y\":2}".into(), 0)]
        );
        drop(a);
        assert!(!reader.fill(b.as_fd()).unwrap());
    }
}
