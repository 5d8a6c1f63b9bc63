//! Channel setup: the source connects the main channel (standalone only) and N multifd
//! channels and writes each one's 64-byte init packet; the destination accepts connections in
//! any order, tells the main channel from multifd channels by their first four bytes as QEMU
//! does (`QEVM` = main), validates each init packet and slots the channel by its id.
//!
//! Under a VMM the sockets may also be passed in already connected (SCM_RIGHTS): the source
//! then only writes the init packets ([`send_inits`]) and the destination classifies the
//! passed sockets exactly as accepted ones ([`Acceptor::passed`]).
//!
//! Every wait ends: connects and reads carry the session timeout, the accept loop has a
//! deadline that moves forward whenever a connection arrives, and it stops when the session's
//! cancel flag is set.
//!
//! A migration's listener serves that migration only: once every channel is here it is closed
//! ([`stop_listening`]), so a connection beyond them is refused rather than left waiting.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use zerocopy::{FromBytes, IntoBytes};

use crate::config::ChannelOrder;
use crate::engine::Progress;
use crate::error::ChannelError;
use crate::session::stream::{read_exact_by, Conn};
use crate::wire::{ChannelSet, InitExpectation, MultifdInitPacket, INIT_PACKET_LEN, MULTIFD_MAGIC};

/// How long one peek waits before the cancel flag is looked at again.
const PEEK_SLICE: Duration = Duration::from_millis(100);

/// `QEMU_VM_FILE_MAGIC` as it opens the main channel.
pub const QEVM: [u8; 4] = *b"QEVM";

/// The source side's connected channels.
#[derive(Debug)]
pub struct SourceChannels {
    pub main: Option<Conn>,
    /// Index = channel id; init packets already sent.
    pub multifd: Vec<Conn>,
}

/// Connects `count` multifd channels (and, with `main`, the main channel) to `addr` in
/// `order`, sending each multifd channel's init packet. `on_main` runs on the main channel
/// right after it connects (standalone: the QEVM header and setup record go out first, as in
/// QEMU the main channel carries its header before multifd channels connect).
pub fn connect(
    addr: SocketAddr,
    count: u8,
    uuid: [u8; 16],
    with_main: bool,
    order: ChannelOrder,
    timeout: Duration,
    mut on_main: impl FnMut(&mut Conn) -> io::Result<()>,
) -> Result<SourceChannels, ChannelError> {
    let mut ids: Vec<u8> = (0..count).collect();
    let main_last = match order {
        ChannelOrder::Ascending => false,
        ChannelOrder::Reverse => {
            ids.reverse();
            false
        }
        ChannelOrder::Shuffle(seed) => {
            shuffle(&mut ids, seed);
            true
        }
    };
    let mut main = None;
    let mut connect_main = |main: &mut Option<Conn>| -> Result<(), ChannelError> {
        let mut stream = TcpStream::connect_timeout(&addr, timeout)
            .and_then(|s| {
                s.set_nodelay(true)?;
                s.set_write_timeout(Some(timeout))?;
                Ok(Conn::Tcp(s))
            })
            .map_err(|source| ChannelError::ConnectMain { addr, source })?;
        on_main(&mut stream).map_err(|source| ChannelError::ConnectMain { addr, source })?;
        *main = Some(stream);
        Ok(())
    };
    if with_main && !main_last {
        connect_main(&mut main)?;
    }
    let mut slots: Vec<Option<Conn>> = (0..count).map(|_| None).collect();
    for id in ids {
        let mut stream = TcpStream::connect_timeout(&addr, timeout)
            .and_then(|s| {
                s.set_nodelay(true)?;
                Ok(Conn::Tcp(s))
            })
            .map_err(|source| ChannelError::Connect {
                channel: id,
                addr,
                source,
            })?;
        send_init(&mut stream, uuid, id, timeout)?;
        slots[usize::from(id)] = Some(stream);
    }
    if with_main && main_last {
        connect_main(&mut main)?;
    }
    Ok(SourceChannels {
        main,
        multifd: slots.into_iter().flatten().collect(),
    })
}

