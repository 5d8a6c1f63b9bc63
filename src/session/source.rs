//! The source session: devices -> packets -> channels, as a state machine with one step
//! function. Each state holds what that phase owns; any error leaves through [`SourceSession::run`],
//! which cancels the engine and returns every device to RUNNING with its state intact.
//!
//! ```mermaid
//! stateDiagram-v2
//!     [*] --> Connecting
//!     Connecting --> AwaitingAck: main channel (QEVM, setup) and N multifd channels up
//!     AwaitingAck --> StopCopy: SWITCHOVER_ACK / send SWITCHOVER_START, devices to STOP_COPY, engine runs
//!     StopCopy --> AwaitingResult: engine done / send END sections and EOF
//!     AwaitingResult --> Complete: result ok / devices to STOP
//!     Connecting --> RolledBack: error
//!     AwaitingAck --> RolledBack: error, destination failure
//!     StopCopy --> RolledBack: error, destination failure, stall, cancel
//!     AwaitingResult --> RolledBack: destination failure, stall
//!     RolledBack --> [*]: devices RUNNING again
//! ```

use std::net::{SocketAddr, TcpStream};
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Duration;

use vfio::{MigState, MigrationDevice};

use crate::config::ChannelOrder;
use crate::engine::{
    monotonic_ns, Engine, EngineKind, Progress, SourceDevice, SourcePlan, SourceReport,
};
use crate::error::error_chain;
use crate::error::{MainChannelError, SessionError};
use crate::metrics;
use crate::session::channels;
use crate::session::driver::{Driver, Event};
use crate::session::main_channel::{
    self, encode_completion, encode_setup, encode_switchover_start, ResultRecord, ReturnMessage,
    ReturnReader, Setup,
};
use crate::wire::DeviceId;

/// How long a source waits for the destination's account after its own engine failed.
const PEER_ACCOUNT_GRACE: Duration = Duration::from_secs(2);

/// A device handed to a source session.
pub struct SourceInput {
    pub id: DeviceId,
    pub device: Box<dyn MigrationDevice>,
    /// The config blob (config space is the VMM's), sent last with the CONFIG flag.
    pub config: Vec<u8>,
    /// The saving data_fd when the device is already in PRE_COPY: the same fd carries on in
    /// STOP_COPY.
    pub precopy_fd: Option<OwnedFd>,
}

impl std::fmt::Debug for SourceInput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SourceInput")
            .field("id", &self.id)
            .field("device", &self.device.name())
            .field("config_len", &self.config.len())
            .finish()
    }
}

/// Where and how a standalone source migrates.
#[derive(Debug, Clone)]
pub struct SourceParams {
    pub connect: SocketAddr,
    pub channels: u8,
    pub uuid: [u8; 16],
    /// Largest device bytes per packet (`EngineConfig::chunk_size`).
    pub chunk: usize,
    /// Longest wait without progress, per step.
    pub timeout: Duration,
    pub order: ChannelOrder,
}

/// A completed migration, as the source saw it.
#[derive(Debug, Clone)]
pub struct SourceOutcome {
    pub engine: EngineKind,
    pub report: SourceReport,
    /// The destination's account.
    pub result: ResultRecord,
    /// CLOCK_MONOTONIC when SWITCHOVER_START went out (downtime starts).
    pub switchover_ns: u64,
    /// When the engine had handed every packet to the kernel.
    pub sent_ns: u64,
    /// When the destination's result arrived.
    pub result_ns: u64,
    /// CPU seconds of this process from the session's start to the engine's end (see
    /// [`crate::metrics`]).
    pub cpu_s: f64,
}

/// The phases; each holds what it owns.
enum State {
    Connecting,
    AwaitingAck {
        main: TcpStream,
        channels: Vec<TcpStream>,
    },
    StopCopy {
        main: TcpStream,
        switchover_ns: u64,
    },
    AwaitingResult {
        report: SourceReport,
        switchover_ns: u64,
        sent_ns: u64,
        cpu_s: f64,
    },
    Complete(SourceOutcome),
}

