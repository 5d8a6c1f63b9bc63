//! The source session: devices -> packets -> channels, as a state machine with one step
//! function. Each state holds what that phase owns; any error leaves through [`SourceSession::run`],
//! which cancels the engine and returns every device to RUNNING with its state intact.
//!
//! Under a VMM ([`ControlLink`]) the channels may be passed in, precopy devices stream their
//! precopy data on the main channel while the session waits for SWITCHOVER_ACK and then for
//! the VMM's `switchover-start`, and devices whose states the VMM drives are only read, never
//! moved (the VMM puts them back to RUNNING on failure: the session reports them).
//!
//! ```mermaid
//! stateDiagram-v2
//!     [*] --> Connecting
//!     Connecting --> AwaitingAck: main channel (QEVM, setup) and N multifd channels up / precopy thread starts (VMM)
//!     AwaitingAck --> AwaitingAck: precopy INIT_DATA_SENT; SWITCHOVER_ACK under a VMM (told to it)
//!     AwaitingAck --> StopCopy: SWITCHOVER_ACK (standalone) or the VMM's switchover-start / precopy stops, send SWITCHOVER_START, devices to STOP_COPY, engine runs
//!     StopCopy --> AwaitingResult: engine done / send END sections and EOF
//!     AwaitingResult --> Complete: result ok / devices to STOP
//!     Connecting --> RolledBack: error
//!     AwaitingAck --> RolledBack: error, destination failure
//!     StopCopy --> RolledBack: error, destination failure, stall, cancel
//!     AwaitingResult --> RolledBack: destination failure, its main channel gone
//!     AwaitingResult --> LeftStopped: stall, cancel (the outcome is unknown)
//!     RolledBack --> [*]: devices RUNNING again
//!     LeftStopped --> [*]: devices STOP, for the VMM to decide
//! ```
//!
//! Once every byte and EOF are sent, the destination may be running the VM: with no result
//! (a stall or a cancel while waiting for it) the devices are stopped, not resumed, as QEMU
//! leaves a source paused after it sent everything; two running copies would be worse.

use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Duration;

use vfio::{MigState, MigrationDevice};

use crate::config::ChannelOrder;
use crate::engine::{
    monotonic_ns, DataPlaneError, Engine, EngineKind, Progress, SourceDevice, SourcePlan,
    SourceReport,
};
use crate::error::error_chain;
use crate::error::{MainChannelError, SessionError};
use crate::metrics;
use crate::session::channels;
use crate::session::driver::{Driver, Event};
use crate::session::link::{
    Commander, ControlLink, DeviceNumbers, DeviceUpdate, EngineNumbers, Location, Notice, Phase,
    PrecopyEvent, VmmCommand,
};
use crate::session::main_channel::{
    self, encode_completion, encode_setup, encode_switchover_start, ResultRecord, ReturnMessage,
    ReturnReader, Setup,
};
use crate::session::precopy::{Precopy, PrecopySource};
use crate::session::stream::Conn;
use crate::session::to_p2p_waypoint;
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
    /// CPU seconds of this process from SWITCHOVER_START to the engine's end (see
    /// [`crate::metrics`]).
    pub cpu_s: f64,
}