fn send_init(
    stream: &mut Conn,
    uuid: [u8; 16],
    id: u8,
    timeout: Duration,
) -> Result<(), ChannelError> {
    let init = MultifdInitPacket::new(uuid, id);
    stream
        .set_write_timeout(Some(timeout))
        .and_then(|()| stream.write_all(init.as_bytes()))
        .and_then(|()| stream.set_write_timeout(None))
        .map_err(|source| ChannelError::SendInit {
            channel: id,
            source,
        })
}

/// Sockets the VMM passed connected: the main channel gets a write timeout, each multifd
/// channel (index = channel id) its init packet.
pub fn send_inits(
    main: Conn,
    mut multifd: Vec<Conn>,
    uuid: [u8; 16],
    timeout: Duration,
) -> Result<SourceChannels, ChannelError> {
    // An event-loop VMM may pass O_NONBLOCK sockets; the session and the engines block (with
    // timeouts), as the destination's accepted sockets do.
    main.set_nonblocking(false)
        .and_then(|()| main.set_write_timeout(Some(timeout)))
        .map_err(|source| ChannelError::Socket {
            peer: main.peer(),
            source,
        })?;
    for (id, stream) in multifd.iter_mut().enumerate() {
        let id = u8::try_from(id).map_err(|_| ChannelError::PassedCount {
            got: id + 1,
            expected: 256,
        })?;
        stream
            .set_nonblocking(false)
            .and_then(|()| stream.set_nodelay())
            .map_err(|source| ChannelError::Socket {
                peer: stream.peer(),
                source,
            })?;
        send_init(stream, uuid, id, timeout)?;
    }
    Ok(SourceChannels {
        main: Some(main),
        multifd,
    })
}

/// Where an [`Acceptor`] gets its connections.
#[derive(Debug)]
enum Incoming<'a> {
    Listener(&'a TcpListener),
    /// Connected sockets the VMM passed, classified in turn.
    Passed(VecDeque<Conn>),
}

/// What arrived on the listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arrival {
    Main,
    Multifd(u8),
}

/// Accepts the main channel (when expected) and exactly N multifd channels, in any order.
#[derive(Debug)]
pub struct Acceptor<'a> {
    incoming: Incoming<'a>,
    /// Checks each init packet and which ids are here.
    channels: ChannelSet,
    want_main: bool,
    timeout: Duration,
    main: Option<Conn>,
    slots: Vec<Option<Conn>>,
    /// The session's progress: its cancel flag ends the accept loop.
    cancel: Option<Arc<Progress>>,
}

impl<'a> Acceptor<'a> {
    pub fn new(
        listener: &'a TcpListener,
        expect: InitExpectation,
        want_main: bool,
        timeout: Duration,
    ) -> Self {
        Self {
            incoming: Incoming::Listener(listener),
            channels: ChannelSet::new(expect),
            want_main,
            timeout,
            main: None,
            slots: (0..expect.channels).map(|_| None).collect(),
            cancel: None,
        }
    }

