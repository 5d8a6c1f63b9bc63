//! Whole multifd packets as they follow one another on a channel: the common header chooses
//! the layout (flag `0x40`), RAM and SYNC packets (`MultiFDPacket_t`, 4 KiB target pages,
//! 1344-byte header) are decoded for inspection with `multifd_ram_unfill_packet`'s checks and
//! a few of our own, device-state packets with the checks of [`DeviceStatePacketHeader`] and
//! [`VfioDeviceStatePacketHeader`]. [`ChannelSet`] and [`DeviceIdxTracker`] hold the checks
//! that need memory across packets and channels (duplicate channel id, duplicate idx, a second
//! config packet, data above the config idx).

use std::collections::BTreeSet;

use zerocopy::byteorder::big_endian::{U32, U64};
use zerocopy::{FromBytes, FromZeros, Immutable, IntoBytes, KnownLayout, Unaligned};

use super::packet::check_magic_version;
use super::{
    DeviceStateHeaderView, DeviceStatePacketHeader, InitExpectation, MultifdInitPacket,
    MultifdPacketHeader, VfioDeviceStatePacketHeader, VfioHeaderView, WireError, COMMON_HEADER_LEN,
    DEVICE_STATE_HEADER_LEN, INIT_PACKET_LEN, MULTIFD_FLAG_COMPRESSION_MASK,
    MULTIFD_FLAG_DEVICE_STATE, MULTIFD_FLAG_SYNC, MULTIFD_MAGIC, MULTIFD_VERSION, VFIO_HEADER_LEN,
};

/// Every flag bit QEMU 10.x defines.
pub const MULTIFD_FLAGS_KNOWN: u32 =
    MULTIFD_FLAG_SYNC | MULTIFD_FLAG_COMPRESSION_MASK | MULTIFD_FLAG_DEVICE_STATE;
/// Target page size of the RAM packets we decode (x86 and most targets).
pub const RAM_PAGE_SIZE: usize = 4096;
/// `MULTIFD_PACKET_SIZE`: bytes of pages one RAM packet describes at most.
pub const MULTIFD_PACKET_SIZE: usize = 512 * 1024;
/// Page offsets in a RAM packet header: `MULTIFD_PACKET_SIZE / RAM_PAGE_SIZE`.
pub const RAM_PAGE_COUNT: usize = MULTIFD_PACKET_SIZE / RAM_PAGE_SIZE;
/// Bytes of a RAM (or SYNC) packet header with 4 KiB pages.
pub const RAM_PACKET_LEN: usize = 320 + 8 * RAM_PAGE_COUNT;
/// Length of the ramblock name field.
pub const RAMBLOCK_LEN: usize = 256;

/// `MultiFDPacket_t` with 4 KiB target pages.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
#[repr(C)]
pub struct MultifdRamPacket {
    pub hdr: MultifdPacketHeader,
    pub pages_alloc: U32,
    pub normal_pages: U32,
    pub next_packet_size: U32,
    pub packet_num: U64,
    pub zero_pages: U32,
    pub unused32: U32,
    pub unused64: [U64; 3],
    pub ramblock: [u8; RAMBLOCK_LEN],
    pub offset: [U64; RAM_PAGE_COUNT],
}

const _: () = assert!(size_of::<MultifdRamPacket>() == RAM_PACKET_LEN);
const _: () = assert!(RAM_PACKET_LEN == 1344);

/// Field offsets within a RAM packet, for error messages.
const OFF_FLAGS: usize = 8;
const OFF_PAGES_ALLOC: usize = 12;
const OFF_NORMAL: usize = 16;
const OFF_NEXT_SIZE: usize = 20;
const OFF_ZERO: usize = 32;
const OFF_RAMBLOCK: usize = 64;
const OFF_OFFSETS: usize = 320;

