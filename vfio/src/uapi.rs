//! The few uAPI pieces the helper uses: `vfio-bindings` 0.7 structs, the ioctl request numbers
//! (the bindings have none), the two small iommufd structs, and the `VFIO_DEVICE_FEATURE`
//! argument buffers, each with compile-time size and offset asserts.
//!
//! Every VFIO and iommufd request is `_IO(';', nr)`: no size or direction in the number.

pub use vfio_bindings::bindings::vfio::{
    vfio_device_attach_iommufd_pt, vfio_device_bind_iommufd, vfio_device_feature,
    vfio_device_feature_mig_data_size, vfio_device_feature_mig_state,
    vfio_device_feature_migration, vfio_group_status, vfio_precopy_info, vfio_region_info,
    VFIO_DEVICE_FEATURE_MIG_PRECOPY_INFOv2, VFIO_TYPE1v2_IOMMU, VFIO_API_VERSION, VFIO_BASE,
    VFIO_DEVICE_FEATURE_GET, VFIO_DEVICE_FEATURE_MIGRATION, VFIO_DEVICE_FEATURE_MIG_DATA_SIZE,
    VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE, VFIO_DEVICE_FEATURE_PROBE, VFIO_DEVICE_FEATURE_SET,
    VFIO_GROUP_FLAGS_CONTAINER_SET, VFIO_GROUP_FLAGS_VIABLE, VFIO_PRECOPY_INFO_REINIT, VFIO_TYPE,
};

/// `VFIO_DEVICE_FEATURE_MIG_PRECOPY_INFOv2` (12) under an upper-case name usable in patterns.
pub const VFIO_DEVICE_FEATURE_MIG_PRECOPY_INFO_V2: u32 = VFIO_DEVICE_FEATURE_MIG_PRECOPY_INFOv2;

/// `_IO(type, nr)`: direction and size bits are zero.
const fn io(ty: u8, nr: u32) -> u32 {
    ((ty as u32) << 8) | nr
}

/// `_IO(VFIO_TYPE, VFIO_BASE + n)`.
const fn vfio_io(n: u32) -> u32 {
    io(VFIO_TYPE, VFIO_BASE + n)
}

/// Container: the API version (0).
pub const VFIO_GET_API_VERSION: u32 = vfio_io(0);
/// Container: whether an IOMMU type is available.
pub const VFIO_CHECK_EXTENSION: u32 = vfio_io(1);
/// Container: pick the IOMMU type (after the first group is attached).
pub const VFIO_SET_IOMMU: u32 = vfio_io(2);
/// Group: `struct vfio_group_status`.
pub const VFIO_GROUP_GET_STATUS: u32 = vfio_io(3);
/// Group: attach to a container (arg: pointer to the container fd).
pub const VFIO_GROUP_SET_CONTAINER: u32 = vfio_io(4);
/// Group: a device fd by name (arg: NUL-terminated name).
pub const VFIO_GROUP_GET_DEVICE_FD: u32 = vfio_io(6);
/// Device: `struct vfio_device_info`.
pub const VFIO_DEVICE_GET_INFO: u32 = vfio_io(7);
/// Device: `struct vfio_region_info` (offset and size of a region in the device fd).
pub const VFIO_DEVICE_GET_REGION_INFO: u32 = vfio_io(8);
/// Device: reset (returns a migration device to RUNNING).
pub const VFIO_DEVICE_RESET: u32 = vfio_io(11);
/// Device: `struct vfio_device_feature` GET/SET/PROBE.
pub const VFIO_DEVICE_FEATURE: u32 = vfio_io(17);
/// cdev device: bind to an iommufd.
pub const VFIO_DEVICE_BIND_IOMMUFD: u32 = vfio_io(18);
/// cdev device: attach to an IOAS or HWPT.
pub const VFIO_DEVICE_ATTACH_IOMMUFD_PT: u32 = vfio_io(19);
/// cdev device: detach (never on a borrowed device).
pub const VFIO_DEVICE_DETACH_IOMMUFD_PT: u32 = vfio_io(20);
/// data_fd (not the device fd): `struct vfio_precopy_info`.
pub const VFIO_MIG_GET_PRECOPY_INFO: u32 = vfio_io(21);

