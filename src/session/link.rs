//! The seam between a session and the control thread when a VMM drives the migration
//! ([`crate::control`]): what the session tells the VMM ([`Notice`]), what the VMM tells the
//! session ([`VmmCommand`] through a [`Commander`]), and how each device is driven.
//!
//! Without a link (`send`, `recv`, `demo`) a session behaves as before: it switches over as
//! soon as the destination acks, and it drives every device's states itself.

use std::fmt;
use std::os::fd::OwnedFd;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use vfio::{MigState, MigrationDevice, MigrationFlags, Owner, PrecopyInfo, VfioError};

use crate::session::stream::Conn;

/// A phase both sides report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Channels being set up.
    Setup,
    /// Channels up and the setup agreed; precopy data (if any) moves on the main channel. The
    /// VM still runs.
    Precopy,
    /// SWITCHOVER_START sent (source) or read (destination): the VM is stopped.
    StopCopy,
    /// Destination: every device's data is written and checked; source: the destination
    /// said so.
    Loaded,
}

/// What a session tells the VMM, in order. Device numbers index the session's inputs.
#[derive(Debug)]
pub enum Notice {
    Phase(Phase),
    /// Source: the destination sent SWITCHOVER_ACK: `switchover-start` may follow.
    SwitchoverAck,
    /// Source: a device's initial precopy bytes went out (DEV_INIT_DATA_SENT).
    InitialDataSent {
        device: usize,
    },
    /// Destination: the initial precopy bytes of every precopy device are written; the
    /// source was sent SWITCHOVER_ACK.
    InitialDataLoaded,
    /// Destination: a device's data is written in full (idx order, config packet last) and,
    /// when the helper drives it, the device accepted it (RESUMING -> STOP).
    DeviceLoaded {
        device: usize,
        bytes: u64,
        data_packets: u32,
        config: Vec<u8>,
        /// The device's state now, when the helper drives it.
        state: Option<MigState>,
    },
    /// Per-device and per-channel numbers from the engine, at its end.
    Report(EngineNumbers),
}

/// What the engine measured, side-neutral, for `query`.
#[derive(Debug, Clone, Default)]
pub struct EngineNumbers {
    pub devices: Vec<DeviceNumbers>,
    /// Per channel: bytes, packets.
    pub channels: Vec<(u64, u64)>,
    pub notes: Vec<String>,
    /// SWITCHOVER_START (sent or read), CLOCK_MONOTONIC.
    pub switchover_ns: u64,
    /// Source: the destination's result arrived; destination: the last device was loaded.
    pub end_ns: u64,
}

/// One device's numbers from the engine's report.
#[derive(Debug, Clone)]
pub struct DeviceNumbers {
    pub bytes: u64,
    pub data_packets: u32,
    /// Per packet, CLOCK_MONOTONIC: read issued on the source, written on the destination.
    pub timestamps_ns: Vec<u64>,
    /// Destination: the most bytes it held queued at once; `None` on the source.
    pub peak_queued_bytes: Option<u64>,
}

/// A new data_fd or config blob for a device, handed over at `switchover-start`.
#[derive(Debug)]
pub struct DeviceUpdate {
    pub device: usize,
    pub config: Option<Vec<u8>>,
    /// VMM-driven device: its saving data_fd in STOP_COPY.
    pub data_fd: Option<OwnedFd>,
}

/// What the VMM tells a running session.
#[derive(Debug)]
pub enum VmmCommand {
    /// Source: the VM is stopped and the VMM-driven devices are in STOP_COPY: stop precopy,
    /// send SWITCHOVER_START and stream.
    SwitchoverStart { updates: Vec<DeviceUpdate> },
    /// Only wakes the session (it then sees the cancel flag).
    Wake,
}

/// Posts VMM commands into a session's event queue.
pub struct Commander(Box<dyn Fn(VmmCommand) -> bool + Send + Sync>);

impl Commander {
    pub fn new(post: impl Fn(VmmCommand) -> bool + Send + Sync + 'static) -> Self {
        Self(Box::new(post))
    }

    /// False when the session is gone.
    pub fn send(&self, command: VmmCommand) -> bool {
        (self.0)(command)
    }
}

impl fmt::Debug for Commander {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Commander")
    }
}

/// The source's precopy thread reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrecopyEvent {
    /// DEV_INIT_DATA_SENT went out for this device.
    InitialSent { device: usize },
}

