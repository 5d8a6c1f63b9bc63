//! A small blocking client of the control protocol, for Rust VMMs, the example VMM
//! (`examples/example-vmm.rs`) and the tests: it sends each command line with its fds in one
//! `sendmsg`, matches replies by id, and queues the events that arrive meanwhile.

use std::collections::VecDeque;
use std::io::{self, BufRead, BufReader, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::control::schema::{ErrorBody, EventLine};

/// Talking to a helper failed (not a refused command: that is an `Err(ErrorBody)` reply).
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("connecting to the helper's control socket {path}")]
    Connect {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("sending {command} to the helper")]
    Send {
        command: String,
        #[source]
        source: io::Error,
    },
    #[error("the helper closed the control connection while {what}")]
    Closed { what: String },
    #[error("no {what} from the helper within {waited:?}")]
    Timeout { what: String, waited: Duration },
    #[error("the helper sent a line that is not a reply or an event: {line}")]
    Unexpected { line: String },
    #[error("starting the control reader thread")]
    Thread(#[source] io::Error),
}

/// A connection to one helper.
#[derive(Debug)]
pub struct Client {
    stream: UnixStream,
    lines: Receiver<Value>,
    reader: Option<JoinHandle<()>>,
    next_id: u64,
    events: VecDeque<EventLine>,
    /// The greeting (`{"return": {"vfio-multifd": ...}}`).
    pub greeting: Value,
    /// How long to wait for a reply.
    pub reply_timeout: Duration,
}

impl Client {
    /// Connects to `path` and reads the greeting.
    pub fn connect(path: &Path) -> Result<Client, ClientError> {
        let stream = UnixStream::connect(path).map_err(|source| ClientError::Connect {
            path: path.display().to_string(),
            source,
        })?;
        Client::from_stream(stream)
    }

    /// Uses an already connected control socket; reads the greeting.
    pub fn from_stream(stream: UnixStream) -> Result<Client, ClientError> {
        let read_half = stream.try_clone().map_err(ClientError::Thread)?;
        let (tx, lines) = mpsc::channel();
        let reader = thread::Builder::new()
            .name("control-client".into())
            .spawn(move || {
                for line in BufReader::new(read_half).lines() {
                    let Ok(line) = line else { break };
                    let value =
                        serde_json::from_str(&line).unwrap_or_else(|_| json!({ "unparsed": line }));
                    if tx.send(value).is_err() {
                        break;
                    }
                }
            })
            .map_err(ClientError::Thread)?;
        let mut client = Client {
            stream,
            lines,
            reader: Some(reader),
            next_id: 1,
            events: VecDeque::new(),
            greeting: Value::Null,
            reply_timeout: Duration::from_secs(30),
        };
        client.greeting = client.next_line("the greeting", Duration::from_secs(10))?;
        Ok(client)
    }

    fn next_line(&mut self, what: &str, limit: Duration) -> Result<Value, ClientError> {
        match self.lines.recv_timeout(limit) {
            Ok(value) => Ok(value),
            Err(RecvTimeoutError::Timeout) => Err(ClientError::Timeout {
                what: what.into(),
                waited: limit,
            }),
            Err(RecvTimeoutError::Disconnected) => Err(ClientError::Closed {
                what: format!("waiting for {what}"),
            }),
        }
    }

    /// Sends a raw line (and fds) as is: for tests of malformed input.
    pub fn send_raw(&mut self, line: &[u8], fds: &[BorrowedFd<'_>]) -> Result<(), ClientError> {
        let err = |source| ClientError::Send {
            command: "a raw line".into(),
            source,
        };
        let sent = vfio::fd::send_with_fds(self.stream.as_fd(), line, fds).map_err(err)?;
        (&self.stream).write_all(&line[sent..]).map_err(err)
    }

    /// The next reply line (skipping events into the queue).
    pub fn next_reply(&mut self) -> Result<Value, ClientError> {
        let deadline = Instant::now() + self.reply_timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let value = self.next_line("a reply", left)?;
            if value.get("event").is_some() {
                self.queue_event(value)?;
                continue;
            }
            return Ok(value);
        }
    }

    fn queue_event(&mut self, value: Value) -> Result<(), ClientError> {
        let line = value.to_string();
        let event: EventLine =
            serde_json::from_value(value).map_err(|_| ClientError::Unexpected { line })?;
        self.events.push_back(event);
        Ok(())
    }

    /// Runs one command: its line and `fds` go in one `sendmsg` (`arguments.fds` must name
    /// them). `Ok(Err(..))` is the helper's refusal.
    pub fn execute(
        &mut self,
        command: &str,
        arguments: Value,
        fds: &[BorrowedFd<'_>],
    ) -> Result<Result<Value, ErrorBody>, ClientError> {
        let id = self.next_id;
        self.next_id += 1;
        let mut line = json!({ "execute": command, "arguments": arguments, "id": id }).to_string();
        line.push('\n');
        let err = |source| ClientError::Send {
            command: command.into(),
            source,
        };
        let sent =
            vfio::fd::send_with_fds(self.stream.as_fd(), line.as_bytes(), fds).map_err(err)?;
        (&self.stream)
            .write_all(&line.as_bytes()[sent..])
            .map_err(err)?;
        loop {
            let reply = self.next_reply()?;
            if reply.get("id").and_then(Value::as_u64) != Some(id) {
                // A reply without our id (e.g. to a raw line sent earlier): not ours.
                log::debug!("skipping a reply for another request: {reply}");
                continue;
            }
            if let Some(ret) = reply.get("return") {
                return Ok(Ok(ret.clone()));
            }
            if let Some(error) = reply.get("error") {
                return match serde_json::from_value::<ErrorBody>(error.clone()) {
                    Ok(body) => Ok(Err(body)),
                    Err(_) => Err(ClientError::Unexpected {
                        line: reply.to_string(),
                    }),
                };
            }
            return Err(ClientError::Unexpected {
                line: reply.to_string(),
            });
        }
    }

    /// The next event, waiting at most `limit`.
    pub fn next_event(&mut self, limit: Duration) -> Result<Option<EventLine>, ClientError> {
        if let Some(event) = self.events.pop_front() {
            return Ok(Some(event));
        }
        match self.lines.recv_timeout(limit) {
            Ok(value) if value.get("event").is_some() => {
                self.queue_event(value)?;
                Ok(self.events.pop_front())
            }
            Ok(other) => Err(ClientError::Unexpected {
                line: other.to_string(),
            }),
            Err(RecvTimeoutError::Timeout) => Ok(None),
            Err(RecvTimeoutError::Disconnected) => Err(ClientError::Closed {
                what: "waiting for an event".into(),
            }),
        }
    }

    /// Waits for the first event `pick` accepts, handing every event (accepted or not) to
    /// `seen` first.
    pub fn wait_event(
        &mut self,
        what: &str,
        limit: Duration,
        mut seen: impl FnMut(&EventLine),
        mut pick: impl FnMut(&EventLine) -> bool,
    ) -> Result<EventLine, ClientError> {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next_event(left)? {
                Some(event) => {
                    seen(&event);
                    if pick(&event) {
                        return Ok(event);
                    }
                }
                None => {
                    return Err(ClientError::Timeout {
                        what: what.into(),
                        waited: limit,
                    })
                }
            }
        }
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
    }
}