/// iommufd ioctl type (`IOMMUFD_TYPE`, the same ';').
pub const IOMMUFD_TYPE: u8 = b';';
/// `IOMMUFD_CMD_BASE`.
pub const IOMMUFD_CMD_BASE: u32 = 0x80;
/// iommufd: destroy an object.
pub const IOMMU_DESTROY: u32 = io(IOMMUFD_TYPE, IOMMUFD_CMD_BASE);
/// iommufd: allocate an I/O address space.
pub const IOMMU_IOAS_ALLOC: u32 = io(IOMMUFD_TYPE, IOMMUFD_CMD_BASE + 1);

/// `struct iommu_ioas_alloc` (include/uapi/linux/iommufd.h).
#[allow(non_camel_case_types)]
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct iommu_ioas_alloc {
    /// sizeof(struct iommu_ioas_alloc).
    pub size: u32,
    /// Must be 0.
    pub flags: u32,
    /// Output: the IOAS id.
    pub out_ioas_id: u32,
}

/// `struct iommu_destroy`.
#[allow(non_camel_case_types)]
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct iommu_destroy {
    /// sizeof(struct iommu_destroy).
    pub size: u32,
    /// The object id.
    pub id: u32,
}

/// A `struct vfio_device_feature` header followed by one feature payload, as the ioctl takes it.
/// Aligned to 8 so a payload with a u64 starts right after the 8-byte header.
#[repr(C, align(8))]
#[derive(Debug, Default, Clone, Copy)]
pub struct FeatureBuf<T: Copy> {
    /// The whole buffer's size.
    pub argsz: u32,
    /// Feature id | GET/SET/PROBE.
    pub flags: u32,
    /// The payload.
    pub data: T,
}

impl<T: Copy + Default> FeatureBuf<T> {
    /// A buffer for `feature` with `op` bits (GET, SET, PROBE) and a payload.
    pub fn new(feature: u32, op: u32, data: T) -> Self {
        FeatureBuf {
            argsz: u32::try_from(std::mem::size_of::<Self>()).unwrap_or(u32::MAX),
            flags: feature | op,
            data,
        }
    }
}

/// A feature request with no payload (PROBE, PRECOPY_INFOv2 SET).
pub type FeatureHeader = FeatureBuf<[u8; 0]>;

const _: () = {
    use std::mem::{offset_of, size_of};
    assert!(size_of::<vfio_device_feature>() == 8);
    assert!(offset_of!(vfio_device_feature, argsz) == offset_of!(FeatureBuf<u64>, argsz));
    assert!(offset_of!(vfio_device_feature, flags) == offset_of!(FeatureBuf<u64>, flags));
    assert!(offset_of!(vfio_device_feature, data) == offset_of!(FeatureBuf<u64>, data));
    assert!(size_of::<FeatureBuf<vfio_device_feature_migration>>() == 16);
    assert!(size_of::<FeatureBuf<vfio_device_feature_mig_state>>() == 16);
    assert!(size_of::<FeatureBuf<vfio_device_feature_mig_data_size>>() == 16);
    assert!(offset_of!(FeatureBuf<vfio_device_feature_mig_state>, data) == 8);
    assert!(size_of::<FeatureHeader>() == 8);
    assert!(size_of::<vfio_device_feature_mig_state>() == 8);
    assert!(offset_of!(vfio_device_feature_mig_state, data_fd) == 4);
    assert!(size_of::<vfio_precopy_info>() == 24);
    assert!(offset_of!(vfio_precopy_info, initial_bytes) == 8);
    assert!(offset_of!(vfio_precopy_info, dirty_bytes) == 16);
    assert!(size_of::<vfio_group_status>() == 8);
    assert!(size_of::<vfio_region_info>() == 32);
    assert!(offset_of!(vfio_region_info, offset) == 24);
    assert!(size_of::<vfio_device_bind_iommufd>() == 24);
    assert!(offset_of!(vfio_device_bind_iommufd, out_devid) == 12);
    assert!(size_of::<vfio_device_attach_iommufd_pt>() == 16);
    assert!(offset_of!(vfio_device_attach_iommufd_pt, pt_id) == 8);
    assert!(size_of::<iommu_ioas_alloc>() == 12);
    assert!(offset_of!(iommu_ioas_alloc, out_ioas_id) == 8);
    assert!(size_of::<iommu_destroy>() == 8);
};

