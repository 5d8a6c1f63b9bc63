//! The source's precopy thread (only under a VMM): while the VM runs, it reads each precopy
//! device's saving data_fd and sends what it reads on the main channel as QEMU's VFIO
//! `save_live_iterate` does (SECTION_PART, DEV_DATA_STATE), then DEV_INIT_DATA_SENT once the
//! device's initial bytes are out. It stops when the session asks (switchover-start, cancel,
//! failure) and is joined before any device leaves PRE_COPY under the helper's control and
//! before the engine reads the same data_fd in STOP_COPY, so the device's stream stays in
//! order: precopy bytes, then stop-copy bytes.
//!
//! When the initial bytes are out:
//! - a real data_fd answers `VFIO_MIG_GET_PRECOPY_INFO`: `initial_bytes == 0`;
//! - a data_fd without it (ENOTTY: simulated devices on memfds and pipes): the first time a read
//!   finds nothing (0, ENOMSG, or nothing readable yet).
//!
//! Dirty bytes keep being sent until switchover. Reads never block: a data_fd that polls as not
//! readable is skipped for now.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::Duration;

use vfio::{DataDirection, DataFdDevice, MigrationDevice};

use crate::error::{MainChannelError, SessionError};
use crate::session::driver::Event;
use crate::session::link::PrecopyEvent;
use crate::session::main_channel::{
    self, encode_init_data_sent, frame_precopy_part, PRECOPY_CHUNK, PRECOPY_HEAD, PRECOPY_TAIL,
};
use crate::session::stream::Conn;
use crate::wire::DeviceId;

/// How long the thread rests when no device had anything to read.
const IDLE: Duration = Duration::from_millis(20);

/// One device the thread reads.
#[derive(Debug)]
pub struct PrecopySource {
    /// Index in the session's inputs.
    pub device: usize,
    /// Its main-stream section id.
    pub section: u32,
    pub id: DeviceId,
    /// A duplicate of the saving data_fd (same open file as the one the engine reads later).
    pub data_fd: OwnedFd,
}

/// The running thread.
#[derive(Debug)]
pub struct Precopy {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<Result<(), SessionError>>>,
    /// A duplicate of the main channel, shut down when the thread is dropped without
    /// [`Precopy::stop`] (a failure): a write blocked on a peer that stopped reading ends.
    wake: Conn,
}

struct Reader {
    source: PrecopySource,
    /// The data_fd as a device, for VFIO_MIG_GET_PRECOPY_INFO.
    info_fd: DataFdDevice,
    /// None: not asked yet; Some(false): the fd has no PRECOPY_INFO.
    has_info: Option<bool>,
    init_sent: bool,
    /// The device left PRE_COPY (PRECOPY_INFO says EINVAL): read no more.
    done: bool,
}

impl Precopy {
    /// Starts the thread on a duplicate of the main channel. Its events (and its error) go to
    /// the session's queue; `bytes` counts the precopy bytes sent.
    pub fn start<P: Send + 'static, R: Send + 'static>(
        sources: Vec<PrecopySource>,
        main: Conn,
        chunk: usize,
        bytes: Arc<AtomicU64>,
        events: Sender<Event<P, R>>,
    ) -> Result<Precopy, SessionError> {
        let stop = Arc::new(AtomicBool::new(false));
        let mut readers = Vec::with_capacity(sources.len());
        for source in sources {
            let dup = source
                .data_fd
                .try_clone()
                .map_err(|e| SessionError::Precopy {
                    device: source.id.clone(),
                    source: e,
                })?;
            let info_fd = DataFdDevice::new(source.id.to_string(), dup, DataDirection::Save)
                .map_err(|e| SessionError::Precopy {
                    device: source.id.clone(),
                    source: io::Error::other(crate::error::error_chain(&e)),
                })?;
            readers.push(Reader {
                source,
                info_fd,
                has_info: None,
                init_sent: false,
                done: false,
            });
        }
        let wake = main.try_clone().map_err(|source| {
            SessionError::Main(MainChannelError::Write {
                what: "precopy data (socket setup)",
                source,
            })
        })?;
        let thread_stop = stop.clone();
        let chunk = chunk.clamp(1, PRECOPY_CHUNK);
        let handle = thread::Builder::new()
            .name("precopy".into())
            .spawn(move || {
                let result = run(readers, main, chunk, &bytes, &thread_stop, &events);
                match result {
                    // Running: the session hears of it now. Stopping: from `stop`.
                    Err(err) if !thread_stop.load(Ordering::Relaxed) => {
                        let _ = events.send(Event::Precopy(Err(err)));
                        Ok(())
                    }
                    result => result,
                }
            })
            .map_err(|source| SessionError::Spawn {
                what: "precopy",
                source,
            })?;
        Ok(Precopy {
            stop,
            handle: Some(handle),
            wake,
        })
    }

