//! The destination session: channels -> packets -> devices, as a state machine with one step
//! function. Reassembly by idx, the queued-bytes limit and backpressure live in the engine
//! (over [`crate::session::reassembly`]); the session owns the devices, the main channel and
//! the verdict.
//!
//! Precopy data (announced in the setup) is written to each device's data_fd by the
//! main-channel reader, in stream order; the engine then starts only at SWITCHOVER_START, so
//! every precopy byte is in the device before the first stop-copy byte, and SWITCHOVER_ACK
//! waits for every precopy device's DEV_INIT_DATA_SENT (QEMU's switchover-ack). Under a VMM
//! ([`ControlLink`]) the channels may be passed in, devices whose states the VMM drives are
//! only written to, and a loaded device stays in STOP (the VMM starts the VM).
//!
//! ```mermaid
//! stateDiagram-v2
//!     [*] --> Accepting
//!     Accepting --> Loading: main (QEVM, setup agreed) + N multifd channels / devices RESUMING, engine runs (no precopy), SWITCHOVER_ACK (no precopy)
//!     Loading --> Loading: precopy data / written; DEV_INIT_DATA_SENT of the last precopy device / SWITCHOVER_ACK
//!     Loading --> Loading: SWITCHOVER_START (downtime starts) / engine runs (precopy) / EOF / engine done
//!     Loading --> Complete: EOF and engine done / devices STOP (stream verified) then RUNNING, config checked, result ok + SHUT 0
//!     Accepting --> Failed: error
//!     Loading --> Failed: error, source vanished, stall, cancel
//!     Failed --> [*]: result with the error + SHUT 1; devices reset (helper-owned) or reported
//! ```

use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::io::{self, Write};
use std::net::TcpListener;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vfio::{MigState, MigrationDevice, Owner};

use crate::engine::{monotonic_ns, DestDevice, DestPlan, DestReport, Engine, EngineKind, Progress};
use crate::error::error_chain;
use crate::error::{MainChannelError, SessionError};
use crate::metrics;
use crate::session::channels::{self, Acceptor, Arrival};
use crate::session::driver::{Driver, Event};
use crate::session::link::{
    locate, Commander, ControlLink, DeviceNumbers, EngineNumbers, Notice, Phase,
};
use crate::session::main_channel::{
    self, encode_result, encode_switchover_ack, uuid_text, DeviceResult, MainEvent, MainReader,
    ResultRecord, Setup,
};
use crate::session::stream::{Conn, ReadBy};
use crate::session::to_p2p_waypoint;
use crate::wire::{DeviceId, InitExpectation};

/// How long a failed data plane waits for the main channel to say the source is gone.
const PEER_GRACE: Duration = Duration::from_millis(200);

/// A device handed to a destination session.
pub struct DestInput {
    pub id: DeviceId,
    pub device: Box<dyn MigrationDevice>,
    /// The config blob the source must send (standalone and demo know it); `None` when the
    /// VMM checks it.
    pub expected_config: Option<Vec<u8>>,
    /// This device's queued-bytes limit; `None` takes the engine's
    /// ([`crate::engine::DestDevice::max_queued_bytes`]).
    pub max_queued_bytes: Option<u64>,
}

impl std::fmt::Debug for DestInput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DestInput")
            .field("id", &self.id)
            .field("device", &self.device.name())
            .finish()
    }
}

/// What a standalone destination expects.
#[derive(Debug, Clone)]
pub struct DestParams {
    pub channels: u8,
    pub uuid: [u8; 16],
    /// Largest device bytes per packet accepted (`EngineConfig::chunk_size`).
    pub chunk: usize,
    /// Longest wait without progress, per step.
    pub timeout: Duration,
}

