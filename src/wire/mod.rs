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
//!
//! Modules: [`packet`] (init, device-state and VFIO headers), [`multifd`] (whole packets on a
//! channel: the common header picks the layout, RAM and SYNC packets, the cross-packet checks
//! of [`ChannelSet`] and [`DeviceIdxTracker`]), [`main_stream`] (the `QEVM` main channel and
//! the return path). Every decoder is incremental (`Ok(None)` = more bytes needed), never
//! panics, borrows instead of allocating, and reports a [`WireError`] that names the field
//! ([`WireError::field`]), the value and the byte offset ([`WireError::offset`], relative to
//! the slice decoded; [`WireError::shifted`] moves it to a stream offset).

pub mod main_stream;
pub mod multifd;
pub mod packet;

pub use multifd::*;
pub use packet::*;

/// A malformed or unexpected piece of a stream. Every variant names the field and the byte
/// offset of the field within the packet (or the stream, where a decoder knows it); the
/// messages follow QEMU's wording where QEMU has one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error(
        "received packet magic {got:x}, expected {:x} (offset {offset})",
        MULTIFD_MAGIC
    )]
    BadMagic { got: u32, offset: usize },
    #[error(
        "received packet version {got}, expected {} (offset {offset})",
        MULTIFD_VERSION
    )]
    BadVersion { got: u32, offset: usize },
    #[error(
        "received uuid '{}' and expected uuid '{}' don't match for channel {id} (offset {offset})",
        fmt_uuid(got),
        fmt_uuid(expected)
    )]
    UuidMismatch {
        got: [u8; 16],
        expected: [u8; 16],
        id: u8,
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

    // Main migration stream (main_stream.rs).
    #[error("Not a migration stream: magic {got:#010x} (offset {offset})")]
    NotMigrationStream { got: u32, offset: usize },
    #[error("Unsupported migration stream version {got} (offset {offset})")]
    StreamVersion { got: u32, offset: usize },
    #[error("Unknown savevm section type {got} (offset {offset})")]
    UnknownSectionType { got: u8, offset: usize },
    #[error("section idstr is empty (offset {offset})")]
    EmptySectionIdstr { offset: usize },
    #[error("capabilities count {count} is above the {max} a stream may list (offset {offset})")]
    TooManyCapabilities { count: u32, max: u32, offset: usize },
    #[error("unknown subsection {name:?} (offset {offset})")]
    UnknownSubsection { name: String, offset: usize },
    #[error("MIG_CMD {cmd:#x} unknown (len {len:#x}) (offset {offset})")]
    UnknownCommand { cmd: u16, len: u16, offset: usize },
    #[error("{name} received with bad length - expecting {expected}, got {got} (offset {offset})")]
    CommandLength {
        name: &'static str,
        expected: u16,
        got: u16,
        offset: usize,
    },
    #[error(
        "Missing section footer for section {section_id}: found byte {got:#x} (offset {offset})"
    )]
    MissingFooter {
        got: u8,
        section_id: u32,
        offset: usize,
    },
    #[error(
        "Mismatched section id in footer - read {got:#x} expected {expected:#x} (offset {offset})"
    )]
    FooterMismatch {
        expected: u32,
        got: u32,
        offset: usize,
    },
    #[error("Unknown tag {got:#x} (offset {offset})")]
    UnknownVfioMarker { got: u64, offset: usize },
    #[error("Unknown combination of migration flags: {flags:#x} (offset {offset})")]
    UnknownRamFlags { flags: u64, offset: usize },
    #[error("Found a zero page with value {value} (offset {offset})")]
    RamZeroFill { value: u8, offset: usize },
    #[error("ram block list adds up to more than the MEM_SIZE total {total} (offset {offset})")]
    RamBlockList { total: u64, offset: usize },
    #[error("Received invalid message {msg_type:#06x} length {len:#06x} (offset {offset})")]
    UnknownRpMessage {
        msg_type: u16,
        len: u16,
        offset: usize,
    },
    #[error(
        "Received '{name}' message ({msg_type:#06x}) with incorrect length {got} expecting {} (offset {offset})",
        fmt_expected_len(*expected)
    )]
    RpLength {
        name: &'static str,
        msg_type: u16,
        got: u16,
        expected: Option<u16>,
        offset: usize,
    },
    #[error("output buffer holds {have} bytes, the record needs {need} (offset {offset})")]
    BufferTooSmall {
        need: usize,
        have: usize,
        offset: usize,
    },
    #[error("item longer than {max} bytes, the most one record or packet may hold: a length field is too large (offset {offset})")]
    ItemTooLong { max: usize, offset: usize },
    #[error("truncated {what}: needs {need} bytes, only {have} left (offset {offset})")]
    Truncated {
        what: &'static str,
        need: usize,
        have: usize,
        offset: usize,
    },

    // Multifd RAM and SYNC packets, channel and device checks (multifd.rs).
    #[error("packet flags {flags:#x} have undefined bits {:#x} (offset {offset})", flags & !MULTIFD_FLAGS_KNOWN)]
    UnknownFlags { flags: u32, offset: usize },
    #[error("packet flags {flags:#x} are a device-state packet, not RAM (offset {offset})")]
    NotRam { flags: u32, offset: usize },
    #[error("flags received {flags:x} flags expected 0 (offset {offset})")]
    RamCompressed { flags: u32, offset: usize },
    #[error("received packet with {got} pages, expected {max} (offset {offset})")]
    RamPagesAlloc { got: u32, max: u32, offset: usize },
    #[error("received packet with {got} non-zero pages, which exceeds maximum expected pages {max} (offset {offset})")]
    RamNormalPages { got: u32, max: u32, offset: usize },
    #[error("received packet with {got} zero pages, expected maximum {max} (offset {offset})")]
    RamZeroPages { got: u32, max: u32, offset: usize },
    #[error("unterminated ram block name (offset {offset})")]
    RamUnterminatedBlock { offset: usize },
    #[error("unknown ram block \"\": packet carries pages but no block name (offset {offset})")]
    RamMissingBlock { offset: usize },
    #[error("page offset {value:#x} is not a multiple of the page size (offset {offset})")]
    RamPageOffset { value: u64, offset: usize },
    #[error(
        "next_packet_size {size} does not match {expected} bytes of normal pages (offset {offset})"
    )]
    RamPayloadSize {
        size: u32,
        expected: u64,
        offset: usize,
    },
    #[error("state buffer {idx} already filled (offset {offset})")]
    DuplicateIdx { idx: u32, offset: usize },
    #[error("second config packet idx {idx}: the config packet was idx {first} (offset {offset})")]
    SecondConfigPacket { idx: u32, first: u32, offset: usize },
    #[error("packet idx {idx} is above the config packet idx {config_idx} (offset {offset})")]
    IdxAboveConfig {
        idx: u32,
        config_idx: u32,
        offset: usize,
    },
}