impl State {
    fn name(&self) -> &'static str {
        match self {
            State::Connecting => "connecting",
            State::AwaitingAck { .. } => "waiting for SWITCHOVER_ACK",
            State::StopCopy { .. } => "streaming device state",
            State::AwaitingResult { .. } => "waiting for the destination's result",
            State::Complete(_) => "complete",
        }
    }
}

/// A standalone source: its own main channel to a `recv` helper.
pub struct SourceSession<'a> {
    params: SourceParams,
    devices: &'a mut [SourceInput],
    engine: Arc<dyn Engine>,
    driver: Driver<ReturnMessage, SourceReport>,
    cpu_start: f64,
}

impl<'a> SourceSession<'a> {
    /// `progress` is shared with whoever watches or cancels the migration.
    pub fn new(
        params: SourceParams,
        devices: &'a mut [SourceInput],
        engine: Arc<dyn Engine>,
        progress: Arc<Progress>,
    ) -> Self {
        let timeout = params.timeout;
        Self {
            params,
            devices,
            engine,
            driver: Driver::new(progress, timeout),
            cpu_start: metrics::process_cpu_seconds(),
        }
    }

    /// Runs the migration to its end. On failure every device is back in RUNNING (or the
    /// error says which one could not be).
    pub fn run(mut self) -> Result<SourceOutcome, SessionError> {
        let mut state = State::Connecting;
        let result = loop {
            let step = state.name();
            match self.step(state) {
                Ok(State::Complete(outcome)) => break Ok(outcome),
                Ok(next) => state = next,
                Err(err) => {
                    log::debug!("source failed while {step}: {}", error_chain(&err));
                    break Err(err);
                }
            }
        };
        match result {
            Ok(outcome) => {
                self.driver.finish();
                Ok(outcome)
            }
            Err(err) => {
                self.driver.cancel();
                let err = rollback(self.devices, err);
                self.driver.finish();
                Err(err)
            }
        }
    }

    /// One transition.
    fn step(&mut self, state: State) -> Result<State, SessionError> {
        match state {
            State::Connecting => self.connect(),
            State::AwaitingAck { main, channels } => {
                match self.driver.wait("waiting for SWITCHOVER_ACK")? {
                    Event::Peer(Ok(ReturnMessage::SwitchoverAck)) => {
                        self.switchover(main, channels)
                    }
                    other => Err(self.unexpected(other, "waiting for SWITCHOVER_ACK")),
                }
            }
            State::StopCopy {
                mut main,
                switchover_ns,
            } => match self.driver.wait("streaming device state")? {
                Event::Engine(Ok(Ok(report))) => {
                    let sent_ns = monotonic_ns();
                    let cpu_s = metrics::process_cpu_seconds() - self.cpu_start;
                    main_channel::send(
                        &mut main,
                        "END sections and EOF",
                        &encode_completion(self.devices.len()),
                    )
                    .map_err(SessionError::Main)?;
                    Ok(State::AwaitingResult {
                        report,
                        switchover_ns,
                        sent_ns,
                        cpu_s,
                    })
                }
                other => Err(self.unexpected(other, "streaming device state")),
            },
            State::AwaitingResult {
                report,
                switchover_ns,
                sent_ns,
                cpu_s,
            } => match self.driver.wait("waiting for the destination's result")? {
                Event::Peer(Ok(ReturnMessage::Result(result))) if result.ok => {
                    let result_ns = monotonic_ns();
                    // The destination runs the devices now: nothing here may roll the
                    // source back any more (two running copies); what is odd is noted.
                    let mut report = report;
                    report.notes.extend(self.check_result(&result, &report));
                    for input in self.devices.iter_mut() {
                        if let Err(e) = input.device.set_state(MigState::Stop) {
                            let note = format!(
                                "device {} could not leave STOP_COPY after the migration: {}",
                                input.id,
                                error_chain(&e)
                            );
                            log::warn!("{note}");
                            report.notes.push(note);
                        }
                    }
                    Ok(State::Complete(SourceOutcome {
                        engine: self.engine.kind(),
                        report,
                        result,
                        switchover_ns,
                        sent_ns,
                        result_ns,
                        cpu_s,
                    }))
                }
                other => Err(self.unexpected(other, "waiting for the destination's result")),
            },
            State::Complete(outcome) => Ok(State::Complete(outcome)),
        }
    }