/// A decoded RAM or SYNC packet header, borrowing from the bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RamPacketView<'a> {
    pub flags: u32,
    pub pages_alloc: u32,
    pub normal_pages: u32,
    pub zero_pages: u32,
    pub next_packet_size: u32,
    pub packet_num: u64,
    /// The ramblock name without its NUL padding (empty in SYNC packets).
    pub ramblock: &'a [u8],
    offsets: &'a [U64; RAM_PAGE_COUNT],
}

impl RamPacketView<'_> {
    /// The packet is a SYNC packet.
    pub fn is_sync(&self) -> bool {
        self.flags & MULTIFD_FLAG_SYNC != 0
    }

    /// Offsets of the normal pages, in payload order.
    pub fn normal_offsets(&self) -> impl Iterator<Item = u64> + '_ {
        let end = (self.normal_pages as usize).min(RAM_PAGE_COUNT);
        self.offsets[..end].iter().map(|o| o.get())
    }

    /// Offsets of the zero pages.
    pub fn zero_offsets(&self) -> impl Iterator<Item = u64> + '_ {
        // The counts were checked by `decode`; `min` keeps a caller-edited view in bounds.
        let start = (self.normal_pages as usize).min(RAM_PAGE_COUNT);
        let end = start
            .saturating_add(self.zero_pages as usize)
            .min(RAM_PAGE_COUNT);
        self.offsets[start..end].iter().map(|o| o.get())
    }
}

impl MultifdRamPacket {
    /// A SYNC packet (`multifd_send_sync_main`): everything zero but magic, version, flags
    /// and `packet_num`.
    pub fn sync(packet_num: u64) -> Self {
        let mut p = Self::new_zeroed();
        p.hdr = MultifdPacketHeader {
            magic: MULTIFD_MAGIC.into(),
            version: MULTIFD_VERSION.into(),
            flags: MULTIFD_FLAG_SYNC.into(),
        };
        p.packet_num = packet_num.into();
        p
    }

    /// A nocomp RAM packet as `multifd_ram_fill_packet` writes it: `pages_alloc` =
    /// [`RAM_PAGE_COUNT`], normal pages first, then zero pages; `next_packet_size` = normal
    /// pages × 4096. Fails when the pages do not fit or the name does not fit its field.
    pub fn ram(
        packet_num: u64,
        ramblock: &[u8],
        normal: &[u64],
        zero: &[u64],
    ) -> Result<Self, WireError> {
        if ramblock.len() >= RAMBLOCK_LEN || ramblock.contains(&0) {
            return Err(WireError::RamUnterminatedBlock {
                offset: OFF_RAMBLOCK,
            });
        }
        let pages = normal.len() + zero.len();
        if pages > RAM_PAGE_COUNT {
            return Err(WireError::RamPagesAlloc {
                got: u32::try_from(pages).unwrap_or(u32::MAX),
                max: RAM_PAGE_COUNT as u32,
                offset: OFF_PAGES_ALLOC,
            });
        }
        let mut p = Self::new_zeroed();
        p.hdr = MultifdPacketHeader {
            magic: MULTIFD_MAGIC.into(),
            version: MULTIFD_VERSION.into(),
            flags: 0.into(),
        };
        p.pages_alloc = (RAM_PAGE_COUNT as u32).into();
        p.normal_pages = (normal.len() as u32).into();
        p.zero_pages = (zero.len() as u32).into();
        p.next_packet_size = ((normal.len() * RAM_PAGE_SIZE) as u32).into();
        p.packet_num = packet_num.into();
        p.ramblock[..ramblock.len()].copy_from_slice(ramblock);
        for (slot, off) in p.offset.iter_mut().zip(normal.iter().chain(zero)) {
            *slot = (*off).into();
        }
        Ok(p)
    }