    /// Classifies sockets the VMM passed instead of accepting: there must be exactly one per
    /// expected connection.
    pub fn passed(
        sockets: Vec<Conn>,
        expect: InitExpectation,
        want_main: bool,
        timeout: Duration,
    ) -> Result<Acceptor<'static>, ChannelError> {
        let expected = usize::from(expect.channels) + usize::from(want_main);
        if sockets.len() != expected {
            return Err(ChannelError::PassedCount {
                got: sockets.len(),
                expected,
            });
        }
        Ok(Acceptor {
            incoming: Incoming::Passed(sockets.into()),
            channels: ChannelSet::new(expect),
            want_main,
            timeout,
            main: None,
            slots: (0..expect.channels).map(|_| None).collect(),
            cancel: None,
        })
    }

    /// Stops waiting for connections once `progress`'s cancel flag is set.
    pub fn cancel_with(mut self, progress: Arc<Progress>) -> Self {
        self.cancel = Some(progress);
        self
    }

    /// Multifd channels connected so far.
    fn accepted(&self) -> usize {
        self.slots.iter().filter(|slot| slot.is_some()).count()
    }

    /// Every expected connection is here.
    pub fn complete(&self) -> bool {
        self.accepted() == self.slots.len() && (self.main.is_some() || !self.want_main)
    }

    /// The main channel, once it arrived.
    pub fn main_mut(&mut self) -> Option<&mut Conn> {
        self.main.as_mut()
    }

    fn main_state(&self) -> &'static str {
        match (self.want_main, self.main.is_some()) {
            (false, _) => "not used",
            (true, true) => "connected",
            (true, false) => "not connected",
        }
    }

    /// Waits (at most the timeout) for the next connection and classifies it.
    pub fn accept_next(&mut self) -> Result<Arrival, ChannelError> {
        let started = Instant::now();
        let mut stream = match &mut self.incoming {
            Incoming::Listener(_) => self.accept_until(started + self.timeout)?,
            Incoming::Passed(queue) => match queue.pop_front() {
                Some(stream) => stream,
                None => {
                    return Err(ChannelError::PassedCount {
                        got: self.accepted() + usize::from(self.main.is_some()),
                        expected: self.slots.len() + usize::from(self.want_main),
                    })
                }
            },
        };
        let peer = stream.peer();
        let setup = |stream: &Conn| -> io::Result<()> {
            stream.set_nonblocking(false)?;
            stream.set_nodelay()?;
            stream.set_read_timeout(Some(self.timeout))
        };
        setup(&stream).map_err(|source| ChannelError::Socket {
            peer: peer.clone(),
            source,
        })?;
        // One deadline for the connection's whole greeting, however it trickles in.
        let deadline = Instant::now() + self.timeout;
        let mut first = [0u8; 4];
        peek_exact(&stream, &mut first, deadline, self.cancel.as_deref()).map_err(|source| {
            ChannelError::Classify {
                peer: peer.clone(),
                source,
            }
        })?;
        if first == QEVM {
            if !self.want_main {
                return Err(ChannelError::UnexpectedMain { peer });
            }
            if self.main.is_some() {
                return Err(ChannelError::SecondMain { peer });
            }
            self.main = Some(stream);
            return Ok(Arrival::Main);
        }
        // Neither channel's magic (QEMU 10.1+ refuses such a connection at once): waiting for
        // a whole init packet would end only in the timeout, without saying why.
        let magic = u32::from_be_bytes(first);
        if magic != MULTIFD_MAGIC {
            return Err(ChannelError::BadInit {
                peer,
                source: crate::wire::WireError::BadMagic {
                    got: magic,
                    offset: 0,
                },
            });
        }
        let mut init = [0u8; INIT_PACKET_LEN];
        read_exact_by(&mut stream, &mut init, deadline).map_err(|source| {
            ChannelError::RecvInit {
                peer: peer.clone(),
                source,
            }
        })?;
        let id = self
            .channels
            .accept(&init)
            .map_err(|source| ChannelError::BadInit {
                peer: peer.clone(),
                source,
            })?;
        stream
            .set_read_timeout(None)
            .map_err(|source| ChannelError::Socket { peer, source })?;
        self.slots[usize::from(id)] = Some(stream);
        Ok(Arrival::Multifd(id))
    }

    fn accept_until(&self, deadline: Instant) -> Result<Conn, ChannelError> {
        let Incoming::Listener(listener) = &self.incoming else {
            unreachable!("accept_until is only called with a listener")
        };
        let accept_err = |source| ChannelError::Accept {
            main: self.main_state(),
            accepted: self.accepted(),
            expected: self.channels.expected(),
            source,
        };
        listener.set_nonblocking(true).map_err(accept_err)?;
        loop {
            if self.cancel.as_ref().is_some_and(|p| p.cancelled()) {
                return Err(ChannelError::Cancelled {
                    main: self.main_state(),
                    accepted: self.accepted(),
                    expected: self.channels.expected(),
                });
            }
            match listener.accept() {
                Ok((stream, _)) => return Ok(Conn::Tcp(stream)),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if Instant::now() >= deadline {
                        return Err(ChannelError::AcceptTimeout {
                            waited: self.timeout,
                            main: self.main_state(),
                            accepted: self.accepted(),
                            expected: self.channels.expected(),
                            missing: self
                                .channels
                                .missing()
                                .map(|id| id.to_string())
                                .collect::<Vec<_>>()
                                .join(", "),
                        });
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(accept_err(e)),
            }
        }
    }

    /// The main channel (if expected) and the multifd channels ordered by id. Call once
    /// [`Self::complete`] is true.
    pub fn finish(self) -> (Option<Conn>, Vec<Conn>) {
        debug_assert!(self.complete());
        (self.main, self.slots.into_iter().flatten().collect())
    }
}

