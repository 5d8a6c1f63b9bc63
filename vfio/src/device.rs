//! Real VFIO devices behind [`MigrationDevice`]:
//! - [`VfioDevice`]: a device fd, borrowed from a VMM ([`Owner::Vmm`]: never reset, detached or
//!   closed beyond our own dup) or opened by the helper ([`Owner::Helper`]) through the legacy
//!   group/container path ([`VfioContainer`], [`VfioGroup`]) or the iommufd cdev path
//!   ([`VfioDevice::open_cdev`]);
//! - [`DataFdDevice`]: only a data_fd; the VMM drives the states.
//!
//! Every state change is planned ([`crate::plan`]) and taken one kernel arc per SET, so a
//! failure names its arc, and the state is read back with GET after any failed SET.

use std::ffi::CString;
use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::fd::{check_data_fd, DataDirection};
use crate::planner::{arc_ends_session, arc_opens_data_fd, plan};
use crate::uapi::{
    VFIO_TYPE1v2_IOMMU, VFIO_API_VERSION, VFIO_DEVICE_FEATURE_MIG_PRECOPY_INFO_V2,
    VFIO_DEVICE_FEATURE_SET, VFIO_GROUP_FLAGS_VIABLE, VFIO_PRECOPY_INFO_REINIT,
};
use crate::{os, sys};
use crate::{MigState, MigrationDevice, MigrationFlags, Owner, PrecopyInfo, VfioError};

/// `VFIO_PCI_OFFSET_SHIFT`: vfio-pci places region `index` at `index << 40` in the device fd.
pub const VFIO_PCI_OFFSET_SHIFT: u32 = 40;

/// A legacy VFIO container (`/dev/vfio/vfio`) with TYPE1v2 set once its first group joins.
#[derive(Debug)]
pub struct VfioContainer {
    fd: OwnedFd,
    root: PathBuf,
    iommu_set: Mutex<bool>,
}

impl VfioContainer {
    /// Opens `/dev/vfio/vfio` and checks the API version (0) and TYPE1v2.
    pub fn open() -> Result<Arc<VfioContainer>, VfioError> {
        Self::open_at(Path::new("/dev/vfio"))
    }

    /// [`VfioContainer::open`] with another directory than `/dev/vfio` (`<root>/vfio`, and
    /// groups at `<root>/<N>`).
    pub fn open_at(root: &Path) -> Result<Arc<VfioContainer>, VfioError> {
        let path = root.join("vfio");
        let who = path.display().to_string();
        let fd =
            open_rw(&path).map_err(|e| VfioError::io(&who, "opening the VFIO container", e))?;
        let version = sys::get_api_version(fd.as_fd())
            .map_err(|e| VfioError::io(&who, "VFIO_GET_API_VERSION", e))?;
        if u32::try_from(version).ok() != Some(VFIO_API_VERSION) {
            return Err(VfioError::io(
                &who,
                "VFIO_GET_API_VERSION (not API version 0)",
                io::Error::from_raw_os_error(libc::EPROTO),
            ));
        }
        let has = sys::check_extension(fd.as_fd(), VFIO_TYPE1v2_IOMMU)
            .map_err(|e| VfioError::io(&who, "VFIO_CHECK_EXTENSION(TYPE1v2)", e))?;
        if has <= 0 {
            return Err(VfioError::io(
                &who,
                "VFIO_CHECK_EXTENSION(TYPE1v2) (not available)",
                io::Error::from_raw_os_error(libc::ENODEV),
            ));
        }
        Ok(Arc::new(VfioContainer {
            fd,
            root: root.to_owned(),
            iommu_set: Mutex::new(false),
        }))
    }

    /// Opens `/dev/vfio/<group>`, checks it is VIABLE, attaches it to this container and sets
    /// TYPE1v2 on the first attach. A group has one opener at a time (EBUSY otherwise).
    pub fn open_group(self: &Arc<Self>, group: u32) -> Result<Arc<VfioGroup>, VfioError> {
        let path = self.root.join(group.to_string());
        let who = path.display().to_string();
        let fd = open_rw(&path).map_err(|e| VfioError::io(&who, "opening the VFIO group", e))?;
        let flags = sys::group_get_status(fd.as_fd())
            .map_err(|e| VfioError::io(&who, "VFIO_GROUP_GET_STATUS", e))?;
        if flags & VFIO_GROUP_FLAGS_VIABLE == 0 {
            return Err(VfioError::io(
                &who,
                "VFIO_GROUP_GET_STATUS (group not viable: bind every device of the group to vfio)",
                io::Error::from_raw_os_error(libc::EPERM),
            ));
        }
        sys::group_set_container(fd.as_fd(), self.fd.as_fd())
            .map_err(|e| VfioError::io(&who, "VFIO_GROUP_SET_CONTAINER", e))?;
        let mut set = self.iommu_set.lock().unwrap_or_else(|p| p.into_inner());
        if !*set {
            sys::set_iommu(self.fd.as_fd(), VFIO_TYPE1v2_IOMMU)
                .map_err(|e| VfioError::io(&who, "VFIO_SET_IOMMU(TYPE1v2)", e))?;
            *set = true;
        }
        Ok(Arc::new(VfioGroup {
            fd,
            id: group,
            _container: Arc::clone(self),
        }))
    }
}

