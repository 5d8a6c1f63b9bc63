//! VFIO migration uAPI v2 for `vfio-multifd`: real devices and simulated devices with real fds.
//!
//! One interface, [`MigrationDevice`], covers every device a session moves:
//! - [`VfioDevice`]: a real device fd (borrowed from a VMM, or opened by the helper through the
//!   legacy group/container path or the iommufd cdev path);
//! - [`DataFdDevice`]: only a `data_fd`, the VMM drives the states;
//! - [`SimSource`] / [`SimSink`]: simulated devices whose `data_fd` is a real kernel fd (memfd,
//!   pipe, or a FUSE file for [`sim::fault`] devices), never an in-process fake.
//!
//! State changes are planned by [`plan`], which follows the kernel's next-hop table
//! (`vfio_mig_get_next_state`) and the helper's rules: from PRE_COPY ask for STOP_COPY directly,
//! keep the one saving-group `data_fd`, never request ERROR, recover from ERROR only with RESET and
//! only when the helper owns the device.
//!
//! ## data_fd rules for the data plane
//! - A `data_fd` is a stream: one reader (or writer) at a time, sequential, no offsets (real
//!   and FUSE fds give ESPIPE to pread/pwrite). Never splice/sendfile from a real one.
//! - Reads return what is buffered: short reads are normal, read in a loop. A memfd sim
//!   returns all that is asked (up to EOF); a paced sim returns at most the pipe's 1 MiB and
//!   blocks while the device has produced nothing yet; real drivers without `.poll` (all but
//!   mlx5) never block and cannot be added to epoll (EPERM): use blocking reads on a thread.
//! - In PRE_COPY, `read() == 0` or `ENOMSG` means "drained for now"; only in STOP_COPY is 0 the
//!   end of the stream ([`planner::classify_read`], [`planner::classify_cqe`]). Ask
//!   [`MigrationDevice::precopy_info`] before reading in PRE_COPY: a paced sim's read past
//!   the precopy part blocks until STOP_COPY.
//! - Never read or write a `data_fd` while a `set_state` on the same device is running; a
//!   sink's RESUMING -> STOP expects every `write()` to have returned.
//! - Closing the last device fd, RESET or a session-ending arc disables a real data_fd
//!   (ENODEV); a sim's pipe then reads EOF, its memfd is not disabled (do not rely on either).
//!
//! All `unsafe` of the crate sits in `sys` (ioctls), `os` (plain syscalls), [`fd`] (adopting
//! numbers, SCM_RIGHTS) and one call in `sim::content` (the AVX-512 check, after feature
//! detection), each block with a `SAFETY` comment.

#![warn(missing_docs)]

use std::fmt;
use std::os::fd::OwnedFd;

pub mod device;
pub mod error;
pub mod fd;
pub mod interrupt;
mod os;
pub mod planner;
pub mod sim;
mod sys;
pub mod uapi;

pub use device::{DataFdDevice, Iommufd, VfioContainer, VfioDevice, VfioGroup};
pub use error::{StreamMismatch, VfioError};
pub use fd::DataDirection;
pub use planner::{plan, PlanError};
pub use sim::{sim_pair, DeviceSpeed, SimSink, SimSource, SimSpec};

/// A device migration state (`enum vfio_device_mig_state`, uAPI values).
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MigState {
    /// The device failed a transition; only RESET leaves this state.
    Error = 0,
    /// Stopped, not saving.
    Stop = 1,
    /// Running normally.
    Running = 2,
    /// Stopped and streaming its final state on the saving `data_fd`.
    StopCopy = 3,
    /// Stopped and accepting a state stream on the resuming `data_fd`.
    Resuming = 4,
    /// Running, but starts no new peer-to-peer DMA.
    RunningP2p = 5,
    /// Running and streaming precopy data on the saving `data_fd`.
    PreCopy = 6,
    /// PRE_COPY without new peer-to-peer DMA.
    PreCopyP2p = 7,
}

impl MigState {
    /// Every state, in uAPI order.
    pub const ALL: [MigState; 8] = [
        MigState::Error,
        MigState::Stop,
        MigState::Running,
        MigState::StopCopy,
        MigState::Resuming,
        MigState::RunningP2p,
        MigState::PreCopy,
        MigState::PreCopyP2p,
    ];

