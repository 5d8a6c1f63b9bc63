//! The VMM-driven migration as the control thread sees it: the devices the VMM registered,
//! the migration thread that runs a session over them, the status every command is checked
//! against, and the events the VMM gets.
//!
//! ```mermaid
//! stateDiagram-v2
//!     [*] --> none
//!     none --> setup: migrate-outgoing / migrate-incoming (devices registered)
//!     setup --> precopy: channels up, setup agreed (the VM runs)
//!     precopy --> stop_copy: source: switchover-start (after SWITCHOVER_ACK) / destination: SWITCHOVER_START read
//!     stop_copy --> loaded: every device written and checked
//!     loaded --> completed: source: destination's result / destination: every config handed over (load-config-ready)
//!     setup --> failed
//!     precopy --> failed
//!     stop_copy --> failed
//!     loaded --> failed
//!     setup --> cancelled: cancel, quit, the VMM left
//!     precopy --> cancelled
//!     stop_copy --> cancelled
//!     loaded --> cancelled
//!     completed --> none: next add-device
//!     failed --> none
//!     cancelled --> none
//! ```
//!
//! The final `MIGRATION` event (completed, failed or cancelled) goes out only once the
//! migration thread has let go of everything: engine and reader threads joined, every device
//! and data_fd the VMM handed over closed.

use std::net::{SocketAddr, TcpListener};
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::{json, Value};
use vfio::{MigState, MigrationDevice, Owner, VfioDevice};

use crate::config::ChannelOrder;
pub use crate::control::outbox::Events;
use crate::control::schema::{base64_encode, DeviceMode};
use crate::engine::{Engine, Progress};
use crate::error::{error_chain, SessionError};
use crate::metrics;
use crate::session::dest::{DestInput, DestParams, DestSession};
use crate::session::link::{
    locate, Commander, ControlLink, DeviceUpdate, EngineNumbers, Location, Notice, PassedChannels,
    Phase, VmmDevice,
};
use crate::session::source::{SourceInput, SourceParams, SourceSession};
use crate::wire::DeviceId;

/// Which side this helper plays.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Source,
    Destination,
}

/// The status the VMM sees (`MIGRATION` events, `query`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Status {
    None,
    Setup,
    Precopy,
    StopCopy,
    Loaded,
    Completed,
    Failed,
    Cancelled,
}

impl Status {
    pub fn name(self) -> &'static str {
        match self {
            Status::None => "none",
            Status::Setup => "setup",
            Status::Precopy => "precopy",
            Status::StopCopy => "stop-copy",
            Status::Loaded => "loaded",
            Status::Completed => "completed",
            Status::Failed => "failed",
            Status::Cancelled => "cancelled",
        }
    }

    /// No migration runs (none, or the last one ended).
    pub fn idle(self) -> bool {
        matches!(
            self,
            Status::None | Status::Completed | Status::Failed | Status::Cancelled
        )
    }
}

/// A device the VMM registered with `add-device`, not yet handed to a migration.
pub struct Registered {
    /// The VMM's handle.
    pub handle: String,
    pub id: DeviceId,
    pub mode: DeviceMode,
    /// `device` mode: the VFIO device (a dup of the VMM's fd).
    pub device: Option<VfioDevice>,
    /// `data-fd` mode: the data_fd, when handed over.
    pub data_fd: Option<OwnedFd>,
    pub precopy: bool,
    pub config: Option<Vec<u8>>,
    pub multifd_transfer: crate::control::schema::OnOffAuto,
    pub load_config_after_iter: bool,
    /// Destination: the queued-bytes limit (`u64::MAX`: unlimited).
    pub max_queued: u64,
}

impl std::fmt::Debug for Registered {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registered")
            .field("handle", &self.handle)
            .field("mode", &self.mode)
            .field("data_fd", &self.data_fd.is_some())
            .finish_non_exhaustive()
    }
}