/// An open VFIO group attached to a container; hands out device fds by name.
#[derive(Debug)]
pub struct VfioGroup {
    fd: OwnedFd,
    id: u32,
    _container: Arc<VfioContainer>,
}

impl VfioGroup {
    /// The group number.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// `VFIO_GROUP_GET_DEVICE_FD(name)` (PCI BDF `0000:bb:dd.f` or mdev UUID); the helper owns
    /// the device.
    pub fn open_device(self: &Arc<Self>, name: &str) -> Result<VfioDevice, VfioError> {
        let cname = CString::new(name).map_err(|_| VfioError::InvalidSpec {
            device: name.to_owned(),
            reason: "device name contains a NUL byte",
        })?;
        let fd = sys::group_get_device_fd(self.fd.as_fd(), &cname)
            .map_err(|e| VfioError::io(name, "VFIO_GROUP_GET_DEVICE_FD", e))?;
        VfioDevice::new(
            name.to_owned(),
            fd,
            Owner::Helper,
            Keep::Group(Arc::clone(self)),
        )
    }
}

/// The IOMMU group number of a device from sysfs (`/sys/bus/{pci,mdev}/devices/<name>/iommu_group`).
pub fn iommu_group_of(name: &str) -> Result<u32, VfioError> {
    let mut last = io::Error::from_raw_os_error(libc::ENOENT);
    for bus in ["pci", "mdev", "platform"] {
        let link = format!("/sys/bus/{bus}/devices/{name}/iommu_group");
        match std::fs::read_link(&link) {
            Ok(target) => {
                return target
                    .file_name()
                    .and_then(|n| n.to_str())
                    .and_then(|n| n.parse().ok())
                    .ok_or_else(|| {
                        VfioError::io(
                            name,
                            "reading the iommu_group link",
                            io::Error::from_raw_os_error(libc::EINVAL),
                        )
                    })
            }
            Err(e) => last = e,
        }
    }
    Err(VfioError::io(
        name,
        "finding the device's iommu_group in sysfs",
        last,
    ))
}

/// The cdev of a PCI device (`/dev/vfio/devices/vfioN` from `/sys/bus/pci/devices/<BDF>/vfio-dev/`).
pub fn cdev_path_of(bdf: &str) -> Result<PathBuf, VfioError> {
    let dir = format!("/sys/bus/pci/devices/{bdf}/vfio-dev");
    let entries =
        std::fs::read_dir(&dir).map_err(|e| VfioError::io(bdf, "listing vfio-dev in sysfs", e))?;
    for entry in entries.flatten() {
        let name = entry.file_name();
        if let Some(n) = name.to_str().filter(|n| n.starts_with("vfio")) {
            return Ok(PathBuf::from(format!("/dev/vfio/devices/{n}")));
        }
    }
    Err(VfioError::io(
        bdf,
        "finding the device's vfio cdev (needs CONFIG_VFIO_DEVICE_CDEV)",
        io::Error::from_raw_os_error(libc::ENOENT),
    ))
}

/// An open `/dev/iommu` with one IOAS, shared by the cdev devices attached to it.
#[derive(Debug)]
pub struct Iommufd {
    fd: OwnedFd,
    ioas: u32,
}

impl Iommufd {
    /// Opens `/dev/iommu` and allocates an IOAS.
    pub fn open() -> Result<Arc<Iommufd>, VfioError> {
        Self::open_path(Path::new("/dev/iommu"))
    }

    /// [`Iommufd::open`] at another path.
    pub fn open_path(path: &Path) -> Result<Arc<Iommufd>, VfioError> {
        let who = path.display().to_string();
        let fd = open_rw(path).map_err(|e| VfioError::io(&who, "opening the iommufd", e))?;
        let ioas =
            sys::ioas_alloc(fd.as_fd()).map_err(|e| VfioError::io(&who, "IOMMU_IOAS_ALLOC", e))?;
        Ok(Arc::new(Iommufd { fd, ioas }))
    }

    /// The IOAS id devices attach to.
    pub fn ioas(&self) -> u32 {
        self.ioas
    }
}