    /// Stops the thread and waits for it: after this nothing reads the data_fds or writes the
    /// main channel any more. A read or write in progress finishes first (bounded by the main
    /// channel's write timeout); if it failed, its error is returned: precopy bytes read from
    /// a device did not all reach the main channel, so the stream cannot go on.
    pub fn stop(&mut self) -> Result<(), SessionError> {
        self.stop.store(true, Ordering::Relaxed);
        match self.handle.take().map(JoinHandle::join) {
            None | Some(Ok(Ok(()))) => Ok(()),
            Some(Ok(Err(err))) => Err(err),
            Some(Err(_)) => Err(SessionError::PrecopyPanicked),
        }
    }
}

impl Drop for Precopy {
    fn drop(&mut self) {
        if self.handle.is_some() {
            // Not stopped on the way to switchover: the migration failed.
            let _ = self.wake.shutdown(std::net::Shutdown::Both);
            if let Err(err) = self.stop() {
                log::debug!(
                    "precopy after the failure: {}",
                    crate::error::error_chain(&err)
                );
            }
        }
    }
}

fn run<P, R>(
    mut readers: Vec<Reader>,
    mut main: Conn,
    chunk: usize,
    bytes: &AtomicU64,
    stop: &AtomicBool,
    events: &Sender<Event<P, R>>,
) -> Result<(), SessionError> {
    let mut buf = vec![0u8; PRECOPY_HEAD + chunk + PRECOPY_TAIL];
    let write_err = |source| SessionError::Main(source);
    while !stop.load(Ordering::Relaxed) {
        let mut moved = false;
        for reader in readers.iter_mut().filter(|r| !r.done) {
            if stop.load(Ordering::Relaxed) {
                return Ok(());
            }
            let device = reader.source.device;
            let section = reader.source.section;
            let mut want = chunk;
            let mut initial_left = None;
            if reader.has_info != Some(false) {
                match reader.info_fd.precopy_info() {
                    Ok(info) => {
                        reader.has_info = Some(true);
                        initial_left = Some(info.initial_bytes);
                        want = want.min(usize::try_from(info.pending()).unwrap_or(usize::MAX));
                    }
                    Err(e) if e.errno() == Some(libc::EINVAL) && reader.has_info == Some(true) => {
                        // Out of PRE_COPY (the VMM moved it on): the rest is stop-copy data.
                        reader.done = true;
                        continue;
                    }
                    Err(e) => {
                        log::debug!(
                            "device {}: no VFIO_MIG_GET_PRECOPY_INFO on its data_fd ({}); \
                             a read that finds nothing ends its initial data",
                            reader.source.id,
                            crate::error::error_chain(&e)
                        );
                        reader.has_info = Some(false);
                    }
                }
            }
            if initial_left == Some(0) && !reader.init_sent {
                send_init_sent(&mut main, reader, events)?;
            }
            let readable = want > 0
                && nix::poll::poll(
                    &mut [nix::poll::PollFd::new(
                        reader.source.data_fd.as_fd(),
                        nix::poll::PollFlags::POLLIN,
                    )],
                    nix::poll::PollTimeout::ZERO,
                )
                .map_err(|e| SessionError::Precopy {
                    device: reader.source.id.clone(),
                    source: io::Error::from(e),
                })? > 0;
            let n = if readable {
                match nix::unistd::read(
                    &reader.source.data_fd,
                    &mut buf[PRECOPY_HEAD..PRECOPY_HEAD + want],
                ) {
                    Ok(n) => n,
                    // Interrupted before reading anything says nothing about what is left:
                    // not the empty read that ends a PRECOPY_INFO-less device's initial data.
                    Err(nix::errno::Errno::EINTR) => continue,
                    Err(nix::errno::Errno::ENOMSG) | Err(nix::errno::Errno::EAGAIN) => 0,
                    Err(e) => {
                        return Err(SessionError::Precopy {
                            device: reader.source.id.clone(),
                            source: io::Error::from(e),
                        })
                    }
                }
            } else {
                0
            };
            if n == 0 {
                // Drained for now (in PRE_COPY, 0 is not the end of the stream).
                if reader.has_info == Some(false) && !reader.init_sent {
                    send_init_sent(&mut main, reader, events)?;
                }
                continue;
            }
            let record = frame_precopy_part(section, &mut buf, n);
            main_channel::send(&mut main, "precopy data", record).map_err(write_err)?;
            bytes.fetch_add(n as u64, Ordering::Relaxed);
            moved = true;
            log::trace!("device {device}: {n} precopy bytes sent");
        }
        if !moved {
            thread::sleep(IDLE);
        }
    }
    Ok(())
}