/// A device in a running (or finished) migration, as `query` shows it.
#[derive(Debug, Clone)]
pub struct DeviceView {
    pub handle: String,
    pub id: DeviceId,
    pub mode: DeviceMode,
    pub precopy: bool,
    pub hold_config: bool,
    /// migrating, initial-data-sent, config-held, loaded, rolled-back, left-to-vmm, reset;
    /// at a failed end also stopped, rollback-failed, reset-failed, unknown.
    pub status: &'static str,
    pub has_data_fd: bool,
    pub has_config: bool,
    pub bytes: Option<u64>,
    pub data_packets: Option<u32>,
    pub state: Option<String>,
    pub timestamps: Vec<u64>,
    /// Destination: the device's queued-bytes limit, and the most it held queued (at the
    /// engine's end).
    pub max_queued: Option<u64>,
    pub peak_queued_bytes: Option<u64>,
    /// Destination, load-config-after-iter: the VMM said the rest of the VM is loaded.
    pub ready: bool,
    /// Destination: the config waiting for `load-config-ready`.
    pub held: Option<Vec<u8>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// What the control thread and the migration thread share.
#[derive(Debug)]
pub struct Shared {
    pub state: Mutex<Inner>,
    pub events: Events,
}

/// The migration's status and numbers.
#[derive(Debug)]
pub struct Inner {
    pub status: Status,
    pub role: Option<Role>,
    /// Source: SWITCHOVER_ACK arrived.
    pub acked: bool,
    pub devices: Vec<DeviceView>,
    pub channels: u8,
    pub engine: Option<String>,
    pub numbers: Option<EngineNumbers>,
    pub notes: Vec<String>,
    pub error: Option<Value>,
    pub started: Option<Instant>,
    pub switchover: Option<Instant>,
    pub ended: Option<Instant>,
    pub progress: Option<Arc<Progress>>,
    pub precopy_bytes: Arc<AtomicU64>,
    /// Devices the VMM handed over but the helper did not move (multifd-transfer off/auto).
    pub not_moved: Vec<String>,
    /// Source: device updates the VMM sent, delivered with `switchover-start`. Here, not on the
    /// control thread, so that the final status drops them (closing their fds) before its
    /// event goes out.
    pub pending_updates: Vec<DeviceUpdate>,
}

impl Default for Inner {
    fn default() -> Self {
        Self {
            status: Status::None,
            role: None,
            acked: false,
            devices: Vec::new(),
            channels: 0,
            engine: None,
            numbers: None,
            notes: Vec::new(),
            error: None,
            started: None,
            switchover: None,
            ended: None,
            progress: None,
            precopy_bytes: Arc::new(AtomicU64::new(0)),
            not_moved: Vec::new(),
            pending_updates: Vec::new(),
        }
    }
}

impl Shared {
    pub fn new() -> Arc<Shared> {
        Arc::new(Shared {
            state: Mutex::new(Inner::default()),
            events: Events::default(),
        })
    }

    pub fn lock(&self) -> MutexGuard<'_, Inner> {
        lock(&self.state)
    }

    fn set_status(&self, status: Status, extra: Value) {
        let (role, dropped) = {
            let mut inner = self.lock();
            inner.status = status;
            if status == Status::StopCopy {
                inner.switchover = Some(Instant::now());
            }
            let mut dropped = Vec::new();
            if !status.idle() {
                inner.ended = None;
            } else {
                inner.ended.get_or_insert_with(Instant::now);
                dropped = std::mem::take(&mut inner.pending_updates);
            }
            (inner.role, dropped)
        };
        // Every fd of the migration is closed before its final event.
        drop(dropped);
        let mut data = json!({ "status": status.name(), "role": role });
        if let (Value::Object(map), Value::Object(more)) = (&mut data, extra) {
            map.extend(more);
        }
        self.events.emit("MIGRATION", data);
    }

