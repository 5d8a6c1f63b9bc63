//! Errors, one enum per layer. Each variant names the step that failed; the cause rides in
//! `#[source]` (never repeated in the message) and the context (device, channel, address) sits
//! in fields. Lower layers keep their own enums: [`crate::wire::WireError`] (framing) and
//! [`crate::engine::DataPlaneError`] (moving bytes).

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use crate::engine::DataPlaneError;
use crate::wire::{DeviceId, WireError};
use vfio::{MigState, VfioError};

/// A command line or configuration value out of bounds. Messages name the flag.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("--{flag} {value:?}: {why}")]
    Invalid {
        flag: &'static str,
        value: String,
        why: String,
    },
    #[error("--{flag} {value}: {why}")]
    OutOfRange {
        flag: &'static str,
        value: u64,
        why: String,
    },
    #[error("VFIO_MULTIFD_FORBID={value:?}: {why}")]
    ForbidEnv { value: String, why: String },
    #[error("resolving --{flag} {value:?}")]
    Resolve {
        flag: &'static str,
        value: String,
        #[source]
        source: io::Error,
    },
}

/// Setting up the main and multifd channels (connect, accept, init packets).
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    #[error("connecting the main channel to {addr}")]
    ConnectMain {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("connecting multifd channel {channel} to {addr}")]
    Connect {
        channel: u8,
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("sending the init packet of multifd channel {channel}")]
    SendInit {
        channel: u8,
        #[source]
        source: io::Error,
    },
    #[error("accepting connections (main channel {main}, {accepted} of {expected} multifd channels so far)")]
    Accept {
        main: &'static str,
        accepted: usize,
        expected: u8,
        #[source]
        source: io::Error,
    },
    #[error("timed out after {waited:?}: main channel {main}, {accepted} of {expected} multifd channels connected (missing: {})", if .missing.is_empty() { "none" } else { .missing })]
    AcceptTimeout {
        waited: Duration,
        main: &'static str,
        accepted: usize,
        expected: u8,
        /// The multifd channel ids not connected, "1, 3".
        missing: String,
    },
    #[error("reading the first bytes of the connection from {peer}")]
    Classify {
        peer: String,
        #[source]
        source: io::Error,
    },
    #[error("reading the init packet of the connection from {peer}")]
    RecvInit {
        peer: String,
        #[source]
        source: io::Error,
    },
    #[error("failed to receive packet via multifd channel from {peer}")]
    BadInit {
        peer: String,
        #[source]
        source: WireError,
    },
    #[error("a second main channel (QEVM) connected from {peer}")]
    SecondMain { peer: String },
    #[error("no main channel expected, but {peer} opened one (QEVM)")]
    UnexpectedMain { peer: String },
    #[error("cancelled while accepting connections (main channel {main}, {accepted} of {expected} multifd channels so far)")]
    Cancelled {
        main: &'static str,
        accepted: usize,
        expected: u8,
    },
    #[error(
        "the VMM passed {got} sockets but the migration needs {expected} (main + multifd channels)"
    )]
    PassedCount { got: usize, expected: usize },
    #[error("configuring the socket from {peer}")]
    Socket {
        peer: String,
        #[source]
        source: io::Error,
    },
}

