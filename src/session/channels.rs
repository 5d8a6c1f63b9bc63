//! Channel setup: the source connects the main channel (standalone only) and N multifd
//! channels and writes each one's 64-byte init packet; the destination accepts connections in
//! any order, tells the main channel from multifd channels by their first four bytes as QEMU
//! does (`QEVM` = main), validates each init packet and slots the channel by its id.
//!
//! Every wait ends: connects and reads carry the session timeout, and the accept loop has a
//! deadline that moves forward whenever a connection arrives.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use zerocopy::IntoBytes;

use crate::config::ChannelOrder;
use crate::error::ChannelError;
use crate::wire::{InitExpectation, MultifdInitPacket, WireError, INIT_PACKET_LEN};

/// `QEMU_VM_FILE_MAGIC` as it opens the main channel.
pub const QEVM: [u8; 4] = *b"QEVM";

/// The source side's connected channels.
#[derive(Debug)]
pub struct SourceChannels {
    pub main: Option<TcpStream>,
    /// Index = channel id; init packets already sent.
    pub multifd: Vec<TcpStream>,
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
    mut on_main: impl FnMut(&mut TcpStream) -> io::Result<()>,
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
    let mut connect_main = |main: &mut Option<TcpStream>| -> Result<(), ChannelError> {
        let mut stream = TcpStream::connect_timeout(&addr, timeout)
            .and_then(|s| {
                s.set_nodelay(true)?;
                s.set_write_timeout(Some(timeout))?;
                Ok(s)
            })
            .map_err(|source| ChannelError::ConnectMain { addr, source })?;
        on_main(&mut stream).map_err(|source| ChannelError::ConnectMain { addr, source })?;
        *main = Some(stream);
        Ok(())
    };
    if with_main && !main_last {
        connect_main(&mut main)?;
    }
    let mut slots: Vec<Option<TcpStream>> = (0..count).map(|_| None).collect();
    for id in ids {
        let mut stream = TcpStream::connect_timeout(&addr, timeout)
            .and_then(|s| {
                s.set_nodelay(true)?;
                Ok(s)
            })
            .map_err(|source| ChannelError::Connect {
                channel: id,
                addr,
                source,
            })?;
        let init = MultifdInitPacket::new(uuid, id);
        stream
            .set_write_timeout(Some(timeout))
            .and_then(|()| stream.write_all(init.as_bytes()))
            .and_then(|()| stream.set_write_timeout(None))
            .map_err(|source| ChannelError::SendInit {
                channel: id,
                source,
            })?;
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

/// What arrived on the listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arrival {
    Main,
    Multifd(u8),
}

/// Accepts the main channel (when expected) and exactly N multifd channels, in any order.
#[derive(Debug)]
pub struct Acceptor<'a> {
    listener: &'a TcpListener,
    expect: InitExpectation,
    want_main: bool,
    timeout: Duration,
    main: Option<TcpStream>,
    slots: Vec<Option<TcpStream>>,
    accepted: usize,
}

impl<'a> Acceptor<'a> {
    pub fn new(
        listener: &'a TcpListener,
        expect: InitExpectation,
        want_main: bool,
        timeout: Duration,
    ) -> Self {
        Self {
            listener,
            expect,
            want_main,
            timeout,
            main: None,
            slots: (0..expect.channels).map(|_| None).collect(),
            accepted: 0,
        }
    }

    /// Every expected connection is here.
    pub fn complete(&self) -> bool {
        self.accepted == self.slots.len() && (self.main.is_some() || !self.want_main)
    }

    /// The main channel, once it arrived.
    pub fn main_mut(&mut self) -> Option<&mut TcpStream> {
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
        let (mut stream, peer) = self.accept_until(started + self.timeout)?;
        let setup = |stream: &TcpStream| -> io::Result<()> {
            stream.set_nonblocking(false)?;
            stream.set_nodelay(true)?;
            stream.set_read_timeout(Some(self.timeout))
        };
        setup(&stream).map_err(|source| ChannelError::Socket { peer, source })?;
        let mut first = [0u8; 4];
        peek_exact(&stream, &mut first, Instant::now() + self.timeout)
            .map_err(|source| ChannelError::Classify { peer, source })?;
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
        let mut init = [0u8; INIT_PACKET_LEN];
        stream
            .read_exact(&mut init)
            .map_err(|source| ChannelError::RecvInit { peer, source })?;
        let id = MultifdInitPacket::decode(&init, &self.expect)
            .map_err(|source| ChannelError::BadInit { peer, source })?;
        let slot = &mut self.slots[usize::from(id)];
        if slot.is_some() {
            return Err(ChannelError::BadInit {
                peer,
                source: WireError::DuplicateChannel { id, offset: 24 },
            });
        }
        stream
            .set_read_timeout(None)
            .map_err(|source| ChannelError::Socket { peer, source })?;
        *slot = Some(stream);
        self.accepted += 1;
        Ok(Arrival::Multifd(id))
    }

    fn accept_until(&self, deadline: Instant) -> Result<(TcpStream, SocketAddr), ChannelError> {
        let accept_err = |source| ChannelError::Accept {
            main: self.main_state(),
            accepted: self.accepted,
            expected: self.expect.channels,
            source,
        };
        self.listener.set_nonblocking(true).map_err(accept_err)?;
        loop {
            match self.listener.accept() {
                Ok(pair) => return Ok(pair),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if Instant::now() >= deadline {
                        return Err(ChannelError::AcceptTimeout {
                            waited: self.timeout,
                            main: self.main_state(),
                            accepted: self.accepted,
                            expected: self.expect.channels,
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
    pub fn finish(self) -> (Option<TcpStream>, Vec<TcpStream>) {
        debug_assert!(self.complete());
        (self.main, self.slots.into_iter().flatten().collect())
    }
}

/// Peeks until `buf` is full: the bytes stay in the socket for the reader that follows.
fn peek_exact(stream: &TcpStream, buf: &mut [u8], deadline: Instant) -> io::Result<()> {
    loop {
        let n = stream.peek(buf)?;
        if n == buf.len() {
            return Ok(());
        }
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed before its first 4 bytes",
            ));
        }
        if Instant::now() >= deadline {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("only {n} of the first 4 bytes arrived"),
            ));
        }
        // A partial first segment: wait for the rest.
        std::thread::sleep(Duration::from_millis(1));
    }
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
    fn missing_channels_time_out_with_a_count() {
        let (listener, addr) = bind();
        let _a = raw_init(addr, UUID, 0);
        let expect = InitExpectation {
            uuid: UUID,
            channels: 2,
        };
        let mut acceptor = Acceptor::new(&listener, expect, true, Duration::from_millis(200));
        assert_eq!(acceptor.accept_next().unwrap(), Arrival::Multifd(0));
        let err = acceptor.accept_next().unwrap_err();
        assert!(
            matches!(
                err,
                ChannelError::AcceptTimeout {
                    accepted: 1,
                    expected: 2,
                    main: "not connected",
                    ..
                }
            ),
            "{err:?}"
        );
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
    fn unexpected_main_is_rejected() {
        let (listener, addr) = bind();
        let mut s = TcpStream::connect(addr).unwrap();
        s.write_all(b"QEVM\0\0\0\x03").unwrap();
        let err = accept_all(&listener, 1, false).unwrap_err();
        assert!(matches!(err, ChannelError::UnexpectedMain { .. }));
    }
}