    /// A session's notice: status, events.
    fn on_notice(&self, notice: Notice) {
        match notice {
            Notice::Phase(phase) => {
                let status = match phase {
                    Phase::Setup => Status::Setup,
                    Phase::Precopy => Status::Precopy,
                    Phase::StopCopy => Status::StopCopy,
                    Phase::Loaded => Status::Loaded,
                };
                self.set_status(status, json!({}));
            }
            Notice::SwitchoverAck => {
                self.lock().acked = true;
                self.events.emit("SWITCHOVER_ACK", json!({}));
            }
            Notice::InitialDataSent { device } => {
                let handle = {
                    let mut inner = self.lock();
                    inner.devices.get_mut(device).map(|d| {
                        d.status = "initial-data-sent";
                        d.handle.clone()
                    })
                };
                self.events
                    .emit("INITIAL_DATA_SENT", json!({ "device": handle }));
            }
            Notice::InitialDataLoaded => {
                let bytes = self.lock().precopy_bytes.load(Ordering::Relaxed);
                self.events.emit(
                    "INITIAL_DATA_LOADED",
                    json!({ "precopy-bytes": bytes, "switchover-ack": "sent" }),
                );
            }
            Notice::DeviceLoaded {
                device,
                bytes,
                data_packets,
                config,
                state,
            } => {
                let event = {
                    let mut inner = self.lock();
                    let Some(view) = inner.devices.get_mut(device) else {
                        return;
                    };
                    view.bytes = Some(bytes);
                    view.data_packets = Some(data_packets);
                    view.state = state.map(|s| s.kernel_name().to_string());
                    if view.hold_config && !view.ready {
                        view.status = "config-held";
                        view.held = Some(config);
                        None
                    } else {
                        view.status = "loaded";
                        Some(device_loaded(view, &config))
                    }
                };
                if let Some(data) = event {
                    self.events.emit("DEVICE_LOADED", data);
                }
            }
            Notice::Report(numbers) => {
                let mut inner = self.lock();
                for (view, device) in inner.devices.iter_mut().zip(&numbers.devices) {
                    view.bytes = Some(device.bytes);
                    view.data_packets = Some(device.data_packets);
                    view.timestamps = device.timestamps_ns.clone();
                    view.peak_queued_bytes = device.peak_queued_bytes;
                }
                inner.notes.extend(numbers.notes.iter().cloned());
                inner.numbers = Some(numbers);
            }
        }
    }

    /// `load-config-ready`: marks devices ready and hands over the configs held for them.
    /// Returns how many configs are still held afterwards. Tells `hold` only when this call
    /// released the last held config: the migration thread reads it only while configs are
    /// held, so a message per call would pile up unread for the migration's life.
    pub fn release_configs(&self, device: Option<usize>, hold: Option<&Sender<Hold>>) -> usize {
        let mut released = Vec::new();
        let still_held = {
            let mut inner = self.lock();
            for (i, view) in inner.devices.iter_mut().enumerate() {
                if device.is_some_and(|d| d != i) {
                    continue;
                }
                view.ready = true;
                if let Some(config) = view.held.take() {
                    view.status = "loaded";
                    released.push(device_loaded(view, &config));
                }
            }
            inner.devices.iter().filter(|d| d.held.is_some()).count()
        };
        let last = still_held == 0 && !released.is_empty();
        for data in released {
            self.events.emit("DEVICE_LOADED", data);
        }
        // After the events: once woken, the migration thread may report its end at once.
        if let (true, Some(hold)) = (last, hold) {
            let _ = hold.send(Hold::Released);
        }
        still_held
    }
}

fn device_loaded(view: &DeviceView, config: &[u8]) -> Value {
    json!({
        "device": view.handle,
        "idstr": view.id.idstr,
        "instance-id": view.id.instance_id,
        "bytes": view.bytes,
        "data-packets": view.data_packets,
        "state": view.state,
        "config": base64_encode(config),
    })
}

/// What the destination's migration thread waits for when configs are held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hold {
    Released,
    Cancel,
}

