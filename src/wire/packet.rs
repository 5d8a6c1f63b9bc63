//! Multifd channel packets as QEMU 10.x lays them out: the 64-byte init packet, the 12-byte
//! common header, the 276-byte device-state header and the 12-byte VFIO header that opens its
//! payload. All integers are big-endian and the structs are packed; zerocopy's `U32`/`U64`
//! describe them so no byte is shuffled by hand.

use zerocopy::byteorder::big_endian::{U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use super::WireError;

/// `MULTIFD_MAGIC`: first four bytes of every multifd packet and of the init packet.
pub const MULTIFD_MAGIC: u32 = 0x1122_3344;
/// `MULTIFD_VERSION`.
pub const MULTIFD_VERSION: u32 = 1;
/// Flag bit: a SYNC packet.
pub const MULTIFD_FLAG_SYNC: u32 = 0x01;
/// Flag bits: the compression method (NOCOMP = 0).
pub const MULTIFD_FLAG_COMPRESSION_MASK: u32 = 0x3e;
/// Flag bit (QEMU 10.0): the packet is a device-state packet, not RAM.
pub const MULTIFD_FLAG_DEVICE_STATE: u32 = 0x40;
/// `VFIO_DEVICE_STATE_PACKET_VER_CURRENT`.
pub const VFIO_DEVICE_STATE_PACKET_VERSION: u32 = 0;
/// VFIO packet flag: this packet carries the device's config blob (last idx of the device).
pub const VFIO_DEVICE_STATE_CONFIG_STATE: u32 = 0x1;
/// Length of the idstr field of a device-state packet.
pub const IDSTR_LEN: usize = 256;

/// Bytes of the init packet (`MultiFDInit_t`).
pub const INIT_PACKET_LEN: usize = 64;
/// Bytes of the common header every packet starts with.
pub const COMMON_HEADER_LEN: usize = 12;
/// Bytes of the device-state packet header (`MultiFDPacketDeviceState_t`).
pub const DEVICE_STATE_HEADER_LEN: usize = 276;
/// Bytes of the VFIO header at the start of a device-state payload (`VFIODeviceStatePacket`).
pub const VFIO_HEADER_LEN: usize = 12;
/// Room in front of each chunk for both headers: a source reads device data right after it.
pub const PACKET_HEADER_ROOM: usize = DEVICE_STATE_HEADER_LEN + VFIO_HEADER_LEN;

/// `MultiFDInit_t`: the first 64 bytes a sender writes on each multifd channel.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
#[repr(C)]
pub struct MultifdInitPacket {
    pub magic: U32,
    pub version: U32,
    pub uuid: [u8; 16],
    pub id: u8,
    pub unused1: [u8; 7],
    pub unused2: [U64; 4],
}

/// The 12 bytes that open every multifd packet.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
#[repr(C)]
pub struct MultifdPacketHeader {
    pub magic: U32,
    pub version: U32,
    pub flags: U32,
}

/// `MultiFDPacketDeviceState_t`: the header of a device-state packet; `next_packet_size`
/// payload bytes follow it.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
#[repr(C)]
pub struct DeviceStatePacketHeader {
    pub hdr: MultifdPacketHeader,
    pub idstr: [u8; IDSTR_LEN],
    pub instance_id: U32,
    pub next_packet_size: U32,
}

/// `VFIODeviceStatePacket` without its data: opens every VFIO device-state payload.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
#[repr(C)]
pub struct VfioDeviceStatePacketHeader {
    pub version: U32,
    pub idx: U32,
    pub flags: U32,
}

const _: () = assert!(size_of::<MultifdInitPacket>() == INIT_PACKET_LEN);
const _: () = assert!(size_of::<MultifdPacketHeader>() == COMMON_HEADER_LEN);
const _: () = assert!(size_of::<DeviceStatePacketHeader>() == DEVICE_STATE_HEADER_LEN);
const _: () = assert!(size_of::<VfioDeviceStatePacketHeader>() == VFIO_HEADER_LEN);

/// A device as the wire names it: QEMU's SaveStateEntry idstr plus its instance id.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeviceId {
    /// At most 255 bytes, no NUL (it must fit QEMU's NUL-terminated 256-byte field).
    pub idstr: String,
    pub instance_id: u32,
}