    /// Decodes a RAM or SYNC packet header. Checks, in order: magic, version, no undefined
    /// flag bits, not a device-state packet, no compression (we decode nocomp only),
    /// QEMU's `pages_alloc ≤ 128`, `normal ≤ pages_alloc`, `zero ≤ pages_alloc − normal`;
    /// then ours: `next_packet_size` = normal × 4096 (QEMU's nocomp receiver reads that many
    /// bytes whatever the field says), a NUL-terminated ramblock name, a name whenever the
    /// packet carries pages, and page-aligned offsets.
    pub fn decode(bytes: &[u8; RAM_PACKET_LEN]) -> Result<RamPacketView<'_>, WireError> {
        let Ok(p) = Self::ref_from_bytes(bytes) else {
            // Unreachable: the array has exactly the struct's size and alignment 1.
            return Err(WireError::Truncated {
                what: "RAM packet header",
                need: RAM_PACKET_LEN,
                have: bytes.len(),
                offset: 0,
            });
        };
        check_magic_version(p.hdr.magic.get(), p.hdr.version.get(), 0)?;
        let flags = p.hdr.flags.get();
        check_known_flags(flags)?;
        if flags & MULTIFD_FLAG_DEVICE_STATE != 0 {
            return Err(WireError::NotRam {
                flags,
                offset: OFF_FLAGS,
            });
        }
        if flags & MULTIFD_FLAG_COMPRESSION_MASK != 0 {
            return Err(WireError::RamCompressed {
                flags,
                offset: OFF_FLAGS,
            });
        }
        let pages_alloc = p.pages_alloc.get();
        if pages_alloc > RAM_PAGE_COUNT as u32 {
            return Err(WireError::RamPagesAlloc {
                got: pages_alloc,
                max: RAM_PAGE_COUNT as u32,
                offset: OFF_PAGES_ALLOC,
            });
        }
        let normal_pages = p.normal_pages.get();
        if normal_pages > pages_alloc {
            return Err(WireError::RamNormalPages {
                got: normal_pages,
                max: pages_alloc,
                offset: OFF_NORMAL,
            });
        }
        let zero_pages = p.zero_pages.get();
        if zero_pages > pages_alloc - normal_pages {
            return Err(WireError::RamZeroPages {
                got: zero_pages,
                max: pages_alloc - normal_pages,
                offset: OFF_ZERO,
            });
        }
        let next_packet_size = p.next_packet_size.get();
        let expected = u64::from(normal_pages) * RAM_PAGE_SIZE as u64;
        if u64::from(next_packet_size) != expected {
            return Err(WireError::RamPayloadSize {
                size: next_packet_size,
                expected,
                offset: OFF_NEXT_SIZE,
            });
        }
        if p.ramblock[RAMBLOCK_LEN - 1] != 0 {
            return Err(WireError::RamUnterminatedBlock {
                offset: OFF_RAMBLOCK + RAMBLOCK_LEN - 1,
            });
        }
        let name_len = p
            .ramblock
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(RAMBLOCK_LEN);
        let pages = (normal_pages + zero_pages) as usize;
        if pages > 0 && name_len == 0 {
            return Err(WireError::RamMissingBlock {
                offset: OFF_RAMBLOCK,
            });
        }
        for (i, off) in p.offset[..pages].iter().enumerate() {
            if off.get() % RAM_PAGE_SIZE as u64 != 0 {
                return Err(WireError::RamPageOffset {
                    value: off.get(),
                    offset: OFF_OFFSETS + 8 * i,
                });
            }
        }
        Ok(RamPacketView {
            flags,
            pages_alloc,
            normal_pages,
            zero_pages,
            next_packet_size,
            packet_num: p.packet_num.get(),
            ramblock: &p.ramblock[..name_len],
            offsets: &p.offset,
        })
    }
}

fn check_known_flags(flags: u32) -> Result<(), WireError> {
    if flags & !MULTIFD_FLAGS_KNOWN != 0 {
        return Err(WireError::UnknownFlags {
            flags,
            offset: OFF_FLAGS,
        });
    }
    Ok(())
}

/// Which layout follows the common header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PacketLayout {
    /// `MultiFDPacket_t` (RAM pages, or SYNC).
    Ram,
    /// `MultiFDPacketDeviceState_t`.
    DeviceState,
}

