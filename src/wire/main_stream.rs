//! The main migration channel, as far as this product needs it: the `QEVM` file header,
//! section headers and footers, COMMAND records, EOF, the VMDESCRIPTION trailer, the
//! CONFIGURATION section, RAM section items, VFIO section markers, and the return-path
//! messages the destination sends back. Standalone `send`/`recv`/`demo` use the same framing
//! on their own main channel; `inspect` uses it to walk a captured QEMU main channel.
//!
//! ```mermaid
//! sequenceDiagram
//!     participant S as source main channel
//!     participant D as destination
//!     S->>D: QEVM header (51 45 56 4d 00 00 00 03)
//!     S->>D: CONFIGURATION, SECTION_START ... footer
//!     loop precopy
//!         S->>D: SECTION_PART ... footer
//!     end
//!     S->>D: COMMAND SWITCHOVER_START (08 00 0b 00 00)
//!     S->>D: SECTION_END / SECTION_FULL ... footer
//!     S->>D: EOF (00), VMDESCRIPTION
//!     D-->>S: return path: SWITCHOVER_ACK (00 07 00 00), SHUT (00 01 00 04 + status)
//! ```
//!
//! Decoders are incremental: each takes the bytes available so far and returns `Ok(None)`
//! when more are needed, or the item and how many bytes it used. Error offsets are relative to
//! the slice passed in; a caller walking a stream adds its base with [`WireError::shifted`].
//! Nothing here allocates: decoded items borrow from the input.

use super::WireError;

/// `QEMU_VM_FILE_MAGIC`: "QEVM", the first four bytes of a main channel.
pub const QEMU_VM_FILE_MAGIC: u32 = 0x5145_564D;
/// `QEMU_VM_FILE_VERSION`.
pub const QEMU_VM_FILE_VERSION: u32 = 3;
/// Bytes of the file header: magic and version.
pub const FILE_HEADER_LEN: usize = 8;

/// `QEMU_VM_EOF`.
pub const QEMU_VM_EOF: u8 = 0x00;
/// `QEMU_VM_SECTION_START`.
pub const QEMU_VM_SECTION_START: u8 = 0x01;
/// `QEMU_VM_SECTION_PART`.
pub const QEMU_VM_SECTION_PART: u8 = 0x02;
/// `QEMU_VM_SECTION_END`.
pub const QEMU_VM_SECTION_END: u8 = 0x03;
/// `QEMU_VM_SECTION_FULL`.
pub const QEMU_VM_SECTION_FULL: u8 = 0x04;
/// `QEMU_VM_SUBSECTION`.
pub const QEMU_VM_SUBSECTION: u8 = 0x05;
/// `QEMU_VM_VMDESCRIPTION`.
pub const QEMU_VM_VMDESCRIPTION: u8 = 0x06;
/// `QEMU_VM_CONFIGURATION`.
pub const QEMU_VM_CONFIGURATION: u8 = 0x07;
/// `QEMU_VM_COMMAND`.
pub const QEMU_VM_COMMAND: u8 = 0x08;
/// `QEMU_VM_SECTION_FOOTER`.
pub const QEMU_VM_SECTION_FOOTER: u8 = 0x7e;

/// The five bytes of `MIG_CMD_SWITCHOVER_START` (length exactly 0).
pub const SWITCHOVER_START: [u8; 5] = [0x08, 0x00, 0x0b, 0x00, 0x00];
/// The four bytes of the return-path `MIG_RP_MSG_SWITCHOVER_ACK`.
pub const RP_SWITCHOVER_ACK: [u8; 4] = [0x00, 0x07, 0x00, 0x00];

/// VFIO main-stream marker `VFIO_MIG_FLAG_END_OF_STATE`.
pub const VFIO_MIG_FLAG_END_OF_STATE: u64 = 0xffff_ffff_ef10_0001;
/// `VFIO_MIG_FLAG_DEV_CONFIG_STATE`: opens a config blob.
pub const VFIO_MIG_FLAG_DEV_CONFIG_STATE: u64 = 0xffff_ffff_ef10_0002;
/// `VFIO_MIG_FLAG_DEV_SETUP_STATE`.
pub const VFIO_MIG_FLAG_DEV_SETUP_STATE: u64 = 0xffff_ffff_ef10_0003;
/// `VFIO_MIG_FLAG_DEV_DATA_STATE`: followed by a BE u64 size and that many bytes.
pub const VFIO_MIG_FLAG_DEV_DATA_STATE: u64 = 0xffff_ffff_ef10_0004;
/// `VFIO_MIG_FLAG_DEV_INIT_DATA_SENT`.
pub const VFIO_MIG_FLAG_DEV_INIT_DATA_SENT: u64 = 0xffff_ffff_ef10_0005;
/// `VFIO_MIG_FLAG_DEV_CONFIG_LOAD_READY` (QEMU 10.1+).
pub const VFIO_MIG_FLAG_DEV_CONFIG_LOAD_READY: u64 = 0xffff_ffff_ef10_0006;