/// A migration thread and the handles to steer it.
#[derive(Debug)]
pub struct Migration {
    pub role: Role,
    thread: Option<JoinHandle<()>>,
    pub commander: Commander,
    pub progress: Arc<Progress>,
    /// Set by cancel, quit or the VMM leaving: the end is "cancelled", not "failed".
    pub cancel_requested: Arc<AtomicBool>,
    pub hold: Sender<Hold>,
    /// Source: `switchover-start` was accepted. The status says `stop-copy` only once the
    /// session has sent SWITCHOVER_START; in between, a second switchover-start or an
    /// update-device (which nothing would read any more) is refused by this.
    pub switchover_sent: bool,
    /// How long a cancelled migration may take to let go of everything: a step that does not
    /// see the cancel (a device ioctl, say) still ends within the session's no-progress
    /// timeout.
    pub cancel_grace: Duration,
}

impl Migration {
    /// Asks the migration to stop: its session rolls back and it reports "cancelled".
    pub fn cancel(&self) {
        self.cancel_requested.store(true, Ordering::Relaxed);
        self.progress.cancel.store(true, Ordering::Relaxed);
        self.commander.send(crate::session::link::VmmCommand::Wake);
        let _ = self.hold.send(Hold::Cancel);
    }

    pub fn finished(&self) -> bool {
        self.thread.as_ref().is_none_or(|t| t.is_finished())
    }

    /// Waits (at most `limit`) for the thread to end; false if it did not.
    pub fn join(&mut self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while !self.finished() {
            if Instant::now() >= deadline {
                return false;
            }
            thread::sleep(Duration::from_millis(5));
        }
        if let Some(handle) = self.thread.take() {
            if handle.join().is_err() {
                log::error!("the migration thread panicked");
            }
        }
        true
    }
}

/// How the channels come up.
#[derive(Debug)]
pub enum Transport {
    Connect(SocketAddr),
    Listen(TcpListener),
    Passed(PassedChannels),
}

/// Everything a migration thread needs.
pub struct Plan {
    pub role: Role,
    pub devices: Vec<Registered>,
    pub channels: u8,
    pub uuid: [u8; 16],
    pub chunk: usize,
    pub timeout: Duration,
    pub transport: Transport,
    pub engine: Arc<dyn Engine>,
}

/// Starts the migration thread; returns once the session exists (its commander is here).
pub fn start(plan: Plan, shared: &Arc<Shared>) -> Result<Migration, std::io::Error> {
    let progress = Arc::new(Progress::default());
    let cancel_requested = Arc::new(AtomicBool::new(false));
    let (hold_tx, hold_rx) = mpsc::channel();
    let (commander_tx, commander_rx) = mpsc::channel();
    let role = plan.role;
    let cancel_grace = plan.timeout.saturating_add(Duration::from_secs(5));
    {
        let mut inner = shared.lock();
        *inner = Inner {
            status: Status::Setup,
            role: Some(role),
            channels: plan.channels,
            engine: Some(plan.engine.kind().name().to_string()),
            started: Some(Instant::now()),
            progress: Some(progress.clone()),
            not_moved: std::mem::take(&mut inner.not_moved),
            devices: plan
                .devices
                .iter()
                .map(|d| DeviceView {
                    handle: d.handle.clone(),
                    id: d.id.clone(),
                    mode: d.mode,
                    precopy: d.precopy && role == Role::Source,
                    hold_config: d.load_config_after_iter && role == Role::Destination,
                    status: "migrating",
                    has_data_fd: d.data_fd.is_some(),
                    has_config: d.config.is_some(),
                    bytes: None,
                    data_packets: None,
                    state: None,
                    timestamps: Vec::new(),
                    max_queued: (role == Role::Destination).then_some(d.max_queued),
                    peak_queued_bytes: None,
                    ready: false,
                    held: None,
                })
                .collect(),
            ..Inner::default()
        };
    }
    let thread_shared = shared.clone();
    let thread_progress = progress.clone();
    let thread_cancel = cancel_requested.clone();
    let handle = thread::Builder::new()
        .name("migration".into())
        .spawn(move || {
            let devices = plan.devices.len();
            run_caught(&thread_shared, devices, &thread_cancel, || {
                run(
                    plan,
                    &thread_shared,
                    thread_progress,
                    &thread_cancel,
                    commander_tx,
                    hold_rx,
                )
            })
        })?;
    let commander = commander_rx
        .recv_timeout(Duration::from_secs(10))
        .map_err(|_| std::io::Error::other("the migration thread did not start its session"))?;
    Ok(Migration {
        role,
        thread: Some(handle),
        commander,
        progress,
        cancel_requested,
        hold: hold_tx,
        switchover_sent: false,
        cancel_grace,
    })
}