impl DeviceId {
    /// Checks that `idstr` fits the wire field.
    pub fn new(idstr: impl Into<String>, instance_id: u32) -> Result<Self, WireError> {
        let idstr = idstr.into();
        if idstr.is_empty() || idstr.len() >= IDSTR_LEN || idstr.as_bytes().contains(&0) {
            return Err(WireError::BadIdstr { idstr, offset: 12 });
        }
        Ok(Self { idstr, instance_id })
    }

    /// The NUL-padded 256-byte idstr field.
    pub fn idstr_field(&self) -> [u8; IDSTR_LEN] {
        let mut field = [0u8; IDSTR_LEN];
        field[..self.idstr.len()].copy_from_slice(self.idstr.as_bytes());
        field
    }
}

impl std::fmt::Display for DeviceId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.idstr, self.instance_id)
    }
}

/// What a destination checks an init packet against.
#[derive(Debug, Clone, Copy)]
pub struct InitExpectation {
    pub uuid: [u8; 16],
    pub channels: u8,
}

impl MultifdInitPacket {
    /// The init packet for channel `id`.
    pub fn new(uuid: [u8; 16], id: u8) -> Self {
        Self {
            magic: MULTIFD_MAGIC.into(),
            version: MULTIFD_VERSION.into(),
            uuid,
            id,
            unused1: [0; 7],
            unused2: [U64::ZERO; 4],
        }
    }

    /// Decodes and validates an init packet; returns the channel id. Stricter than QEMU:
    /// `id >= channels` is rejected (QEMU lets `id == channels` through).
    pub fn decode(
        bytes: &[u8; INIT_PACKET_LEN],
        expect: &InitExpectation,
    ) -> Result<u8, WireError> {
        let packet = Self::ref_from_bytes(bytes).expect("64-byte array is a MultifdInitPacket");
        check_magic_version(packet.magic.get(), packet.version.get(), 0)?;
        if packet.uuid != expect.uuid {
            return Err(WireError::UuidMismatch {
                got: packet.uuid,
                expected: expect.uuid,
                id: packet.id,
                offset: 8,
            });
        }
        if packet.id >= expect.channels {
            return Err(WireError::ChannelIdOutOfRange {
                id: packet.id,
                channels: expect.channels,
                offset: 24,
            });
        }
        Ok(packet.id)
    }
}

pub(crate) fn check_magic_version(magic: u32, version: u32, base: usize) -> Result<(), WireError> {
    if magic != MULTIFD_MAGIC {
        return Err(WireError::BadMagic {
            got: magic,
            offset: base,
        });
    }
    if version != MULTIFD_VERSION {
        return Err(WireError::BadVersion {
            got: version,
            offset: base + 4,
        });
    }
    Ok(())
}

/// A decoded device-state header, borrowing the idstr bytes from the header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceStateHeaderView<'a> {
    /// The idstr without its NUL padding.
    pub idstr: &'a [u8],
    pub instance_id: u32,
    pub next_packet_size: u32,
}

impl DeviceStatePacketHeader {
    /// Fills a 276-byte header in place; used in front of every chunk.
    pub fn write(
        out: &mut [u8; DEVICE_STATE_HEADER_LEN],
        idstr_field: &[u8; IDSTR_LEN],
        instance_id: u32,
        next_packet_size: u32,
    ) {
        let header =
            Self::mut_from_bytes(out).expect("276-byte array is a DeviceStatePacketHeader");
        header.hdr = MultifdPacketHeader {
            magic: MULTIFD_MAGIC.into(),
            version: MULTIFD_VERSION.into(),
            flags: MULTIFD_FLAG_DEVICE_STATE.into(),
        };
        header.idstr = *idstr_field;
        header.instance_id = instance_id.into();
        header.next_packet_size = next_packet_size.into();
    }

    /// Rewrites only `next_packet_size` (after a short read).
    pub fn set_next_packet_size(out: &mut [u8; DEVICE_STATE_HEADER_LEN], size: u32) {
        out[272..276].copy_from_slice(&size.to_be_bytes());
    }

