//! Replies and events on their way to the VMM.
//!
//! Lines queue here and a thread of the connection's own writes them, blocking, in order. So
//! neither the control thread nor the migration thread ever waits for a VMM that reads slowly,
//! and a VMM is never timed out for it: the docs promise that waiting for the VMM is never
//! timed. What bounds the queue is the control thread, which answers no further command while
//! more than [`BACKLOG_LIMIT`] bytes wait (the VMM's commands then wait in its socket), and the
//! migration, whose events are a few per device.

use std::collections::VecDeque;
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::control::lines::write_line;
use crate::control::schema::{EventLine, Reply, Timestamp};

/// Queued bytes past which the control thread answers no more commands.
pub const BACKLOG_LIMIT: usize = 4 << 20;

/// The connected VMM's outbox, if a VMM is connected.
#[derive(Debug, Default)]
pub struct Events {
    out: Mutex<Option<Outbox>>,
}

#[derive(Debug)]
struct Outbox {
    queue: Arc<Queue>,
    /// To unblock the writer when the connection ends.
    stream: UnixStream,
    writer: Option<JoinHandle<()>>,
}

#[derive(Debug, Default)]
struct Queue {
    state: Mutex<QueueState>,
    changed: Condvar,
}

#[derive(Debug, Default)]
struct QueueState {
    lines: VecDeque<String>,
    /// Bytes in `lines` and in the line being written.
    bytes: usize,
    /// The connection ends: the writer stops after what is queued.
    closing: bool,
    /// A write failed: the VMM is gone; nothing more is queued.
    failed: bool,
}

impl Events {
    /// Starts writing to `stream` (a blocking socket) from a thread of its own.
    pub fn attach(&self, stream: UnixStream) -> std::io::Result<()> {
        let queue = Arc::new(Queue::default());
        let writer = {
            let queue = queue.clone();
            let out = stream.try_clone()?;
            std::thread::Builder::new()
                .name("control-out".into())
                .spawn(move || write_all(&queue, &out))?
        };
        let old = lock(&self.out).replace(Outbox {
            queue,
            stream,
            writer: Some(writer),
        });
        if let Some(old) = old {
            old.close();
        }
        Ok(())
    }

    /// Ends the connection's output now: what is still queued is dropped.
    pub fn detach(&self) {
        let outbox = lock(&self.out).take();
        if let Some(outbox) = outbox {
            outbox.close();
        }
    }

    /// Waits up to `within` for the queue to be written, then detaches.
    pub fn flush_and_detach(&self, within: Duration) {
        let Some(outbox) = lock(&self.out).take() else {
            return;
        };
        let deadline = Instant::now() + within;
        let mut state = lock(&outbox.queue.state);
        while state.bytes > 0 && !state.failed {
            let now = Instant::now();
            if now >= deadline {
                log::warn!(
                    "the VMM did not read its last {} bytes within {within:?}; dropping them",
                    state.bytes
                );
                break;
            }
            state = match outbox.queue.changed.wait_timeout(state, deadline - now) {
                Ok((guard, _)) => guard,
                Err(poisoned) => poisoned.into_inner().0,
            };
        }
        drop(state);
        outbox.close();
    }

    /// False once a write to the VMM failed: it is gone.
    pub fn attached(&self) -> bool {
        lock(&self.out)
            .as_ref()
            .is_some_and(|outbox| !lock(&outbox.queue.state).failed)
    }

    /// Bytes written to no one yet.
    pub fn backlog(&self) -> usize {
        lock(&self.out)
            .as_ref()
            .map_or(0, |outbox| lock(&outbox.queue.state).bytes)
    }

    /// Queues one line (without its newline).
    pub fn write(&self, text: String) {
        let out = lock(&self.out);
        let Some(outbox) = out.as_ref() else {
            return;
        };
        let mut state = lock(&outbox.queue.state);
        if state.failed || state.closing {
            return;
        }
        state.bytes += text.len() + 1;
        state.lines.push_back(text);
        outbox.queue.changed.notify_all();
    }