    fn connect(&mut self) -> Result<State, SessionError> {
        let setup = Setup {
            uuid: self.params.uuid,
            channels: self.params.channels,
            chunk: self.params.chunk as u64,
            devices: self.devices.iter().map(|d| d.id.clone()).collect(),
        };
        let setup_bytes = encode_setup(&setup).map_err(SessionError::Main)?;
        let connected = channels::connect(
            self.params.connect,
            self.params.channels,
            self.params.uuid,
            true,
            self.params.order,
            self.params.timeout,
            |main| {
                use std::io::Write;
                main.write_all(&setup_bytes)
            },
        )
        .map_err(SessionError::Channels)?;
        let main = connected
            .main
            .expect("connect() with a main channel returns it");
        let socket_err = |source| {
            SessionError::Main(MainChannelError::Read {
                what: "the return path (socket setup)",
                source,
            })
        };
        self.driver.watch(&main).map_err(socket_err)?;
        for channel in &connected.multifd {
            self.driver.watch(channel).map_err(socket_err)?;
        }
        let mut reader = ReturnReader::new(main.try_clone().map_err(socket_err)?);
        self.driver
            .spawn_reader("return-path", move || reader.next_message())?;
        Ok(State::AwaitingAck {
            main,
            channels: connected.multifd,
        })
    }

    /// The VM is stopped: SWITCHOVER_START, devices to STOP_COPY, the engine starts.
    fn switchover(
        &mut self,
        mut main: TcpStream,
        channels: Vec<TcpStream>,
    ) -> Result<State, SessionError> {
        let switchover_ns = monotonic_ns();
        main_channel::send(&mut main, "SWITCHOVER_START", &encode_switchover_start())
            .map_err(SessionError::Main)?;
        let mut devices = Vec::with_capacity(self.devices.len());
        for input in self.devices.iter_mut() {
            devices.push(to_stop_copy(input, self.params.chunk)?);
        }
        let plan = SourcePlan {
            devices,
            channels: channels.into_iter().map(OwnedFd::from).collect(),
            progress: self.driver.progress.clone(),
        };
        let engine = self.engine.clone();
        self.driver
            .spawn_engine("source-engine", move || engine.run_source(plan))?;
        Ok(State::StopCopy {
            main,
            switchover_ns,
        })
    }

    /// Compares the destination's per-device account with what was sent; returns notes.
    fn check_result(&self, result: &ResultRecord, report: &SourceReport) -> Vec<String> {
        let mut notes = Vec::new();
        for (input, sent) in self.devices.iter().zip(&report.devices) {
            let loaded = result
                .devices
                .iter()
                .find(|d| d.idstr == input.id.idstr && d.instance_id == input.id.instance_id);
            match loaded {
                Some(loaded) if loaded.bytes == sent.bytes => {}
                Some(loaded) => notes.push(format!(
                    "device {}: the destination wrote {} bytes, the source sent {}",
                    input.id, loaded.bytes, sent.bytes
                )),
                None => notes.push(format!(
                    "device {}: missing from the destination's result",
                    input.id
                )),
            }
        }
        for note in &notes {
            log::warn!("{note}");
        }
        notes
    }