/// A registered device on its way into a session's inputs.
struct Boxed {
    id: DeviceId,
    device: Box<dyn MigrationDevice>,
    config: Option<Vec<u8>>,
    max_queued: u64,
}

/// How each device ended, for the final event.
struct DeviceEnd {
    state: Option<String>,
    /// The device's `status` in the final event.
    status: &'static str,
    recovery: &'static str,
}

/// Runs the migration `run`; if it panics (a bug), the VMM still gets the final event, with
/// every device's state unknown, instead of a status that never moves again.
fn run_caught(shared: &Shared, devices: usize, cancel_requested: &AtomicBool, run: impl FnOnce()) {
    let Err(payload) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(run)) else {
        return;
    };
    if shared.lock().status.idle() {
        // The final event went out before the panic.
        return;
    }
    let message = payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "no message".to_owned());
    let ends = (0..devices)
        .map(|_| DeviceEnd {
            state: None,
            status: "unknown",
            recovery: "vmm: the helper failed midway; read the device's state before using it",
        })
        .collect();
    finish(
        shared,
        Err(SessionError::MigrationPanicked { message }),
        ends,
        cancel_requested.load(Ordering::Relaxed),
    );
}

fn run(
    plan: Plan,
    shared: &Arc<Shared>,
    progress: Arc<Progress>,
    cancel_requested: &AtomicBool,
    commander_tx: Sender<Commander>,
    hold_rx: Receiver<Hold>,
) {
    let Plan {
        role,
        devices,
        channels,
        uuid,
        chunk,
        timeout,
        transport,
        engine,
    } = plan;
    let vmm_driven: Vec<bool> = devices
        .iter()
        .map(|d| d.mode == DeviceMode::DataFd)
        .collect();
    let precopy: Vec<bool> = devices
        .iter()
        .map(|d| d.precopy && role == Role::Source)
        .collect();
    let precopy_bytes = shared.lock().precopy_bytes.clone();
    let notify_shared = shared.clone();
    let (listener, passed, connect) = match transport {
        Transport::Connect(addr) => (None, None, Some(addr)),
        Transport::Listen(listener) => (Some(listener), None, None),
        Transport::Passed(passed) => (None, Some(passed), None),
    };
    let mut data_fds = Vec::with_capacity(devices.len());
    let mut boxed = Vec::with_capacity(devices.len());
    for d in devices {
        data_fds.push(d.data_fd);
        let device: Box<dyn MigrationDevice> = match d.device {
            Some(device) => Box::new(device),
            None => Box::new(VmmDevice::new(d.handle.clone())),
        };
        boxed.push(Boxed {
            id: d.id,
            device,
            config: d.config,
            max_queued: d.max_queued,
        });
    }
    let link = ControlLink {
        vmm_driven: vmm_driven.clone(),
        data_fds,
        precopy,
        passed,
        precopy_bytes,
        notify: Box::new(move |notice| notify_shared.on_notice(notice)),
    };
    let (result, ends): (Result<(), SessionError>, Vec<DeviceEnd>) = match role {
        Role::Source => {
            let mut inputs: Vec<SourceInput> = boxed
                .into_iter()
                .map(|b| SourceInput {
                    id: b.id,
                    device: b.device,
                    config: b.config.unwrap_or_default(),
                    precopy_fd: None,
                })
                .collect();
            let params = SourceParams {
                connect: connect.unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0))),
                channels,
                uuid,
                chunk,
                timeout,
                order: ChannelOrder::Ascending,
            };
            let session = SourceSession::new(params, &mut inputs, engine, progress.clone())
                .with_control(link);
            let _ = commander_tx.send(session.commander());
            let result = session.run().map(|_| ());
            let unknown = matches!(result, Err(SessionError::OutcomeUnknown { .. }));
            let ends = inputs
                .iter()
                .enumerate()
                .map(|(i, input)| {
                    end_of(input.device.as_ref(), vmm_driven[i], Role::Source, unknown)
                })
                .collect();
            (result, ends)
        }
        Role::Destination => {
            let mut inputs: Vec<DestInput> = boxed
                .into_iter()
                .map(|b| DestInput {
                    id: b.id,
                    device: b.device,
                    expected_config: None,
                    max_queued_bytes: Some(b.max_queued),
                })
                .collect();
            let params = DestParams {
                channels,
                uuid,
                chunk,
                timeout,
            };
            let session = DestSession::controlled(
                listener,
                params,
                &mut inputs,
                engine,
                progress.clone(),
                link,
            );
            let _ = commander_tx.send(session.commander());
            let mut result = session.run().map(|_| ());
            if result.is_ok() {
                // Configs still held: the migration ends when the VMM takes them. A `Released`
                // sent before a config was held (load-config-ready for one device during
                // stop-copy) says nothing about the configs held now: look again after each.
                let held = || shared.lock().devices.iter().any(|d| d.held.is_some());
                let mut released = true;
                while released && held() {
                    released = hold_rx.recv() == Ok(Hold::Released);
                }
                if !released {
                    result = Err(SessionError::Cancelled {
                        step: "holding device configs for load-config-ready, after the source was told the device state loaded (its devices stay stopped with their state: resume the source VM there)",
                    });
                    for input in inputs.iter_mut() {
                        if input.device.owner() == Owner::Helper {
                            if let Err(e) = input.device.reset() {
                                log::warn!("resetting device {}: {}", input.id, error_chain(&e));
                            }
                        }
                    }
                }
            }
            let ends = inputs
                .iter()
                .enumerate()
                .map(|(i, input)| {
                    end_of(
                        input.device.as_ref(),
                        vmm_driven[i],
                        Role::Destination,
                        false,
                    )
                })
                .collect();
            (result, ends)
        }
    };
    // Every device, data_fd, socket and listener of this migration is closed by now (the
    // inputs, the link and the listener went with the session); only then is the VMM told.
    finish(
        shared,
        result,
        ends,
        cancel_requested.load(Ordering::Relaxed),
    );
}