/// RAM section item flag: a zero page (one fill byte follows).
pub const RAM_SAVE_FLAG_ZERO: u64 = 0x02;
/// RAM section item flag: total RAM size, then the block list.
pub const RAM_SAVE_FLAG_MEM_SIZE: u64 = 0x04;
/// RAM section item flag: a full page follows.
pub const RAM_SAVE_FLAG_PAGE: u64 = 0x08;
/// RAM section item flag: end of this section's RAM items.
pub const RAM_SAVE_FLAG_EOS: u64 = 0x10;
/// RAM section item flag: same block as the previous item (no block name follows).
pub const RAM_SAVE_FLAG_CONTINUE: u64 = 0x20;
/// RAM section item flag: an XBZRLE-encoded page.
pub const RAM_SAVE_FLAG_XBZRLE: u64 = 0x40;
/// RAM section item flag: RDMA hook (not supported here).
pub const RAM_SAVE_FLAG_HOOK: u64 = 0x80;
/// RAM section item flag: a compressed page (removed from QEMU; rejected).
pub const RAM_SAVE_FLAG_COMPRESS_PAGE: u64 = 0x100;
/// RAM section item flag: the multifd channels were synced (pairs with SYNC packets).
pub const RAM_SAVE_FLAG_MULTIFD_FLUSH: u64 = 0x200;

/// Writes `bytes` at the cursor of a caller's slice; fails instead of panicking when full.
struct SliceWriter<'a> {
    out: &'a mut [u8],
    pos: usize,
}

impl SliceWriter<'_> {
    fn put(&mut self, bytes: &[u8]) {
        // Callers check `encoded_len` against the slice first; this never runs past the end.
        if let Some(dst) = self.out.get_mut(self.pos..self.pos + bytes.len()) {
            dst.copy_from_slice(bytes);
        }
        self.pos += bytes.len();
    }
}

fn check_room(need: usize, out: &[u8]) -> Result<(), WireError> {
    if out.len() < need {
        return Err(WireError::BufferTooSmall {
            need,
            have: out.len(),
            offset: 0,
        });
    }
    Ok(())
}