/// A connection turned away because the migration already had all its channels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TurnedAway {
    pub peer: SocketAddr,
    /// What its first bytes said it is, when they had already arrived.
    pub claimed: Option<Arrival>,
}

/// Closes the listener of a migration that has all its channels, so that the kernel refuses a
/// later connect (a second source pointed at this port) instead of leaving it in the backlog
/// for the rest of the migration. The connections already queued are accepted first, so that
/// each is logged, and closed unread, which resets them.
pub fn stop_listening(listener: TcpListener, channels: u8) -> Vec<TurnedAway> {
    let mut turned_away = Vec::new();
    // Nothing is waited for here: only what is already queued is looked at.
    if let Err(e) = listener.set_nonblocking(true) {
        log::warn!("closing the migration listener without a look at its queue: {e}");
        return turned_away;
    }
    loop {
        match listener.accept() {
            Ok((stream, peer)) => {
                let claimed = claimed_by(&stream);
                let claim = match claimed {
                    Some(Arrival::Main) => " (it claims to be the main channel)".to_string(),
                    Some(Arrival::Multifd(id)) => format!(" (it claims multifd channel {id})"),
                    None => String::new(),
                };
                log::warn!(
                    "refusing an extra connection from {peer}{claim}: the main channel and all \
                     {channels} multifd channels are already connected"
                );
                turned_away.push(TurnedAway { peer, claimed });
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted
                ) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) => {
                log::warn!(
                    "turning away extra connections: {e}; closing the listener resets the rest"
                );
                break;
            }
        }
    }
    turned_away
}

/// The main channel or the multifd channel an extra connection's first bytes claim, if they
/// are there already (an extra connection is not waited for).
fn claimed_by(stream: &TcpStream) -> Option<Arrival> {
    let mut first = [0u8; INIT_PACKET_LEN];
    stream.set_nonblocking(true).ok()?;
    let n = stream.peek(&mut first).ok()?;
    if first[..n].starts_with(&QEVM) {
        return Some(Arrival::Main);
    }
    let init = MultifdInitPacket::read_from_bytes(first.get(..n)?).ok()?;
    (init.magic.get() == MULTIFD_MAGIC).then_some(Arrival::Multifd(init.id))
}

/// Peeks until `buf` is full: the bytes stay in the socket for the reader that follows.
fn peek_exact(
    stream: &Conn,
    buf: &mut [u8],
    deadline: Instant,
    cancel: Option<&Progress>,
) -> io::Result<()> {
    // Short waits, so a cancel is seen while the peer is silent; the caller's read timeout is
    // put back afterwards.
    stream.set_read_timeout(Some(PEEK_SLICE))?;
    let result = loop {
        if cancel.is_some_and(|p| p.cancelled()) {
            break Err(io::Error::new(io::ErrorKind::Interrupted, "cancelled"));
        }
        let n = match stream.peek(buf) {
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) =>
            {
                if Instant::now() >= deadline {
                    break Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "nothing arrived before the timeout",
                    ));
                }
                continue;
            }
            Err(e) => break Err(e),
        };
        if n == buf.len() {
            break Ok(());
        }
        if n == 0 {
            break Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed before its first 4 bytes",
            ));
        }
        if Instant::now() >= deadline {
            break Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("only {n} of the first 4 bytes arrived"),
            ));
        }
        // A partial first segment: wait for the rest.
        std::thread::sleep(Duration::from_millis(1));
    };
    let left = deadline.saturating_duration_since(Instant::now());
    stream.set_read_timeout(Some(left.max(Duration::from_millis(1))))?;
    result
}