/// The standalone main channel: QEMU main-stream framing plus our setup and result records.
#[derive(Debug, thiserror::Error)]
pub enum MainChannelError {
    #[error("writing {what} on the main channel")]
    Write {
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("reading {what} on the main channel")]
    Read {
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("timed out after {after:?} waiting for {what}")]
    TimedOut { what: &'static str, after: Duration },
    #[error("the peer closed the main channel while {what} was expected")]
    Closed { what: &'static str },
    #[error("malformed {what} at stream offset {offset}")]
    Wire {
        what: &'static str,
        offset: u64,
        #[source]
        source: WireError,
    },
    #[error("{what} (the record at stream offset {offset})")]
    Malformed { what: String, offset: u64 },
    /// A well-formed message in the wrong step of the protocol.
    #[error("{what}")]
    Unexpected { what: String },
    #[error("{what} is {len} bytes, above the {max}-byte limit")]
    TooLong {
        what: &'static str,
        len: usize,
        max: usize,
    },
    #[error("writing precopy data to the data_fd of device {device}")]
    PrecopyWrite {
        device: DeviceId,
        #[source]
        source: io::Error,
    },
    #[error("decoding the {what} JSON")]
    Json {
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },
    /// A malformed record inside one device's section: which one, for the error and the
    /// result's location.
    #[error("section {section} (device {device})")]
    InSection {
        section: u32,
        device: DeviceId,
        #[source]
        source: Box<MainChannelError>,
    },
}

impl MainChannelError {
    /// The peer closed or reset the connection (a socket closed with unread bytes resets).
    pub fn peer_gone(&self) -> bool {
        match self {
            Self::Closed { .. } => true,
            Self::Read { source, .. } => matches!(
                source.kind(),
                io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
            ),
            _ => false,
        }
    }

    /// A read that ended because the socket's read timeout `after` passed (EAGAIN is how
    /// SO_RCVTIMEO ends a read), told as the wait it was.
    pub fn timed_out(self, after: Duration) -> Self {
        match self {
            Self::Read { what, source }
                if matches!(
                    source.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                Self::TimedOut { what, after }
            }
            other => other,
        }
    }
}

/// A migration session, by step. Device variants name the device, data-plane failures carry
/// the engine's error (which names channel, device and idx).
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("setting up channels")]
    Channels(#[source] ChannelError),
    #[error("main channel")]
    Main(#[source] MainChannelError),
    #[error("source and destination disagree: {what}")]
    Mismatch { what: String },
    #[error("reading the migration state of device {device}")]
    DeviceGetState {
        device: DeviceId,
        #[source]
        source: VfioError,
    },
    #[error("moving device {device} to {to}")]
    DeviceState {
        device: DeviceId,
        to: MigState,
        #[source]
        source: VfioError,
    },
    #[error("device {device} is in {state}; a source device must be RUNNING or PRE_COPY")]
    SourceState { device: DeviceId, state: MigState },
    #[error("device {device} is in PRE_COPY but its saving data_fd was not handed over")]
    NoPrecopyFd { device: DeviceId },
    #[error("device {device} entered {state} without a data_fd")]
    NoDataFd { device: DeviceId, state: MigState },
    #[error("starting the {what} thread")]
    Spawn {
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("data plane ({engine} engine)")]
    DataPlane {
        engine: &'static str,
        #[source]
        source: DataPlaneError,
    },
    #[error("the {engine} engine thread panicked")]
    EnginePanicked { engine: &'static str },
    #[error("the precopy thread panicked")]
    PrecopyPanicked,
    #[error("the migration thread panicked (a bug in vfio-multifd): {message}")]
    MigrationPanicked { message: String },
    #[error("the engine reported {got} devices, {expected} expected")]
    ReportShape { got: usize, expected: usize },
    #[error("config blob of device {device} is {len} bytes, more than one packet may carry (the chunk, {chunk} bytes)")]
    ConfigTooLarge {
        device: DeviceId,
        len: usize,
        chunk: usize,
    },
    #[error("config blob of device {device} differs from the source's ({got} bytes, {expected} expected)")]
    ConfigMismatch {
        device: DeviceId,
        got: usize,
        expected: usize,
    },
    #[error("no progress for {idle:?} while {step}{}", outstanding_text(.outstanding))]
    Stalled {
        step: &'static str,
        idle: Duration,
        /// What the engine still had in flight when the stall cancelled it (empty when it
        /// was not running or had nothing in flight).
        outstanding: Vec<String>,
    },
    #[error("the destination failed: {message}")]
    DestinationFailed {
        message: String,
        /// Where, as the destination located its error.
        location: crate::session::link::Location,
    },
    #[error("the source ended the main channel before EOF while {step}")]
    SourceVanished { step: &'static str },
    /// Failing is the safe answer: a source that cannot learn the outcome must not find its
    /// devices running here as well.
    #[error("the source closed the main channel after its EOF without waiting for the result, while {step}")]
    SourceLeftBeforeResult { step: &'static str },
    #[error("the source ended the main channel before EOF while loading device state, and the {engine} engine failed")]
    SourceVanishedMidStream {
        engine: &'static str,
        #[source]
        source: DataPlaneError,
    },
    #[error("cancelled while {step}")]
    Cancelled { step: &'static str },
    #[error("precopy: reading the data_fd of device {device}")]
    Precopy {
        device: DeviceId,
        #[source]
        source: io::Error,
    },
    #[error("the VMM's command does not fit the session: {what}")]
    VmmCommand { what: String },
    #[error("no result from the destination, which may be running the VM: the source's devices are left in STOP for the VMM to decide, after")]
    OutcomeUnknown {
        #[source]
        first: Box<SessionError>,
    },
    #[error("returning devices to their pre-migration state failed too ({rollback}) after")]
    RollbackFailed {
        #[source]
        first: Box<SessionError>,
        rollback: String,
    },
}

/// Outstanding ops a stall error names at most; the rest are counted.
const OUTSTANDING_SHOWN: usize = 4;

/// " (outstanding: a; b; and 3 more)", or nothing: a stall of every one of 64 channels would
/// otherwise make one line of every one of them.
fn outstanding_text(outstanding: &[String]) -> String {
    if outstanding.is_empty() {
        return String::new();
    }
    let shown = &outstanding[..outstanding.len().min(OUTSTANDING_SHOWN)];
    let mut text = format!(" (outstanding: {}", shown.join("; "));
    if outstanding.len() > shown.len() {
        text.push_str(&format!("; and {} more", outstanding.len() - shown.len()));
    }
    text.push(')');
    text
}

impl SessionError {
    /// A stall (also one behind [`SessionError::OutcomeUnknown`]) with what the engine still
    /// had in flight when the stall cancelled it: the channel and device that stopped moving.
    pub fn with_outstanding(self, lines: Vec<String>) -> Self {
        match self {
            SessionError::Stalled { step, idle, .. } if !lines.is_empty() => {
                SessionError::Stalled {
                    step,
                    idle,
                    outstanding: lines,
                }
            }
            SessionError::OutcomeUnknown { first } => SessionError::OutcomeUnknown {
                first: Box::new(first.with_outstanding(lines)),
            },
            other => other,
        }
    }
}

/// `send` and `recv` with simulated devices.
#[derive(Debug, thiserror::Error)]
pub enum StandaloneError {
    #[error("building simulated device {device}")]
    SimDevice {
        device: String,
        #[source]
        source: VfioError,
    },
    #[error("opening VFIO device {device}")]
    VfioDevice {
        device: String,
        #[source]
        source: VfioError,
    },
    #[error("listening on {addr}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("starting the {what} thread")]
    Thread {
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("the {side} failed")]
    Session {
        side: &'static str,
        #[source]
        source: SessionError,
    },
}

/// `demo`: two child helpers and the numbers they report.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("locating the vfio-multifd executable to spawn the {side}")]
    CurrentExe {
        side: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("spawning the {side} helper")]
    Spawn {
        side: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("the {side} helper did not say where it listens within {waited:?}")]
    NoListenAddr {
        side: &'static str,
        waited: Duration,
    },
    #[error("waiting for the {side} helper")]
    Wait {
        side: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("the {side} helper ran longer than {limit:?} and was killed")]
    Timeout { side: &'static str, limit: Duration },
    #[error("the {side} helper sent no report (exit status {status})")]
    NoReport { side: &'static str, status: String },
    #[error("starting the {what} thread")]
    Thread {
        what: &'static str,
        #[source]
        source: io::Error,
    },
}

/// An error and its causes on one line, `: `-separated (for logs and the peer).
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut cause = err.source();
    while let Some(next) = cause {
        text.push_str(": ");
        text.push_str(&next.to_string());
        cause = next.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_main_channel_error_says_main_channel_once() {
        let err = SessionError::Main(MainChannelError::Unexpected {
            what: "SWITCHOVER_START twice".into(),
        });
        assert_eq!(error_chain(&err), "main channel: SWITCHOVER_START twice");
    }

    #[test]
    fn a_stall_names_what_the_engine_had_outstanding() {
        let stall = || SessionError::Stalled {
            step: "streaming device state",
            idle: Duration::from_secs(5),
            outstanding: Vec::new(),
        };
        assert_eq!(
            stall().with_outstanding(Vec::new()).to_string(),
            "no progress for 5s while streaming device state"
        );
        let lines: Vec<String> = (0..6).map(|c| format!("channel {c}: send")).collect();
        assert_eq!(
            stall().with_outstanding(lines[..2].to_vec()).to_string(),
            "no progress for 5s while streaming device state \
             (outstanding: channel 0: send; channel 1: send)"
        );
        assert!(stall()
            .with_outstanding(lines.clone())
            .to_string()
            .ends_with("channel 3: send; and 2 more)"));
        let unknown = SessionError::OutcomeUnknown {
            first: Box::new(stall()),
        }
        .with_outstanding(lines[..1].to_vec());
        let SessionError::OutcomeUnknown { first } = unknown else {
            panic!("still an unknown outcome");
        };
        assert!(first
            .to_string()
            .ends_with("(outstanding: channel 0: send)"));
        // Other errors are left as they are.
        let cancelled = SessionError::Cancelled { step: "x" }.with_outstanding(lines);
        assert_eq!(cancelled.to_string(), "cancelled while x");
    }
}
