//! Every VFIO and iommufd ioctl the crate issues, one `SAFETY` line each.
//!
//! The `SAFETY` lines of the device ioctls hold for VFIO's own handlers only: another driver
//! may read or write other memory for the same request number. So every device fd goes
//! through [`real::check_device`] first (`VfioDevice` does it before its first ioctl).
//!
//! Unit tests (`cfg(test)`) swap this module for `sys/fake.rs`, a fake kernel with the same
//! functions: a per-device state machine following the kernel's next-hop table, real memfds as
//! data_fds, and failure injection. The real functions are compiled in tests too and exercised
//! against non-VFIO fds (ENOTTY).

#[cfg(not(test))]
pub(crate) use real::*;

#[cfg(test)]
pub(crate) use fake::*;

#[cfg(test)]
pub(crate) mod fake;

pub(crate) mod real {
    #![cfg_attr(test, allow(dead_code))]

    use std::ffi::CStr;
    use std::io;
    use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

    use crate::uapi::*;

    fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
        if ret < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(ret)
        }
    }

    /// Refuses anything but a VFIO device fd, so no device ioctl below reaches another driver.
    pub(crate) fn check_device(dev: BorrowedFd<'_>) -> Result<(), crate::VfioError> {
        crate::fd::check_device_fd(dev)
    }

    /// `VFIO_GET_API_VERSION` on a container.
    pub(crate) fn get_api_version(container: BorrowedFd<'_>) -> io::Result<i32> {
        // SAFETY: the request takes no argument; the borrowed fd is open for the call.
        check(unsafe { libc::ioctl(container.as_raw_fd(), VFIO_GET_API_VERSION as _) })
    }

    /// `VFIO_CHECK_EXTENSION`: > 0 when the IOMMU type is available.
    pub(crate) fn check_extension(container: BorrowedFd<'_>, ext: u32) -> io::Result<i32> {
        // SAFETY: the argument is an integer passed by value; the fd is open for the call.
        check(unsafe {
            libc::ioctl(
                container.as_raw_fd(),
                VFIO_CHECK_EXTENSION as _,
                libc::c_ulong::from(ext),
            )
        })
    }

    /// `VFIO_SET_IOMMU`.
    pub(crate) fn set_iommu(container: BorrowedFd<'_>, ty: u32) -> io::Result<()> {
        // SAFETY: the argument is an integer passed by value; the fd is open for the call.
        check(unsafe {
            libc::ioctl(
                container.as_raw_fd(),
                VFIO_SET_IOMMU as _,
                libc::c_ulong::from(ty),
            )
        })
        .map(drop)
    }

    /// `VFIO_GROUP_GET_STATUS`: the group's flags.
    pub(crate) fn group_get_status(group: BorrowedFd<'_>) -> io::Result<u32> {
        let mut status = vfio_group_status {
            argsz: argsz::<vfio_group_status>(),
            flags: 0,
        };
        // SAFETY: `status` is a live, correctly sized vfio_group_status the kernel writes for
        // the duration of the call only.
        check(unsafe {
            libc::ioctl(
                group.as_raw_fd(),
                VFIO_GROUP_GET_STATUS as _,
                &mut status as *mut vfio_group_status,
            )
        })?;
        Ok(status.flags)
    }

    /// `VFIO_GROUP_SET_CONTAINER`.
    pub(crate) fn group_set_container(
        group: BorrowedFd<'_>,
        container: BorrowedFd<'_>,
    ) -> io::Result<()> {
        let fd: libc::c_int = container.as_raw_fd();
        // SAFETY: the kernel reads one int from `fd`, which lives across the call; both fds are
        // borrowed, so open.
        check(unsafe {
            libc::ioctl(
                group.as_raw_fd(),
                VFIO_GROUP_SET_CONTAINER as _,
                &fd as *const libc::c_int,
            )
        })
        .map(drop)
    }

    /// `VFIO_GROUP_GET_DEVICE_FD` by device name (BDF or mdev UUID).
    pub(crate) fn group_get_device_fd(group: BorrowedFd<'_>, name: &CStr) -> io::Result<OwnedFd> {
        // SAFETY: `name` is NUL-terminated and outlives the call; the kernel only reads it.
        let fd = check(unsafe {
            libc::ioctl(
                group.as_raw_fd(),
                VFIO_GROUP_GET_DEVICE_FD as _,
                name.as_ptr(),
            )
        })?;
        // SAFETY: on success the kernel installed `fd` as a new descriptor of this process that
        // nothing else knows: we are its only owner.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    /// `VFIO_DEVICE_GET_REGION_INFO` for one region index.
    pub(crate) fn region_info(dev: BorrowedFd<'_>, index: u32) -> io::Result<vfio_region_info> {
        let mut info = vfio_region_info {
            argsz: argsz::<vfio_region_info>(),
            index,
            ..Default::default()
        };
        // SAFETY: `info` is a live vfio_region_info whose argsz says its size; the kernel
        // writes no more than argsz bytes during the call.
        check(unsafe {
            libc::ioctl(
                dev.as_raw_fd(),
                VFIO_DEVICE_GET_REGION_INFO as _,
                &mut info as *mut vfio_region_info,
            )
        })?;
        Ok(info)
    }

    /// `VFIO_DEVICE_RESET`.
    pub(crate) fn device_reset(dev: BorrowedFd<'_>) -> io::Result<()> {
        // SAFETY: the request takes no argument; the fd is open for the call.
        check(unsafe { libc::ioctl(dev.as_raw_fd(), VFIO_DEVICE_RESET as _) }).map(drop)
    }

    /// `VFIO_DEVICE_BIND_IOMMUFD`: returns the devid.
    pub(crate) fn bind_iommufd(dev: BorrowedFd<'_>, iommufd: BorrowedFd<'_>) -> io::Result<u32> {
        let mut bind = vfio_device_bind_iommufd {
            argsz: argsz::<vfio_device_bind_iommufd>(),
            flags: 0,
            iommufd: iommufd.as_raw_fd(),
            out_devid: 0,
            token_uuid_ptr: 0,
        };
        // SAFETY: `bind` is live and sized by argsz; no token pointer is passed (flags 0).
        check(unsafe {
            libc::ioctl(
                dev.as_raw_fd(),
                VFIO_DEVICE_BIND_IOMMUFD as _,
                &mut bind as *mut vfio_device_bind_iommufd,
            )
        })?;
        Ok(bind.out_devid)
    }

    /// `IOMMU_IOAS_ALLOC` on an iommufd: returns the IOAS id.
    pub(crate) fn ioas_alloc(iommufd: BorrowedFd<'_>) -> io::Result<u32> {
        let mut alloc = iommu_ioas_alloc {
            size: argsz::<iommu_ioas_alloc>(),
            flags: 0,
            out_ioas_id: 0,
        };
        // SAFETY: `alloc` is live and its `size` field says how much the kernel may touch.
        check(unsafe {
            libc::ioctl(
                iommufd.as_raw_fd(),
                IOMMU_IOAS_ALLOC as _,
                &mut alloc as *mut iommu_ioas_alloc,
            )
        })?;
        Ok(alloc.out_ioas_id)
    }

    /// `VFIO_DEVICE_ATTACH_IOMMUFD_PT`: returns the pt_id the kernel wrote back.
    pub(crate) fn attach_iommufd_pt(dev: BorrowedFd<'_>, pt_id: u32) -> io::Result<u32> {
        let mut attach = vfio_device_attach_iommufd_pt {
            argsz: argsz::<vfio_device_attach_iommufd_pt>(),
            flags: 0,
            pt_id,
            pasid: 0,
        };
        // SAFETY: `attach` is live and sized by argsz for the call.
        check(unsafe {
            libc::ioctl(
                dev.as_raw_fd(),
                VFIO_DEVICE_ATTACH_IOMMUFD_PT as _,
                &mut attach as *mut vfio_device_attach_iommufd_pt,
            )
        })?;
        Ok(attach.pt_id)
    }

    fn feature<T: Copy>(dev: BorrowedFd<'_>, buf: &mut FeatureBuf<T>) -> io::Result<()> {
        // SAFETY: `buf` is a live FeatureBuf whose argsz is its own size; the kernel reads the
        // header and reads/writes at most argsz - 8 payload bytes during the call.
        check(unsafe {
            libc::ioctl(
                dev.as_raw_fd(),
                VFIO_DEVICE_FEATURE as _,
                buf as *mut FeatureBuf<T>,
            )
        })
        .map(drop)
    }

    /// `VFIO_DEVICE_FEATURE_MIGRATION` GET: the migration flags.
    pub(crate) fn mig_flags(dev: BorrowedFd<'_>) -> io::Result<u64> {
        let mut buf = FeatureBuf::new(
            VFIO_DEVICE_FEATURE_MIGRATION,
            VFIO_DEVICE_FEATURE_GET,
            vfio_device_feature_migration::default(),
        );
        feature(dev, &mut buf)?;
        Ok(buf.data.flags)
    }

    /// `VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE` GET: the raw state.
    pub(crate) fn mig_get_state(dev: BorrowedFd<'_>) -> io::Result<u32> {
        let mut buf = FeatureBuf::new(
            VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE,
            VFIO_DEVICE_FEATURE_GET,
            vfio_device_feature_mig_state {
                device_state: 0,
                data_fd: -1,
            },
        );
        feature(dev, &mut buf)?;
        Ok(buf.data.device_state)
    }

    /// `VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE` SET: the new data_fd when the arc opens one.
    pub(crate) fn mig_set_state(dev: BorrowedFd<'_>, state: u32) -> io::Result<Option<OwnedFd>> {
        let mut buf = FeatureBuf::new(
            VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE,
            VFIO_DEVICE_FEATURE_SET,
            vfio_device_feature_mig_state {
                device_state: state,
                data_fd: -1,
            },
        );
        feature(dev, &mut buf)?;
        if buf.data.data_fd < 0 {
            return Ok(None);
        }
        // SAFETY: on success a non-negative data_fd is a new descriptor the kernel installed in
        // this process (O_CLOEXEC) during this call; nothing else knows it, we own it.
        Ok(Some(unsafe { OwnedFd::from_raw_fd(buf.data.data_fd) }))
    }

    /// `VFIO_DEVICE_FEATURE_MIG_DATA_SIZE` GET: bytes still to come in STOP_COPY.
    pub(crate) fn mig_data_size(dev: BorrowedFd<'_>) -> io::Result<u64> {
        let mut buf = FeatureBuf::new(
            VFIO_DEVICE_FEATURE_MIG_DATA_SIZE,
            VFIO_DEVICE_FEATURE_GET,
            vfio_device_feature_mig_data_size::default(),
        );
        feature(dev, &mut buf)?;
        Ok(buf.data.stop_copy_length)
    }

    /// `VFIO_DEVICE_FEATURE` PROBE of `feature_id` with GET and/or SET in `ops`.
    pub(crate) fn feature_probe(dev: BorrowedFd<'_>, feature_id: u32, ops: u32) -> io::Result<()> {
        let mut buf = FeatureHeader::new(feature_id, VFIO_DEVICE_FEATURE_PROBE | ops, []);
        feature(dev, &mut buf)
    }

    /// `VFIO_DEVICE_FEATURE` SET of a feature with no payload (PRECOPY_INFOv2 opt-in).
    pub(crate) fn feature_set_empty(dev: BorrowedFd<'_>, feature_id: u32) -> io::Result<()> {
        let mut buf = FeatureHeader::new(feature_id, VFIO_DEVICE_FEATURE_SET, []);
        feature(dev, &mut buf)
    }

    /// `VFIO_MIG_GET_PRECOPY_INFO` on a saving data_fd; `flags` in is 0 unless v2 was opted in.
    pub(crate) fn precopy_info(
        data_fd: BorrowedFd<'_>,
        flags: u32,
    ) -> io::Result<vfio_precopy_info> {
        let mut info = vfio_precopy_info {
            argsz: argsz::<vfio_precopy_info>(),
            flags,
            initial_bytes: 0,
            dirty_bytes: 0,
        };
        // SAFETY: `info` is a live vfio_precopy_info sized by argsz, written during the call.
        check(unsafe {
            libc::ioctl(
                data_fd.as_raw_fd(),
                VFIO_MIG_GET_PRECOPY_INFO as _,
                &mut info as *mut vfio_precopy_info,
            )
        })?;
        Ok(info)
    }
}