/// `size_of::<T>()` as the u32 the uAPI's `argsz`/`size` fields hold.
pub fn argsz<T>() -> u32 {
    u32::try_from(std::mem::size_of::<T>()).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_numbers_match_the_kernel() {
        assert_eq!(VFIO_GET_API_VERSION, 0x3B64);
        assert_eq!(VFIO_CHECK_EXTENSION, 0x3B65);
        assert_eq!(VFIO_SET_IOMMU, 0x3B66);
        assert_eq!(VFIO_GROUP_GET_STATUS, 0x3B67);
        assert_eq!(VFIO_GROUP_SET_CONTAINER, 0x3B68);
        assert_eq!(VFIO_GROUP_GET_DEVICE_FD, 0x3B6A);
        assert_eq!(VFIO_DEVICE_GET_INFO, 0x3B6B);
        assert_eq!(VFIO_DEVICE_GET_REGION_INFO, 0x3B6C);
        assert_eq!(VFIO_DEVICE_RESET, 0x3B6F);
        assert_eq!(VFIO_DEVICE_FEATURE, 0x3B75);
        assert_eq!(VFIO_DEVICE_FEATURE, 15221);
        assert_eq!(VFIO_DEVICE_BIND_IOMMUFD, 0x3B76);
        assert_eq!(VFIO_DEVICE_ATTACH_IOMMUFD_PT, 0x3B77);
        assert_eq!(VFIO_DEVICE_DETACH_IOMMUFD_PT, 0x3B78);
        assert_eq!(VFIO_MIG_GET_PRECOPY_INFO, 0x3B79);
        assert_eq!(VFIO_MIG_GET_PRECOPY_INFO, 15225);
        assert_eq!(IOMMU_DESTROY, 0x3B80);
        assert_eq!(IOMMU_IOAS_ALLOC, 0x3B81);
    }

    #[test]
    fn feature_ids_and_flags_match_the_uapi() {
        assert_eq!(VFIO_DEVICE_FEATURE_GET, 1 << 16);
        assert_eq!(VFIO_DEVICE_FEATURE_SET, 1 << 17);
        assert_eq!(VFIO_DEVICE_FEATURE_PROBE, 1 << 18);
        assert_eq!(VFIO_DEVICE_FEATURE_MIGRATION, 1);
        assert_eq!(VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE, 2);
        assert_eq!(VFIO_DEVICE_FEATURE_MIG_DATA_SIZE, 9);
        assert_eq!(VFIO_DEVICE_FEATURE_MIG_PRECOPY_INFOv2, 12);
        assert_eq!(VFIO_PRECOPY_INFO_REINIT, 1);
        assert_eq!(VFIO_TYPE1v2_IOMMU, 3);
    }

    #[test]
    fn feature_buffers_carry_their_size() {
        let b = FeatureBuf::new(
            VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE,
            VFIO_DEVICE_FEATURE_SET,
            vfio_device_feature_mig_state {
                device_state: 3,
                data_fd: -1,
            },
        );
        assert_eq!(b.argsz, 16);
        assert_eq!(b.flags, (1 << 17) | 2);
        assert_eq!(
            FeatureHeader::new(12, VFIO_DEVICE_FEATURE_PROBE, []).argsz,
            8
        );
        assert_eq!(argsz::<vfio_precopy_info>(), 24);
    }

    #[test]
    fn mig_state_values_match_the_bindings() {
        use crate::MigState;
        use vfio_bindings::bindings::vfio as b;
        assert_eq!(
            MigState::Error.raw(),
            b::vfio_device_mig_state_VFIO_DEVICE_STATE_ERROR
        );
        assert_eq!(
            MigState::Stop.raw(),
            b::vfio_device_mig_state_VFIO_DEVICE_STATE_STOP
        );
        assert_eq!(
            MigState::Running.raw(),
            b::vfio_device_mig_state_VFIO_DEVICE_STATE_RUNNING
        );
        assert_eq!(
            MigState::StopCopy.raw(),
            b::vfio_device_mig_state_VFIO_DEVICE_STATE_STOP_COPY
        );
        assert_eq!(
            MigState::Resuming.raw(),
            b::vfio_device_mig_state_VFIO_DEVICE_STATE_RESUMING
        );
        assert_eq!(
            MigState::RunningP2p.raw(),
            b::vfio_device_mig_state_VFIO_DEVICE_STATE_RUNNING_P2P
        );
        assert_eq!(
            MigState::PreCopy.raw(),
            b::vfio_device_mig_state_VFIO_DEVICE_STATE_PRE_COPY
        );
        assert_eq!(
            MigState::PreCopyP2p.raw(),
            b::vfio_device_mig_state_VFIO_DEVICE_STATE_PRE_COPY_P2P
        );
        assert_eq!(MigState::from_raw(8), None);
        for s in MigState::ALL {
            assert_eq!(MigState::from_raw(s.raw()), Some(s));
        }
    }
}