/// A source device (the helper's, stopped; or the VMM's) when the source sent everything and no
/// result came: the destination may be running the VM.
const OUTCOME_UNKNOWN: &str =
    "vmm: the destination's outcome is unknown; resume the device only if the destination does not run the VM";

/// What became of a device at a failed or cancelled migration's end, read from the device
/// itself: a rollback or reset that did not get there is said so. `outcome_unknown`: the
/// source sent everything and no result came, so its devices stop instead of resuming.
fn end_of(
    device: &dyn MigrationDevice,
    vmm_driven: bool,
    role: Role,
    outcome_unknown: bool,
) -> DeviceEnd {
    if vmm_driven {
        return DeviceEnd {
            state: None,
            status: "left-to-vmm",
            recovery: match (role, outcome_unknown) {
                (Role::Source, true) => OUTCOME_UNKNOWN,
                (Role::Source, false) => "vmm: return the device to RUNNING",
                (Role::Destination, _) => "vmm: reset the device",
            },
        };
    }
    let state = device.state().ok();
    let target = if outcome_unknown {
        MigState::Stop
    } else {
        MigState::Running
    };
    let (status, recovery) = match (role, device.owner(), state) {
        (Role::Source, _, Some(s)) if s == target && outcome_unknown => {
            ("stopped", OUTCOME_UNKNOWN)
        }
        (Role::Source, _, Some(s)) if s == target => ("rolled-back", "helper: back to RUNNING"),
        (Role::Source, _, _) => (
            "rollback-failed",
            "helper: could not return the device to RUNNING (see the error)",
        ),
        (Role::Destination, Owner::Helper, Some(MigState::Running)) => ("reset", "helper: reset"),
        (Role::Destination, Owner::Helper, _) => (
            "reset-failed",
            "helper: could not reset the device (see the error)",
        ),
        (Role::Destination, Owner::Vmm, _) => ("left-to-vmm", "vmm: reset the device"),
    };
    DeviceEnd {
        state: state.map(|s| s.kernel_name().to_string()),
        status,
        recovery,
    }
}

