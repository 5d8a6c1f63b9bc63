//! What both sessions need to drive an engine without hanging: the engine and the main-channel
//! reader run on named threads and report into one event queue; the session waits on that
//! queue with an inactivity limit (no event and no byte moved for `timeout` is a stall), and
//! cancels by setting the engine's cancel flag and shutting the sockets down, which wakes any
//! blocked send or receive. Under a VMM, the control thread posts its commands into the same
//! queue ([`Driver::commander`]), and the source's precopy thread its progress.

use std::net::Shutdown;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crate::engine::{DataPlaneError, Progress};
use crate::error::{MainChannelError, SessionError};
use crate::session::link::{Commander, PrecopyEvent, VmmCommand};
use crate::session::stream::Conn;

/// How often a waiting session looks at the progress counters and the cancel flag.
const TICK: Duration = Duration::from_millis(50);

/// Something a session waits for.
#[derive(Debug)]
pub enum Event<P, R> {
    /// A message from the peer's main channel; an error ends the reader.
    Peer(Result<P, MainChannelError>),
    /// The engine finished; `Err(())` when its thread panicked.
    Engine(Result<Result<R, DataPlaneError>, ()>),
    /// A command of the VMM, through the control thread.
    Vmm(VmmCommand),
    /// The source's precopy thread: a device's initial data went out, or it failed.
    Precopy(Result<PrecopyEvent, SessionError>),
}

/// The event queue, the progress counters and the sockets to shut down on cancel.
#[derive(Debug)]
pub struct Driver<P, R> {
    tx: Sender<Event<P, R>>,
    rx: Receiver<Event<P, R>>,
    pub progress: Arc<Progress>,
    timeout: Duration,
    wake: Vec<Conn>,
    threads: Vec<JoinHandle<()>>,
    engine: Option<JoinHandle<()>>,
}

impl<P: Send + 'static, R: Send + 'static> Driver<P, R> {
    pub fn new(progress: Arc<Progress>, timeout: Duration) -> Self {
        // `join_engine` waits `timeout` after a cancel: the engine's workers get half of it to
        // drain their cancelled I/O (never more than the default), the rest covers noticing
        // the cancel (one poll) and winding down.
        progress.set_cancel_drain((timeout / 2).min(crate::engine::DEFAULT_CANCEL_DRAIN));
        let (tx, rx) = mpsc::channel();
        Self {
            tx,
            rx,
            progress,
            timeout,
            wake: Vec::new(),
            threads: Vec::new(),
            engine: None,
        }
    }

    /// Keeps a duplicate of `stream` to shut it down on cancel.
    pub fn watch(&mut self, stream: &Conn) -> std::io::Result<()> {
        self.wake.push(stream.try_clone()?);
        Ok(())
    }

    /// Runs `read` on a named thread until it fails (the peer closed, or the session shut the
    /// socket down), posting each message.
    pub fn spawn_reader(
        &mut self,
        name: &str,
        mut read: impl FnMut() -> Result<P, MainChannelError> + Send + 'static,
    ) -> Result<(), SessionError> {
        let tx = self.tx.clone();
        let handle = thread::Builder::new()
            .name(name.into())
            .spawn(move || loop {
                let message = read();
                let last = message.is_err();
                if tx.send(Event::Peer(message)).is_err() || last {
                    return;
                }
            })
            .map_err(|source| SessionError::Spawn {
                what: "main channel reader",
                source,
            })?;
        self.threads.push(handle);
        Ok(())
    }

