//! JSON lines with file descriptors on a unix stream socket.
//!
//! A VMM sends each command line and the fds it names in one `sendmsg`. The kernel delivers a
//! batch of SCM_RIGHTS fds with a `recvmsg` that ends inside the bytes of the `sendmsg` that
//! carried them (it never reads past a message that carries fds), so a batch belongs to the line
//! holding the last byte of the `recvmsg` it came with. Each line is handed out with exactly its
//! own fds; the fds of a line that is too long, or of bytes that never end in a newline, are
//! closed with it.

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
    /// A complete line (without its newline) and the fds that came with it.
    Text(Vec<u8>, Vec<OwnedFd>),
    /// A line longer than [`MAX_LINE`]: its bytes (and fds) were dropped.
    TooLong,
}

/// Splits the byte stream into lines and keeps each batch of fds with its line.
#[derive(Debug, Default)]
pub struct LineReader {
    buf: Vec<u8>,
    /// Stream offset of `buf[0]`.
    base: u64,
    /// (stream offset of the last byte of the recvmsg they came with, fds).
    batches: Vec<(u64, Vec<OwnedFd>)>,
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
        let (n, fds) = vfio::fd::recv_with_fds(sock, &mut chunk, MAX_FDS)?;
        if n == 0 {
            return Ok(false);
        }
        self.push(&chunk[..n], fds);
        Ok(true)
    }

    /// Takes one `recvmsg`'s bytes and fds.
    pub fn push(&mut self, bytes: &[u8], fds: Vec<OwnedFd>) {
        let end = self.base + self.buf.len() as u64 + bytes.len() as u64;
        if !fds.is_empty() && !bytes.is_empty() {
            self.batches.push((end - 1, fds));
        }
        self.buf.extend_from_slice(bytes);
        self.split();
    }

    fn split(&mut self) {
        while let Some(pos) = self.buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.buf.drain(..=pos).collect();
            let start = self.base;
            let newline = start + pos as u64;
            self.base += line.len() as u64;
            let fds = self.take_fds(start, newline);
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
            self.ready.push_back(Line::Text(text, fds));
        }
        if self.buf.len() > MAX_LINE {
            if !self.skipping {
                self.ready.push_back(Line::TooLong);
            }
            self.skipping = true;
            self.base += self.buf.len() as u64;
            self.buf.clear();
            let upto = self.base;
            self.batches.retain(|(at, _)| *at >= upto);
        }
    }

    /// The fds of batches that arrived within `[start, end]`; older strays close.
    fn take_fds(&mut self, start: u64, end: u64) -> Vec<OwnedFd> {
        let mut taken = Vec::new();
        let mut keep = Vec::new();
        for (at, fds) in self.batches.drain(..) {
            if at > end {
                keep.push((at, fds));
            } else if at >= start {
                taken.extend(fds);
            }
        }
        self.batches = keep;
        taken
    }

    /// The next complete line, if any.
    pub fn next_line(&mut self) -> Option<Line> {
        self.ready.pop_front()
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
            Line::Text(t, f) => (String::from_utf8(t).unwrap(), f.len()),
            Line::TooLong => ("<too long>".into(), 0),
        }
    }

    #[test]
    fn fds_stay_with_the_line_that_carried_them() {
        let mut r = LineReader::new();
        // The tail of an earlier line arrives with the next line's fds (the kernel glued a
        // plain segment to the one carrying fds).
        r.push(b"{\"a\"", Vec::new());
        r.push(b"}\n{\"b\":1}\n", fds(2));
        assert_eq!(text(r.next_line().unwrap()), ("{\"a\"}".into(), 0));
        assert_eq!(text(r.next_line().unwrap()), ("{\"b\":1}".into(), 2));
        assert!(r.next_line().is_none());
        // A message cut short by the buffer: its fds came with its first part.
        r.push(b"{\"c\":", fds(1));
        assert!(r.next_line().is_none());
        r.push(b"2}\n", Vec::new());
        assert_eq!(text(r.next_line().unwrap()), ("{\"c\":2}".into(), 1));
    }

    #[test]
    fn an_overlong_line_is_reported_once_and_skipped_with_its_fds() {
        let mut r = LineReader::new();
        let big = vec![b'x'; MAX_LINE + 10];
        r.push(&big, fds(3));
        assert!(matches!(r.next_line(), Some(Line::TooLong)));
        r.push(b"xxx\n{\"ok\":1}\n", Vec::new());
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