/// A completed migration, as the destination saw it.
#[derive(Debug, Clone)]
pub struct DestOutcome {
    pub engine: EngineKind,
    pub report: DestReport,
    /// CLOCK_MONOTONIC when SWITCHOVER_START arrived.
    pub switchover_ns: u64,
    /// When the last device was loaded.
    pub loaded_ns: u64,
    /// Per device, in input order, as sent to the source.
    pub results: Vec<DeviceResult>,
    /// Each device's config blob (config space is the VMM's).
    pub configs: Vec<Vec<u8>>,
    /// CPU seconds of this process from SWITCHOVER_START to the engine's end (see
    /// [`crate::metrics`]).
    pub cpu_s: f64,
}

enum State {
    Accepting,
    Loading {
        main: Conn,
        switchover_ns: Option<u64>,
        eof: bool,
        /// The engine's report and the process CPU seconds from SWITCHOVER_START to it.
        report: Option<(DestReport, f64)>,
        /// With precopy devices, the engine starts at SWITCHOVER_START.
        pending: Option<DestPlan>,
        /// Precopy sections whose DEV_INIT_DATA_SENT has not come yet; SWITCHOVER_ACK goes
        /// out when it is empty.
        awaiting_init: BTreeSet<u32>,
    },
    Complete(DestOutcome),
}

impl State {
    fn name(&self) -> &'static str {
        match self {
            State::Accepting => "accepting channels",
            State::Loading { .. } => "loading device state",
            State::Complete(_) => "complete",
        }
    }
}

/// A standalone destination: one migration from a `send` helper.
pub struct DestSession<'a> {
    /// None when a VMM passed the channels, and once every channel is here: it is closed then,
    /// so that an extra connection is refused instead of waiting for the migration to end.
    listener: Option<TcpListener>,
    params: DestParams,
    devices: &'a mut [DestInput],
    engine: Arc<dyn Engine>,
    driver: Driver<MainEvent, DestReport>,
    /// The return path, once the main channel is here.
    reply: Option<Conn>,
    /// Process CPU seconds at SWITCHOVER_START, which the outcome's `cpu_s` counts from:
    /// set-up before it (channels, a device's RESUMING set-up) is not downtime.
    cpu_at_switchover: f64,
    /// Devices this session moved out of RUNNING (a prefix of `devices`).
    touched: usize,
    /// Present when a VMM drives the migration.
    link: Option<ControlLink>,
}

impl<'a> DestSession<'a> {
    pub fn new(
        listener: TcpListener,
        params: DestParams,
        devices: &'a mut [DestInput],
        engine: Arc<dyn Engine>,
        progress: Arc<Progress>,
    ) -> Self {
        Self::with_link(Some(listener), params, devices, engine, progress, None)
    }

    /// A destination a VMM drives: channels accepted on `listener`, or passed in the link.
    pub fn controlled(
        listener: Option<TcpListener>,
        params: DestParams,
        devices: &'a mut [DestInput],
        engine: Arc<dyn Engine>,
        progress: Arc<Progress>,
        link: ControlLink,
    ) -> Self {
        Self::with_link(listener, params, devices, engine, progress, Some(link))
    }