/// What a helper-opened device keeps alive.
#[derive(Debug)]
enum Keep {
    Nothing,
    Group(#[allow(dead_code)] Arc<VfioGroup>),
    Iommufd(#[allow(dead_code)] Arc<Iommufd>),
}

/// A real VFIO device fd with migration support.
#[derive(Debug)]
pub struct VfioDevice {
    name: String,
    owner: Owner,
    fd: OwnedFd,
    flags: MigrationFlags,
    precopy_v2: bool,
    /// A dup of the open session's data_fd (saving group or resuming).
    session_fd: Option<OwnedFd>,
    _keep: Keep,
}

impl VfioDevice {
    fn new(name: String, fd: OwnedFd, owner: Owner, keep: Keep) -> Result<VfioDevice, VfioError> {
        sys::check_device(fd.as_fd())?;
        let flags = sys::mig_flags(fd.as_fd())
            .map_err(|e| VfioError::io(&name, "VFIO_DEVICE_FEATURE GET MIGRATION", e))?;
        let flags = MigrationFlags(flags);
        let mut precopy_v2 = false;
        if flags.contains(MigrationFlags::PRE_COPY) {
            precopy_v2 = probe_precopy_v2(&name, fd.as_fd(), owner)?;
        }
        log::debug!("{name}: migration flags {flags}, PRECOPY_INFOv2 {precopy_v2}");
        Ok(VfioDevice {
            name,
            owner,
            fd,
            flags,
            precopy_v2,
            session_fd: None,
            _keep: keep,
        })
    }

    /// A device fd the VMM lent: we keep a dup (F_DUPFD_CLOEXEC), never reset, detach or close
    /// the VMM's device; dropping this closes only the dup. Fails unless the fd passes
    /// [`crate::fd::check_device_fd`] and then answers `VFIO_DEVICE_FEATURE` GET MIGRATION.
    pub fn borrowed(name: impl Into<String>, fd: BorrowedFd<'_>) -> Result<VfioDevice, VfioError> {
        let name = name.into();
        let dup = fd
            .try_clone_to_owned()
            .map_err(|e| VfioError::io(&name, "duplicating the VMM's device fd", e))?;
        VfioDevice::new(name, dup, Owner::Vmm, Keep::Nothing)
    }

    /// A device fd received (e.g. over SCM_RIGHTS) with an explicit owner: `Owner::Vmm` unless
    /// the VMM said the helper owns the device. Either way the open file may be shared with
    /// the VMM.
    pub fn from_fd(
        name: impl Into<String>,
        fd: OwnedFd,
        owner: Owner,
    ) -> Result<VfioDevice, VfioError> {
        VfioDevice::new(name.into(), fd, owner, Keep::Nothing)
    }

    /// Opens a device by name through the legacy path: its IOMMU group from sysfs, then
    /// `container.open_group` and `GET_DEVICE_FD`. Open all groups of one VM through one
    /// container; a group opens once (use [`VfioGroup::open_device`] for a second device).
    pub fn open_legacy(
        container: &Arc<VfioContainer>,
        name: &str,
    ) -> Result<VfioDevice, VfioError> {
        let group = container.open_group(iommu_group_of(name)?)?;
        group.open_device(name)
    }

    /// Opens a device through the iommufd cdev path: open `cdev`, BIND_IOMMUFD, then
    /// ATTACH_IOMMUFD_PT to the iommufd's IOAS. A cdev-opened device cannot be opened again.
    pub fn open_cdev(
        name: impl Into<String>,
        cdev: &Path,
        iommufd: &Arc<Iommufd>,
    ) -> Result<VfioDevice, VfioError> {
        let name = name.into();
        let fd = open_rw(cdev).map_err(|e| VfioError::io(&name, "opening the VFIO cdev", e))?;
        sys::check_device(fd.as_fd())?;
        sys::bind_iommufd(fd.as_fd(), iommufd.fd.as_fd())
            .map_err(|e| VfioError::io(&name, "VFIO_DEVICE_BIND_IOMMUFD", e))?;
        sys::attach_iommufd_pt(fd.as_fd(), iommufd.ioas)
            .map_err(|e| VfioError::io(&name, "VFIO_DEVICE_ATTACH_IOMMUFD_PT", e))?;
        VfioDevice::new(name, fd, Owner::Helper, Keep::Iommufd(Arc::clone(iommufd)))
    }

    /// The device fd (for region access in tests and the lab).
    pub fn device_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Whether the kernel has PRECOPY_INFOv2 for this device (PROBE); helper-owned devices are
    /// then opted in, borrowed ones keep the VMM's choice.
    pub fn precopy_v2(&self) -> bool {
        self.precopy_v2
    }

    /// `VFIO_DEVICE_GET_REGION_INFO`: (offset in the device fd, size) of region `index`.
    pub fn region(&self, index: u32) -> Result<(u64, u64), VfioError> {
        let info = sys::region_info(self.fd.as_fd(), index)
            .map_err(|e| VfioError::io(&self.name, "VFIO_DEVICE_GET_REGION_INFO", e))?;
        Ok((info.offset, info.size))
    }

    /// `pread` from the device fd at an absolute offset (region offset + register).
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<usize, VfioError> {
        os::pread(self.fd.as_fd(), buf, offset)
            .map_err(|e| VfioError::io(&self.name, "reading a device region", e))
    }

    /// `pwrite` to the device fd at an absolute offset.
    pub fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), VfioError> {
        os::pwrite_all(self.fd.as_fd(), buf, offset)
            .map_err(|e| VfioError::io(&self.name, "writing a device region", e))
    }

    fn get_state(&self) -> Result<MigState, VfioError> {
        let raw = sys::mig_get_state(self.fd.as_fd()).map_err(|e| {
            VfioError::io(&self.name, "VFIO_DEVICE_FEATURE GET MIG_DEVICE_STATE", e)
        })?;
        MigState::from_raw(raw).ok_or_else(|| VfioError::UnknownState {
            device: self.name.clone(),
            raw,
        })
    }
}

/// Probes PRECOPY_INFOv2 (PROBE|SET of feature 12). A helper-owned device is opted in (SET);
/// a borrowed one is left as the VMM set it: PRECOPY_INFO passes flags 0 either way, so its
/// REINIT bit is either the kernel's real output (opted in) or the echoed 0 (not).
fn probe_precopy_v2(name: &str, fd: BorrowedFd<'_>, owner: Owner) -> Result<bool, VfioError> {
    let feature = VFIO_DEVICE_FEATURE_MIG_PRECOPY_INFO_V2;
    match sys::feature_probe(fd, feature, VFIO_DEVICE_FEATURE_SET) {
        Ok(()) => {}
        Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL) | Some(libc::ENOTTY)) => {
            return Ok(false)
        }
        Err(e) => {
            log::warn!("{name}: PRECOPY_INFOv2 PROBE failed ({e}); using v1 precopy info");
            return Ok(false);
        }
    }
    if owner == Owner::Helper {
        sys::feature_set_empty(fd, feature)
            .map_err(|e| VfioError::io(name, "VFIO_DEVICE_FEATURE SET PRECOPY_INFOv2", e))?;
    }
    Ok(true)
}

