//! The crate's one error type: each variant names the step and the device; the cause rides in
//! `#[source]` and is never printed in the message too; errno is kept in the `io::Error`.

use std::io;
use std::os::fd::RawFd;

use crate::planner::PlanError;
use crate::MigState;

/// Why a loaded stream (or config blob) differs from what the device expected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum StreamMismatch {
    /// The first byte that differs.
    #[error("first corrupt byte at offset {offset}")]
    Corrupt {
        /// Byte offset in the stream.
        offset: u64,
    },
    /// The stream ended early.
    #[error("{missing} bytes missing: got {got} of {expected}")]
    Missing {
        /// Bytes that never arrived.
        missing: u64,
        /// Bytes received.
        got: u64,
        /// Bytes expected.
        expected: u64,
    },
    /// More bytes than the device state holds.
    #[error("{extra} extra bytes after the {expected} expected")]
    Extra {
        /// Bytes past the end.
        extra: u64,
        /// Bytes expected.
        expected: u64,
    },
}

/// Errors of the VFIO layer.
#[derive(Debug, thiserror::Error)]
pub enum VfioError {
    /// A syscall or ioctl failed; `step` names it (e.g. "VFIO_GROUP_GET_DEVICE_FD").
    #[error("{step} for {device}")]
    Io {
        /// The device (or path) the step was for.
        device: String,
        /// What was being done.
        step: &'static str,
        /// The OS error, errno kept.
        #[source]
        source: io::Error,
    },
    /// No legal way from the current state to the requested one.
    #[error("{device}: cannot go from {from} to {target}")]
    Plan {
        /// The device.
        device: String,
        /// Its current state.
        from: MigState,
        /// The requested state.
        target: MigState,
        /// Why.
        #[source]
        source: PlanError,
    },
    /// A `MIG_DEVICE_STATE` SET failed; `now` is the state a GET read afterwards (None when the
    /// GET failed too).
    #[error("{device}: SET {from} -> {to} (towards {target}) failed; the device is now in {}",
        now.map_or("an unknown state (GET failed)", |s| s.kernel_name()))]
    SetState {
        /// The device.
        device: String,
        /// The state before the failed arc.
        from: MigState,
        /// The arc's end.
        to: MigState,
        /// The state the caller asked for.
        target: MigState,
        /// The real state read back with GET.
        now: Option<MigState>,
        /// The kernel's error.
        #[source]
        source: io::Error,
    },
    /// The kernel reported a state value this crate does not know.
    #[error("{device}: the kernel reported unknown migration state {raw}")]
    UnknownState {
        /// The device.
        device: String,
        /// The raw value.
        raw: u32,
    },
    /// An arc that must open a data_fd returned none.
    #[error("{device}: {from} -> {to} should open a data_fd but the kernel returned none")]
    MissingDataFd {
        /// The device.
        device: String,
        /// Arc start.
        from: MigState,
        /// Arc end.
        to: MigState,
    },
    /// An arc that must not open a data_fd returned one (closed at once).
    #[error("{device}: {from} -> {to} returned a data_fd where none is expected")]
    UnexpectedDataFd {
        /// The device.
        device: String,
        /// Arc start.
        from: MigState,
        /// Arc end.
        to: MigState,
    },
    /// The VMM owns the device: the helper may not reset, detach or close it.
    #[error("{device}: {action} is the VMM's job; the helper only borrows this device")]
    NotOwner {
        /// The device.
        device: String,
        /// What was refused (e.g. "RESET out of ERROR").
        action: &'static str,
    },
    /// Only a data_fd was handed over: the VMM drives the device states.
    #[error("{device}: {action} needs the device fd; only its data_fd was handed over and the VMM drives the states")]
    VmmDrivesStates {
        /// The device.
        device: String,
        /// What was refused.
        action: &'static str,
    },
    /// PRECOPY_INFO (or another saving-fd query) outside a precopy session.
    #[error("{device}: {action} needs an open PRE_COPY session; the device is in {state}")]
    NotInPrecopy {
        /// The device.
        device: String,
        /// What was asked.
        action: &'static str,
        /// The state it is in.
        state: MigState,
    },
    /// RESUMING -> STOP refused the loaded stream (the simulated sink's verdict, like a driver's).
    #[error("{device}: RESUMING -> STOP rejected the loaded stream; the device is now in {now}")]
    LoadRejected {
        /// The device.
        device: String,
        /// Its state after the refusal.
        now: MigState,
        /// What was wrong.
        #[source]
        source: StreamMismatch,
    },
    /// The config blob handed to a simulated sink is not the source's.
    #[error("{device}: config blob rejected")]
    ConfigRejected {
        /// The device.
        device: String,
        /// What was wrong.
        #[source]
        source: StreamMismatch,
    },
    /// A simulated device spec that cannot be built.
    #[error("{device}: invalid simulated device spec: {reason}")]
    InvalidSpec {
        /// The device.
        device: String,
        /// What is wrong with it (our own text, not a cause).
        reason: &'static str,
    },
    /// A file descriptor handed to the helper is not what it must be.
    #[error("fd {fd}: expected {expected}, found {found}")]
    BadFd {
        /// The number.
        fd: RawFd,
        /// What it must be.
        expected: &'static str,
        /// What it is.
        found: String,
    },
    /// Checking a handed-over file descriptor failed.
    #[error("fd {fd}: {step}")]
    FdCheck {
        /// The number.
        fd: RawFd,
        /// The check.
        step: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

impl VfioError {
    /// The errno behind this error, where there is one.
    pub fn errno(&self) -> Option<i32> {
        match self {
            VfioError::Io { source, .. }
            | VfioError::SetState { source, .. }
            | VfioError::FdCheck { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }

    /// The device state known after this error, where the error reports one.
    pub fn state_after(&self) -> Option<MigState> {
        match self {
            VfioError::SetState { now, .. } => *now,
            VfioError::LoadRejected { now, .. } => Some(*now),
            _ => None,
        }
    }

    pub(crate) fn io(device: &str, step: &'static str, source: io::Error) -> VfioError {
        VfioError::Io {
            device: device.to_owned(),
            step,
            source,
        }
    }
}