    fn with_link(
        listener: Option<TcpListener>,
        params: DestParams,
        devices: &'a mut [DestInput],
        engine: Arc<dyn Engine>,
        progress: Arc<Progress>,
        link: Option<ControlLink>,
    ) -> Self {
        let timeout = params.timeout;
        Self {
            listener,
            params,
            devices,
            engine,
            driver: Driver::new(progress, timeout),
            reply: None,
            cpu_at_switchover: metrics::process_cpu_seconds(),
            touched: 0,
            link,
        }
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

    /// Receives one migration. On failure the source is told why (when the main channel is
    /// up), and helper-owned devices are reset; devices the VMM owns are named in the error.
    pub fn run(mut self) -> Result<DestOutcome, SessionError> {
        self.notify(Notice::Phase(Phase::Setup));
        let mut state = State::Accepting;
        let result = loop {
            let step = state.name();
            match self.step(state) {
                Ok(State::Complete(outcome)) => break Ok(outcome),
                Ok(next) => state = next,
                Err(err) => {
                    log::debug!("destination failed while {step}: {}", error_chain(&err));
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
                if let Some(reply) = self.reply.as_mut() {
                    let mut record = ResultRecord::failure(&error_chain(&err));
                    record.location = locate(&err);
                    match encode_result(&record) {
                        Ok(bytes) => {
                            if let Err(e) = main_channel::send(reply, "the failure result", &bytes)
                            {
                                log::warn!("telling the source: {}", error_chain(&e));
                            }
                        }
                        Err(e) => log::warn!("encoding the failure result: {}", error_chain(&e)),
                    }
                }
                // An engine that did not stop in time (logged) is still blocked in a device
                // write; the recovery goes on regardless, since ending the device's resuming
                // session is what ends such a write.
                self.driver.cancel();
                let skip: Vec<bool> = (0..self.touched).map(|i| self.vmm_driven(i)).collect();
                if let Some(link) = self.link.as_mut() {
                    // Nothing of a VMM-driven device stays open here.
                    link.data_fds.clear();
                }
                let err = recover(&mut self.devices[..self.touched], &skip, err);
                self.driver.finish();
                Err(err)
            }
        }
    }

    fn step(&mut self, state: State) -> Result<State, SessionError> {
        match state {
            State::Accepting => self.accept(),
            State::Loading {
                mut main,
                mut switchover_ns,
                mut eof,
                mut report,
                mut pending,
                mut awaiting_init,
            } => {
                let event = if switchover_ns.is_none() && self.link.is_some() {
                    // The VM runs: the source's VMM decides when to switch over.
                    self.driver.wait_unbounded("waiting for SWITCHOVER_START")?
                } else {
                    self.driver.wait("loading device state")?
                };
                if self.driver.progress.cancelled() {
                    return Err(SessionError::Cancelled {
                        step: "loading device state",
                    });
                }
                match event {
                    Event::Peer(Ok(MainEvent::InitDataSent(section))) => {
                        awaiting_init.remove(&section);
                        if awaiting_init.is_empty() {
                            main_channel::send(
                                &mut main,
                                "SWITCHOVER_ACK",
                                &encode_switchover_ack(),
                            )
                            .map_err(SessionError::Main)?;
                            self.notify(Notice::InitialDataLoaded);
                        }
                    }
                    Event::Peer(Ok(MainEvent::SwitchoverStart)) => {
                        switchover_ns = Some(monotonic_ns());
                        self.cpu_at_switchover = metrics::process_cpu_seconds();
                        self.notify(Notice::Phase(Phase::StopCopy));
                        if let Some(plan) = pending.take() {
                            let engine = self.engine.clone();
                            self.driver
                                .spawn_engine("dest-engine", move || engine.run_dest(plan))?;
                        }
                    }
                    Event::Vmm(_) => {}
                    Event::Precopy(_) => {
                        return Err(SessionError::Mismatch {
                            what: "a precopy event on the destination".into(),
                        })
                    }
                    Event::Peer(Ok(MainEvent::Eof)) => eof = true,
                    Event::Peer(Err(err)) if eof && err.peer_gone() => {
                        return Err(SessionError::SourceLeftBeforeResult {
                            step: "loading device state",
                        })
                    }
                    Event::Peer(Err(MainChannelError::Closed { .. })) => {
                        return Err(SessionError::SourceVanished {
                            step: if switchover_ns.is_some() {
                                "loading device state"
                            } else {
                                "waiting for SWITCHOVER_START"
                            },
                        })
                    }
                    Event::Peer(Err(err)) => return Err(SessionError::Main(err)),
                    Event::Engine(Ok(Ok(done))) => {
                        report = Some((
                            done,
                            metrics::process_cpu_seconds() - self.cpu_at_switchover,
                        ))
                    }
                    Event::Engine(Ok(Err(source))) => {
                        let engine = self.engine.kind().name();
                        if !eof {
                            let gone = self.driver.linger_for_peer(PEER_GRACE, |report| {
                                report.err().filter(MainChannelError::peer_gone)
                            });
                            if gone.is_some() {
                                return Err(SessionError::SourceVanishedMidStream {
                                    engine,
                                    source,
                                });
                            }
                        }
                        return Err(SessionError::DataPlane { engine, source });
                    }
                    Event::Engine(Err(())) => {
                        return Err(SessionError::EnginePanicked {
                            engine: self.engine.kind().name(),
                        })
                    }
                }
                match (eof, report) {
                    (true, Some((report, cpu_s))) => {
                        let switchover_ns = switchover_ns.ok_or_else(|| {
                            SessionError::Main(MainChannelError::Unexpected {
                                what: "EOF without SWITCHOVER_START".into(),
                            })
                        })?;
                        self.complete(&mut main, report, switchover_ns, cpu_s)
                    }
                    (eof, report) => Ok(State::Loading {
                        main,
                        switchover_ns,
                        eof,
                        report,
                        pending,
                        awaiting_init,
                    }),
                }
            }
            State::Complete(outcome) => Ok(State::Complete(outcome)),
        }
    }

    /// Main + N multifd channels in any order (accepted, or passed by a VMM); the setup is
    /// checked as soon as the main channel arrives, so a disagreement fails at once instead of
    /// timing out.
    fn accept(&mut self) -> Result<State, SessionError> {
        let expect = InitExpectation {
            uuid: self.params.uuid,
            channels: self.params.channels,
        };
        let passed = self.link.as_mut().and_then(|l| l.passed.take());
        let mut acceptor = match (passed, self.listener.as_ref()) {
            (Some(passed), _) => {
                let mut sockets = vec![passed.main];
                sockets.extend(passed.multifd);
                Acceptor::passed(sockets, expect, true, self.params.timeout)
                    .map_err(SessionError::Channels)?
            }
            (None, Some(listener)) => Acceptor::new(listener, expect, true, self.params.timeout),
            (None, None) => {
                return Err(SessionError::VmmCommand {
                    what: "neither a listener nor passed channels".into(),
                })
            }
        }
        .cancel_with(self.driver.progress.clone());
        let mut reader = None;
        let mut precopy_sections = Vec::new();
        while !acceptor.complete() {
            if self.driver.progress.cancelled() {
                return Err(SessionError::Cancelled {
                    step: "accepting channels",
                });
            }
            let arrival = acceptor.accept_next().map_err(|err| match err {
                crate::error::ChannelError::Cancelled { .. } => SessionError::Cancelled {
                    step: "accepting channels",
                },
                other => SessionError::Channels(other),
            })?;
            if arrival == Arrival::Main {
                let main = acceptor.main_mut().expect("the main channel just arrived");
                let socket_err = |source| {
                    SessionError::Main(MainChannelError::Read {
                        what: "the setup (socket setup)",
                        source,
                    })
                };
                self.reply = Some(main.try_clone().map_err(socket_err)?);
                self.driver.watch(main).map_err(socket_err)?;
                let mut main_reader = MainReader::new(ReadBy::new(
                    main.try_clone().map_err(socket_err)?,
                    Instant::now() + self.params.timeout,
                ));
                let setup = main_reader
                    .read_setup(self.devices.len())
                    .map_err(|e| SessionError::Main(e.timed_out(self.params.timeout)))?;
                // From here the main channel waits on the source's VMM, which is not timed.
                main_reader.inner_mut().unbounded();
                self.check_setup(&setup)?;
                // Sections are numbered in the source's device order, which may not be ours.
                precopy_sections = setup
                    .precopy
                    .iter()
                    .map(|&section| (section, setup.devices[section as usize].clone()))
                    .collect();
                reader = Some(main_reader);
            }
        }
        let (main, multifd) = acceptor.finish();
        if let Some(listener) = self.listener.take() {
            channels::stop_listening(listener, self.params.channels);
        }
        let mut main = main.expect("complete() includes the main channel");
        let mut reader = reader.expect("the setup was read when the main channel arrived");
        let socket_err = |source| {
            SessionError::Main(MainChannelError::Read {
                what: "the main channel (socket setup)",
                source,
            })
        };
        main.set_read_timeout(None)
            .and_then(|()| main.set_write_timeout(Some(self.params.timeout)))
            .map_err(socket_err)?;
        for channel in &multifd {
            self.driver.watch(channel).map_err(socket_err)?;
        }

        let mut devices = Vec::with_capacity(self.devices.len());
        for i in 0..self.devices.len() {
            // Counted first: a device that fails on its way to RESUMING needs recovery too.
            self.touched += 1;
            let fd = if self.vmm_driven(i) {
                self.link
                    .as_mut()
                    .and_then(|l| l.take_data_fd(i))
                    .ok_or_else(|| SessionError::NoDataFd {
                        device: self.devices[i].id.clone(),
                        state: MigState::Resuming,
                    })?
            } else {
                to_resuming(&mut self.devices[i])?
            };
            devices.push(DestDevice {
                id: self.devices[i].id.clone(),
                data_fd: fd,
                max_queued_bytes: self.devices[i].max_queued_bytes,
            });
        }
        // The reader writes precopy data into duplicates of the resuming data_fds, and drops
        // them at SWITCHOVER_START, before the engine writes the first stop-copy byte.
        let mut precopy_fds: HashMap<u32, (DeviceId, File)> = HashMap::new();
        for (section, id) in &precopy_sections {
            let section = *section;
            let device =
                devices
                    .iter()
                    .find(|d| &d.id == id)
                    .ok_or_else(|| SessionError::Mismatch {
                        what: format!("precopy section {section} is device {id}, unknown here"),
                    })?;
            let dup = device
                .data_fd
                .try_clone()
                .map_err(|source| SessionError::Precopy {
                    device: device.id.clone(),
                    source,
                })?;
            precopy_fds.insert(section, (device.id.clone(), File::from(dup)));
        }
        let precopy_bytes = self
            .link
            .as_ref()
            .map(|l| l.precopy_bytes.clone())
            .unwrap_or_else(|| Arc::new(AtomicU64::new(0)));
        let plan = DestPlan {
            devices,
            channels: multifd.into_iter().map(OwnedFd::from).collect(),
            progress: self.driver.progress.clone(),
        };
        let pending = if precopy_sections.is_empty() {
            let engine = self.engine.clone();
            self.driver
                .spawn_engine("dest-engine", move || engine.run_dest(plan))?;
            None
        } else {
            Some(plan)
        };
        let cancel = self.driver.progress.clone();
        self.driver.spawn_reader("main-channel", move || {
            let mut sink = |section: u32, data: &[u8]| -> Result<(), MainChannelError> {
                let Some((id, file)) = precopy_fds.get_mut(&section) else {
                    return Err(MainChannelError::Unexpected {
                        what: format!("precopy data for section {section} after SWITCHOVER_START"),
                    });
                };
                write_precopy(file, data, &|| cancel.cancelled()).map_err(|source| {
                    MainChannelError::PrecopyWrite {
                        device: id.clone(),
                        source,
                    }
                })?;
                precopy_bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
                Ok(())
            };
            let event = reader.next_event_with(&mut sink);
            if !matches!(event, Ok(MainEvent::InitDataSent(_))) {
                // SWITCHOVER_START (or the end): the engine owns the data_fds from here.
                precopy_fds.clear();
            }
            event
        })?;
        let awaiting_init: BTreeSet<u32> = precopy_sections.iter().map(|(s, _)| *s).collect();
        self.notify(Notice::Phase(Phase::Precopy));
        if awaiting_init.is_empty() {
            // No precopy device: QEMU acks at once.
            main_channel::send(&mut main, "SWITCHOVER_ACK", &encode_switchover_ack())
                .map_err(SessionError::Main)?;
            self.notify(Notice::InitialDataLoaded);
        }
        Ok(State::Loading {
            main,
            switchover_ns: None,
            eof: false,
            report: None,
            pending,
            awaiting_init,
        })
    }

    fn check_setup(&self, setup: &Setup) -> Result<(), SessionError> {
        let mismatch = |what: String| Err(SessionError::Mismatch { what });
        if setup.uuid != self.params.uuid {
            return mismatch(format!(
                "source uuid {} but destination uuid {}",
                uuid_text(&setup.uuid),
                uuid_text(&self.params.uuid)
            ));
        }
        if setup.channels != self.params.channels {
            return mismatch(format!(
                "the source opens {} multifd channels, the destination expects {}",
                setup.channels, self.params.channels
            ));
        }
        if setup.chunk > self.params.chunk as u64 {
            return mismatch(format!(
                "the source sends chunks of up to {} bytes, the destination accepts {}",
                setup.chunk, self.params.chunk
            ));
        }
        let ours: BTreeSet<&DeviceId> = self.devices.iter().map(|d| &d.id).collect();
        let theirs: BTreeSet<&DeviceId> = setup.devices.iter().collect();
        if theirs.len() != setup.devices.len() {
            return mismatch("the source lists a device twice".into());
        }
        if let Some(extra) = theirs.difference(&ours).next() {
            return mismatch(format!("the source sends device {extra}, unknown here"));
        }
        if let Some(missing) = ours.difference(&theirs).next() {
            return mismatch(format!("device {missing} is not sent by the source"));
        }
        Ok(())
    }

    /// Every device loaded and the source's EOF read: RESUMING -> STOP (the device checks the
    /// stream) -> RUNNING, configs checked, the result sent.
    fn complete(
        &mut self,
        main: &mut Conn,
        mut report: DestReport,
        switchover_ns: u64,
        cpu_s: f64,
    ) -> Result<State, SessionError> {
        if report.devices.len() != self.devices.len() {
            return Err(SessionError::ReportShape {
                got: report.devices.len(),
                expected: self.devices.len(),
            });
        }
        let mut results = Vec::with_capacity(self.devices.len());
        let mut configs = Vec::with_capacity(self.devices.len());
        let controlled = self.link.is_some();
        let mut loaded = Vec::with_capacity(self.devices.len());
        for (i, (input, device_report)) in
            self.devices.iter_mut().zip(&mut report.devices).enumerate()
        {
            let vmm_driven = self.link.as_ref().is_some_and(|l| l.is_vmm_driven(i));
            if let Some(expected) = &input.expected_config {
                if *expected != device_report.config {
                    return Err(SessionError::ConfigMismatch {
                        device: input.id.clone(),
                        got: device_report.config.len(),
                        expected: expected.len(),
                    });
                }
            }
            // A VMM-driven device is the VMM's to move at all; the others stop here, and run
            // below once all are loaded (without a VMM; under one the VMM starts the VM).
            if !vmm_driven {
                set_state(input, MigState::Stop)?;
                // A device that loads from a buffer of its own is loaded when it has consumed
                // its last byte, which may come after the last write.
                if let Some(done) = input.device.load_done_ns() {
                    device_report.loaded_ns = device_report.loaded_ns.max(done);
                }
            }
            results.push(DeviceResult {
                idstr: input.id.idstr.clone(),
                instance_id: input.id.instance_id,
                bytes: device_report.bytes,
                data_packets: device_report.data_packets,
                config_len: device_report.config.len(),
                loaded_ns: device_report.loaded_ns,
            });
            configs.push(device_report.config.clone());
            loaded.push(Notice::DeviceLoaded {
                device: i,
                bytes: device_report.bytes,
                data_packets: device_report.data_packets,
                config: device_report.config.clone(),
                state: if vmm_driven {
                    None
                } else {
                    input.device.state().ok()
                },
            });
        }
        if !controlled {
            // Every device to RUNNING_P2P before any runs, so none starts DMA into a peer
            // that is still stopped.
            for input in self.devices.iter_mut() {
                to_p2p_waypoint(input.device.as_mut(), &input.id, MigState::Running)?;
            }
            for input in self.devices.iter_mut() {
                set_state(input, MigState::Running)?;
            }
        }
        let loaded_ns = report
            .devices
            .iter()
            .map(|d| d.loaded_ns)
            .max()
            .unwrap_or(switchover_ns);
        let bytes =
            encode_result(&ResultRecord::success(results.clone())).map_err(SessionError::Main)?;
        main_channel::send(main, "the result", &bytes).map_err(SessionError::Main)?;
        // Sent: a later failure must not send a second result.
        self.reply = None;
        if controlled {
            for notice in loaded {
                self.notify(notice);
            }
            self.notify(Notice::Report(EngineNumbers {
                devices: report
                    .devices
                    .iter()
                    .map(|d| DeviceNumbers {
                        bytes: d.bytes,
                        data_packets: d.data_packets,
                        timestamps_ns: d.written_ns.clone(),
                        peak_queued_bytes: Some(d.peak_queued_bytes),
                    })
                    .collect(),
                channels: report
                    .channels
                    .iter()
                    .map(|c| (c.bytes, c.packets))
                    .collect(),
                notes: report.notes.clone(),
                switchover_ns,
                end_ns: loaded_ns,
            }));
            self.notify(Notice::Phase(Phase::Loaded));
        }
        Ok(State::Complete(DestOutcome {
            engine: self.engine.kind(),
            report,
            switchover_ns,
            loaded_ns,
            results,
            configs,
            cpu_s,
        }))
    }
}

/// Writes all of `data` into a resuming data_fd. One that is O_NONBLOCK (a VMM may hand one
/// over) and says EAGAIN while the device's buffer is full is waited for, as the engines
/// wait, until the session is cancelled.
fn write_precopy(file: &mut File, mut data: &[u8], cancelled: &dyn Fn() -> bool) -> io::Result<()> {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    use std::os::fd::AsFd;
    while !data.is_empty() {
        match file.write(data) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && !cancelled() => {
                let mut fds = [PollFd::new(file.as_fd(), PollFlags::POLLOUT)];
                // Readiness or not, the next write (or the cancel check) tells.
                let _ = poll(&mut fds, PollTimeout::from(50u8));
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// -> RESUMING; the resuming data_fd.
fn set_state(input: &mut DestInput, to: MigState) -> Result<(), SessionError> {
    input
        .device
        .set_state(to)
        .map_err(|source| SessionError::DeviceState {
            device: input.id.clone(),
            to,
            source,
        })?;
    Ok(())
}

fn to_resuming(input: &mut DestInput) -> Result<OwnedFd, SessionError> {
    let opened = input
        .device
        .set_state(MigState::Resuming)
        .map_err(|source| SessionError::DeviceState {
            device: input.id.clone(),
            to: MigState::Resuming,
            source,
        })?;
    opened.ok_or_else(|| SessionError::NoDataFd {
        device: input.id.clone(),
        state: MigState::Resuming,
    })
}

/// After a failure, for each device the session touched: the helper resets the devices it
/// owns (loaded or not, none of them may keep a half-migrated state); devices the VMM owns are
/// left to it and named in the error.
fn recover(devices: &mut [DestInput], skip: &[bool], err: SessionError) -> SessionError {
    let mut problems = Vec::new();
    for (i, input) in devices.iter_mut().enumerate() {
        if skip.get(i).copied().unwrap_or(false) {
            log::info!(
                "device {}: its states are the VMM's; it recovers the device",
                input.id
            );
            continue;
        }
        let state = input.device.state().ok();
        match input.device.owner() {
            Owner::Helper => match input.device.reset() {
                Ok(()) => log::info!("device {} reset after the failed migration", input.id),
                Err(e) => problems.push(format!(
                    "resetting device {}: {}",
                    input.id,
                    error_chain(&e)
                )),
            },
            Owner::Vmm => problems.push(format!(
                "device {} is left in {} for the VMM to recover",
                input.id,
                state.map_or("an unknown state", |s| s.kernel_name())
            )),
        }
    }
    if problems.is_empty() {
        err
    } else {
        SessionError::RollbackFailed {
            first: Box::new(err),
            rollback: problems.join("; "),
        }
    }
}