    /// Turns an event that does not fit the state into the error that explains it best.
    fn unexpected(
        &self,
        event: Event<ReturnMessage, SourceReport>,
        step: &'static str,
    ) -> SessionError {
        if self.driver.progress.cancelled() {
            // Whatever failed after a cancel failed because of it.
            return SessionError::Cancelled { step };
        }
        match event {
            Event::Peer(Ok(ReturnMessage::Result(result))) if !result.ok => {
                SessionError::DestinationFailed {
                    message: result.error.unwrap_or_else(|| "no reason given".into()),
                }
            }
            Event::Peer(Ok(ReturnMessage::Shut(status))) => SessionError::DestinationFailed {
                message: format!("SHUT with status {status} while {step}"),
            },
            Event::Peer(Ok(other)) => SessionError::Main(MainChannelError::Malformed {
                what: format!("{other:?} while {step}"),
            }),
            Event::Peer(Err(err)) => SessionError::Main(err),
            Event::Engine(Ok(Err(source))) => {
                let local = SessionError::DataPlane {
                    engine: self.engine.kind().name(),
                    source,
                };
                // The destination's account names the device it failed on; prefer it.
                let peer = self
                    .driver
                    .linger_for_peer(PEER_ACCOUNT_GRACE, |m| match m {
                        ReturnMessage::Result(r) if !r.ok => r.error,
                        _ => None,
                    });
                match peer {
                    Some(message) => {
                        log::warn!("source data plane: {}", error_chain(&local));
                        SessionError::DestinationFailed { message }
                    }
                    None => local,
                }
            }
            Event::Engine(Err(())) => SessionError::EnginePanicked {
                engine: self.engine.kind().name(),
            },
            Event::Engine(Ok(Ok(_))) => SessionError::Mismatch {
                what: format!("the engine finished while {step}"),
            },
        }
    }
}

/// RUNNING or PRE_COPY -> STOP_COPY; returns what the engine needs.
fn to_stop_copy(input: &mut SourceInput, chunk: usize) -> Result<SourceDevice, SessionError> {
    let id = input.id.clone();
    let state = input
        .device
        .state()
        .map_err(|source| SessionError::DeviceGetState {
            device: id.clone(),
            source,
        })?;
    if !matches!(
        state,
        MigState::Running | MigState::RunningP2p | MigState::PreCopy | MigState::PreCopyP2p
    ) {
        return Err(SessionError::SourceState { device: id, state });
    }
    // QEMU: data_buffer_size = min(1 MiB, stop-copy size), fixed before STOP_COPY; 1 MiB when
    // the query fails.
    let read_size = match input.device.stop_copy_size() {
        Ok(size) => (size.min(chunk as u64) as usize).max(1),
        Err(err) => {
            log::warn!(
                "device {id}: stop-copy size unknown ({}); reading {chunk} bytes at a time",
                error_chain(&err)
            );
            chunk
        }
    };
    let opened = input
        .device
        .set_state(MigState::StopCopy)
        .map_err(|source| SessionError::DeviceState {
            device: id.clone(),
            to: MigState::StopCopy,
            source,
        })?;
    let data_fd = match (opened, state.is_precopy()) {
        (Some(fd), _) => fd,
        (None, true) => input
            .precopy_fd
            .take()
            .ok_or_else(|| SessionError::NoPrecopyFd { device: id.clone() })?,
        (None, false) => {
            return Err(SessionError::NoDataFd {
                device: id,
                state: MigState::StopCopy,
            })
        }
    };
    Ok(SourceDevice {
        id,
        data_fd,
        read_size,
        config: input.config.clone(),
    })
}

/// Every device back to RUNNING (from STOP_COPY through STOP, from PRE_COPY directly). A
/// device that cannot get there is named in the returned error.
fn rollback(devices: &mut [SourceInput], err: SessionError) -> SessionError {
    let mut failures = Vec::new();
    for input in devices.iter_mut() {
        input.precopy_fd = None;
        let state = match input.device.state() {
            Ok(state) => state,
            Err(e) => {
                failures.push(format!("device {}: {}", input.id, error_chain(&e)));
                continue;
            }
        };
        if state == MigState::Running {
            continue;
        }
        match input.device.set_state(MigState::Running) {
            Ok(_) => log::info!("device {} back to RUNNING from {state}", input.id),
            Err(e) => failures.push(format!("device {}: {}", input.id, error_chain(&e))),
        }
    }
    if failures.is_empty() {
        err
    } else {
        SessionError::RollbackFailed {
            first: Box::new(err),
            rollback: failures.join("; "),
        }
    }
}