/// The phases; each holds what it owns.
enum State {
    Connecting,
    AwaitingAck {
        main: Conn,
        channels: Vec<Conn>,
        /// Under a VMM: the precopy thread, while it runs.
        precopy: Option<Precopy>,
        /// Under a VMM: SWITCHOVER_ACK arrived (the VMM was told).
        acked: bool,
    },
    StopCopy {
        main: Conn,
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
    /// Process CPU seconds at SWITCHOVER_START, which the outcome's `cpu_s` counts from:
    /// set-up before it (channels, a device's RESUMING set-up) is not downtime.
    cpu_at_switchover: f64,
    /// Present when a VMM drives the migration.
    link: Option<ControlLink>,
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
            cpu_at_switchover: metrics::process_cpu_seconds(),
            link: None,
        }
    }

    /// Lets a VMM drive the session (see the module doc). `params.connect` is unused when the
    /// link carries passed channels.
    pub fn with_control(mut self, link: ControlLink) -> Self {
        self.link = Some(link);
        self
    }

    /// The handle the control thread posts the VMM's commands with.
    pub fn commander(&self) -> Commander {
        self.driver.commander()
    }

    fn notify(&mut self, notice: Notice) {
        if let Some(link) = self.link.as_mut() {
            (link.notify)(notice);
        }
    }

    fn vmm_driven(&self, device: usize) -> bool {
        self.link.as_ref().is_some_and(|l| l.is_vmm_driven(device))
    }

    /// Runs the migration to its end. On failure every device the helper drives is back in
    /// RUNNING (or the error says which one could not be); devices the VMM drives are left to
    /// it, and nothing of theirs is held any more.
    pub fn run(mut self) -> Result<SourceOutcome, SessionError> {
        self.notify(Notice::Phase(Phase::Setup));
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
                // An engine that did not stop in time (logged) is still blocked in a device
                // read; the rollback goes on regardless, since ending the device's saving
                // session is what ends such a read, and waiting longer would leave the
                // device stopped.
                self.driver.cancel();
                // The engine has stopped (or been given up on): what it had in flight names
                // the channel and device a stall is stuck on.
                let err = err.with_outstanding(self.driver.progress.take_outstanding());
                let skip: Vec<bool> = (0..self.devices.len())
                    .map(|i| self.vmm_driven(i))
                    .collect();
                if let Some(link) = self.link.as_mut() {
                    // Nothing of a VMM-driven device stays open here.
                    link.data_fds.clear();
                }
                let target = if matches!(err, SessionError::OutcomeUnknown { .. }) {
                    MigState::Stop
                } else {
                    MigState::Running
                };
                let err = rollback(self.devices, &skip, target, err);
                self.driver.finish();
                Err(err)
            }
        }
    }

    /// One transition.
    fn step(&mut self, state: State) -> Result<State, SessionError> {
        match state {
            State::Connecting => self.connect(),
            State::AwaitingAck {
                main,
                channels,
                mut precopy,
                mut acked,
            } => {
                let step = if acked {
                    "waiting for the VMM's switchover-start"
                } else {
                    "waiting for SWITCHOVER_ACK"
                };
                let event = if self.link.is_some() {
                    // The VM runs: the VMM decides when to switch over.
                    self.driver.wait_unbounded(step)?
                } else {
                    self.driver.wait(step)?
                };
                match event {
                    Event::Peer(Ok(ReturnMessage::SwitchoverAck)) if !acked => {
                        if self.link.is_none() {
                            return self.switchover(main, channels, None, Vec::new());
                        }
                        acked = true;
                        self.notify(Notice::SwitchoverAck);
                    }
                    Event::Vmm(VmmCommand::SwitchoverStart { updates }) => {
                        if !acked {
                            return Err(SessionError::VmmCommand {
                                what: "switchover-start before SWITCHOVER_ACK".into(),
                            });
                        }
                        return self.switchover(main, channels, precopy.take(), updates);
                    }
                    Event::Vmm(VmmCommand::Wake) => {}
                    Event::Precopy(Ok(PrecopyEvent::InitialSent { device })) => {
                        self.notify(Notice::InitialDataSent { device })
                    }
                    Event::Precopy(Err(err)) => return Err(err),
                    other => return Err(self.unexpected(other, step)),
                }
                Ok(State::AwaitingAck {
                    main,
                    channels,
                    precopy,
                    acked,
                })
            }
            State::StopCopy {
                mut main,
                switchover_ns,
            } => match self.driver.wait("streaming device state")? {
                Event::Engine(Ok(Ok(report))) => {
                    let sent_ns = monotonic_ns();
                    let cpu_s = metrics::process_cpu_seconds() - self.cpu_at_switchover;
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
            } => match self
                .driver
                .wait("waiting for the destination's result")
                .map_err(|err| match err {
                    SessionError::Stalled { .. } | SessionError::Cancelled { .. } => {
                        SessionError::OutcomeUnknown {
                            first: Box::new(err),
                        }
                    }
                    other => other,
                })? {
                Event::Peer(Ok(ReturnMessage::Result(result))) if result.ok => {
                    let result_ns = monotonic_ns();
                    // The destination runs the devices now: nothing here may roll the
                    // source back any more (two running copies); what is odd is noted.
                    let mut report = report;
                    report.notes.extend(self.check_result(&result, &report));
                    for (i, input) in self.devices.iter_mut().enumerate() {
                        if self.link.as_ref().is_some_and(|l| l.is_vmm_driven(i)) {
                            continue;
                        }
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
                    if self.link.is_some() {
                        self.notify(Notice::Report(EngineNumbers {
                            devices: report
                                .devices
                                .iter()
                                .map(|d| DeviceNumbers {
                                    bytes: d.bytes,
                                    data_packets: d.data_packets,
                                    timestamps_ns: d.read_issued_ns.clone(),
                                    peak_queued_bytes: None,
                                })
                                .collect(),
                            channels: report
                                .channels
                                .iter()
                                .map(|c| (c.bytes, c.packets))
                                .collect(),
                            notes: report.notes.clone(),
                            switchover_ns,
                            end_ns: result_ns,
                        }));
                        self.notify(Notice::Phase(Phase::Loaded));
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
                // A cancel's wake-up: the next wait sees the cancel and reports the outcome
                // unknown. Rolling back here would resume the source beside a destination
                // that may run the VM.
                Event::Vmm(VmmCommand::Wake) => Ok(State::AwaitingResult {
                    report,
                    switchover_ns,
                    sent_ns,
                    cpu_s,
                }),
                // A failure the destination reports is definite, cancel or not: the source
                // may resume.
                Event::Peer(Ok(ReturnMessage::Result(result))) => {
                    Err(SessionError::DestinationFailed {
                        message: result.error.unwrap_or_else(|| "no reason given".into()),
                        location: result.location,
                    })
                }
                other => match self.unexpected(other, "waiting for the destination's result") {
                    err @ (SessionError::Stalled { .. } | SessionError::Cancelled { .. }) => {
                        Err(SessionError::OutcomeUnknown {
                            first: Box::new(err),
                        })
                    }
                    err => Err(err),
                },
            },
            State::Complete(outcome) => Ok(State::Complete(outcome)),
        }
    }

    fn connect(&mut self) -> Result<State, SessionError> {
        let precopy: Vec<u32> = (0..self.devices.len())
            .filter(|&i| self.link.as_ref().is_some_and(|l| l.is_precopy(i)))
            .map(|i| i as u32)
            .collect();
        let setup = Setup {
            uuid: self.params.uuid,
            channels: self.params.channels,
            chunk: self.params.chunk as u64,
            devices: self.devices.iter().map(|d| d.id.clone()).collect(),
            precopy: precopy.clone(),
        };
        let setup_bytes = encode_setup(&setup).map_err(SessionError::Main)?;
        let passed = self.link.as_mut().and_then(|l| l.passed.take());
        let connected = match passed {
            Some(passed) => {
                let mut channels = channels::send_inits(
                    passed.main,
                    passed.multifd,
                    self.params.uuid,
                    self.params.timeout,
                )
                .map_err(SessionError::Channels)?;
                if let Some(main) = channels.main.as_mut() {
                    main_channel::send(main, "the setup", &setup_bytes)
                        .map_err(SessionError::Main)?;
                }
                channels
            }
            None => channels::connect(
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
            .map_err(SessionError::Channels)?,
        };
        let main = connected
            .main
            .expect("connect() and send_inits() return the main channel");
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
        let precopy = if precopy.is_empty() {
            None
        } else {
            Some(self.start_precopy(&main, &precopy)?)
        };
        self.notify(Notice::Phase(Phase::Precopy));
        Ok(State::AwaitingAck {
            main,
            channels: connected.multifd,
            precopy,
            acked: false,
        })
    }

    /// Helper-driven precopy devices go RUNNING -> PRE_COPY; the precopy thread starts on
    /// duplicates of every precopy device's saving data_fd.
    fn start_precopy(&mut self, main: &Conn, devices: &[u32]) -> Result<Precopy, SessionError> {
        let mut sources = Vec::with_capacity(devices.len());
        for &section in devices {
            let i = section as usize;
            let id = self.devices[i].id.clone();
            let dup_err = |source| SessionError::Precopy {
                device: id.clone(),
                source,
            };
            let data_fd = if self.vmm_driven(i) {
                self.link
                    .as_ref()
                    .and_then(|link| link.dup_data_fd(i))
                    .ok_or_else(|| SessionError::NoPrecopyFd { device: id.clone() })?
                    .map_err(dup_err)?
            } else {
                let input = &mut self.devices[i];
                let state =
                    input
                        .device
                        .state()
                        .map_err(|source| SessionError::DeviceGetState {
                            device: id.clone(),
                            source,
                        })?;
                if !state.is_precopy() {
                    let opened = input
                        .device
                        .set_state(MigState::PreCopy)
                        .map_err(|source| SessionError::DeviceState {
                            device: id.clone(),
                            to: MigState::PreCopy,
                            source,
                        })?;
                    input.precopy_fd = opened;
                }
                input
                    .precopy_fd
                    .as_ref()
                    .ok_or_else(|| SessionError::NoPrecopyFd { device: id.clone() })?
                    .try_clone()
                    .map_err(dup_err)?
            };
            sources.push(PrecopySource {
                device: i,
                section,
                id,
                data_fd,
            });
        }
        let main = main.try_clone().map_err(|source| {
            SessionError::Main(MainChannelError::Write {
                what: "precopy data (socket setup)",
                source,
            })
        })?;
        let bytes = self
            .link
            .as_ref()
            .map(|l| l.precopy_bytes.clone())
            .unwrap_or_default();
        Precopy::start(
            sources,
            main,
            self.params.chunk,
            bytes,
            self.driver.sender(),
        )
    }

    /// The VM is stopped: precopy stops, SWITCHOVER_START, devices to STOP_COPY (the
    /// VMM-driven ones are there already), the engine starts.
    fn switchover(
        &mut self,
        mut main: Conn,
        channels: Vec<Conn>,
        precopy: Option<Precopy>,
        updates: Vec<DeviceUpdate>,
    ) -> Result<State, SessionError> {
        if let Some(mut precopy) = precopy {
            precopy.stop()?;
        }
        for update in updates {
            let Some(input) = self.devices.get_mut(update.device) else {
                return Err(SessionError::VmmCommand {
                    what: format!("an update for device number {}", update.device),
                });
            };
            if let Some(config) = update.config {
                input.config = config;
            }
            if let Some(fd) = update.data_fd {
                let vmm_driven = self
                    .link
                    .as_ref()
                    .is_some_and(|l| l.is_vmm_driven(update.device));
                match self
                    .link
                    .as_mut()
                    .and_then(|l| l.data_fds.get_mut(update.device))
                {
                    Some(slot) if vmm_driven => *slot = Some(fd),
                    _ => {
                        return Err(SessionError::VmmCommand {
                            what: format!(
                                "a data_fd for device {}, whose states the helper drives",
                                input.id
                            ),
                        })
                    }
                }
            }
        }
        // The config packet is one packet: the destination refuses any above a chunk.
        if let Some(input) = self
            .devices
            .iter()
            .find(|d| d.config.len() > self.params.chunk)
        {
            return Err(SessionError::ConfigTooLarge {
                device: input.id.clone(),
                len: input.config.len(),
                chunk: self.params.chunk,
            });
        }
        let switchover_ns = monotonic_ns();
        self.cpu_at_switchover = metrics::process_cpu_seconds();
        main_channel::send(&mut main, "SWITCHOVER_START", &encode_switchover_start())
            .map_err(SessionError::Main)?;
        self.notify(Notice::Phase(Phase::StopCopy));
        for i in 0..self.devices.len() {
            if !self.vmm_driven(i) {
                let input = &mut self.devices[i];
                to_p2p_waypoint(input.device.as_mut(), &input.id, MigState::StopCopy)?;
            }
        }
        let mut devices = Vec::with_capacity(self.devices.len());
        for i in 0..self.devices.len() {
            if self.vmm_driven(i) {
                let id = self.devices[i].id.clone();
                let data_fd = self
                    .link
                    .as_mut()
                    .and_then(|l| l.take_data_fd(i))
                    .ok_or_else(|| SessionError::NoDataFd {
                        device: id.clone(),
                        state: MigState::StopCopy,
                    })?;
                devices.push(SourceDevice {
                    id,
                    data_fd,
                    read_size: self.params.chunk,
                    config: self.devices[i].config.clone(),
                });
            } else {
                devices.push(to_stop_copy(&mut self.devices[i], self.params.chunk)?);
            }
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
                    location: result.location,
                }
            }
            Event::Peer(Ok(ReturnMessage::Shut(status))) => SessionError::DestinationFailed {
                message: format!("SHUT with status {status} while {step}"),
                location: Location::default(),
            },
            Event::Peer(Ok(other)) => SessionError::Main(MainChannelError::Unexpected {
                what: format!("{other:?} while {step}"),
            }),
            Event::Peer(Err(err)) => SessionError::Main(err),
            Event::Engine(Ok(Err(source))) => {
                // A device of ours that failed to read is the cause: the destination only saw
                // the channels close after it.
                let ours = matches!(source, DataPlaneError::ReadDevice { .. });
                let local = SessionError::DataPlane {
                    engine: self.engine.kind().name(),
                    source,
                };
                if ours {
                    return local;
                }
                // Otherwise the destination's account names the device it failed on; prefer it.
                let peer = self
                    .driver
                    .linger_for_peer(PEER_ACCOUNT_GRACE, |m| match m {
                        Ok(ReturnMessage::Result(r)) if !r.ok => {
                            let location = r.location;
                            r.error.map(|message| (message, location))
                        }
                        _ => None,
                    });
                match peer {
                    Some((message, location)) => {
                        log::warn!("source data plane: {}", error_chain(&local));
                        SessionError::DestinationFailed { message, location }
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
            Event::Precopy(Err(err)) => err,
            Event::Precopy(Ok(event)) => SessionError::Mismatch {
                what: format!("precopy {event:?} while {step}"),
            },
            Event::Vmm(command) => SessionError::VmmCommand {
                what: format!("{command:?} while {step}"),
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

/// Every device to `target` (RUNNING after a failure, from STOP_COPY through STOP or from
/// PRE_COPY directly; STOP when the outcome is unknown), except those marked in `skip` (the
/// VMM drives them). A device that cannot get there is named in the returned error.
fn rollback(
    devices: &mut [SourceInput],
    skip: &[bool],
    target: MigState,
    err: SessionError,
) -> SessionError {
    let mut failures = Vec::new();
    let mut failed = vec![false; devices.len()];
    // Every device to its P2P state first, so that none runs while a peer is stopped.
    for (i, input) in devices.iter_mut().enumerate() {
        input.precopy_fd = None;
        if skip.get(i).copied().unwrap_or(false) {
            continue;
        }
        if let Err(e) = to_p2p_waypoint(input.device.as_mut(), &input.id, target) {
            failures.push(error_chain(&e));
            failed[i] = true;
        }
    }
    for (i, input) in devices.iter_mut().enumerate() {
        if skip.get(i).copied().unwrap_or(false) || failed[i] {
            continue;
        }
        let state = match input.device.state() {
            Ok(state) => state,
            Err(e) => {
                failures.push(format!("device {}: {}", input.id, error_chain(&e)));
                continue;
            }
        };
        if state == target {
            continue;
        }
        match input.device.set_state(target) {
            Ok(_) => log::info!("device {} to {target} from {state}", input.id),
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