impl MigrationDevice for VfioDevice {
    fn name(&self) -> &str {
        &self.name
    }

    fn owner(&self) -> Owner {
        self.owner
    }

    fn migration_flags(&self) -> Result<MigrationFlags, VfioError> {
        Ok(self.flags)
    }

    fn state(&self) -> Result<MigState, VfioError> {
        self.get_state()
    }

    fn set_state(&mut self, target: MigState) -> Result<Option<OwnedFd>, VfioError> {
        let from = self.get_state()?;
        let path = plan(from, target, self.flags).map_err(|source| VfioError::Plan {
            device: self.name.clone(),
            from,
            target,
            source,
        })?;
        let mut cur = from;
        let mut opened = None;
        for next in path {
            let got = match sys::mig_set_state(self.fd.as_fd(), next.raw()) {
                Ok(got) => got,
                Err(source) => {
                    let now = match self.get_state() {
                        Ok(now) => Some(now),
                        Err(e) => {
                            log::warn!("{}: GET after a failed SET failed too: {e}", self.name);
                            None
                        }
                    };
                    if now.is_none_or(|s| !s.is_saving() && s != MigState::Resuming) {
                        self.session_fd = None;
                    }
                    return Err(VfioError::SetState {
                        device: self.name.clone(),
                        from: cur,
                        to: next,
                        target,
                        now,
                        source,
                    });
                }
            };
            if arc_ends_session(cur, next) {
                self.session_fd = None;
            }
            match (arc_opens_data_fd(cur, next), got) {
                (true, Some(fd)) => opened = Some(fd),
                (true, None) => {
                    return Err(VfioError::MissingDataFd {
                        device: self.name.clone(),
                        from: cur,
                        to: next,
                    })
                }
                (false, Some(fd)) => {
                    drop(fd);
                    return Err(VfioError::UnexpectedDataFd {
                        device: self.name.clone(),
                        from: cur,
                        to: next,
                    });
                }
                (false, None) => {}
            }
            cur = next;
        }
        if let Some(fd) = &opened {
            let dup = fd
                .try_clone()
                .map_err(|e| VfioError::io(&self.name, "duplicating the new data_fd", e))?;
            self.session_fd = Some(dup);
        }
        Ok(opened)
    }

    fn precopy_info(&self) -> Result<PrecopyInfo, VfioError> {
        let Some(fd) = self.session_fd.as_ref() else {
            return Err(VfioError::NotInPrecopy {
                device: self.name.clone(),
                action: "VFIO_MIG_GET_PRECOPY_INFO",
                state: self.get_state()?,
            });
        };
        precopy_info_on(&self.name, fd.as_fd(), self.precopy_v2)
    }

    fn stop_copy_size(&self) -> Result<u64, VfioError> {
        sys::mig_data_size(self.fd.as_fd())
            .map_err(|e| VfioError::io(&self.name, "VFIO_DEVICE_FEATURE GET MIG_DATA_SIZE", e))
    }

    fn reset(&mut self) -> Result<(), VfioError> {
        if self.owner != Owner::Helper {
            return Err(VfioError::NotOwner {
                device: self.name.clone(),
                action: "VFIO_DEVICE_RESET",
            });
        }
        self.session_fd = None;
        sys::device_reset(self.fd.as_fd())
            .map_err(|e| VfioError::io(&self.name, "VFIO_DEVICE_RESET", e))
    }
}

/// PRECOPY_INFO with flags 0; REINIT is read only when v2 is on (a v1 driver echoes the 0).
fn precopy_info_on(name: &str, fd: BorrowedFd<'_>, v2: bool) -> Result<PrecopyInfo, VfioError> {
    let info = sys::precopy_info(fd, 0)
        .map_err(|e| VfioError::io(name, "VFIO_MIG_GET_PRECOPY_INFO", e))?;
    Ok(PrecopyInfo {
        initial_bytes: info.initial_bytes,
        dirty_bytes: info.dirty_bytes,
        reinit: v2 && info.flags & VFIO_PRECOPY_INFO_REINIT != 0,
    })
}