    /// Decodes a device-state header with QEMU's checks plus ours: magic, version, the
    /// device-state flag (RAM and SYNC packets are not accepted on a device-state receiver),
    /// no SYNC bit, no compression, a NUL-terminated idstr, a non-empty payload that holds at
    /// least the VFIO header, and at most `max_packet_size` payload bytes.
    pub fn decode(
        bytes: &[u8; DEVICE_STATE_HEADER_LEN],
        max_packet_size: u32,
    ) -> Result<DeviceStateHeaderView<'_>, WireError> {
        let header = Self::ref_from_bytes(bytes).expect("276-byte array is a header");
        check_magic_version(header.hdr.magic.get(), header.hdr.version.get(), 0)?;
        let flags = header.hdr.flags.get();
        if flags & MULTIFD_FLAG_DEVICE_STATE == 0 {
            return Err(WireError::NotDeviceState { flags, offset: 8 });
        }
        if flags & MULTIFD_FLAG_SYNC != 0 {
            return Err(WireError::SyncDeviceState { offset: 8 });
        }
        if flags & MULTIFD_FLAG_COMPRESSION_MASK != 0 {
            return Err(WireError::Compressed { flags, offset: 8 });
        }
        if header.idstr[IDSTR_LEN - 1] != 0 {
            return Err(WireError::UnterminatedIdstr { offset: 12 });
        }
        let len = header
            .idstr
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(IDSTR_LEN);
        let next_packet_size = header.next_packet_size.get();
        if next_packet_size == 0 {
            return Err(WireError::EmptyDeviceState { offset: 272 });
        }
        if (next_packet_size as usize) < VFIO_HEADER_LEN {
            return Err(WireError::PacketTooShort {
                size: next_packet_size,
                offset: 272,
            });
        }
        if next_packet_size > max_packet_size {
            return Err(WireError::PacketTooLarge {
                size: next_packet_size,
                max: max_packet_size,
                offset: 272,
            });
        }
        Ok(DeviceStateHeaderView {
            idstr: &header.idstr[..len],
            instance_id: header.instance_id.get(),
            next_packet_size,
        })
    }
}

/// A decoded VFIO header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VfioHeaderView {
    pub idx: u32,
    /// The packet carries the config blob (flag bit 0).
    pub config: bool,
}

impl VfioDeviceStatePacketHeader {
    /// Fills a 12-byte VFIO header in place.
    pub fn write(out: &mut [u8; VFIO_HEADER_LEN], idx: u32, config: bool) {
        let header = Self::mut_from_bytes(out).expect("12-byte array is a VFIO header");
        header.version = VFIO_DEVICE_STATE_PACKET_VERSION.into();
        header.idx = idx.into();
        header.flags = if config {
            VFIO_DEVICE_STATE_CONFIG_STATE
        } else {
            0
        }
        .into();
    }

    /// Decodes a VFIO header: version 0, idx not 0xFFFFFFFF. Other flag bits are ignored,
    /// as QEMU does. `offset` is where the header sits in its stream, for error messages.
    pub fn decode(
        bytes: &[u8; VFIO_HEADER_LEN],
        offset: usize,
    ) -> Result<VfioHeaderView, WireError> {
        let header = Self::ref_from_bytes(bytes).expect("12-byte array is a VFIO header");
        let version = header.version.get();
        if version != VFIO_DEVICE_STATE_PACKET_VERSION {
            return Err(WireError::VfioVersion {
                got: version,
                offset,
            });
        }
        let idx = header.idx.get();
        if idx == u32::MAX {
            return Err(WireError::InvalidIdx { offset: offset + 4 });
        }
        Ok(VfioHeaderView {
            idx,
            config: header.flags.get() & VFIO_DEVICE_STATE_CONFIG_STATE != 0,
        })
    }
}