    /// The state for a uAPI value, `None` for values this crate does not know.
    pub fn from_raw(raw: u32) -> Option<MigState> {
        MigState::ALL.get(usize::try_from(raw).ok()?).copied()
    }

    /// The uAPI value.
    pub fn raw(self) -> u32 {
        self as u32
    }

    /// The kernel's name (`STOP_COPY`), as in logs and `vfio.h`.
    pub fn kernel_name(self) -> &'static str {
        match self {
            MigState::Error => "ERROR",
            MigState::Stop => "STOP",
            MigState::Running => "RUNNING",
            MigState::StopCopy => "STOP_COPY",
            MigState::Resuming => "RESUMING",
            MigState::RunningP2p => "RUNNING_P2P",
            MigState::PreCopy => "PRE_COPY",
            MigState::PreCopyP2p => "PRE_COPY_P2P",
        }
    }

    /// PRE_COPY, PRE_COPY_P2P and STOP_COPY share one saving `data_fd`.
    pub fn is_saving(self) -> bool {
        matches!(
            self,
            MigState::PreCopy | MigState::PreCopyP2p | MigState::StopCopy
        )
    }

    /// PRE_COPY or PRE_COPY_P2P: reading 0 or ENOMSG means "drained for now".
    pub fn is_precopy(self) -> bool {
        matches!(self, MigState::PreCopy | MigState::PreCopyP2p)
    }

    /// The migration flags a device needs for this state to exist (`state_flags_table`).
    /// ERROR needs none (it always exists but can never be requested).
    pub fn required_flags(self) -> MigrationFlags {
        match self {
            MigState::Error => MigrationFlags(0),
            MigState::Stop | MigState::Running | MigState::StopCopy | MigState::Resuming => {
                MigrationFlags::STOP_COPY
            }
            MigState::RunningP2p => MigrationFlags::STOP_COPY | MigrationFlags::P2P,
            MigState::PreCopy => MigrationFlags::STOP_COPY | MigrationFlags::PRE_COPY,
            MigState::PreCopyP2p => {
                MigrationFlags::STOP_COPY | MigrationFlags::P2P | MigrationFlags::PRE_COPY
            }
        }
    }
}

impl fmt::Display for MigState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.kernel_name())
    }
}

/// `VFIO_DEVICE_FEATURE_MIGRATION` flags: which optional states a device has.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct MigrationFlags(pub u64);

impl MigrationFlags {
    /// STOP, STOP_COPY and RESUMING (mandatory for migration).
    pub const STOP_COPY: MigrationFlags = MigrationFlags(1);
    /// RUNNING_P2P (and PRE_COPY_P2P together with PRE_COPY).
    pub const P2P: MigrationFlags = MigrationFlags(2);
    /// PRE_COPY (and PRE_COPY_P2P together with P2P).
    pub const PRE_COPY: MigrationFlags = MigrationFlags(4);
    /// Every flag this crate knows.
    pub const ALL: MigrationFlags = MigrationFlags(7);

    /// The raw bits.
    pub fn bits(self) -> u64 {
        self.0
    }

    /// Whether every bit of `other` is set.
    pub fn contains(self, other: MigrationFlags) -> bool {
        self.0 & other.0 == other.0
    }

    /// Whether a device with these flags has `state`.
    pub fn has_state(self, state: MigState) -> bool {
        self.contains(state.required_flags())
    }
}

impl std::ops::BitOr for MigrationFlags {
    type Output = MigrationFlags;
    fn bitor(self, rhs: MigrationFlags) -> MigrationFlags {
        MigrationFlags(self.0 | rhs.0)
    }
}

impl fmt::Display for MigrationFlags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut names = Vec::new();
        if self.contains(MigrationFlags::STOP_COPY) {
            names.push("STOP_COPY");
        }
        if self.contains(MigrationFlags::P2P) {
            names.push("P2P");
        }
        if self.contains(MigrationFlags::PRE_COPY) {
            names.push("PRE_COPY");
        }
        let unknown = self.0 & !MigrationFlags::ALL.0;
        if unknown != 0 {
            return write!(f, "{}|{unknown:#x}", names.join("|"));
        }
        if names.is_empty() {
            return f.write_str("none");
        }
        f.write_str(&names.join("|"))
    }
}