fn encode_with(len: usize, out: &mut Vec<u8>, f: impl FnOnce(&mut SliceWriter<'_>)) {
    let start = out.len();
    out.resize(start + len, 0);
    let mut w = SliceWriter {
        out: &mut out[start..],
        pos: 0,
    };
    f(&mut w);
}

/// A bounds-checked reader over a slice: `None` = the input ends before the item does.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Self { buf, pos: 0 }
    }
    fn bytes(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.pos.checked_add(n)?;
        let out = self.buf.get(self.pos..end)?;
        self.pos = end;
        Some(out)
    }
    fn u8(&mut self) -> Option<u8> {
        self.bytes(1).map(|b| b[0])
    }
    fn be16(&mut self) -> Option<u16> {
        self.bytes(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }
    fn be32(&mut self) -> Option<u32> {
        let b = self.bytes(4)?;
        Some(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn be64(&mut self) -> Option<u64> {
        let b = self.bytes(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Some(u64::from_be_bytes(a))
    }
}

/// Unwraps a reader step inside a decoder that returns `Result<Option<_>, _>`.
macro_rules! need {
    ($e:expr) => {
        match $e {
            Some(v) => v,
            None => return Ok(None),
        }
    };
}

// ---------------------------------------------------------------------------------------------
// File header

/// Appends the 8-byte `QEVM` file header (magic, version 3).
pub fn encode_file_header(out: &mut Vec<u8>) {
    out.extend_from_slice(&QEMU_VM_FILE_MAGIC.to_be_bytes());
    out.extend_from_slice(&QEMU_VM_FILE_VERSION.to_be_bytes());
}

/// Decodes the file header; returns the bytes used (always [`FILE_HEADER_LEN`]). QEMU:
/// "Not a migration stream", "Unsupported migration stream version".
pub fn decode_file_header(buf: &[u8]) -> Result<Option<usize>, WireError> {
    let mut r = Reader::new(buf);
    let magic = need!(r.be32());
    if magic != QEMU_VM_FILE_MAGIC {
        return Err(WireError::NotMigrationStream {
            got: magic,
            offset: 0,
        });
    }
    let version = need!(r.be32());
    if version != QEMU_VM_FILE_VERSION {
        return Err(WireError::StreamVersion {
            got: version,
            offset: 4,
        });
    }
    Ok(Some(FILE_HEADER_LEN))
}

// ---------------------------------------------------------------------------------------------
// Commands

/// `enum qemu_vm_cmd` (`migration/savevm.c`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum MigCommand {
    OpenReturnPath = 1,
    Ping = 2,
    PostcopyAdvise = 3,
    PostcopyListen = 4,
    PostcopyRun = 5,
    PostcopyRamDiscard = 6,
    Packaged = 7,
    EnableColo = 8,
    PostcopyResume = 9,
    RecvBitmap = 10,
    /// QEMU 10.0: the source stopped the VM; destination hooks start load threads.
    SwitchoverStart = 11,
}

impl MigCommand {
    /// Every command, in number order.
    pub const ALL: [MigCommand; 11] = [
        Self::OpenReturnPath,
        Self::Ping,
        Self::PostcopyAdvise,
        Self::PostcopyListen,
        Self::PostcopyRun,
        Self::PostcopyRamDiscard,
        Self::Packaged,
        Self::EnableColo,
        Self::PostcopyResume,
        Self::RecvBitmap,
        Self::SwitchoverStart,
    ];

    /// The command with number `cmd`; `None` for INVALID (0) and numbers above 11.
    pub fn from_u16(cmd: u16) -> Option<Self> {
        Self::ALL.iter().copied().find(|c| *c as u16 == cmd)
    }

    /// QEMU's name for it (`mig_cmd_args`).
    pub fn name(self) -> &'static str {
        match self {
            Self::OpenReturnPath => "OPEN_RETURN_PATH",
            Self::Ping => "PING",
            Self::PostcopyAdvise => "POSTCOPY_ADVISE",
            Self::PostcopyListen => "POSTCOPY_LISTEN",
            Self::PostcopyRun => "POSTCOPY_RUN",
            Self::PostcopyRamDiscard => "POSTCOPY_RAM_DISCARD",
            Self::Packaged => "PACKAGED",
            Self::EnableColo => "ENABLE_COLO",
            Self::PostcopyResume => "POSTCOPY_RESUME",
            Self::RecvBitmap => "RECV_BITMAP",
            Self::SwitchoverStart => "SWITCHOVER_START",
        }
    }

    /// The fixed data length QEMU requires, `None` where it is variable.
    pub fn expected_len(self) -> Option<u16> {
        match self {
            Self::OpenReturnPath
            | Self::PostcopyListen
            | Self::PostcopyRun
            | Self::EnableColo
            | Self::PostcopyResume
            | Self::SwitchoverStart => Some(0),
            Self::Ping | Self::Packaged => Some(4),
            Self::PostcopyAdvise | Self::PostcopyRamDiscard | Self::RecvBitmap => None,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Records

/// The header of a SECTION_START or SECTION_FULL record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SectionHeader<'a> {
    pub section_id: u32,
    /// The SaveStateEntry idstr (1..=255 bytes, no NUL on the wire).
    pub idstr: &'a [u8],
    pub instance_id: u32,
    pub version_id: u32,
}

/// The CONFIGURATION section (`vmstate_configuration`): the machine type name and the
/// optional subsections QEMU 10.x defines for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Configuration<'a> {
    /// Machine type name, for example `pc-i440fx-10.0`.
    pub machine: &'a [u8],
    /// Subsection `configuration/target-page-bits`.
    pub target_page_bits: Option<u32>,
    /// Subsection `configuration/capabilities`: the raw list (u8 length + name each) and count.
    pub capabilities: Option<(u32, &'a [u8])>,
    /// Subsection `configuration/uuid`.
    pub uuid: Option<[u8; 16]>,
}

/// One record of the main channel at a record boundary. Section bodies (what follows a
/// section header up to its footer) are device-specific and not part of the record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Record<'a> {
    /// `QEMU_VM_EOF`.
    Eof,
    SectionStart(SectionHeader<'a>),
    SectionPart {
        section_id: u32,
    },
    SectionEnd {
        section_id: u32,
    },
    SectionFull(SectionHeader<'a>),
    /// `QEMU_VM_SECTION_FOOTER`: closes the section with this id.
    Footer {
        section_id: u32,
    },
    /// `QEMU_VM_COMMAND` with its data (for PACKAGED the packaged stream follows the record).
    Command {
        cmd: MigCommand,
        data: &'a [u8],
    },
    /// `QEMU_VM_VMDESCRIPTION`: the JSON description after EOF.
    VmDescription {
        json: &'a [u8],
    },
    Configuration(Configuration<'a>),
}

impl Record<'_> {
    /// `SWITCHOVER_START`.
    pub const fn switchover_start() -> Record<'static> {
        Record::Command {
            cmd: MigCommand::SwitchoverStart,
            data: &[],
        }
    }

    /// Bytes [`Record::encode`] writes.
    pub fn encoded_len(&self) -> usize {
        match self {
            Record::Eof => 1,
            Record::SectionStart(h) | Record::SectionFull(h) => 1 + 4 + 1 + h.idstr.len() + 8,
            Record::SectionPart { .. } | Record::SectionEnd { .. } | Record::Footer { .. } => 5,
            Record::Command { data, .. } => 5 + data.len(),
            Record::VmDescription { json } => 5 + json.len(),
            Record::Configuration(c) => {
                let mut len = 1 + 4 + c.machine.len();
                if c.target_page_bits.is_some() {
                    len += subsection_header_len(SUB_TARGET_PAGE_BITS) + 4;
                }
                if let Some((_, list)) = c.capabilities {
                    len += subsection_header_len(SUB_CAPABILITIES) + 4 + list.len();
                }
                if c.uuid.is_some() {
                    len += subsection_header_len(SUB_UUID) + 16;
                }
                len
            }
        }
    }

    /// Appends the record to `out`. Lengths that do not fit their field (idstr over 255
    /// bytes, command data over 65535, machine name or JSON over 4 GiB) are a caller bug:
    /// [`Record::encode_to_slice`] rejects them, this truncates them, so use that where input
    /// is untrusted.
    pub fn encode(&self, out: &mut Vec<u8>) {
        encode_with(self.encoded_len(), out, |w| self.put(w));
    }

    /// Writes the record at the start of `out`; returns the bytes written.
    pub fn encode_to_slice(&self, out: &mut [u8]) -> Result<usize, WireError> {
        // (length, the most its field holds, the field's offset in the record)
        let field = match self {
            Record::SectionStart(h) | Record::SectionFull(h)
                if h.idstr.is_empty() || h.idstr.len() > 255 =>
            {
                return Err(WireError::BadIdstr {
                    idstr: String::from_utf8_lossy(h.idstr).into_owned(),
                    offset: 6,
                })
            }
            Record::Command { data, .. } => Some((data.len(), usize::from(u16::MAX), 3)),
            Record::VmDescription { json } => Some((json.len(), u32::MAX as usize, 1)),
            Record::Configuration(c) => Some((c.machine.len(), u32::MAX as usize, 1)),
            _ => None,
        };
        if let Some((len, max, offset)) = field {
            if len > max {
                return Err(WireError::ItemTooLong { max, offset });
            }
        }
        let len = self.encoded_len();
        check_room(len, out)?;
        let mut w = SliceWriter { out, pos: 0 };
        self.put(&mut w);
        Ok(len)
    }

    fn put(&self, w: &mut SliceWriter<'_>) {
        match self {
            Record::Eof => w.put(&[QEMU_VM_EOF]),
            Record::SectionStart(h) => put_section_header(w, QEMU_VM_SECTION_START, h),
            Record::SectionFull(h) => put_section_header(w, QEMU_VM_SECTION_FULL, h),
            Record::SectionPart { section_id } => {
                w.put(&[QEMU_VM_SECTION_PART]);
                w.put(&section_id.to_be_bytes());
            }
            Record::SectionEnd { section_id } => {
                w.put(&[QEMU_VM_SECTION_END]);
                w.put(&section_id.to_be_bytes());
            }
            Record::Footer { section_id } => {
                w.put(&[QEMU_VM_SECTION_FOOTER]);
                w.put(&section_id.to_be_bytes());
            }
            Record::Command { cmd, data } => {
                w.put(&[QEMU_VM_COMMAND]);
                w.put(&(*cmd as u16).to_be_bytes());
                w.put(&(data.len() as u16).to_be_bytes());
                w.put(data);
            }
            Record::VmDescription { json } => {
                w.put(&[QEMU_VM_VMDESCRIPTION]);
                w.put(&(json.len() as u32).to_be_bytes());
                w.put(json);
            }
            Record::Configuration(c) => {
                w.put(&[QEMU_VM_CONFIGURATION]);
                w.put(&(c.machine.len() as u32).to_be_bytes());
                w.put(c.machine);
                if let Some(bits) = c.target_page_bits {
                    put_subsection_header(w, SUB_TARGET_PAGE_BITS);
                    w.put(&bits.to_be_bytes());
                }
                if let Some((count, list)) = c.capabilities {
                    put_subsection_header(w, SUB_CAPABILITIES);
                    w.put(&count.to_be_bytes());
                    w.put(list);
                }
                if let Some(uuid) = c.uuid {
                    put_subsection_header(w, SUB_UUID);
                    w.put(&uuid);
                }
            }
        }
    }
}

fn put_section_header(w: &mut SliceWriter<'_>, kind: u8, h: &SectionHeader<'_>) {
    w.put(&[kind]);
    w.put(&h.section_id.to_be_bytes());
    w.put(&[h.idstr.len() as u8]);
    w.put(h.idstr);
    w.put(&h.instance_id.to_be_bytes());
    w.put(&h.version_id.to_be_bytes());
}

const SUB_TARGET_PAGE_BITS: &[u8] = b"configuration/target-page-bits";
const SUB_CAPABILITIES: &[u8] = b"configuration/capabilities";
/// Capability names a CONFIGURATION record may list. QEMU 10.0 knows 25 and rejects any
/// name it does not know; the bound keeps a forged count from walking a whole capture.
pub const MAX_CAPABILITIES: u32 = 256;
const SUB_UUID: &[u8] = b"configuration/uuid";

fn subsection_header_len(name: &[u8]) -> usize {
    1 + 1 + name.len() + 4
}

fn put_subsection_header(w: &mut SliceWriter<'_>, name: &[u8]) {
    w.put(&[QEMU_VM_SUBSECTION, name.len() as u8]);
    w.put(name);
    w.put(&1u32.to_be_bytes());
}

/// Decodes one record at a record boundary (after the file header). `Ok(None)`: `buf` ends
/// before the record does. Checks, with QEMU's wording: the record type ("Unknown savevm
/// section type"), command number ("MIG_CMD 0x.. unknown") and fixed command lengths
/// ("... received with bad length - expecting .., got .."); stricter than QEMU: an empty
/// section idstr and an unknown CONFIGURATION subsection are errors.
pub fn decode_record(buf: &[u8]) -> Result<Option<(Record<'_>, usize)>, WireError> {
    let mut r = Reader::new(buf);
    let kind = need!(r.u8());
    let record = match kind {
        QEMU_VM_EOF => Record::Eof,
        QEMU_VM_SECTION_START | QEMU_VM_SECTION_FULL => {
            let section_id = need!(r.be32());
            let len = need!(r.u8());
            if len == 0 {
                return Err(WireError::EmptySectionIdstr { offset: 5 });
            }
            let idstr = need!(r.bytes(usize::from(len)));
            let instance_id = need!(r.be32());
            let version_id = need!(r.be32());
            let h = SectionHeader {
                section_id,
                idstr,
                instance_id,
                version_id,
            };
            if kind == QEMU_VM_SECTION_START {
                Record::SectionStart(h)
            } else {
                Record::SectionFull(h)
            }
        }
        QEMU_VM_SECTION_PART => Record::SectionPart {
            section_id: need!(r.be32()),
        },
        QEMU_VM_SECTION_END => Record::SectionEnd {
            section_id: need!(r.be32()),
        },
        QEMU_VM_SECTION_FOOTER => Record::Footer {
            section_id: need!(r.be32()),
        },
        QEMU_VM_COMMAND => {
            let cmd_raw = need!(r.be16());
            let len = need!(r.be16());
            let Some(cmd) = MigCommand::from_u16(cmd_raw) else {
                return Err(WireError::UnknownCommand {
                    cmd: cmd_raw,
                    len,
                    offset: 1,
                });
            };
            if let Some(expected) = cmd.expected_len() {
                if expected != len {
                    return Err(WireError::CommandLength {
                        name: cmd.name(),
                        expected,
                        got: len,
                        offset: 3,
                    });
                }
            }
            Record::Command {
                cmd,
                data: need!(r.bytes(usize::from(len))),
            }
        }
        QEMU_VM_VMDESCRIPTION => {
            let len = need!(r.be32());
            Record::VmDescription {
                json: need!(r.bytes(len as usize)),
            }
        }
        QEMU_VM_CONFIGURATION => {
            let len = need!(r.be32());
            let machine = need!(r.bytes(len as usize));
            let mut c = Configuration {
                machine,
                target_page_bits: None,
                capabilities: None,
                uuid: None,
            };
            // Subsections follow while the next byte is QEMU_VM_SUBSECTION; the byte after
            // the last one starts the next record, so one byte of look-ahead is needed.
            loop {
                let at = r.pos;
                let next = need!(r.buf.get(at).copied());
                if next != QEMU_VM_SUBSECTION {
                    break;
                }
                r.pos += 1;
                let name_len = need!(r.u8());
                let name = need!(r.bytes(usize::from(name_len)));
                let _version = need!(r.be32());
                match name {
                    SUB_TARGET_PAGE_BITS => c.target_page_bits = Some(need!(r.be32())),
                    SUB_CAPABILITIES => {
                        let count_at = r.pos;
                        let count = need!(r.be32());
                        if count > MAX_CAPABILITIES {
                            return Err(WireError::TooManyCapabilities {
                                count,
                                max: MAX_CAPABILITIES,
                                offset: count_at,
                            });
                        }
                        let start = r.pos;
                        for _ in 0..count {
                            let n = need!(r.u8());
                            need!(r.bytes(usize::from(n)));
                        }
                        c.capabilities = Some((count, &r.buf[start..r.pos]));
                    }
                    SUB_UUID => {
                        let mut uuid = [0u8; 16];
                        uuid.copy_from_slice(need!(r.bytes(16)));
                        c.uuid = Some(uuid);
                    }
                    _ => {
                        return Err(WireError::UnknownSubsection {
                            name: String::from_utf8_lossy(name).into_owned(),
                            offset: at,
                        })
                    }
                }
            }
            Record::Configuration(c)
        }
        other => {
            return Err(WireError::UnknownSectionType {
                got: other,
                offset: 0,
            })
        }
    };
    Ok(Some((record, r.pos)))
}

/// Checks that `buf` starts with the footer of `section_id`; returns the bytes used (5).
/// QEMU: "Missing section footer for ..." / "Mismatched section id in footer for ...".
pub fn decode_footer(buf: &[u8], section_id: u32) -> Result<Option<usize>, WireError> {
    let mut r = Reader::new(buf);
    let kind = need!(r.u8());
    if kind != QEMU_VM_SECTION_FOOTER {
        return Err(WireError::MissingFooter {
            got: kind,
            section_id,
            offset: 0,
        });
    }
    let got = need!(r.be32());
    if got != section_id {
        return Err(WireError::FooterMismatch {
            expected: section_id,
            got,
            offset: 1,
        });
    }
    Ok(Some(5))
}

// ---------------------------------------------------------------------------------------------
// VFIO markers

/// The BE u64 markers of a VFIO device's main-stream sections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum VfioMarker {
    EndOfState,
    DevConfigState,
    DevSetupState,
    DevDataState,
    DevInitDataSent,
    /// QEMU 10.1+ (`x-migration-load-config-after-iter`).
    DevConfigLoadReady,
}

impl VfioMarker {
    /// The marker's BE u64 value.
    pub fn value(self) -> u64 {
        match self {
            Self::EndOfState => VFIO_MIG_FLAG_END_OF_STATE,
            Self::DevConfigState => VFIO_MIG_FLAG_DEV_CONFIG_STATE,
            Self::DevSetupState => VFIO_MIG_FLAG_DEV_SETUP_STATE,
            Self::DevDataState => VFIO_MIG_FLAG_DEV_DATA_STATE,
            Self::DevInitDataSent => VFIO_MIG_FLAG_DEV_INIT_DATA_SENT,
            Self::DevConfigLoadReady => VFIO_MIG_FLAG_DEV_CONFIG_LOAD_READY,
        }
    }

    /// The marker with this value.
    pub fn from_u64(value: u64) -> Option<Self> {
        Some(match value {
            VFIO_MIG_FLAG_END_OF_STATE => Self::EndOfState,
            VFIO_MIG_FLAG_DEV_CONFIG_STATE => Self::DevConfigState,
            VFIO_MIG_FLAG_DEV_SETUP_STATE => Self::DevSetupState,
            VFIO_MIG_FLAG_DEV_DATA_STATE => Self::DevDataState,
            VFIO_MIG_FLAG_DEV_INIT_DATA_SENT => Self::DevInitDataSent,
            VFIO_MIG_FLAG_DEV_CONFIG_LOAD_READY => Self::DevConfigLoadReady,
            _ => return None,
        })
    }

    /// QEMU's macro name without the `VFIO_MIG_FLAG_` prefix.
    pub fn name(self) -> &'static str {
        match self {
            Self::EndOfState => "END_OF_STATE",
            Self::DevConfigState => "DEV_CONFIG_STATE",
            Self::DevSetupState => "DEV_SETUP_STATE",
            Self::DevDataState => "DEV_DATA_STATE",
            Self::DevInitDataSent => "DEV_INIT_DATA_SENT",
            Self::DevConfigLoadReady => "DEV_CONFIG_LOAD_READY",
        }
    }

    /// Appends the 8-byte marker.
    pub fn encode(self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.value().to_be_bytes());
    }
}