/// Only a data_fd, handed over by a VMM that drives the device states itself.
#[derive(Debug)]
pub struct DataFdDevice {
    name: String,
    fd: OwnedFd,
    direction: DataDirection,
}

impl DataFdDevice {
    /// Takes a data_fd (saving: readable; resuming: writable), type-checked.
    pub fn new(
        name: impl Into<String>,
        fd: OwnedFd,
        direction: DataDirection,
    ) -> Result<DataFdDevice, VfioError> {
        check_data_fd(fd.as_fd(), direction)?;
        Ok(DataFdDevice {
            name: name.into(),
            fd,
            direction,
        })
    }

    /// The data_fd (read or write it from one thread at a time).
    pub fn data_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// A dup of the data_fd (same open file: the position is shared).
    pub fn clone_data_fd(&self) -> Result<OwnedFd, VfioError> {
        self.fd
            .try_clone()
            .map_err(|e| VfioError::io(&self.name, "duplicating the data_fd", e))
    }

    /// Saving or resuming.
    pub fn direction(&self) -> DataDirection {
        self.direction
    }
}

impl MigrationDevice for DataFdDevice {
    fn name(&self) -> &str {
        &self.name
    }

    fn owner(&self) -> Owner {
        Owner::Vmm
    }

    fn migration_flags(&self) -> Result<MigrationFlags, VfioError> {
        Err(VfioError::VmmDrivesStates {
            device: self.name.clone(),
            action: "reading the migration flags",
        })
    }

    fn state(&self) -> Result<MigState, VfioError> {
        Err(VfioError::VmmDrivesStates {
            device: self.name.clone(),
            action: "reading the state",
        })
    }

    fn set_state(&mut self, _target: MigState) -> Result<Option<OwnedFd>, VfioError> {
        Err(VfioError::VmmDrivesStates {
            device: self.name.clone(),
            action: "changing the state",
        })
    }

    fn precopy_info(&self) -> Result<PrecopyInfo, VfioError> {
        precopy_info_on(&self.name, self.fd.as_fd(), false)
    }

    fn stop_copy_size(&self) -> Result<u64, VfioError> {
        Err(VfioError::VmmDrivesStates {
            device: self.name.clone(),
            action: "MIG_DATA_SIZE",
        })
    }

    fn reset(&mut self) -> Result<(), VfioError> {
        Err(VfioError::NotOwner {
            device: self.name.clone(),
            action: "VFIO_DEVICE_RESET",
        })
    }
}