fn finish(
    shared: &Shared,
    result: Result<(), SessionError>,
    ends: Vec<DeviceEnd>,
    cancel_requested: bool,
) {
    let err = match result {
        Ok(()) => {
            shared.set_status(Status::Completed, json!({}));
            return;
        }
        Err(err) => err,
    };
    let cancelled = cancel_requested || matches!(err, SessionError::Cancelled { .. });
    let text = error_chain(&err);
    let location = locate(&err);
    let devices: Vec<Value> = {
        let mut inner = shared.lock();
        inner.error = Some(json!({ "desc": text, "location": location }));
        inner
            .devices
            .iter_mut()
            .zip(&ends)
            .map(|(view, end)| {
                view.state = end.state.clone();
                view.held = None;
                view.status = end.status;
                json!({
                    "device": view.handle,
                    "state": end.state,
                    "recovery": end.recovery,
                })
            })
            .collect()
    };
    if cancelled {
        log::info!("migration cancelled: {text}");
        shared.set_status(Status::Cancelled, json!({ "devices": devices }));
    } else {
        log::error!("migration failed: {text}");
        shared
            .events
            .emit("MIGRATION_FAILED", failed_data(&text, &location));
        shared.set_status(Status::Failed, json!({ "devices": devices, "error": text }));
    }
}

fn failed_data(text: &str, location: &Location) -> Value {
    json!({
        "desc": text,
        "device": location.device,
        "channel": location.channel,
        "idx": location.idx,
    })
}

