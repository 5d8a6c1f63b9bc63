//! QEMU 10.x migration framing, pure: no I/O, no allocation on the encode/decode hot path.
//!
//! A multifd channel, as both QEMU and `vfio-multifd` write it:
//!
//! ```mermaid
//! sequenceDiagram
//!     participant S as source channel i
//!     participant D as destination
//!     S->>D: MultiFDInit_t (64 B: magic, version, uuid, id = i)
//!     loop every packet handed to channel i
//!         S->>D: device-state header (276 B: flags 0x40, idstr, instance_id, next_packet_size)
//!         S->>D: VFIO header (12 B: version 0, idx, flags) + chunk
//!     end
//!     S->>D: EOF at a packet boundary (clean end)
//! ```
//!
//! Per device, data packets carry idx 0, 1, 2, ... and the one config packet (flag 1) carries
//! idx = number of data packets; packets of one device are spread over all channels.

pub mod packet;

pub use packet::*;

/// A malformed or unexpected piece of a stream. Every variant names the field and the byte
/// offset of the field within the packet (or the stream, where a decoder knows it); the
/// messages follow QEMU's wording where QEMU has one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("received packet magic {got:x}, expected {:x} (offset {offset})", MULTIFD_MAGIC)]
    BadMagic { got: u32, offset: usize },
    #[error("received packet version {got}, expected {} (offset {offset})", MULTIFD_VERSION)]
    BadVersion { got: u32, offset: usize },
    #[error("received uuid '{}' and expected uuid '{}' don't match (offset {offset})", fmt_uuid(got), fmt_uuid(expected))]
    UuidMismatch {
        got: [u8; 16],
        expected: [u8; 16],
        offset: usize,
    },
    #[error("received channel id {id} is out of range: {channels} channels (offset {offset})")]
    ChannelIdOutOfRange { id: u8, channels: u8, offset: usize },
    #[error("received id '{id}' already setup (offset {offset})")]
    DuplicateChannel { id: u8, offset: usize },
    #[error("packet flags {flags:#x} are not a device-state packet (offset {offset})")]
    NotDeviceState { flags: u32, offset: usize },
    #[error("received SYNC device state packet (offset {offset})")]
    SyncDeviceState { offset: usize },
    #[error("compressed device state packet, flags {flags:#x} (offset {offset})")]
    Compressed { flags: u32, offset: usize },
    #[error("unterminated multifd device state idstr (offset {offset})")]
    UnterminatedIdstr { offset: usize },
    #[error("idstr {idstr:?} does not fit the 256-byte NUL-terminated field (offset {offset})")]
    BadIdstr { idstr: String, offset: usize },
    #[error("received empty device state packet (offset {offset})")]
    EmptyDeviceState { offset: usize },
    #[error("packet too short at {size} (min is 12) (offset {offset})")]
    PacketTooShort { size: u32, offset: usize },
    #[error("next_packet_size {size} is above the maximum {max} (offset {offset})")]
    PacketTooLarge { size: u32, max: u32, offset: usize },
    #[error("packet has unknown version {got} (offset {offset})")]
    VfioVersion { got: u32, offset: usize },
    #[error("packet index is invalid (offset {offset})")]
    InvalidIdx { offset: usize },
}

impl WireError {
    /// Byte offset of the offending field.
    pub fn offset(&self) -> usize {
        match *self {
            Self::BadMagic { offset, .. }
            | Self::BadVersion { offset, .. }
            | Self::UuidMismatch { offset, .. }
            | Self::ChannelIdOutOfRange { offset, .. }
            | Self::DuplicateChannel { offset, .. }
            | Self::NotDeviceState { offset, .. }
            | Self::SyncDeviceState { offset }
            | Self::Compressed { offset, .. }
            | Self::UnterminatedIdstr { offset }
            | Self::BadIdstr { offset, .. }
            | Self::EmptyDeviceState { offset }
            | Self::PacketTooShort { offset, .. }
            | Self::PacketTooLarge { offset, .. }
            | Self::VfioVersion { offset, .. }
            | Self::InvalidIdx { offset } => offset,
        }
    }
}

/// Formats 16 raw uuid bytes in text order (`12345678-9abc-...`).
pub fn fmt_uuid(uuid: &[u8; 16]) -> String {
    let h: String = uuid.iter().map(|b| format!("{b:02x}")).collect();
    format!("{}-{}-{}-{}-{}", &h[0..8], &h[8..12], &h[12..16], &h[16..20], &h[20..32])
}

/// Parses a uuid in text form; QEMU's `qemu_uuid_parse` order.
pub fn parse_uuid(text: &str) -> Option<[u8; 16]> {
    let hex: String = text.chars().filter(|&c| c != '-').collect();
    if hex.len() != 32 || text.len() != 36 {
        return None;
    }
    let mut out = [0u8; 16];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}