fn open_rw(path: &Path) -> io::Result<OwnedFd> {
    Ok(OwnedFd::from(
        OpenOptions::new().read(true).write(true).open(path)?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::fake::{self, FailSet, FakeDev};
    use crate::MigState::*;
    use crate::PlanError;

    fn fake_device(flags: MigrationFlags, tweak: impl FnOnce(&mut FakeDev)) -> (u64, OwnedFd) {
        let mut dev = FakeDev::new(flags.bits());
        tweak(&mut dev);
        fake::new_device(dev).unwrap()
    }

    fn arcs(key: u64) -> Vec<(MigState, MigState)> {
        fake::with_device(key, |d| std::mem::take(&mut d.arcs)).unwrap()
    }

    #[test]
    fn stop_copy_takes_each_arc_and_returns_the_new_fd() {
        let (key, vmm_fd) = fake_device(MigrationFlags::ALL, |_| {});
        let mut dev = VfioDevice::borrowed("dev0", vmm_fd.as_fd()).unwrap();
        assert_eq!(dev.owner(), Owner::Vmm);
        assert_eq!(dev.migration_flags().unwrap(), MigrationFlags::ALL);
        assert_eq!(dev.state().unwrap(), Running);
        let fd = dev.set_state(StopCopy).unwrap();
        assert!(fd.is_some(), "RUNNING -> STOP_COPY opens the saving fd");
        assert_eq!(
            arcs(key),
            vec![(Running, RunningP2p), (RunningP2p, Stop), (Stop, StopCopy)]
        );
        assert_eq!(
            fake::with_device(key, |d| d.sets),
            Some(3),
            "one SET per arc"
        );
        assert_eq!(dev.stop_copy_size().unwrap(), 4096);
        assert!(dev.set_state(Stop).unwrap().is_none());
        assert!(dev.set_state(Running).unwrap().is_none());
        assert_eq!(dev.state().unwrap(), Running);
        assert_eq!(fake::with_device(key, |d| d.session), Some(None));
    }

    #[test]
    fn borrowed_device_is_never_reset_and_drop_leaves_the_vmm_fd_alone() {
        let (key, vmm_fd) = fake_device(MigrationFlags::ALL, |d| {
            d.fail = Some(FailSet {
                on: Stop,
                errno: libc::EIO,
                ends_in: Some(Error),
            });
        });
        let mut dev = VfioDevice::borrowed("vmm-dev", vmm_fd.as_fd()).unwrap();
        let err = dev.set_state(StopCopy).unwrap_err();
        match &err {
            VfioError::SetState {
                from,
                to,
                target,
                now,
                ..
            } => {
                assert_eq!(
                    (*from, *to, *target, *now),
                    (RunningP2p, Stop, StopCopy, Some(Error))
                );
            }
            other => panic!("unexpected {other:?}"),
        }
        assert_eq!(err.errno(), Some(libc::EIO));
        assert_eq!(err.state_after(), Some(Error));
        let msg = err.to_string();
        assert!(msg.contains("vmm-dev") && msg.contains("ERROR"), "{msg}");
        assert!(
            !msg.contains("Input/output"),
            "the cause is not printed twice: {msg}"
        );
        // From ERROR: no SET is tried, and a borrowed device is not reset.
        assert!(matches!(
            dev.set_state(Running),
            Err(VfioError::Plan {
                source: PlanError::FromError,
                ..
            })
        ));
        let reset = dev.reset().unwrap_err();
        assert!(matches!(reset, VfioError::NotOwner { .. }));
        assert!(reset.to_string().contains("VMM"), "{reset}");
        drop(dev);
        assert_eq!(fake::with_device(key, |d| d.resets), Some(0));
        // The VMM's fd still works after our dup is gone.
        assert_eq!(sys::mig_get_state(vmm_fd.as_fd()).unwrap(), Error.raw());
    }

    #[test]
    fn helper_owned_device_recovers_from_error_with_reset() {
        let (key, fd) = fake_device(MigrationFlags::ALL, |d| {
            d.fail = Some(FailSet {
                on: Resuming,
                errno: libc::EFAULT,
                ends_in: Some(Error),
            });
        });
        let mut dev = VfioDevice::from_fd("owned", fd, Owner::Helper).unwrap();
        let err = dev.set_state(Resuming).unwrap_err();
        assert_eq!(err.state_after(), Some(Error));
        dev.reset().unwrap();
        assert_eq!(fake::with_device(key, |d| d.resets), Some(1));
        assert_eq!(dev.state().unwrap(), Running);
        assert!(dev.set_state(Resuming).unwrap().is_some());
    }

    #[test]
    fn failed_set_reports_where_the_device_really_is() {
        // The failure leaves the device where it was before the failing arc.
        let (_, fd) = fake_device(MigrationFlags::ALL, |d| {
            d.fail = Some(FailSet {
                on: StopCopy,
                errno: libc::ENOMEM,
                ends_in: None,
            });
        });
        let mut dev = VfioDevice::from_fd("d", fd, Owner::Vmm).unwrap();
        let err = dev.set_state(StopCopy).unwrap_err();
        assert!(matches!(
            err,
            VfioError::SetState {
                from: Stop,
                to: StopCopy,
                now: Some(Stop),
                ..
            }
        ));
        assert_eq!(err.errno(), Some(libc::ENOMEM));
        assert_eq!(dev.state().unwrap(), Stop);
    }

    #[test]
    fn precopy_keeps_one_fd_across_stop_copy() {
        let (key, fd) = fake_device(MigrationFlags::ALL, |d| d.precopy = (1000, 24));
        let mut dev = VfioDevice::from_fd("pre", fd, Owner::Vmm).unwrap();
        assert!(!dev.precopy_v2());
        assert!(matches!(
            dev.precopy_info(),
            Err(VfioError::NotInPrecopy { state: Running, .. })
        ));
        let data = dev.set_state(PreCopy).unwrap();
        assert!(data.is_some());
        let info = dev.precopy_info().unwrap();
        assert_eq!(
            info,
            PrecopyInfo {
                initial_bytes: 1000,
                dirty_bytes: 24,
                reinit: false
            }
        );
        arcs(key);
        assert!(
            dev.set_state(StopCopy).unwrap().is_none(),
            "same session, no new fd"
        );
        assert_eq!(
            arcs(key),
            vec![(PreCopy, PreCopyP2p), (PreCopyP2p, StopCopy)]
        );
        // PRECOPY_INFO outside PRE_COPY: the kernel's EINVAL, errno kept.
        assert_eq!(dev.precopy_info().unwrap_err().errno(), Some(libc::EINVAL));
        // Asking for STOP from PRE_COPY is refused before any SET.
        dev.set_state(Running).unwrap();
        dev.set_state(PreCopy).unwrap();
        let sets = fake::with_device(key, |d| d.sets);
        assert!(matches!(
            dev.set_state(Stop),
            Err(VfioError::Plan {
                source: PlanError::EndsSavingSession { .. },
                ..
            })
        ));
        assert_eq!(fake::with_device(key, |d| d.sets), sets);
        assert_eq!(dev.state().unwrap(), PreCopy);
    }

    #[test]
    fn precopy_v2_only_when_the_kernel_has_it() {
        let (key, fd) = fake_device(MigrationFlags::ALL, |d| {
            d.v2_supported = true;
            d.reinit = true;
            d.precopy = (5, 0);
        });
        let mut dev = VfioDevice::from_fd("v2", fd, Owner::Helper).unwrap();
        assert!(dev.precopy_v2());
        assert_eq!(fake::with_device(key, |d| d.v2_on), Some(true));
        dev.set_state(PreCopy).unwrap();
        assert!(dev.precopy_info().unwrap().reinit);

        // A borrowed device on a v2 kernel is probed, never opted in by the helper.
        let (key, fd) = fake_device(MigrationFlags::ALL, |d| {
            d.v2_supported = true;
            d.reinit = true;
        });
        let mut dev = VfioDevice::from_fd("vmm-v2", fd, Owner::Vmm).unwrap();
        assert!(dev.precopy_v2());
        assert_eq!(fake::with_device(key, |d| d.v2_on), Some(false));
        dev.set_state(PreCopy).unwrap();
        assert!(!dev.precopy_info().unwrap().reinit, "v1 echo of flags 0");

        // An old kernel: PROBE fails with EINVAL, flags 0 go in and are echoed back.
        let (key, fd) = fake_device(MigrationFlags::ALL, |d| d.reinit = true);
        let mut dev = VfioDevice::from_fd("v1", fd, Owner::Helper).unwrap();
        assert!(!dev.precopy_v2());
        assert_eq!(fake::with_device(key, |d| d.v2_on), Some(false));
        dev.set_state(PreCopy).unwrap();
        assert!(!dev.precopy_info().unwrap().reinit);
    }

    #[test]
    fn driver_bugs_with_data_fds_are_reported() {
        let (_, fd) = fake_device(MigrationFlags::ALL, |d| d.bug_no_fd = true);
        let mut dev = VfioDevice::from_fd("nofd", fd, Owner::Vmm).unwrap();
        assert!(matches!(
            dev.set_state(StopCopy),
            Err(VfioError::MissingDataFd {
                from: Stop,
                to: StopCopy,
                ..
            })
        ));
        let (_, fd) = fake_device(MigrationFlags::ALL, |d| d.bug_extra_fd = true);
        let mut dev = VfioDevice::from_fd("extra", fd, Owner::Vmm).unwrap();
        assert!(matches!(
            dev.set_state(RunningP2p),
            Err(VfioError::UnexpectedDataFd { .. })
        ));
    }

    #[test]
    fn devices_without_optional_states() {
        let (key, fd) = fake_device(MigrationFlags::STOP_COPY, |_| {});
        let mut dev = VfioDevice::from_fd("basic", fd, Owner::Vmm).unwrap();
        assert!(dev.set_state(StopCopy).unwrap().is_some());
        assert_eq!(arcs(key), vec![(Running, Stop), (Stop, StopCopy)]);
        assert!(matches!(
            dev.set_state(RunningP2p),
            Err(VfioError::Plan {
                source: PlanError::Unsupported {
                    state: RunningP2p,
                    ..
                },
                ..
            })
        ));
        assert!(matches!(
            dev.precopy_info(),
            Err(VfioError::Io { .. }) | Err(VfioError::NotInPrecopy { .. })
        ));
    }

    #[test]
    fn a_non_vfio_fd_is_refused_before_any_ioctl() {
        let memfd = os::memfd(c"not-vfio").unwrap();
        let err = VfioDevice::borrowed("x", memfd.as_fd()).unwrap_err();
        assert!(matches!(err, VfioError::BadFd { .. }), "{err}");
        assert!(err.to_string().contains("/memfd:not-vfio"), "{err}");
        let null: OwnedFd = std::fs::File::open("/dev/null").unwrap().into();
        let err = VfioDevice::from_fd("null", null, Owner::Vmm).unwrap_err();
        assert!(err.to_string().contains("character device 1:3"), "{err}");
        // A fake group is no device either, though the fake kernel knows it.
        let dir = std::env::temp_dir().join(format!("vfio-fake-notdev-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        fake::group_file(&dir.join("g"), true, vec![]).unwrap();
        let group: OwnedFd = std::fs::File::open(dir.join("g")).unwrap().into();
        let err = VfioDevice::from_fd("group", group, Owner::Vmm).unwrap_err();
        assert!(matches!(err, VfioError::BadFd { .. }), "{err}");
        fake::iommufd_file(&dir.join("iommu")).unwrap();
        let iommufd = Iommufd::open_path(&dir.join("iommu")).unwrap();
        std::fs::write(dir.join("not-a-cdev"), b"").unwrap();
        let err = VfioDevice::open_cdev("nc", &dir.join("not-a-cdev"), &iommufd).unwrap_err();
        assert!(matches!(err, VfioError::BadFd { .. }), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
        // And a device without migration support.
        let (_, fd) = fake_device(MigrationFlags(0), |_| {});
        assert_eq!(
            VfioDevice::from_fd("nomig", fd, Owner::Vmm)
                .unwrap_err()
                .errno(),
            Some(libc::ENOTTY)
        );
    }

    #[test]
    fn legacy_group_path() {
        let dir = std::env::temp_dir().join(format!("vfio-fake-legacy-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (a, _) = fake_device(MigrationFlags::ALL, |_| {});
        let (b, _) = fake_device(MigrationFlags::ALL, |_| {});
        fake::container_file(&dir.join("vfio")).unwrap();
        fake::group_file(
            &dir.join("7"),
            true,
            vec![("uuid-a".into(), a), ("uuid-b".into(), b)],
        )
        .unwrap();
        fake::group_file(&dir.join("8"), false, vec![]).unwrap();
        let container = VfioContainer::open_at(&dir).unwrap();
        let group = container.open_group(7).unwrap();
        assert_eq!(group.id(), 7);
        let mut da = group.open_device("uuid-a").unwrap();
        let db = group.open_device("uuid-b").unwrap();
        assert_eq!(da.owner(), Owner::Helper);
        assert_eq!(db.state().unwrap(), Running);
        assert!(da.set_state(StopCopy).unwrap().is_some());
        assert_eq!(fake::with_device(b, |d| d.state), Some(Running));
        assert_eq!(
            group.open_device("nope").unwrap_err().errno(),
            Some(libc::ENODEV)
        );
        let err = container.open_group(8).unwrap_err();
        assert!(err.to_string().contains("not viable"), "{err}");
        let region = da.region(0).unwrap();
        assert_eq!(region, (0, 8));
        assert_eq!(da.region(1).unwrap().0, 1 << VFIO_PCI_OFFSET_SHIFT);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn cdev_path_binds_and_attaches() {
        let dir = std::env::temp_dir().join(format!("vfio-fake-cdev-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        fake::iommufd_file(&dir.join("iommu")).unwrap();
        let (key, _) = fake_device(MigrationFlags::ALL, |d| d.v2_supported = true);
        std::fs::write(dir.join("vfio0"), key.to_le_bytes()).unwrap();
        let iommufd = Iommufd::open_path(&dir.join("iommu")).unwrap();
        assert_eq!(iommufd.ioas(), 1);
        let mut dev = VfioDevice::open_cdev("0000:00:02.0", &dir.join("vfio0"), &iommufd).unwrap();
        assert_eq!(dev.owner(), Owner::Helper);
        assert!(dev.precopy_v2());
        assert!(dev.set_state(PreCopy).unwrap().is_some());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn data_fd_device_leaves_states_to_the_vmm() {
        let (_, dev_fd) = fake_device(MigrationFlags::ALL, |d| d.precopy = (64, 0));
        let mut vmm = VfioDevice::from_fd("vmm", dev_fd, Owner::Vmm).unwrap();
        let data = vmm.set_state(PreCopy).unwrap().unwrap();
        let mut only = DataFdDevice::new("only-data", data, DataDirection::Save).unwrap();
        assert_eq!(only.owner(), Owner::Vmm);
        assert_eq!(only.precopy_info().unwrap().initial_bytes, 64);
        let err = only.set_state(StopCopy).unwrap_err();
        assert!(matches!(err, VfioError::VmmDrivesStates { .. }));
        assert!(err.to_string().contains("VMM drives"), "{err}");
        assert!(only.state().is_err() && only.stop_copy_size().is_err() && only.reset().is_err());
        // The VMM switches to STOP_COPY on the device; the data_fd stays the same session.
        vmm.set_state(StopCopy).unwrap();
        assert_eq!(only.precopy_info().unwrap_err().errno(), Some(libc::EINVAL));
        // A socket is no data_fd.
        let (s, _peer) = crate::fd::socketpair().unwrap();
        assert!(matches!(
            DataFdDevice::new("sock", s, DataDirection::Save),
            Err(VfioError::BadFd { .. })
        ));
    }

    #[test]
    fn boxed_trait_objects_work() {
        let (_, fd) = fake_device(MigrationFlags::ALL, |_| {});
        let mut devs: Vec<Box<dyn MigrationDevice>> = vec![Box::new(
            VfioDevice::from_fd("boxed", fd, Owner::Vmm).unwrap(),
        )];
        for d in &mut devs {
            assert!(d.set_state(StopCopy).unwrap().is_some());
            assert_eq!(d.name(), "boxed");
        }
    }

    #[test]
    fn real_ioctls_on_a_foreign_fd_give_enotty() {
        use crate::sys::real;
        let m = os::memfd(c"foreign").unwrap();
        let f = m.as_fd();
        let enotty =
            |r: io::Result<()>| assert_eq!(r.unwrap_err().raw_os_error(), Some(libc::ENOTTY));
        enotty(real::get_api_version(f).map(drop));
        enotty(real::check_extension(f, 3).map(drop));
        enotty(real::set_iommu(f, 3));
        enotty(real::group_get_status(f).map(drop));
        enotty(real::group_set_container(f, f));
        enotty(real::group_get_device_fd(f, c"0000:00:00.0").map(drop));
        enotty(real::region_info(f, 0).map(drop));
        enotty(real::device_reset(f));
        enotty(real::bind_iommufd(f, f).map(drop));
        enotty(real::ioas_alloc(f).map(drop));
        enotty(real::attach_iommufd_pt(f, 1).map(drop));
        enotty(real::mig_flags(f).map(drop));
        enotty(real::mig_get_state(f).map(drop));
        enotty(real::mig_set_state(f, 1).map(drop));
        enotty(real::mig_data_size(f).map(drop));
        enotty(real::feature_probe(f, 12, VFIO_DEVICE_FEATURE_SET));
        enotty(real::feature_set_empty(f, 12));
        enotty(real::precopy_info(f, 0).map(drop));
    }
}