/// One item of a VFIO section body on the main channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VfioItem<'a> {
    Marker(VfioMarker),
    /// `DEV_DATA_STATE`, BE u64 size, then `size` bytes of precopy data.
    Data(&'a [u8]),
}

impl VfioItem<'_> {
    /// Appends the item.
    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            VfioItem::Marker(m) => m.encode(out),
            VfioItem::Data(data) => {
                VfioMarker::DevDataState.encode(out);
                out.extend_from_slice(&(data.len() as u64).to_be_bytes());
                out.extend_from_slice(data);
            }
        }
    }
}

/// Decodes one VFIO marker (and, for `DEV_DATA_STATE`, its size and data). QEMU: "Unknown
/// tag 0x..".
pub fn decode_vfio_item(buf: &[u8]) -> Result<Option<(VfioItem<'_>, usize)>, WireError> {
    let mut r = Reader::new(buf);
    let value = need!(r.be64());
    let Some(marker) = VfioMarker::from_u64(value) else {
        return Err(WireError::UnknownVfioMarker {
            got: value,
            offset: 0,
        });
    };
    if marker != VfioMarker::DevDataState {
        return Ok(Some((VfioItem::Marker(marker), r.pos)));
    }
    let size = need!(r.be64());
    let Ok(size) = usize::try_from(size) else {
        return Err(WireError::Truncated {
            what: "VFIO DEV_DATA_STATE data",
            need: usize::MAX,
            have: buf.len() - r.pos,
            offset: 8,
        });
    };
    let data = need!(r.bytes(size));
    Ok(Some((VfioItem::Data(data), r.pos)))
}