/// Fisher-Yates with a splitmix64 stream: deterministic per seed, no extra crate.
fn shuffle(ids: &mut [u8], seed: u64) {
    let mut state = seed;
    let mut next = || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    for i in (1..ids.len()).rev() {
        let j = (next() % (i as u64 + 1)) as usize;
        ids.swap(i, j);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::WireError;

    fn bind() -> (TcpListener, SocketAddr) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        (listener, addr)
    }

    const UUID: [u8; 16] = [7; 16];

    fn accept_all(
        listener: &TcpListener,
        channels: u8,
        main: bool,
    ) -> Result<Vec<Arrival>, ChannelError> {
        let expect = InitExpectation {
            uuid: UUID,
            channels,
        };
        let mut acceptor = Acceptor::new(listener, expect, main, Duration::from_secs(5));
        let mut arrivals = Vec::new();
        while !acceptor.complete() {
            arrivals.push(acceptor.accept_next()?);
        }
        let (main_stream, multifd) = acceptor.finish();
        assert_eq!(main_stream.is_some(), main);
        assert_eq!(multifd.len(), usize::from(channels));
        Ok(arrivals)
    }

    #[test]
    fn any_order_is_slotted_by_id_and_main_is_told_apart() {
        for order in [
            ChannelOrder::Ascending,
            ChannelOrder::Reverse,
            ChannelOrder::Shuffle(3),
        ] {
            let (listener, addr) = bind();
            let source = std::thread::spawn(move || {
                connect(addr, 5, UUID, true, order, Duration::from_secs(5), |s| {
                    s.write_all(b"QEVM\0\0\0\x03")
                })
            });
            let arrivals = accept_all(&listener, 5, true).unwrap();
            let channels = source.join().unwrap().unwrap();
            assert_eq!(channels.multifd.len(), 5);
            for (id, stream) in channels.multifd.iter().enumerate() {
                let Conn::Tcp(stream) = stream else {
                    panic!("channel {id} is not TCP")
                };
                let local = stream.local_addr().unwrap();
                assert_ne!(local.port(), 0, "channel {id} connected");
            }
            let multifd: Vec<u8> = arrivals
                .iter()
                .filter_map(|a| match a {
                    Arrival::Multifd(id) => Some(*id),
                    Arrival::Main => None,
                })
                .collect();
            match order {
                ChannelOrder::Ascending => {
                    assert_eq!(arrivals[0], Arrival::Main);
                    assert_eq!(multifd, vec![0, 1, 2, 3, 4]);
                }
                ChannelOrder::Reverse => assert_eq!(multifd, vec![4, 3, 2, 1, 0]),
                ChannelOrder::Shuffle(_) => {
                    assert_eq!(arrivals.last(), Some(&Arrival::Main));
                    let mut sorted = multifd.clone();
                    sorted.sort_unstable();
                    assert_eq!(sorted, vec![0, 1, 2, 3, 4]);
                }
            }
        }
    }

    fn raw_init(addr: SocketAddr, uuid: [u8; 16], id: u8) -> TcpStream {
        let mut s = TcpStream::connect(addr).unwrap();
        s.write_all(MultifdInitPacket::new(uuid, id).as_bytes())
            .unwrap();
        s
    }

    #[test]
    fn duplicate_id_wrong_uuid_and_out_of_range_id_are_rejected() {
        let (listener, addr) = bind();
        let _a = raw_init(addr, UUID, 1);
        let _b = raw_init(addr, UUID, 1);
        let err = accept_all(&listener, 2, false).unwrap_err();
        assert!(
            matches!(
                err,
                ChannelError::BadInit {
                    source: WireError::DuplicateChannel { id: 1, .. },
                    ..
                }
            ),
            "{err:?}"
        );

        let (listener, addr) = bind();
        let _c = raw_init(addr, [9; 16], 0);
        let err = accept_all(&listener, 2, false).unwrap_err();
        assert!(matches!(
            err,
            ChannelError::BadInit {
                source: WireError::UuidMismatch { .. },
                ..
            }
        ));

        let (listener, addr) = bind();
        let _d = raw_init(addr, UUID, 2);
        let err = accept_all(&listener, 2, false).unwrap_err();
        assert!(matches!(
            err,
            ChannelError::BadInit {
                source: WireError::ChannelIdOutOfRange {
                    id: 2,
                    channels: 2,
                    ..
                },
                ..
            }
        ));
    }

    #[test]
    fn missing_channels_time_out_with_a_count_and_their_ids() {
        let (listener, addr) = bind();
        let _a = raw_init(addr, UUID, 1);
        let expect = InitExpectation {
            uuid: UUID,
            channels: 3,
        };
        let mut acceptor = Acceptor::new(&listener, expect, true, Duration::from_millis(200));
        assert_eq!(acceptor.accept_next().unwrap(), Arrival::Multifd(1));
        let err = acceptor.accept_next().unwrap_err();
        assert!(
            matches!(
                &err,
                ChannelError::AcceptTimeout {
                    accepted: 1,
                    expected: 3,
                    main: "not connected",
                    missing,
                    ..
                } if missing == "0, 2"
            ),
            "{err:?}"
        );
        assert!(err.to_string().contains("(missing: 0, 2)"), "{err}");
    }

    #[test]
    fn an_init_packet_that_trickles_in_times_out_at_the_deadline() {
        let (listener, addr) = bind();
        let init = MultifdInitPacket::new(UUID, 0);
        let bytes = init.as_bytes().to_vec();
        let trickler = std::thread::spawn(move || {
            let mut s = TcpStream::connect(addr).unwrap();
            s.write_all(&bytes[..8]).unwrap();
            // A byte every 100 ms: each read would see one within a fixed 300 ms timeout.
            for b in &bytes[8..] {
                std::thread::sleep(Duration::from_millis(100));
                if s.write_all(std::slice::from_ref(b)).is_err() {
                    return;
                }
            }
        });
        let expect = InitExpectation {
            uuid: UUID,
            channels: 1,
        };
        let mut acceptor = Acceptor::new(&listener, expect, false, Duration::from_millis(300));
        let started = Instant::now();
        let err = acceptor.accept_next().unwrap_err();
        let took = started.elapsed();
        assert!(
            matches!(&err, ChannelError::RecvInit { source, .. }
                if source.kind() == io::ErrorKind::TimedOut),
            "{err:?}"
        );
        assert!(took < Duration::from_secs(2), "{took:?}");
        let text = crate::error::error_chain(&err);
        assert!(text.contains("of 64 bytes received"), "{text}");
        drop(acceptor);
        trickler.join().unwrap();
    }

    #[test]
    fn a_silent_connection_times_out_instead_of_hanging() {
        let (listener, addr) = bind();
        let _silent = TcpStream::connect(addr).unwrap();
        let expect = InitExpectation {
            uuid: UUID,
            channels: 1,
        };
        let mut acceptor = Acceptor::new(&listener, expect, false, Duration::from_millis(200));
        let err = acceptor.accept_next().unwrap_err();
        assert!(matches!(err, ChannelError::Classify { .. }), "{err:?}");
    }

    #[test]
    fn passed_sockets_are_classified_like_accepted_ones() {
        use std::os::unix::net::UnixStream;
        let (main_src, main_dst) = UnixStream::pair().unwrap();
        let mut sources = Vec::new();
        let mut passed = vec![Conn::Unix(main_dst)];
        for _ in 0..3 {
            let (a, b) = UnixStream::pair().unwrap();
            sources.push(Conn::Unix(a));
            passed.push(Conn::Unix(b));
        }
        // The destination gets them in any order.
        passed.swap(0, 2);
        let mut channels =
            send_inits(Conn::Unix(main_src), sources, UUID, Duration::from_secs(5)).unwrap();
        channels
            .main
            .as_mut()
            .unwrap()
            .write_all(b"QEVM\0\0\0\x03")
            .unwrap();
        let expect = InitExpectation {
            uuid: UUID,
            channels: 3,
        };
        let mut acceptor = Acceptor::passed(passed, expect, true, Duration::from_secs(5)).unwrap();
        let mut arrivals = Vec::new();
        while !acceptor.complete() {
            arrivals.push(acceptor.accept_next().unwrap());
        }
        assert!(arrivals.contains(&Arrival::Main));
        let (main, multifd) = acceptor.finish();
        assert!(main.is_some());
        assert_eq!(multifd.len(), 3);

        let err = Acceptor::passed(Vec::new(), expect, true, Duration::from_secs(5)).unwrap_err();
        assert!(
            matches!(
                err,
                ChannelError::PassedCount {
                    got: 0,
                    expected: 4
                }
            ),
            "{err:?}"
        );
    }

    #[test]
    fn a_silent_passed_socket_stops_at_cancel() {
        use std::os::unix::net::UnixStream;
        let (_quiet, passed) = UnixStream::pair().unwrap();
        let expect = InitExpectation {
            uuid: UUID,
            channels: 1,
        };
        let progress = Arc::new(Progress::default());
        let mut acceptor = Acceptor::passed(
            vec![Conn::Unix(passed)],
            expect,
            false,
            Duration::from_secs(30),
        )
        .unwrap()
        .cancel_with(progress.clone());
        let flag = progress.clone();
        let cancel = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(150));
            flag.cancel
                .store(true, std::sync::atomic::Ordering::Relaxed);
        });
        let started = Instant::now();
        let err = acceptor.accept_next().unwrap_err();
        cancel.join().unwrap();
        assert!(matches!(err, ChannelError::Classify { .. }), "{err:?}");
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    /// What the connecting side of a turned-away connection sees within `bound`.
    fn refused_within(stream: &mut TcpStream, bound: Duration) -> Result<(), String> {
        use std::io::Read;
        stream.set_read_timeout(Some(bound)).unwrap();
        match stream.read(&mut [0u8; 1]) {
            Ok(0) => Ok(()),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionAborted
                ) =>
            {
                Ok(())
            }
            other => Err(format!("still open after {bound:?}: {other:?}")),
        }
    }

    #[test]
    fn connections_beyond_the_expected_ones_are_refused_and_named() {
        let (listener, addr) = bind();
        let _channel = raw_init(addr, UUID, 0);
        accept_all(&listener, 1, false).unwrap();
        // A second source: its channel 0 again, then its main channel.
        let mut extra = raw_init(addr, UUID, 0);
        let mut extra_main = TcpStream::connect(addr).unwrap();
        extra_main.write_all(b"QEVM\0\0\0\x03").unwrap();
        let mut silent = TcpStream::connect(addr).unwrap();
        // The three are queued once their bytes are readable on this side.
        std::thread::sleep(Duration::from_millis(100));
        let turned_away = stop_listening(listener, 1);
        let peers = [&extra, &extra_main, &silent].map(|s| s.local_addr().unwrap());
        assert_eq!(
            turned_away,
            vec![
                TurnedAway {
                    peer: peers[0],
                    claimed: Some(Arrival::Multifd(0)),
                },
                TurnedAway {
                    peer: peers[1],
                    claimed: Some(Arrival::Main),
                },
                TurnedAway {
                    peer: peers[2],
                    claimed: None,
                },
            ]
        );
        for stream in [&mut extra, &mut extra_main, &mut silent] {
            refused_within(stream, Duration::from_secs(2)).unwrap();
        }
        let err = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused, "{err}");
    }

    #[test]
    fn unexpected_main_is_rejected() {
        let (listener, addr) = bind();
        let mut s = TcpStream::connect(addr).unwrap();
        s.write_all(b"QEVM\0\0\0\x03").unwrap();
        let err = accept_all(&listener, 1, false).unwrap_err();
        assert!(matches!(err, ChannelError::UnexpectedMain { .. }));
    }
}