/// Decodes the 12-byte common header as QEMU's receiver does (magic, version) and picks the
/// layout from flag `0x40`; returns the flags too. Undefined flag bits are rejected.
pub fn decode_common_header(
    bytes: &[u8; COMMON_HEADER_LEN],
) -> Result<(PacketLayout, u32), WireError> {
    let magic = u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
    let version = u32::from_be_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]);
    let flags = u32::from_be_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]);
    check_magic_version(magic, version, 0)?;
    check_known_flags(flags)?;
    let layout = if flags & MULTIFD_FLAG_DEVICE_STATE != 0 {
        PacketLayout::DeviceState
    } else {
        PacketLayout::Ram
    };
    Ok((layout, flags))
}

/// What a receiver bounds before it reads a payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PacketLimits {
    /// Largest device-state `next_packet_size` accepted (QEMU has no bound).
    pub max_packet_size: u32,
}

impl Default for PacketLimits {
    /// 64 MiB of data plus the VFIO header: far above QEMU's 1 MiB chunks.
    fn default() -> Self {
        Self {
            max_packet_size: (64 << 20) + VFIO_HEADER_LEN as u32,
        }
    }
}

/// One whole packet of a multifd channel (after its init packet).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MultifdPacket<'a> {
    /// A RAM packet, or a SYNC packet (`header.is_sync()`), and its page data.
    Ram {
        header: RamPacketView<'a>,
        data: &'a [u8],
    },
    /// A device-state packet: its header, the VFIO header opening the payload, and the data
    /// after the VFIO header.
    DeviceState {
        header: DeviceStateHeaderView<'a>,
        vfio: VfioHeaderView,
        data: &'a [u8],
    },
}

impl MultifdPacket<'_> {
    /// Bytes the packet occupies on the wire, headers included.
    pub fn wire_len(&self) -> usize {
        match self {
            Self::Ram { data, .. } => RAM_PACKET_LEN + data.len(),
            Self::DeviceState { data, .. } => {
                DEVICE_STATE_HEADER_LEN + VFIO_HEADER_LEN + data.len()
            }
        }
    }
}

/// Decodes the next packet of a multifd channel from the bytes available. `Ok(None)`: more
/// bytes are needed. Headers are checked as soon as they are complete, so a bad
/// `next_packet_size` is reported before any payload is awaited. Error offsets are relative
/// to `buf`.
pub fn decode_packet<'a>(
    buf: &'a [u8],
    limits: &PacketLimits,
) -> Result<Option<(MultifdPacket<'a>, usize)>, WireError> {
    let Some(common) = buf.first_chunk::<COMMON_HEADER_LEN>() else {
        return Ok(None);
    };
    let (layout, _) = decode_common_header(common)?;
    match layout {
        PacketLayout::Ram => {
            let Some(hdr) = buf.first_chunk::<RAM_PACKET_LEN>() else {
                return Ok(None);
            };
            let header = MultifdRamPacket::decode(hdr)?;
            let end = RAM_PACKET_LEN + header.next_packet_size as usize;
            let Some(data) = buf.get(RAM_PACKET_LEN..end) else {
                return Ok(None);
            };
            Ok(Some((MultifdPacket::Ram { header, data }, end)))
        }
        PacketLayout::DeviceState => {
            let Some(hdr) = buf.first_chunk::<DEVICE_STATE_HEADER_LEN>() else {
                return Ok(None);
            };
            let header = DeviceStatePacketHeader::decode(hdr, limits.max_packet_size)?;
            let vfio_end = DEVICE_STATE_HEADER_LEN + VFIO_HEADER_LEN;
            let Some(vfio) = buf
                .get(DEVICE_STATE_HEADER_LEN..vfio_end)
                .and_then(|b| <&[u8; VFIO_HEADER_LEN]>::try_from(b).ok())
            else {
                return Ok(None);
            };
            let vfio = VfioDeviceStatePacketHeader::decode(vfio, DEVICE_STATE_HEADER_LEN)?;
            let end = DEVICE_STATE_HEADER_LEN + header.next_packet_size as usize;
            let Some(data) = buf.get(vfio_end..end) else {
                return Ok(None);
            };
            Ok(Some((
                MultifdPacket::DeviceState { header, vfio, data },
                end,
            )))
        }
    }
}