// ---------------------------------------------------------------------------------------------
// RAM section items

/// One item of a RAM section body (`ram_load_precopy`). With multifd, pages travel on the
/// multifd channels and the main channel carries MEM_SIZE, MULTIFD_FLUSH and EOS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RamItem<'a> {
    /// Total RAM bytes and the raw block list (u8 name length, name, BE u64 used_length
    /// each); iterate it with [`ram_blocks`].
    MemSize {
        total: u64,
        blocks: &'a [u8],
    },
    /// A zero page; `block` is `None` with RAM_SAVE_FLAG_CONTINUE.
    Zero {
        block: Option<&'a [u8]>,
        offset: u64,
    },
    /// A full page.
    Page {
        block: Option<&'a [u8]>,
        offset: u64,
        data: &'a [u8],
    },
    /// An XBZRLE-encoded page.
    Xbzrle {
        block: Option<&'a [u8]>,
        offset: u64,
        data: &'a [u8],
    },
    MultifdFlush,
    Eos,
}

impl RamItem<'_> {
    /// Appends the item (`blocks` of MEM_SIZE, and `data`, are written as given).
    pub fn encode(&self, out: &mut Vec<u8>) {
        let put_block = |out: &mut Vec<u8>, block: &Option<&[u8]>| {
            if let Some(name) = block {
                out.push(name.len() as u8);
                out.extend_from_slice(name);
            }
        };
        let cont = |block: &Option<&[u8]>| {
            if block.is_none() {
                RAM_SAVE_FLAG_CONTINUE
            } else {
                0
            }
        };
        match self {
            RamItem::MemSize { total, blocks } => {
                encode_ram_word(*total, RAM_SAVE_FLAG_MEM_SIZE, out);
                out.extend_from_slice(blocks);
            }
            RamItem::Zero { block, offset } => {
                encode_ram_word(*offset, RAM_SAVE_FLAG_ZERO | cont(block), out);
                put_block(out, block);
                out.push(0);
            }
            RamItem::Page {
                block,
                offset,
                data,
            } => {
                encode_ram_word(*offset, RAM_SAVE_FLAG_PAGE | cont(block), out);
                put_block(out, block);
                out.extend_from_slice(data);
            }
            RamItem::Xbzrle {
                block,
                offset,
                data,
            } => {
                encode_ram_word(*offset, RAM_SAVE_FLAG_XBZRLE | cont(block), out);
                put_block(out, block);
                out.push(1); // ENCODING_FLAG_XBZRLE
                out.extend_from_slice(&(data.len() as u16).to_be_bytes());
                out.extend_from_slice(data);
            }
            RamItem::MultifdFlush => encode_ram_word(0, RAM_SAVE_FLAG_MULTIFD_FLUSH, out),
            RamItem::Eos => encode_ram_word(0, RAM_SAVE_FLAG_EOS, out),
        }
    }
}