/// `query`'s answer.
pub fn query(inner: &Inner, timestamps: bool) -> Value {
    let now = Instant::now();
    let end = inner.ended.unwrap_or(now);
    let stop_copy_bytes = inner
        .progress
        .as_ref()
        .map_or(0, |p| p.bytes.load(Ordering::Relaxed));
    let packets = inner
        .progress
        .as_ref()
        .map_or(0, |p| p.packets.load(Ordering::Relaxed));
    let precopy_bytes = inner.precopy_bytes.load(Ordering::Relaxed);
    let rate = |bytes: u64, from: Option<Instant>, to: Instant| -> Option<f64> {
        let secs = to.checked_duration_since(from?)?.as_secs_f64();
        (secs > 0.0).then(|| bytes as f64 / secs)
    };
    let precopy_end = inner.switchover.unwrap_or(end);
    let downtime_ms = inner.numbers.as_ref().and_then(|n| {
        n.end_ns
            .checked_sub(n.switchover_ns)
            .map(|ns| ns as f64 / 1e6)
    });
    let mut histogram = metrics::new_histogram();
    let devices: Vec<Value> = inner
        .devices
        .iter()
        .map(|d| {
            for pair in d.timestamps.windows(2) {
                histogram.saturating_record(pair[1].saturating_sub(pair[0]).max(1));
            }
            let mut v = json!({
                "device": d.handle,
                "idstr": d.id.idstr,
                "instance-id": d.id.instance_id,
                "mode": d.mode,
                "precopy": d.precopy,
                "load-config-after-iter": d.hold_config,
                "status": d.status,
                "bytes": d.bytes,
                "data-packets": d.data_packets,
                "state": d.state,
            });
            if let Some(limit) = d.max_queued {
                v["max-queued-buffers-size"] = super::limit_value(limit);
                v["peak-queued-bytes"] = json!(d.peak_queued_bytes);
            }
            if timestamps {
                v["timestamps-ns"] = json!(d.timestamps);
            }
            v
        })
        .collect();
    let latency = metrics::summarize(&histogram);
    let channels: Vec<Value> = inner
        .numbers
        .as_ref()
        .map(|n| {
            n.channels
                .iter()
                .enumerate()
                .map(|(i, (bytes, packets))| {
                    json!({ "channel": i, "bytes": bytes, "packets": packets })
                })
                .collect()
        })
        .unwrap_or_default();
    json!({
        "status": inner.status.name(),
        "role": inner.role,
        "engine": inner.engine,
        "channels": inner.channels,
        "switchover-ack": inner.acked,
        "elapsed-ms": inner.started.map(|s| end.duration_since(s).as_secs_f64() * 1e3),
        "downtime-ms": downtime_ms,
        "bytes": {
            "precopy": precopy_bytes,
            "stop-copy": stop_copy_bytes,
            "packets": packets,
        },
        "rates": {
            "precopy-bytes-per-second": rate(precopy_bytes, inner.started, precopy_end),
            "stop-copy-bytes-per-second": rate(stop_copy_bytes, inner.switchover, end),
        },
        "devices": devices,
        "per-channel": channels,
        "latency": {
            "measure": "per device, the gap between consecutive data packets (source: reads issued; destination: writes done); pair both sides' timestamps-ns for end-to-end latency",
            "p50-us": latency.p50,
            "p99-us": latency.p99,
            "p999-us": latency.p999,
            "max-us": latency.max,
            "count": latency.count,
        },
        "not-moved": inner.not_moved,
        "notes": inner.notes,
        "error": inner.error,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(i: u32, held: Option<Vec<u8>>) -> DeviceView {
        DeviceView {
            handle: format!("nic{i}"),
            id: DeviceId::new(format!("0000:0{i}:02.0/vfio"), 0).unwrap(),
            mode: DeviceMode::Device,
            precopy: false,
            hold_config: held.is_some(),
            status: "migrating",
            has_data_fd: false,
            has_config: false,
            bytes: None,
            data_packets: None,
            state: Some("stop-copy".into()),
            timestamps: Vec::new(),
            max_queued: None,
            peak_queued_bytes: None,
            ready: false,
            held,
        }
    }

    #[test]
    fn only_releasing_the_last_held_config_wakes_the_migration_thread() {
        let shared = Shared::new();
        shared.lock().devices = vec![view(0, Some(vec![1])), view(1, Some(vec![2]))];
        let (hold, woken) = mpsc::channel();
        assert_eq!(shared.release_configs(Some(0), Some(&hold)), 1);
        assert_eq!(woken.try_iter().count(), 0, "a config is still held");
        for _ in 0..1000 {
            assert_eq!(shared.release_configs(None, Some(&hold)), 0);
        }
        assert_eq!(woken.try_iter().collect::<Vec<_>>(), [Hold::Released]);
    }

    #[test]
    fn a_panicking_migration_still_ends_with_a_final_status_and_unknown_devices() {
        let shared = Shared::new();
        {
            let mut inner = shared.lock();
            inner.status = Status::StopCopy;
            inner.devices = vec![view(0, None)];
        }
        let cancel = AtomicBool::new(false);
        let shared_in = shared.clone();
        thread::spawn(move || {
            run_caught(&shared_in, 1, &cancel, || panic!("an invariant broke"));
        })
        .join()
        .unwrap();

        let inner = shared.lock();
        assert_eq!(inner.status, Status::Failed);
        let error = inner.error.as_ref().unwrap()["desc"].as_str().unwrap();
        assert!(
            error.contains("the migration thread panicked") && error.contains("an invariant broke"),
            "{error}"
        );
        assert_eq!(inner.devices[0].status, "unknown");
        assert_eq!(inner.devices[0].state, None);
    }

    #[test]
    fn a_migration_that_returns_is_left_alone() {
        let shared = Shared::new();
        shared.lock().status = Status::Completed;
        run_caught(&shared, 0, &AtomicBool::new(false), || {});
        assert_eq!(shared.lock().status, Status::Completed);
        assert!(shared.lock().error.is_none());
    }
}