fn send_init_sent<P, R>(
    main: &mut Conn,
    reader: &mut Reader,
    events: &Sender<Event<P, R>>,
) -> Result<(), SessionError> {
    main_channel::send(
        main,
        "DEV_INIT_DATA_SENT",
        &encode_init_data_sent(reader.source.section),
    )
    .map_err(|e: MainChannelError| SessionError::Main(e))?;
    reader.init_sent = true;
    log::debug!("device {}: initial precopy data sent", reader.source.id);
    let _ = events.send(Event::Precopy(Ok(PrecopyEvent::InitialSent {
        device: reader.source.device,
    })));
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::fs::File;
    use std::io::{Seek, Write};
    use std::os::unix::net::UnixStream;
    use std::sync::mpsc;

    use nix::sys::memfd::{memfd_create, MFdFlags};

    use super::*;

    #[test]
    fn a_precopy_write_that_fails_while_stopping_is_returned_by_stop() {
        let mut image = File::from(memfd_create("precopy-src", MFdFlags::MFD_CLOEXEC).unwrap());
        image.write_all(&vec![0x5a; 16 << 20]).unwrap();
        image.rewind().unwrap();
        let (main, peer) = UnixStream::pair().unwrap();
        let (events, _queue) = mpsc::channel::<Event<(), ()>>();
        let mut precopy = Precopy::start(
            vec![PrecopySource {
                device: 0,
                section: 0,
                id: DeviceId::new("0000:00:02.0/vfio", 0).unwrap(),
                data_fd: OwnedFd::from(image),
            }],
            Conn::from(main),
            PRECOPY_CHUNK,
            Arc::new(AtomicU64::new(0)),
            events,
        )
        .unwrap();
        // The peer never reads: the thread ends up blocked in a write of device bytes it has
        // already read; the peer then goes away while the session stops precopy.
        // Bytes at the peer: the thread is writing its first 1 MiB record, which does not fit
        // the socket's buffer.
        let mut first = [0u8; 1];
        std::io::Read::read_exact(&mut &peer, &mut first).unwrap();
        thread::sleep(Duration::from_millis(50));
        let closer = thread::spawn(move || {
            thread::sleep(Duration::from_millis(300));
            drop(peer);
        });
        let result = precopy.stop();
        closer.join().unwrap();
        assert!(
            matches!(
                result,
                Err(SessionError::Main(MainChannelError::Write {
                    what: "precopy data",
                    ..
                }))
            ),
            "{result:?}"
        );
    }
}