/// Who owns a device: only the owner may RESET it, detach it or close it for good.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Owner {
    /// The helper opened the device (or the VMM said the helper owns it).
    Helper,
    /// Borrowed from the VMM: never reset, detach or close the VMM's device.
    Vmm,
}

/// `VFIO_MIG_GET_PRECOPY_INFO` on the saving `data_fd`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct PrecopyInfo {
    /// Initial precopy bytes still to read; go to STOP_COPY once this is 0.
    pub initial_bytes: u64,
    /// Dirty bytes available now (moves with device activity).
    pub dirty_bytes: u64,
    /// PRECOPY_INFOv2 only: new initial data appeared (initial restarted, dirty reset to 0).
    pub reinit: bool,
}

impl PrecopyInfo {
    /// Bytes readable in PRE_COPY right now.
    pub fn pending(&self) -> u64 {
        self.initial_bytes.saturating_add(self.dirty_bytes)
    }
}

/// One device as a migration session sees it: real ([`VfioDevice`], [`DataFdDevice`]) or
/// simulated ([`SimSource`], [`SimSink`]).
pub trait MigrationDevice: Send {
    /// The device's name in errors and logs (QEMU idstr, BDF or mdev UUID).
    fn name(&self) -> &str;
    /// Who may reset, detach or close the device.
    fn owner(&self) -> Owner;
    /// `VFIO_DEVICE_FEATURE_MIGRATION`.
    fn migration_flags(&self) -> Result<MigrationFlags, VfioError>;
    /// The current state (`MIG_DEVICE_STATE` GET).
    fn state(&self) -> Result<MigState, VfioError>;
    /// Plans the arcs to `target` and takes them; returns the data_fd when an arc opens one
    /// (saving group: the same fd stays valid PRE_COPY -> STOP_COPY and None is returned then).
    /// After a failed SET it reads the real state with GET and reports both.
    fn set_state(&mut self, target: MigState) -> Result<Option<OwnedFd>, VfioError>;
    /// `VFIO_MIG_GET_PRECOPY_INFO` on the current saving data_fd (PRE_COPY / PRE_COPY_P2P only).
    fn precopy_info(&self) -> Result<PrecopyInfo, VfioError>;
    /// `VFIO_DEVICE_FEATURE_MIG_DATA_SIZE`: the estimated bytes still to come in STOP_COPY.
    fn stop_copy_size(&self) -> Result<u64, VfioError>;
    /// Recover from ERROR: RESET only when owner() == Helper, else an error saying the VMM must.
    fn reset(&mut self) -> Result<(), VfioError>;
    /// After a successful RESUMING -> STOP: CLOCK_MONOTONIC ns when the device consumed the last
    /// byte of its state, where the device knows and that came after the write that handed it
    /// over (a paced simulated sink loads from a buffer at its own rate). None: the load ended
    /// with the last write (real devices, unpaced simulated sinks).
    fn load_done_ns(&self) -> Option<u64> {
        None
    }
}

impl<T: MigrationDevice + ?Sized> MigrationDevice for Box<T> {
    fn name(&self) -> &str {
        (**self).name()
    }
    fn owner(&self) -> Owner {
        (**self).owner()
    }
    fn migration_flags(&self) -> Result<MigrationFlags, VfioError> {
        (**self).migration_flags()
    }
    fn state(&self) -> Result<MigState, VfioError> {
        (**self).state()
    }
    fn set_state(&mut self, target: MigState) -> Result<Option<OwnedFd>, VfioError> {
        (**self).set_state(target)
    }
    fn precopy_info(&self) -> Result<PrecopyInfo, VfioError> {
        (**self).precopy_info()
    }
    fn stop_copy_size(&self) -> Result<u64, VfioError> {
        (**self).stop_copy_size()
    }
    fn reset(&mut self) -> Result<(), VfioError> {
        (**self).reset()
    }
    fn load_done_ns(&self) -> Option<u64> {
        (**self).load_done_ns()
    }
}