/// Channels the VMM passed already connected: main first, then multifd channel 0..N-1
/// (source); any order (destination: classified by their first bytes, as QEMU does).
#[derive(Debug)]
pub struct PassedChannels {
    pub main: Conn,
    pub multifd: Vec<Conn>,
}

/// How a VMM drives a session.
pub struct ControlLink {
    /// Per device (input order): the VMM drives its states and the helper only moves the
    /// bytes of its data_fd; it never changes, resets or reads the state of such a device.
    pub vmm_driven: Vec<bool>,
    /// Per device: the data_fd of a VMM-driven device, when the VMM handed it over (source:
    /// the saving fd, in PRE_COPY or STOP_COPY; destination: the resuming fd). The session
    /// takes it; a source device may also get it at switchover ([`DeviceUpdate`]).
    pub data_fds: Vec<Option<OwnedFd>>,
    /// Source: per device, read and send precopy data before switchover (the device is in
    /// PRE_COPY, or the helper moves it there). These devices hold back SWITCHOVER_ACK until
    /// their initial bytes are loaded.
    pub precopy: Vec<bool>,
    /// Channels the VMM passed, instead of connecting or listening.
    pub passed: Option<PassedChannels>,
    /// Precopy bytes moved on the main channel (the engine's [`crate::engine::Progress`]
    /// counts the stop-copy bytes).
    pub precopy_bytes: Arc<AtomicU64>,
    /// Receives every notice, on the session's thread (it must not block for long).
    pub notify: Box<dyn FnMut(Notice) + Send>,
}

impl ControlLink {
    pub(crate) fn is_vmm_driven(&self, device: usize) -> bool {
        self.vmm_driven.get(device).copied().unwrap_or(false)
    }

    pub(crate) fn is_precopy(&self, device: usize) -> bool {
        self.precopy.get(device).copied().unwrap_or(false)
    }

    pub(crate) fn take_data_fd(&mut self, device: usize) -> Option<OwnedFd> {
        self.data_fds.get_mut(device).and_then(Option::take)
    }

    /// A duplicate of a VMM-driven device's data_fd, leaving the original in place.
    pub(crate) fn dup_data_fd(&self, device: usize) -> Option<std::io::Result<OwnedFd>> {
        self.data_fds
            .get(device)
            .and_then(Option::as_ref)
            .map(|fd| fd.try_clone())
    }
}

impl fmt::Debug for ControlLink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ControlLink")
            .field("vmm_driven", &self.vmm_driven)
            .field("precopy", &self.precopy)
            .field("passed", &self.passed.is_some())
            .finish_non_exhaustive()
    }
}

/// A device whose states the VMM drives; its data_fd travels in [`ControlLink::data_fds`].
/// Every state operation is refused: the helper never touches such a device beyond its
/// data_fd.
#[derive(Debug)]
pub struct VmmDevice {
    name: String,
}

impl VmmDevice {
    pub fn new(name: impl Into<String>) -> Self {
        Self { name: name.into() }
    }

    fn refused(&self, action: &'static str) -> VfioError {
        VfioError::VmmDrivesStates {
            device: self.name.clone(),
            action,
        }
    }
}

impl MigrationDevice for VmmDevice {
    fn name(&self) -> &str {
        &self.name
    }

    fn owner(&self) -> Owner {
        Owner::Vmm
    }

    fn migration_flags(&self) -> Result<MigrationFlags, VfioError> {
        Err(self.refused("reading the migration flags"))
    }

    fn state(&self) -> Result<MigState, VfioError> {
        Err(self.refused("reading the state"))
    }

    fn set_state(&mut self, _target: MigState) -> Result<Option<OwnedFd>, VfioError> {
        Err(self.refused("changing the state"))
    }

    fn precopy_info(&self) -> Result<PrecopyInfo, VfioError> {
        Err(self.refused("VFIO_MIG_GET_PRECOPY_INFO through the device"))
    }

    fn stop_copy_size(&self) -> Result<u64, VfioError> {
        Err(self.refused("MIG_DATA_SIZE"))
    }

    fn reset(&mut self) -> Result<(), VfioError> {
        Err(VfioError::NotOwner {
            device: self.name.clone(),
            action: "VFIO_DEVICE_RESET",
        })
    }
}

/// Where a migration failed: the device, the multifd channel and the packet idx, as far as
/// the error knows them.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Location {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channel: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idx: Option<u32>,
}

impl Location {
    pub fn is_empty(&self) -> bool {
        self.device.is_none() && self.channel.is_none() && self.idx.is_none()
    }