    pub fn reply(&self, reply: &Reply) {
        match serde_json::to_string(reply) {
            Ok(text) => self.write(text),
            Err(e) => log::error!("encoding a reply: {e}"),
        }
    }

    pub fn emit(&self, event: &str, data: Value) {
        let line = EventLine {
            event: event.into(),
            data,
            timestamp: Timestamp::now(),
        };
        log::info!("event {event}: {}", line.data);
        match serde_json::to_string(&line) {
            Ok(text) => self.write(text),
            Err(e) => log::error!("encoding event {event}: {e}"),
        }
    }
}

impl Outbox {
    /// Stops the writer, blocked in a send or not, and joins it.
    fn close(mut self) {
        {
            let mut state = lock(&self.queue.state);
            state.closing = true;
            state.lines.clear();
            self.queue.changed.notify_all();
        }
        // A writer blocked on a VMM that does not read returns with an error.
        let _ = self.stream.shutdown(Shutdown::Both);
        if let Some(writer) = self.writer.take() {
            if writer.join().is_err() {
                log::error!("the control socket's writer panicked");
            }
        }
    }
}

fn write_all(queue: &Queue, stream: &UnixStream) {
    loop {
        let line = {
            let mut state = lock(&queue.state);
            loop {
                if state.closing && state.lines.is_empty() {
                    return;
                }
                if let Some(line) = state.lines.pop_front() {
                    break line;
                }
                state = match queue.changed.wait(state) {
                    Ok(guard) => guard,
                    Err(poisoned) => poisoned.into_inner(),
                };
            }
        };
        let result = write_line(stream, &line);
        let mut state = lock(&queue.state);
        state.bytes = state.bytes.saturating_sub(line.len() + 1);
        if let Err(e) = result {
            if !state.closing {
                log::warn!("the VMM stopped reading ({e}); dropping its connection's output");
            }
            state.failed = true;
            state.lines.clear();
            state.bytes = 0;
        }
        queue.changed.notify_all();
        if state.failed {
            return;
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader};

    fn read_lines(stream: UnixStream, n: usize) -> Vec<String> {
        BufReader::new(stream)
            .lines()
            .take(n)
            .map(|l| l.unwrap())
            .collect()
    }

    #[test]
    fn a_vmm_that_reads_late_gets_every_line_in_order_and_nobody_waits_for_it() {
        let (ours, theirs) = UnixStream::pair().unwrap();
        theirs
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let events = Events::default();
        events.attach(ours).unwrap();
        // Far more than a socket buffer holds: a blocking write would wait for the reader.
        let line = "x".repeat(10_000);
        let started = Instant::now();
        for i in 0..1000 {
            events.write(format!("{i} {line}"));
        }
        assert!(started.elapsed() < Duration::from_secs(2));
        assert!(events.backlog() > 1 << 20, "{}", events.backlog());
        std::thread::sleep(Duration::from_millis(200));
        assert!(events.attached(), "a slow reader is not a gone reader");
        let got = read_lines(theirs, 1000);
        for (i, text) in got.iter().enumerate() {
            assert_eq!(text, &format!("{i} {line}"));
        }
        events.flush_and_detach(Duration::from_secs(5));
        assert_eq!(events.backlog(), 0);
    }

    #[test]
    fn a_vmm_that_left_is_seen_as_gone_and_detach_does_not_wait_for_a_stuck_one() {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let events = Events::default();
        events.attach(ours).unwrap();
        drop(theirs);
        events.write("{}".into());
        let deadline = Instant::now() + Duration::from_secs(5);
        while events.attached() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(!events.attached());

        let (ours, _stuck) = UnixStream::pair().unwrap();
        events.attach(ours).unwrap();
        for _ in 0..100 {
            events.write("y".repeat(100_000));
        }
        let started = Instant::now();
        events.flush_and_detach(Duration::from_millis(300));
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(300) && took < Duration::from_secs(3),
            "{took:?}"
        );
        assert!(!events.attached());
        assert_eq!(events.backlog(), 0);
    }
}