/// Appends a MEM_SIZE block list entry (name of at most 255 bytes, used length).
pub fn encode_ram_block(name: &[u8], used_length: u64, out: &mut Vec<u8>) {
    out.push(name.len() as u8);
    out.extend_from_slice(name);
    out.extend_from_slice(&used_length.to_be_bytes());
}

/// Decodes one RAM section item with target pages of `page_size` bytes (4096 on x86). Assumes
/// postcopy-ram and x-ignore-shared are off (they add per-block fields to MEM_SIZE).
pub fn decode_ram_item<'a>(
    buf: &'a [u8],
    page_size: usize,
) -> Result<Option<(RamItem<'a>, usize)>, WireError> {
    let mut r = Reader::new(buf);
    let word = need!(r.be64());
    let page_mask = (page_size as u64).wrapping_sub(1);
    let flags = word & page_mask;
    let addr = word & !page_mask;
    let block = |r: &mut Reader<'a>| -> Option<Option<&'a [u8]>> {
        if flags & RAM_SAVE_FLAG_CONTINUE != 0 {
            return Some(None);
        }
        let len = r.u8()?;
        r.bytes(usize::from(len)).map(Some)
    };
    let item = match flags & !RAM_SAVE_FLAG_CONTINUE {
        RAM_SAVE_FLAG_MEM_SIZE => {
            let start = r.pos;
            let mut left = addr;
            while left > 0 {
                let at = r.pos;
                let len = need!(r.u8());
                need!(r.bytes(usize::from(len)));
                let used = need!(r.be64());
                left = match left.checked_sub(used) {
                    Some(l) => l,
                    None => {
                        return Err(WireError::RamBlockList {
                            total: addr,
                            offset: at,
                        })
                    }
                };
            }
            RamItem::MemSize {
                total: addr,
                blocks: &buf[start..r.pos],
            }
        }
        RAM_SAVE_FLAG_ZERO => {
            let block = need!(block(&mut r));
            let at = r.pos;
            let fill = need!(r.u8());
            if fill != 0 {
                return Err(WireError::RamZeroFill {
                    value: fill,
                    offset: at,
                });
            }
            RamItem::Zero {
                block,
                offset: addr,
            }
        }
        RAM_SAVE_FLAG_PAGE => {
            let block = need!(block(&mut r));
            RamItem::Page {
                block,
                offset: addr,
                data: need!(r.bytes(page_size)),
            }
        }
        RAM_SAVE_FLAG_XBZRLE => {
            let block = need!(block(&mut r));
            let _encoding = need!(r.u8());
            let len = need!(r.be16());
            RamItem::Xbzrle {
                block,
                offset: addr,
                data: need!(r.bytes(usize::from(len))),
            }
        }
        RAM_SAVE_FLAG_MULTIFD_FLUSH => RamItem::MultifdFlush,
        RAM_SAVE_FLAG_EOS => RamItem::Eos,
        _ => return Err(WireError::UnknownRamFlags { flags, offset: 0 }),
    };
    Ok(Some((item, r.pos)))
}