    fn fill(&mut self, device: Option<String>, channel: Option<usize>, idx: Option<u32>) {
        if self.device.is_none() {
            self.device = device;
        }
        if self.channel.is_none() {
            self.channel = channel;
        }
        if self.idx.is_none() {
            self.idx = idx;
        }
    }
}

/// Walks an error and its causes for the device, channel and idx they name (the outermost
/// mention of each wins).
pub fn locate(err: &(dyn std::error::Error + 'static)) -> Location {
    use crate::engine::DataPlaneError as D;
    use crate::error::{ChannelError as C, MainChannelError as M, SessionError as S};
    let mut at = Location::default();
    let mut cause = Some(err);
    while let Some(e) = cause {
        if let Some(s) = e.downcast_ref::<S>() {
            match s {
                S::DeviceGetState { device, .. }
                | S::DeviceState { device, .. }
                | S::SourceState { device, .. }
                | S::NoPrecopyFd { device }
                | S::NoDataFd { device, .. }
                | S::ConfigMismatch { device, .. }
                | S::Precopy { device, .. } => at.fill(Some(device.to_string()), None, None),
                S::DestinationFailed { location, .. } => {
                    at.fill(location.device.clone(), location.channel, location.idx)
                }
                _ => {}
            }
        }
        if let Some(d) = e.downcast_ref::<D>() {
            match d {
                D::ReadDevice { device, idx, .. } => {
                    at.fill(Some(device.to_string()), None, Some(*idx))
                }
                D::WriteDevice {
                    device,
                    idx,
                    channel,
                    ..
                }
                | D::Send {
                    channel,
                    device,
                    idx,
                    ..
                }
                | D::Reassembly {
                    channel,
                    device,
                    idx,
                    ..
                } => at.fill(Some(device.to_string()), Some(*channel), Some(*idx)),
                D::TruncatedPayload {
                    channel,
                    device,
                    idx,
                    ..
                }
                | D::RecvPayload {
                    channel,
                    device,
                    idx,
                    ..
                } => at.fill(Some(device.to_string()), Some(*channel), *idx),
                D::Recv { channel, .. }
                | D::Wire { channel, .. }
                | D::TruncatedPacket { channel, .. } => at.fill(None, Some(*channel), None),
                D::UnknownDevice {
                    channel,
                    idstr,
                    instance_id,
                    ..
                } => at.fill(Some(format!("{idstr}/{instance_id}")), Some(*channel), None),
                D::Incomplete {
                    device, next_idx, ..
                } => at.fill(Some(device.to_string()), None, Some(*next_idx)),
                _ => {}
            }
        }
        if let Some(M::PrecopyWrite { device, .. } | M::InSection { device, .. }) =
            e.downcast_ref::<M>()
        {
            at.fill(Some(device.to_string()), None, None);
        }
        if let Some(C::Connect { channel, .. } | C::SendInit { channel, .. }) =
            e.downcast_ref::<C>()
        {
            at.fill(None, Some(usize::from(*channel)), None);
        }
        cause = e.source();
    }
    at
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::DataPlaneError;
    use crate::error::SessionError;
    use crate::wire::DeviceId;

    #[test]
    fn locate_finds_device_channel_and_idx_through_the_chain() {
        let device = DeviceId::new("0000:00:02.0/vfio", 0).unwrap();
        let err = SessionError::DataPlane {
            engine: "uring",
            source: DataPlaneError::WriteDevice {
                device: device.clone(),
                idx: 7,
                channel: 3,
                source: std::io::Error::from_raw_os_error(libc::EIO),
            },
        };
        assert_eq!(
            locate(&err),
            Location {
                device: Some("0000:00:02.0/vfio/0".into()),
                channel: Some(3),
                idx: Some(7),
            }
        );
        let peer = SessionError::DestinationFailed {
            message: "x".into(),
            location: Location {
                device: None,
                channel: Some(1),
                idx: Some(2),
            },
        };
        assert_eq!(locate(&peer).channel, Some(1));
        let plain = SessionError::Cancelled { step: "x" };
        assert!(locate(&plain).is_empty());
        // The location travels in the destination's result record.
        let mut record = crate::session::main_channel::ResultRecord::failure("bad");
        record.location = locate(&err);
        let json = serde_json::to_string(&record).unwrap();
        assert!(json.contains("\"channel\":3"), "{json}");
        let back: crate::session::main_channel::ResultRecord = serde_json::from_str(&json).unwrap();
        assert_eq!(back.location.idx, Some(7));
    }
}