/// The destination's view of one migration's multifd channels: checks each init packet
/// against the expected uuid and channel count and rejects a channel id seen before.
#[derive(Debug, Clone)]
pub struct ChannelSet {
    expect: InitExpectation,
    seen: [bool; 256],
}

impl ChannelSet {
    pub fn new(expect: InitExpectation) -> Self {
        Self {
            expect,
            seen: [false; 256],
        }
    }

    /// Validates an init packet (magic, version, uuid, `id < N`, id not seen); returns the id.
    pub fn accept(&mut self, bytes: &[u8; INIT_PACKET_LEN]) -> Result<u8, WireError> {
        let id = MultifdInitPacket::decode(bytes, &self.expect)?;
        let slot = &mut self.seen[usize::from(id)];
        if *slot {
            return Err(WireError::DuplicateChannel { id, offset: 24 });
        }
        *slot = true;
        Ok(id)
    }

    /// Channel ids not connected yet.
    pub fn missing(&self) -> impl Iterator<Item = u8> + '_ {
        (0..self.expect.channels).filter(|&id| !self.seen[usize::from(id)])
    }

    /// How many channels the migration has (`multifd-channels`).
    pub fn expected(&self) -> u8 {
        self.expect.channels
    }
}

/// Per device, the idx bookkeeping QEMU only asserts: a duplicate idx, a second config
/// packet, data above the config idx. Memory grows with packets received, never with a
/// peer-given idx.
#[derive(Debug, Clone, Default)]
pub struct DeviceIdxTracker {
    seen: BTreeSet<u32>,
    config_idx: Option<u32>,
}

impl DeviceIdxTracker {
    pub fn new() -> Self {
        Self::default()
    }

    /// Records one packet's VFIO header; `offset` is where the idx field sits in its stream.
    /// On error nothing is recorded.
    pub fn record(&mut self, vfio: VfioHeaderView, offset: usize) -> Result<(), WireError> {
        let idx = vfio.idx;
        if self.seen.contains(&idx) {
            return Err(WireError::DuplicateIdx { idx, offset });
        }
        if vfio.config {
            if let Some(first) = self.config_idx {
                return Err(WireError::SecondConfigPacket { idx, first, offset });
            }
            if let Some(&above) = self.seen.range(idx..).next_back() {
                return Err(WireError::IdxAboveConfig {
                    idx: above,
                    config_idx: idx,
                    offset,
                });
            }
            self.config_idx = Some(idx);
        } else if let Some(config_idx) = self.config_idx {
            if idx > config_idx {
                return Err(WireError::IdxAboveConfig {
                    idx,
                    config_idx,
                    offset,
                });
            }
        }
        self.seen.insert(idx);
        Ok(())
    }

    /// The config packet's idx, once seen.
    pub fn config_idx(&self) -> Option<u32> {
        self.config_idx
    }

    /// Distinct idx values recorded.
    pub fn packets(&self) -> usize {
        self.seen.len()
    }

    /// The device's stream is complete: the config packet and every lower idx are present.
    pub fn complete(&self) -> bool {
        self.config_idx
            .is_some_and(|c| self.seen.len() as u64 == u64::from(c) + 1)
    }

    /// Missing idx as inclusive ranges, up to the config idx (or the highest idx seen when
    /// no config packet arrived).
    pub fn missing_ranges(&self) -> Vec<(u32, u32)> {
        let mut out = Vec::new();
        let mut next = 0u32;
        for &idx in &self.seen {
            if idx > next {
                out.push((next, idx - 1));
            }
            next = idx.saturating_add(1);
        }
        out
    }
}