fn fmt_expected_len(expected: Option<u16>) -> String {
    expected.map_or_else(|| "at most 512".to_owned(), |e| e.to_string())
}

/// Runs `$body` with `$off` bound to the `offset` field of whichever variant `$e` is.
macro_rules! with_offset {
    ($e:expr, $off:ident => $body:expr) => {
        match $e {
            WireError::BadMagic { offset: $off, .. }
            | WireError::BadVersion { offset: $off, .. }
            | WireError::UuidMismatch { offset: $off, .. }
            | WireError::ChannelIdOutOfRange { offset: $off, .. }
            | WireError::DuplicateChannel { offset: $off, .. }
            | WireError::NotDeviceState { offset: $off, .. }
            | WireError::SyncDeviceState { offset: $off }
            | WireError::Compressed { offset: $off, .. }
            | WireError::UnterminatedIdstr { offset: $off }
            | WireError::BadIdstr { offset: $off, .. }
            | WireError::EmptyDeviceState { offset: $off }
            | WireError::PacketTooShort { offset: $off, .. }
            | WireError::PacketTooLarge { offset: $off, .. }
            | WireError::VfioVersion { offset: $off, .. }
            | WireError::InvalidIdx { offset: $off }
            | WireError::NotMigrationStream { offset: $off, .. }
            | WireError::StreamVersion { offset: $off, .. }
            | WireError::UnknownSectionType { offset: $off, .. }
            | WireError::EmptySectionIdstr { offset: $off }
            | WireError::UnknownSubsection { offset: $off, .. }
            | WireError::TooManyCapabilities { offset: $off, .. }
            | WireError::UnknownCommand { offset: $off, .. }
            | WireError::CommandLength { offset: $off, .. }
            | WireError::MissingFooter { offset: $off, .. }
            | WireError::FooterMismatch { offset: $off, .. }
            | WireError::UnknownVfioMarker { offset: $off, .. }
            | WireError::UnknownRamFlags { offset: $off, .. }
            | WireError::RamZeroFill { offset: $off, .. }
            | WireError::RamBlockList { offset: $off, .. }
            | WireError::UnknownRpMessage { offset: $off, .. }
            | WireError::RpLength { offset: $off, .. }
            | WireError::BufferTooSmall { offset: $off, .. }
            | WireError::ItemTooLong { offset: $off, .. }
            | WireError::Truncated { offset: $off, .. }
            | WireError::UnknownFlags { offset: $off, .. }
            | WireError::NotRam { offset: $off, .. }
            | WireError::RamCompressed { offset: $off, .. }
            | WireError::RamPagesAlloc { offset: $off, .. }
            | WireError::RamNormalPages { offset: $off, .. }
            | WireError::RamZeroPages { offset: $off, .. }
            | WireError::RamUnterminatedBlock { offset: $off }
            | WireError::RamMissingBlock { offset: $off }
            | WireError::RamPageOffset { offset: $off, .. }
            | WireError::RamPayloadSize { offset: $off, .. }
            | WireError::DuplicateIdx { offset: $off, .. }
            | WireError::SecondConfigPacket { offset: $off, .. }
            | WireError::IdxAboveConfig { offset: $off, .. } => $body,
        }
    };
}