/// Writes both headers into the room in front of a chunk: `room` is the first
/// `PACKET_HEADER_ROOM` bytes of a packet buffer, `data_len` the chunk bytes after it.
pub fn write_packet_headers(
    room: &mut [u8; PACKET_HEADER_ROOM],
    idstr_field: &[u8; IDSTR_LEN],
    instance_id: u32,
    idx: u32,
    config: bool,
    data_len: u32,
) {
    let (ds, vfio) = room.split_at_mut(DEVICE_STATE_HEADER_LEN);
    DeviceStatePacketHeader::write(
        ds.try_into().expect("split at the header length"),
        idstr_field,
        instance_id,
        data_len + VFIO_HEADER_LEN as u32,
    );
    VfioDeviceStatePacketHeader::write(vfio.try_into().expect("12 bytes remain"), idx, config);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.split_whitespace().collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    #[test]
    fn init_packet_matches_qemu_wire_vector_1() {
        let uuid: [u8; 16] = hex("12345678 9abc def0 1122 334455667788")
            .try_into()
            .unwrap();
        let packet = MultifdInitPacket::new(uuid, 2);
        let mut expected =
            hex("11 22 33 44 00 00 00 01 12 34 56 78 9a bc de f0 11 22 33 44 55 66 77 88 02");
        expected.resize(64, 0);
        assert_eq!(packet.as_bytes(), &expected[..]);
        let expect = InitExpectation { uuid, channels: 3 };
        assert_eq!(
            MultifdInitPacket::decode(packet.as_bytes().try_into().unwrap(), &expect),
            Ok(2)
        );
        let expect = InitExpectation { uuid, channels: 2 };
        assert!(matches!(
            MultifdInitPacket::decode(packet.as_bytes().try_into().unwrap(), &expect),
            Err(WireError::ChannelIdOutOfRange {
                id: 2,
                channels: 2,
                offset: 24
            })
        ));
    }

    #[test]
    fn device_state_header_matches_qemu_wire_vector_2() {
        let id = DeviceId::new("0000:00:02.0/vfio", 0).unwrap();
        let mut out = [0xAAu8; DEVICE_STATE_HEADER_LEN];
        DeviceStatePacketHeader::write(&mut out, &id.idstr_field(), 0, 4096);
        let mut expected = hex("11 22 33 44 00 00 00 01 00 00 00 40");
        expected.extend_from_slice(b"0000:00:02.0/vfio");
        expected.resize(268, 0);
        expected.extend_from_slice(&hex("00 00 00 00 00 00 10 00"));
        assert_eq!(&out[..], &expected[..]);
        let view = DeviceStatePacketHeader::decode(&out, 1 << 20).unwrap();
        assert_eq!(view.idstr, b"0000:00:02.0/vfio");
        assert_eq!(view.next_packet_size, 4096);
    }

    #[test]
    fn vfio_headers_match_qemu_wire_vector_3() {
        let mut out = [0u8; VFIO_HEADER_LEN];
        VfioDeviceStatePacketHeader::write(&mut out, 0, false);
        assert_eq!(out.to_vec(), hex("00 00 00 00 00 00 00 00 00 00 00 00"));
        VfioDeviceStatePacketHeader::write(&mut out, 5, true);
        assert_eq!(out.to_vec(), hex("00 00 00 00 00 00 00 05 00 00 00 01"));
        assert_eq!(
            VfioDeviceStatePacketHeader::decode(&out, 0),
            Ok(VfioHeaderView {
                idx: 5,
                config: true
            })
        );
    }

    #[test]
    fn device_state_decode_rejects_what_qemu_only_asserts() {
        let id = DeviceId::new("dev", 0).unwrap();
        let mut out = [0u8; DEVICE_STATE_HEADER_LEN];
        DeviceStatePacketHeader::write(&mut out, &id.idstr_field(), 0, 0);
        assert_eq!(
            DeviceStatePacketHeader::decode(&out, 100),
            Err(WireError::EmptyDeviceState { offset: 272 })
        );
        DeviceStatePacketHeader::write(&mut out, &id.idstr_field(), 0, 101);
        assert!(matches!(
            DeviceStatePacketHeader::decode(&out, 100),
            Err(WireError::PacketTooLarge {
                size: 101,
                max: 100,
                ..
            })
        ));
        out[11] |= MULTIFD_FLAG_SYNC as u8;
        assert_eq!(
            DeviceStatePacketHeader::decode(&out, 1000),
            Err(WireError::SyncDeviceState { offset: 8 })
        );
        let mut idx_max = [0u8; VFIO_HEADER_LEN];
        VfioDeviceStatePacketHeader::write(&mut idx_max, u32::MAX, false);
        assert_eq!(
            VfioDeviceStatePacketHeader::decode(&idx_max, 276),
            Err(WireError::InvalidIdx { offset: 280 })
        );
    }
}