/// The blocks of a MEM_SIZE item: `(name, used_length)` pairs.
pub fn ram_blocks(blocks: &[u8]) -> impl Iterator<Item = (&[u8], u64)> {
    let mut r = Reader::new(blocks);
    std::iter::from_fn(move || {
        let len = r.u8()?;
        let name = r.bytes(usize::from(len))?;
        let used = r.be64()?;
        Some((name, used))
    })
}

/// Appends a RAM item word (`offset | flags`).
pub fn encode_ram_word(offset: u64, flags: u64, out: &mut Vec<u8>) {
    out.extend_from_slice(&(offset | flags).to_be_bytes());
}

// ---------------------------------------------------------------------------------------------
// Return path

/// `enum mig_rp_message_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum RpMessageType {
    /// The destination is closing the return path; data = BE u32 status (0 = ok).
    Shut = 1,
    /// Reply to PING; data = BE u32.
    Pong = 2,
    ReqPagesId = 3,
    ReqPages = 4,
    RecvBitmap = 5,
    ResumeAck = 6,
    /// The destination loaded the initial precopy data of every device that needs it.
    SwitchoverAck = 7,
}

impl RpMessageType {
    /// The type with number `t`; `None` for INVALID (0) and numbers above 7.
    pub fn from_u16(t: u16) -> Option<Self> {
        Some(match t {
            1 => Self::Shut,
            2 => Self::Pong,
            3 => Self::ReqPagesId,
            4 => Self::ReqPages,
            5 => Self::RecvBitmap,
            6 => Self::ResumeAck,
            7 => Self::SwitchoverAck,
            _ => return None,
        })
    }