impl WireError {
    /// Byte offset of the offending field.
    pub fn offset(&self) -> usize {
        with_offset!(self, offset => *offset)
    }

    /// The same error with its offset moved by `base`: decoders report offsets within the
    /// slice they were given, a caller walking a stream adds where that slice starts.
    pub fn shifted(mut self, base: usize) -> Self {
        let offset = self.offset_mut();
        *offset = offset.saturating_add(base);
        self
    }

    /// The wire field the error is about, as QEMU names it.
    pub fn field(&self) -> &'static str {
        match self {
            Self::BadMagic { .. } | Self::NotMigrationStream { .. } => "magic",
            Self::BadVersion { .. } | Self::StreamVersion { .. } => "version",
            Self::UuidMismatch { .. } => "uuid",
            Self::ChannelIdOutOfRange { .. } | Self::DuplicateChannel { .. } => "id",
            Self::NotDeviceState { .. }
            | Self::SyncDeviceState { .. }
            | Self::Compressed { .. }
            | Self::UnknownFlags { .. }
            | Self::NotRam { .. }
            | Self::RamCompressed { .. } => "flags",
            Self::UnterminatedIdstr { .. }
            | Self::BadIdstr { .. }
            | Self::EmptySectionIdstr { .. } => "idstr",
            Self::EmptyDeviceState { .. }
            | Self::PacketTooShort { .. }
            | Self::PacketTooLarge { .. }
            | Self::RamPayloadSize { .. } => "next_packet_size",
            Self::VfioVersion { .. } => "vfio version",
            Self::InvalidIdx { .. }
            | Self::DuplicateIdx { .. }
            | Self::SecondConfigPacket { .. }
            | Self::IdxAboveConfig { .. } => "idx",
            Self::UnknownSectionType { .. } => "section type",
            Self::UnknownSubsection { .. } => "subsection name",
            Self::TooManyCapabilities { .. } => "caps_count",
            Self::UnknownCommand { .. } => "command",
            Self::CommandLength { .. } => "command length",
            Self::MissingFooter { .. } | Self::FooterMismatch { .. } => "section footer",
            Self::UnknownVfioMarker { .. } => "vfio marker",
            Self::UnknownRamFlags { .. } => "ram flags",
            Self::RamZeroFill { .. } => "zero page fill byte",
            Self::RamBlockList { .. } => "ram block used_length",
            Self::UnknownRpMessage { .. } => "return path message type",
            Self::RpLength { .. } => "return path message length",
            Self::BufferTooSmall { .. } => "output buffer",
            Self::ItemTooLong { .. } => "length",
            Self::Truncated { what, .. } => what,
            Self::RamPagesAlloc { .. } => "pages_alloc",
            Self::RamNormalPages { .. } => "normal_pages",
            Self::RamZeroPages { .. } => "zero_pages",
            Self::RamUnterminatedBlock { .. } | Self::RamMissingBlock { .. } => "ramblock",
            Self::RamPageOffset { .. } => "offset",
        }
    }

    fn offset_mut(&mut self) -> &mut usize {
        with_offset!(self, offset => offset)
    }
}

/// Formats 16 raw uuid bytes in text order (`12345678-9abc-...`).
pub fn fmt_uuid(uuid: &[u8; 16]) -> String {
    let h: String = uuid.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// Parses a uuid in text form (`xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`, hex digits in either
/// case); QEMU's `qemu_uuid_parse` order.
pub fn parse_uuid(text: &str) -> Option<[u8; 16]> {
    let text = text.as_bytes();
    let well_formed = text.len() == 36
        && text.iter().enumerate().all(|(i, b)| match i {
            8 | 13 | 18 | 23 => *b == b'-',
            _ => b.is_ascii_hexdigit(),
        });
    if !well_formed {
        return None;
    }
    let mut digits = text
        .iter()
        .filter(|&&b| b != b'-')
        .map(|&b| char::from(b).to_digit(16).map(|d| d as u8));
    let mut out = [0u8; 16];
    for byte in &mut out {
        *byte = (digits.next()?? << 4) | digits.next()??;
    }
    Some(out)
}