    /// Runs the engine on a named thread; its result (or panic) becomes an event.
    pub fn spawn_engine(
        &mut self,
        name: &str,
        run: impl FnOnce() -> Result<R, DataPlaneError> + Send + 'static,
    ) -> Result<(), SessionError> {
        let tx = self.tx.clone();
        let handle = thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                let result = std::panic::catch_unwind(AssertUnwindSafe(run)).map_err(|_| ());
                // The session may be gone (it gave up waiting): nothing left to tell.
                let _ = tx.send(Event::Engine(result));
            })
            .map_err(|source| SessionError::Spawn {
                what: "engine",
                source,
            })?;
        self.engine = Some(handle);
        Ok(())
    }

    /// A handle the control thread posts VMM commands with (and wakes the session).
    pub fn commander(&self) -> Commander {
        let tx = self.tx.clone();
        Commander::new(move |command| tx.send(Event::Vmm(command)).is_ok())
    }

    /// An event already queued comes before a cancel or a stall: the destination's result may
    /// be waiting there, and after it nothing may roll the source back.
    fn queued(&self) -> Option<Event<P, R>> {
        self.rx.try_recv().ok()
    }

    /// A sender for threads the session starts itself (the precopy thread).
    pub fn sender(&self) -> Sender<Event<P, R>> {
        self.tx.clone()
    }

    /// The next event, however long it takes (the VMM decides when to switch over); fails
    /// only when the cancel flag is set.
    pub fn wait_unbounded(&self, step: &'static str) -> Result<Event<P, R>, SessionError> {
        loop {
            if let Some(event) = self.queued() {
                return Ok(event);
            }
            if self.progress.cancelled() {
                return Err(SessionError::Cancelled { step });
            }
            match self.rx.recv_timeout(TICK) {
                Ok(event) => return Ok(event),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    unreachable!("the driver holds a sender")
                }
            }
        }
    }

    /// The next event. Fails when the cancel flag is set, or when `timeout` passes with no
    /// event and no byte moved.
    pub fn wait(&self, step: &'static str) -> Result<Event<P, R>, SessionError> {
        let mut last_bytes = self.progress.bytes.load(Ordering::Relaxed);
        let mut idle_since = Instant::now();
        loop {
            if let Some(event) = self.queued() {
                return Ok(event);
            }
            if self.progress.cancelled() {
                return Err(SessionError::Cancelled { step });
            }
            match self.rx.recv_timeout(TICK) {
                Ok(event) => return Ok(event),
                Err(RecvTimeoutError::Timeout) => {
                    let bytes = self.progress.bytes.load(Ordering::Relaxed);
                    if bytes != last_bytes {
                        last_bytes = bytes;
                        idle_since = Instant::now();
                    } else if idle_since.elapsed() >= self.timeout {
                        return Err(SessionError::Stalled {
                            step,
                            idle: self.timeout,
                            outstanding: Vec::new(),
                        });
                    }
                }
                Err(RecvTimeoutError::Disconnected) => {
                    unreachable!("the driver holds a sender")
                }
            }
        }
    }

    /// Waits up to `limit` for what the peer's reader reports that `pick` accepts, dropping
    /// other events: after a local failure, the peer's account is often the better one (its
    /// result message, or its reader's failure when the peer died: a peer that dies closes
    /// its main channel and its data channels at once, and the data plane often notices
    /// first). The reader's failure is its last report, so the wait ends there.
    pub fn linger_for_peer<T>(
        &self,
        limit: Duration,
        mut pick: impl FnMut(Result<P, MainChannelError>) -> Option<T>,
    ) -> Option<T> {
        let deadline = Instant::now() + limit;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.rx.recv_timeout(left) {
                Ok(Event::Peer(Ok(message))) => {
                    if let Some(found) = pick(Ok(message)) {
                        return Some(found);
                    }
                }
                Ok(Event::Peer(Err(err))) => return pick(Err(err)),
                Ok(Event::Engine(_) | Event::Vmm(_) | Event::Precopy(_)) => {}
                Err(_) => return None,
            }
        }
        None
    }

    /// Stops everything: sets the cancel flag, shuts every watched socket down, and waits up
    /// to the timeout for the engine thread (devices must not change state under a running
    /// engine). Returns false when the engine did not stop in time.
    pub fn cancel(&mut self) -> bool {
        self.progress.cancel.store(true, Ordering::Relaxed);
        self.shutdown_sockets();
        self.join_engine()
    }

    /// Shuts every watched socket down (both directions).
    pub fn shutdown_sockets(&mut self) {
        for stream in self.wake.drain(..) {
            // Already closed by the peer or the engine: nothing to wake.
            let _ = stream.shutdown(Shutdown::Both);
        }
    }

    /// Waits (at most the timeout) for the engine thread to end.
    pub fn join_engine(&mut self) -> bool {
        let Some(handle) = self.engine.take() else {
            return true;
        };
        let deadline = Instant::now() + self.timeout;
        while !handle.is_finished() {
            if Instant::now() >= deadline {
                log::error!(
                    "the engine did not stop within {:?} of cancel",
                    self.timeout
                );
                return false;
            }
            thread::sleep(Duration::from_millis(5));
        }
        // The thread caught any panic itself.
        let _ = handle.join();
        true
    }

    /// Ends the session: sockets shut, engine and readers joined (bounded).
    pub fn finish(mut self) {
        self.shutdown_sockets();
        self.join_engine();
        let deadline = Instant::now() + Duration::from_secs(1);
        for handle in self.threads.drain(..) {
            while !handle.is_finished() && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(2));
            }
            if handle.is_finished() {
                let _ = handle.join();
            }
        }
    }
}
