//! A connected stream socket of either family the helpers use: TCP (`send`/`recv`/`demo`,
//! and `connect`/`listen` addresses of the control protocol) or AF_UNIX (sockets a VMM passes
//! over SCM_RIGHTS, e.g. the two ends of a `socketpair`). The sessions only read, write, peek,
//! set timeouts, duplicate and shut down; engines get the raw [`OwnedFd`].

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use nix::sys::socket::{getsockname, AddressFamily, SockaddrLike, SockaddrStorage};

/// A connected stream socket.
#[derive(Debug)]
pub enum Conn {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Conn {
    /// Takes a connected stream socket handed over as an fd: checked (a socket, SOCK_STREAM,
    /// not listening), then typed by its address family (AF_INET/AF_INET6 or AF_UNIX).
    pub fn from_fd(fd: OwnedFd) -> io::Result<Conn> {
        vfio::fd::check_stream_socket(fd.as_fd())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, vfio_text(&e)))?;
        let local: SockaddrStorage =
            getsockname(std::os::fd::AsRawFd::as_raw_fd(&fd)).map_err(io::Error::from)?;
        match local.family() {
            Some(AddressFamily::Inet) | Some(AddressFamily::Inet6) => {
                Ok(Conn::Tcp(TcpStream::from(fd)))
            }
            Some(AddressFamily::Unix) => Ok(Conn::Unix(UnixStream::from(fd))),
            other => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("a stream socket of family {other:?}; expected TCP or AF_UNIX"),
            )),
        }
    }

    /// The peer, for messages: `tcp 127.0.0.1:4444` or `unix socket (fd passed)`.
    pub fn peer(&self) -> String {
        match self {
            Conn::Tcp(s) => s.peer_addr().map_or_else(
                |_| "tcp peer (address unknown)".into(),
                |a| format!("tcp {a}"),
            ),
            Conn::Unix(_) => "unix socket peer".into(),
        }
    }

    pub fn try_clone(&self) -> io::Result<Conn> {
        Ok(match self {
            Conn::Tcp(s) => Conn::Tcp(s.try_clone()?),
            Conn::Unix(s) => Conn::Unix(s.try_clone()?),
        })
    }

    pub fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        match self {
            Conn::Tcp(s) => s.shutdown(how),
            Conn::Unix(s) => s.shutdown(how),
        }
    }

    pub fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        match self {
            Conn::Tcp(s) => s.set_read_timeout(timeout),
            Conn::Unix(s) => s.set_read_timeout(timeout),
        }
    }

    pub fn set_write_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        match self {
            Conn::Tcp(s) => s.set_write_timeout(timeout),
            Conn::Unix(s) => s.set_write_timeout(timeout),
        }
    }

    pub fn set_nonblocking(&self, on: bool) -> io::Result<()> {
        match self {
            Conn::Tcp(s) => s.set_nonblocking(on),
            Conn::Unix(s) => s.set_nonblocking(on),
        }
    }

    /// TCP_NODELAY on TCP; nothing to do on a unix socket.
    pub fn set_nodelay(&self) -> io::Result<()> {
        match self {
            Conn::Tcp(s) => s.set_nodelay(true),
            Conn::Unix(_) => Ok(()),
        }
    }

    /// Reads without consuming (MSG_PEEK).
    pub fn peek(&self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Conn::Tcp(s) => s.peek(buf),
            Conn::Unix(s) => nix::sys::socket::recv(
                std::os::fd::AsRawFd::as_raw_fd(s),
                buf,
                nix::sys::socket::MsgFlags::MSG_PEEK,
            )
            .map_err(io::Error::from),
        }
    }
}

impl AsFd for Conn {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Conn::Tcp(s) => s.as_fd(),
            Conn::Unix(s) => s.as_fd(),
        }
    }
}

impl From<Conn> for OwnedFd {
    fn from(conn: Conn) -> OwnedFd {
        match conn {
            Conn::Tcp(s) => OwnedFd::from(s),
            Conn::Unix(s) => OwnedFd::from(s),
        }
    }
}

impl From<TcpStream> for Conn {
    fn from(s: TcpStream) -> Conn {
        Conn::Tcp(s)
    }
}

impl From<UnixStream> for Conn {
    fn from(s: UnixStream) -> Conn {
        Conn::Unix(s)
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Conn::Tcp(s) => s.read(buf),
            Conn::Unix(s) => s.read(buf),
        }
    }
}

/// A connection's read side that gives up at a deadline, however slowly the peer trickles:
/// before each read the socket's read timeout is cut to what is left, where a fixed timeout
/// would start again with every byte that arrives.
#[derive(Debug)]
pub struct ReadBy {
    conn: Conn,
    deadline: Option<Instant>,
}

impl ReadBy {
    pub fn new(conn: Conn, deadline: Instant) -> Self {
        Self {
            conn,
            deadline: Some(deadline),
        }
    }

    /// From now on reads wait as the socket says (the caller sets its timeout).
    pub fn unbounded(&mut self) {
        self.deadline = None;
    }
}

impl Read for ReadBy {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self.deadline {
            Some(deadline) => read_until(&mut self.conn, buf, deadline),
            None => self.conn.read(buf),
        }
    }
}

fn read_until(conn: &mut Conn, buf: &mut [u8], deadline: Instant) -> io::Result<usize> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(io::ErrorKind::TimedOut.into());
    }
    conn.set_read_timeout(Some(left))?;
    conn.read(buf)
}

/// Reads exactly `buf` by `deadline` (see [`ReadBy`]); the error says how much arrived.
pub fn read_exact_by(conn: &mut Conn, buf: &mut [u8], deadline: Instant) -> io::Result<()> {
    let mut got = 0;
    while got < buf.len() {
        match read_until(conn, &mut buf[got..], deadline) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("the connection closed after {got} of {} bytes", buf.len()),
                ))
            }
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("timed out with {got} of {} bytes received", buf.len()),
                ))
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Conn::Tcp(s) => s.write(buf),
            Conn::Unix(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Conn::Tcp(s) => s.flush(),
            Conn::Unix(s) => s.flush(),
        }
    }
}

fn vfio_text(err: &vfio::VfioError) -> String {
    crate::error::error_chain(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_families_are_typed_and_other_fds_refused() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let mut conn = Conn::from_fd(OwnedFd::from(a)).unwrap();
        assert!(matches!(conn, Conn::Unix(_)));
        b.write_all(b"QEVM").unwrap();
        let mut peeked = [0u8; 4];
        assert_eq!(conn.peek(&mut peeked).unwrap(), 4);
        let mut read = [0u8; 4];
        conn.read_exact(&mut read).unwrap();
        assert_eq!(&read, b"QEVM");
        conn.set_nodelay().unwrap();

        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let tcp = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let conn = Conn::from_fd(OwnedFd::from(tcp)).unwrap();
        assert!(matches!(conn, Conn::Tcp(_)));
        assert!(conn.peer().starts_with("tcp 127.0.0.1:"));

        let (r, _w) = vfio::fd::pipe().unwrap();
        assert!(Conn::from_fd(r).is_err());
        let err = Conn::from_fd(OwnedFd::from(listener)).unwrap_err();
        assert!(err.to_string().contains("listening"), "{err}");
    }
}