    /// QEMU's name (`rp_cmd_args`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Shut => "SHUT",
            Self::Pong => "PONG",
            Self::ReqPagesId => "REQ_PAGES_ID",
            Self::ReqPages => "REQ_PAGES",
            Self::RecvBitmap => "RECV_BITMAP",
            Self::ResumeAck => "RESUME_ACK",
            Self::SwitchoverAck => "SWITCHOVER_ACK",
        }
    }

    /// The fixed length QEMU requires, `None` where it is variable.
    pub fn expected_len(self) -> Option<u16> {
        match self {
            Self::Shut | Self::Pong | Self::ResumeAck => Some(4),
            Self::ReqPages => Some(12),
            Self::SwitchoverAck => Some(0),
            Self::ReqPagesId | Self::RecvBitmap => None,
        }
    }
}

/// The largest return-path message QEMU's source reads (its buffer is 512 bytes).
pub const RP_MAX_LEN: u16 = 512;

/// A return-path message: BE u16 type, BE u16 length, data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RpMessage<'a> {
    pub msg_type: RpMessageType,
    pub data: &'a [u8],
}

impl RpMessage<'static> {
    /// `SWITCHOVER_ACK` (`00 07 00 00`).
    pub const SWITCHOVER_ACK: RpMessage<'static> = RpMessage {
        msg_type: RpMessageType::SwitchoverAck,
        data: &[],
    };
}

impl RpMessage<'_> {
    /// Bytes [`RpMessage::encode`] writes.
    pub fn encoded_len(&self) -> usize {
        4 + self.data.len()
    }

    /// Appends the message.
    pub fn encode(&self, out: &mut Vec<u8>) {
        encode_with(self.encoded_len(), out, |w| self.put(w));
    }

    /// Writes the message at the start of `out`; returns the bytes written.
    pub fn encode_to_slice(&self, out: &mut [u8]) -> Result<usize, WireError> {
        check_room(self.encoded_len(), out)?;
        let mut w = SliceWriter { out, pos: 0 };
        self.put(&mut w);
        Ok(self.encoded_len())
    }

    fn put(&self, w: &mut SliceWriter<'_>) {
        w.put(&(self.msg_type as u16).to_be_bytes());
        w.put(&(self.data.len() as u16).to_be_bytes());
        w.put(self.data);
    }

    /// The BE u32 carried by SHUT, PONG and RESUME_ACK.
    pub fn value_u32(&self) -> Option<u32> {
        let b: [u8; 4] = self.data.try_into().ok()?;
        Some(u32::from_be_bytes(b))
    }
}

/// Appends `SHUT` with `status` (0 = the destination loaded everything).
pub fn encode_rp_shut(status: u32, out: &mut Vec<u8>) {
    out.extend_from_slice(&(RpMessageType::Shut as u16).to_be_bytes());
    out.extend_from_slice(&4u16.to_be_bytes());
    out.extend_from_slice(&status.to_be_bytes());
}

/// Appends `PONG` with `value`.
pub fn encode_rp_pong(value: u32, out: &mut Vec<u8>) {
    out.extend_from_slice(&(RpMessageType::Pong as u16).to_be_bytes());
    out.extend_from_slice(&4u16.to_be_bytes());
    out.extend_from_slice(&value.to_be_bytes());
}

/// Decodes one return-path message. QEMU: "Received invalid message 0x.. length 0x.." and
/// "Received '..' message (0x..) with incorrect length .. expecting ..".
pub fn decode_rp_message(buf: &[u8]) -> Result<Option<(RpMessage<'_>, usize)>, WireError> {
    let mut r = Reader::new(buf);
    let t = need!(r.be16());
    let len = need!(r.be16());
    let Some(msg_type) = RpMessageType::from_u16(t) else {
        return Err(WireError::UnknownRpMessage {
            msg_type: t,
            len,
            offset: 0,
        });
    };
    let bad_len = match msg_type.expected_len() {
        Some(expected) => expected != len,
        None => len > RP_MAX_LEN,
    };
    if bad_len {
        return Err(WireError::RpLength {
            name: msg_type.name(),
            msg_type: t,
            got: len,
            expected: msg_type.expected_len(),
            offset: 2,
        });
    }
    let data = need!(r.bytes(usize::from(len)));
    Ok(Some((RpMessage { msg_type, data }, r.pos)))
}
