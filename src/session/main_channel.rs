//! The standalone main channel: what two helpers without a VMM say to each other. It is a QEMU
//! main stream wherever QEMU has an equivalent (framing from [`crate::wire::main_stream`]), so
//! `inspect` and QEMU's own tools can walk it; the two additions are marked "ours".
//!
//! Source to destination:
//!
//! | record | bytes | meaning |
//! |---|---|---|
//! | file header | `51 45 56 4d 00 00 00 03` | `QEVM`, version 3 |
//! | CONFIGURATION | `07 <be32 len> "vfio-multifd"` + subsection `configuration/uuid` | the migration uuid (QEMU's validate-uuid check) |
//! | per device: SECTION_START | `01 <be32 sid> <len> idstr <be32 instance_id> 00 00 00 01`, `DEV_SETUP_STATE`, `END_OF_STATE`, footer `7e <be32 sid>` | the device list, as QEMU's VFIO `save_setup` in multifd mode |
//! | VMDESCRIPTION (ours: early) | `06 <be32 len> {"vfio-multifd":{"version":1,"channels":N,"chunk":C,"precopy":[sid..]}}` | what QEMU leaves to configuration on both sides: channel count, largest chunk, and which device sections carry precopy data (they hold back SWITCHOVER_ACK, QEMU's `switchover_ack_needed`) |
//! | per precopy device, repeated: SECTION_PART | `02 <be32 sid>`, `DEV_DATA_STATE <be64 len> data`, `END_OF_STATE`, footer | precopy data, as QEMU's VFIO `save_live_iterate` (only under a VMM, before switchover) |
//! | per precopy device, once: SECTION_PART | `02 <be32 sid>`, `DEV_INIT_DATA_SENT`, footer | its initial bytes are sent (QEMU's switchover-ack flow) |
//! | SWITCHOVER_START | `08 00 0b 00 00` | the VM is stopped: downtime starts |
//! | per device: SECTION_END | `03 <be32 sid>`, `END_OF_STATE`, footer | QEMU's "dummy EOS" at completion in multifd mode |
//! | EOF | `00` | every packet was handed to the multifd channels |
//!
//! Destination to source (the return path, `be16 type, be16 len, data`):
//!
//! | message | bytes | meaning |
//! |---|---|---|
//! | SWITCHOVER_ACK | `00 07 00 00` | channels accepted, setup agreed, devices RESUMING: the source may switch over |
//! | VFIO_MULTIFD_RESULT (ours) | `01 00 <be16 len> <json>` | [`ResultRecord`]: per-device results, or the destination's error text |
//! | SHUT | `00 01 00 04 <be32 status>` | QEMU's last word: 0 = everything loaded, 1 = failed |
//!
//! Nothing is allocated from a peer-given length beyond [`MAX_RECORD`].

use std::io::{self, Read, Write};

use serde::{Deserialize, Serialize};

use crate::error::MainChannelError;
use crate::session::link::Location;
use crate::wire::main_stream::{
    decode_file_header, decode_footer, decode_record, decode_rp_message, decode_vfio_item,
    encode_file_header, encode_rp_shut, Configuration, MigCommand, Record, RpMessage,
    RpMessageType, SectionHeader, VfioItem, VfioMarker, QEMU_VM_CONFIGURATION,
    QEMU_VM_VMDESCRIPTION, VFIO_MIG_FLAG_DEV_DATA_STATE,
};
use crate::wire::{fmt_uuid, DeviceId, WireError};

/// Machine name in the CONFIGURATION record.
pub const MACHINE: &str = "vfio-multifd";
/// Version of the VMDESCRIPTION setup JSON and the result JSON.
pub const STANDALONE_PROTOCOL_VERSION: u32 = 1;
/// VFIO's section version_id (`vfio_migration_init`).
pub const VFIO_VERSION_ID: u32 = 1;
/// Ours: the destination's result message type (QEMU's return-path types end at 7).
pub const MIG_RP_MSG_VFIO_MULTIFD_RESULT: u16 = 0x0100;
/// Largest record a reader buffers (a precopy DEV_DATA_STATE item carries at most
/// [`PRECOPY_CHUNK`] bytes).
pub const MAX_RECORD: usize = 2 << 20;
/// Largest precopy data item a source sends (QEMU's 1 MiB data buffer).
pub const PRECOPY_CHUNK: usize = 1 << 20;
/// Bytes before the data of a precopy SECTION_PART: type, section id, DEV_DATA_STATE, size.
pub const PRECOPY_HEAD: usize = 1 + 4 + 8 + 8;
/// Bytes after the data of a precopy SECTION_PART: END_OF_STATE, footer.
pub const PRECOPY_TAIL: usize = 8 + 5;
/// Longest error text a result record carries (cut at a char boundary below this).
pub const MAX_ERROR_TEXT: usize = 4096;

/// What the source announces before switchover.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Setup {
    pub uuid: [u8; 16],
    pub channels: u8,
    /// Largest device bytes per packet the source sends.
    pub chunk: u64,
    pub devices: Vec<DeviceId>,
    /// Indexes into `devices` of the devices that send precopy data before switchover; the
    /// destination acks only once each one's initial data is loaded.
    pub precopy: Vec<u32>,
}

#[derive(Debug, Serialize, Deserialize)]
struct Description {
    #[serde(rename = "vfio-multifd")]
    vfio_multifd: DescriptionBody,
}

#[derive(Debug, Serialize, Deserialize)]
struct DescriptionBody {
    version: u32,
    channels: u8,
    chunk: u64,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    precopy: Vec<u32>,
}

/// One device's outcome on the destination.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceResult {
    pub idstr: String,
    pub instance_id: u32,
    /// Device data bytes written to its `data_fd`.
    pub bytes: u64,
    pub data_packets: u32,
    pub config_len: usize,
    /// CLOCK_MONOTONIC on the destination when the device was loaded.
    pub loaded_ns: u64,
}

/// `VFIO_MULTIFD_RESULT`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResultRecord {
    pub version: u32,
    pub ok: bool,
    /// The destination's error with its causes, when `ok` is false.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Where the destination's error happened (device, channel, idx), when it knows.
    #[serde(default, skip_serializing_if = "Location::is_empty")]
    pub location: Location,
    #[serde(default)]
    pub devices: Vec<DeviceResult>,
}

impl ResultRecord {
    pub fn success(devices: Vec<DeviceResult>) -> Self {
        Self {
            version: STANDALONE_PROTOCOL_VERSION,
            ok: true,
            error: None,
            location: Location::default(),
            devices,
        }
    }

    /// A failure record; the text is cut to [`MAX_ERROR_TEXT`].
    pub fn failure(text: &str) -> Self {
        let mut end = text.len().min(MAX_ERROR_TEXT);
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        Self {
            version: STANDALONE_PROTOCOL_VERSION,
            ok: false,
            error: Some(text[..end].to_string()),
            location: Location::default(),
            devices: Vec::new(),
        }
    }
}

/// What the destination reads after the setup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MainEvent {
    /// A precopy device's initial bytes are all here (DEV_INIT_DATA_SENT of this section).
    InitDataSent(u32),
    SwitchoverStart,
    /// EOF, after every device's END section.
    Eof,
}

/// What the source reads on the return path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReturnMessage {
    SwitchoverAck,
    Result(ResultRecord),
    /// SHUT with its status (0 = ok).
    Shut(u32),
}

fn section_id(index: usize) -> u32 {
    index as u32
}

/// Source: the file header, CONFIGURATION, one SECTION_START per device and the setup JSON.
pub fn encode_setup(setup: &Setup) -> Result<Vec<u8>, MainChannelError> {
    let mut out = Vec::new();
    encode_file_header(&mut out);
    Record::Configuration(Configuration {
        machine: MACHINE.as_bytes(),
        target_page_bits: None,
        capabilities: None,
        uuid: Some(setup.uuid),
    })
    .encode(&mut out);
    for (i, id) in setup.devices.iter().enumerate() {
        let header = SectionHeader {
            section_id: section_id(i),
            idstr: id.idstr.as_bytes(),
            instance_id: id.instance_id,
            version_id: VFIO_VERSION_ID,
        };
        let start = out.len();
        out.resize(start + Record::SectionStart(header).encoded_len(), 0);
        Record::SectionStart(header)
            .encode_to_slice(&mut out[start..])
            .map_err(|source| MainChannelError::Wire {
                what: "SECTION_START",
                offset: start as u64,
                source,
            })?;
        VfioMarker::DevSetupState.encode(&mut out);
        VfioMarker::EndOfState.encode(&mut out);
        Record::Footer {
            section_id: section_id(i),
        }
        .encode(&mut out);
    }
    let json = serde_json::to_vec(&Description {
        vfio_multifd: DescriptionBody {
            version: STANDALONE_PROTOCOL_VERSION,
            channels: setup.channels,
            chunk: setup.chunk,
            precopy: setup.precopy.clone(),
        },
    })
    .map_err(|source| MainChannelError::Json {
        what: "setup",
        source,
    })?;
    Record::VmDescription { json: &json }.encode(&mut out);
    Ok(out)
}

/// Source: frames `buf[PRECOPY_HEAD..PRECOPY_HEAD + len]`, already read in place, as one
/// precopy SECTION_PART (DEV_DATA_STATE, END_OF_STATE, footer); returns the record's bytes.
/// `buf` must hold `PRECOPY_HEAD + len + PRECOPY_TAIL` bytes.
pub fn frame_precopy_part(section: u32, buf: &mut [u8], len: usize) -> &[u8] {
    let total = PRECOPY_HEAD + len + PRECOPY_TAIL;
    buf[0] = crate::wire::main_stream::QEMU_VM_SECTION_PART;
    buf[1..5].copy_from_slice(&section.to_be_bytes());
    buf[5..13].copy_from_slice(&VfioMarker::DevDataState.value().to_be_bytes());
    buf[13..21].copy_from_slice(&(len as u64).to_be_bytes());
    let tail = PRECOPY_HEAD + len;
    buf[tail..tail + 8].copy_from_slice(&VfioMarker::EndOfState.value().to_be_bytes());
    buf[tail + 8] = crate::wire::main_stream::QEMU_VM_SECTION_FOOTER;
    buf[tail + 9..tail + 13].copy_from_slice(&section.to_be_bytes());
    &buf[..total]
}

/// Source: the SECTION_PART that says a device's initial precopy bytes were all sent.
pub fn encode_init_data_sent(section: u32) -> Vec<u8> {
    let mut out = Vec::new();
    Record::SectionPart {
        section_id: section,
    }
    .encode(&mut out);
    VfioMarker::DevInitDataSent.encode(&mut out);
    Record::Footer {
        section_id: section,
    }
    .encode(&mut out);
    out
}

/// Source: `SWITCHOVER_START`.
pub fn encode_switchover_start() -> Vec<u8> {
    let mut out = Vec::new();
    Record::switchover_start().encode(&mut out);
    out
}

/// Source: one SECTION_END with VFIO's dummy END_OF_STATE per device, then EOF.
pub fn encode_completion(devices: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for i in 0..devices {
        Record::SectionEnd {
            section_id: section_id(i),
        }
        .encode(&mut out);
        VfioMarker::EndOfState.encode(&mut out);
        Record::Footer {
            section_id: section_id(i),
        }
        .encode(&mut out);
    }
    Record::Eof.encode(&mut out);
    out
}

/// Destination: `SWITCHOVER_ACK`.
pub fn encode_switchover_ack() -> Vec<u8> {
    let mut out = Vec::new();
    RpMessage::SWITCHOVER_ACK.encode(&mut out);
    out
}

/// Destination: the result record followed by SHUT (0 when `result.ok`, else 1).
pub fn encode_result(result: &ResultRecord) -> Result<Vec<u8>, MainChannelError> {
    let json = serde_json::to_vec(result).map_err(|source| MainChannelError::Json {
        what: "result",
        source,
    })?;
    if json.len() > usize::from(u16::MAX) {
        return Err(MainChannelError::TooLong {
            what: "result",
            len: json.len(),
            max: usize::from(u16::MAX),
        });
    }
    let mut out = Vec::with_capacity(json.len() + 12);
    out.extend_from_slice(&MIG_RP_MSG_VFIO_MULTIFD_RESULT.to_be_bytes());
    out.extend_from_slice(&(json.len() as u16).to_be_bytes());
    out.extend_from_slice(&json);
    encode_rp_shut(u32::from(!result.ok), &mut out);
    Ok(out)
}

/// Writes `bytes` and flushes.
pub fn send(w: &mut impl Write, what: &'static str, bytes: &[u8]) -> Result<(), MainChannelError> {
    w.write_all(bytes)
        .and_then(|()| w.flush())
        .map_err(|source| MainChannelError::Write { what, source })
}

/// Buffers a byte stream and hands whole records to the incremental decoders.
#[derive(Debug)]
struct Buffered<R> {
    inner: R,
    buf: Vec<u8>,
    /// Stream offset of `buf[0]`.
    base: u64,
    /// Stream offset of the last item handed out, for errors about it.
    item_at: u64,
}

impl<R: Read> Buffered<R> {
    fn new(inner: R) -> Self {
        Self {
            inner,
            buf: Vec::new(),
            base: 0,
            item_at: 0,
        }
    }

    /// An error about the item `next` returned last.
    fn malformed(&self, what: String) -> MainChannelError {
        MainChannelError::Malformed {
            what,
            offset: self.item_at,
        }
    }

    /// Runs `decode` until it has a whole item; consumes its bytes. `decode` turns the
    /// borrowed item into an owned value.
    fn next<T>(
        &mut self,
        what: &'static str,
        mut decode: impl FnMut(&[u8]) -> Result<Option<(T, usize)>, WireError>,
    ) -> Result<T, MainChannelError> {
        loop {
            match decode(&self.buf) {
                Ok(Some((item, used))) => {
                    self.item_at = self.base;
                    self.buf.drain(..used);
                    self.base += used as u64;
                    return Ok(item);
                }
                Ok(None) => {}
                Err(source) => {
                    return Err(MainChannelError::Wire {
                        what,
                        offset: self.base + source.offset() as u64,
                        source,
                    })
                }
            }
            if self.buf.len() >= MAX_RECORD {
                return Err(MainChannelError::TooLong {
                    what,
                    len: self.buf.len(),
                    max: MAX_RECORD,
                });
            }
            let mut chunk = [0u8; 4096];
            let want = chunk.len().min(MAX_RECORD - self.buf.len());
            match self.inner.read(&mut chunk[..want]) {
                Ok(0) => return Err(MainChannelError::Closed { what }),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(source) => return Err(MainChannelError::Read { what, source }),
            }
        }
    }
}

/// A VMDESCRIPTION or CONFIGURATION whose length field says more than a reader buffers is
/// refused at that field: waiting for its bytes would hold a stalling peer's record open and
/// end, if ever, in an error about the buffer instead of the field.
fn refuse_long_record(buf: &[u8]) -> Result<(), WireError> {
    if let [QEMU_VM_VMDESCRIPTION | QEMU_VM_CONFIGURATION, a, b, c, d, ..] = *buf {
        let max = MAX_RECORD - 5;
        if u32::from_be_bytes([a, b, c, d]) as usize > max {
            return Err(WireError::ItemTooLong { max, offset: 1 });
        }
    }
    Ok(())
}

/// The size field of a DEV_DATA_STATE item, once `buf` holds it.
fn data_size(buf: &[u8]) -> Option<u64> {
    let marker = buf.get(..8)?;
    if marker != VFIO_MIG_FLAG_DEV_DATA_STATE.to_be_bytes() {
        return None;
    }
    let mut size = [0u8; 8];
    size.copy_from_slice(buf.get(8..16)?);
    Some(u64::from_be_bytes(size))
}

/// Owned form of the records the destination expects.
enum Owned {
    Configuration {
        machine: Vec<u8>,
        uuid: Option<[u8; 16]>,
    },
    SectionStart(DeviceId, u32),
    SectionPart(u32),
    SectionEnd(u32),
    Description(Vec<u8>),
    Switchover,
    Eof,
    Other(String),
}

fn own(record: &Record<'_>) -> Owned {
    match record {
        Record::Configuration(c) => Owned::Configuration {
            machine: c.machine.to_vec(),
            uuid: c.uuid,
        },
        Record::SectionStart(h) => match std::str::from_utf8(h.idstr)
            .ok()
            .and_then(|idstr| DeviceId::new(idstr, h.instance_id).ok())
        {
            Some(id) => Owned::SectionStart(id, h.section_id),
            None => Owned::Other(format!(
                "SECTION_START {} whose idstr {:?} is no device name",
                h.section_id,
                String::from_utf8_lossy(h.idstr)
            )),
        },
        Record::SectionPart { section_id } => Owned::SectionPart(*section_id),
        Record::SectionEnd { section_id } => Owned::SectionEnd(*section_id),
        Record::VmDescription { json } => Owned::Description(json.to_vec()),
        Record::Command {
            cmd: MigCommand::SwitchoverStart,
            ..
        } => Owned::Switchover,
        Record::Eof => Owned::Eof,
        // Named by kind and size: a record's Debug would print up to 64 KiB of data as text.
        Record::SectionFull(h) => Owned::Other(format!(
            "SECTION_FULL {} {:?}",
            h.section_id,
            String::from_utf8_lossy(h.idstr)
        )),
        Record::Footer { section_id } => Owned::Other(format!("footer of section {section_id}")),
        Record::Command { cmd, data } => Owned::Other(format!(
            "MIG_CMD {} ({} bytes of data)",
            cmd.name(),
            data.len()
        )),
    }
}

impl Owned {
    /// The record, for an error that it came where it does not belong.
    fn describe(&self, ids: &[DeviceId]) -> String {
        let section = |kind: &str, sid: u32| match ids.get(sid as usize) {
            Some(id) => format!("{kind} for section {sid} (device {id})"),
            None => format!("{kind} for section {sid}"),
        };
        match self {
            Owned::Configuration { .. } => "CONFIGURATION".into(),
            Owned::SectionStart(id, sid) => format!("SECTION_START {sid} of device {id}"),
            Owned::SectionPart(sid) => section("SECTION_PART", *sid),
            Owned::SectionEnd(sid) => section("SECTION_END", *sid),
            Owned::Description(_) => "VMDESCRIPTION".into(),
            Owned::Switchover => "SWITCHOVER_START".into(),
            Owned::Eof => "EOF".into(),
            Owned::Other(record) => record.clone(),
        }
    }
}

/// The destination's reader of the source's main stream.
#[derive(Debug)]
pub struct MainReader<R> {
    stream: Buffered<R>,
    /// The devices of the setup, by section id.
    ids: Vec<DeviceId>,
    ended: Vec<bool>,
    switched_over: bool,
    /// Per section: announced as a precopy device, and whether its DEV_INIT_DATA_SENT came.
    precopy: Vec<Option<bool>>,
}

/// Takes each precopy data item: `(section, bytes)`.
pub type PrecopySink<'a> = dyn FnMut(u32, &[u8]) -> Result<(), MainChannelError> + 'a;

/// What a precopy SECTION_PART held.
enum PartEnd {
    EndOfState,
    InitDataSent,
}

impl<R: Read> MainReader<R> {
    pub fn new(inner: R) -> Self {
        Self {
            stream: Buffered::new(inner),
            ids: Vec::new(),
            ended: Vec::new(),
            switched_over: false,
            precopy: Vec::new(),
        }
    }

    /// The stream it reads.
    pub fn inner_mut(&mut self) -> &mut R {
        &mut self.stream.inner
    }

    fn record(&mut self, what: &'static str) -> Result<Owned, MainChannelError> {
        self.stream.next(what, |buf| {
            refuse_long_record(buf)?;
            Ok(decode_record(buf)?.map(|(r, n)| (own(&r), n)))
        })
    }

    fn vfio_marker(
        &mut self,
        what: &'static str,
        want: VfioMarker,
    ) -> Result<(), MainChannelError> {
        let got = self.stream.next(what, |buf| {
            // Data is wrong here whatever its size: refused without waiting for its bytes.
            if data_size(buf).is_some() {
                return Ok(Some((None, 8)));
            }
            Ok(decode_vfio_item(buf)?.map(|(item, n)| {
                let marker = match item {
                    VfioItem::Marker(m) => Some(m),
                    VfioItem::Data(_) => None,
                };
                (marker, n)
            }))
        })?;
        if got != Some(want) {
            return Err(self.stream.malformed(format!(
                "{what}: expected {}, found {}",
                want.name(),
                got.map_or("DEV_DATA_STATE", |m| m.name())
            )));
        }
        Ok(())
    }

    fn footer(&mut self, what: &'static str, id: u32) -> Result<(), MainChannelError> {
        self.stream
            .next(what, |buf| Ok(decode_footer(buf, id)?.map(|n| ((), n))))
    }

    /// Reads the file header, CONFIGURATION, the device sections and the setup JSON. A source
    /// that lists more than `max_devices` devices is refused at the first extra one (each
    /// record is bounded, their number is not).
    pub fn read_setup(&mut self, max_devices: usize) -> Result<Setup, MainChannelError> {
        self.stream.next("the QEVM header", |buf| {
            Ok(decode_file_header(buf)?.map(|n| ((), n)))
        })?;
        let uuid = match self.record("the CONFIGURATION section")? {
            Owned::Configuration { machine, uuid } => {
                if machine != MACHINE.as_bytes() {
                    return Err(self.stream.malformed(format!(
                        "machine type {:?}, expected {MACHINE:?}",
                        String::from_utf8_lossy(&machine)
                    )));
                }
                uuid.unwrap_or([0; 16])
            }
            _ => {
                return Err(self
                    .stream
                    .malformed("the CONFIGURATION section must follow the QEVM header".into()))
            }
        };
        let mut devices = Vec::new();
        loop {
            match self.record("a device SECTION_START or the setup description")? {
                Owned::SectionStart(id, sid) => {
                    if devices.len() == max_devices {
                        return Err(self.stream.malformed(format!(
                            "device {id} is past the {max_devices} devices this destination has"
                        )));
                    }
                    if sid != section_id(devices.len()) {
                        return Err(self.stream.malformed(format!(
                            "section id {sid} for device {id}, expected {}",
                            devices.len()
                        )));
                    }
                    let body = self
                        .vfio_marker("the device setup section", VfioMarker::DevSetupState)
                        .and_then(|()| {
                            self.vfio_marker("the device setup section", VfioMarker::EndOfState)
                        })
                        .and_then(|()| self.footer("the device setup section", sid));
                    in_section(sid, &id, body)?;
                    devices.push(id);
                }
                Owned::Description(json) => {
                    let description: Description =
                        serde_json::from_slice(&json).map_err(|source| MainChannelError::Json {
                            what: "setup description",
                            source,
                        })?;
                    let body = description.vfio_multifd;
                    if body.version != STANDALONE_PROTOCOL_VERSION {
                        return Err(self.stream.malformed(format!(
                            "setup version {}, this helper speaks {STANDALONE_PROTOCOL_VERSION}",
                            body.version
                        )));
                    }
                    self.ids = devices.clone();
                    self.ended = vec![false; devices.len()];
                    self.precopy = vec![None; devices.len()];
                    for &sid in &body.precopy {
                        let slot = self.precopy.get_mut(sid as usize).ok_or_else(|| {
                            self.stream.malformed(format!(
                                "the setup names precopy section {sid} of {} devices",
                                devices.len()
                            ))
                        })?;
                        if slot.replace(false).is_some() {
                            return Err(self.stream.malformed(format!(
                                "the setup names precopy section {sid} twice"
                            )));
                        }
                    }
                    return Ok(Setup {
                        uuid,
                        channels: body.channels,
                        chunk: body.chunk,
                        devices,
                        precopy: body.precopy,
                    });
                }
                other => {
                    return Err(self.stream.malformed(format!(
                        "unexpected {} during setup",
                        other.describe(&devices)
                    )))
                }
            }
        }
    }

    /// Names the section's device in a malformed-record error of its body.
    fn in_section<T>(
        &self,
        sid: u32,
        result: Result<T, MainChannelError>,
    ) -> Result<T, MainChannelError> {
        match self.ids.get(sid as usize) {
            Some(id) => in_section(sid, id, result),
            None => result,
        }
    }

    /// After the setup: `SWITCHOVER_START`, then (consuming each device's END section) EOF.
    /// Precopy data is refused (see [`Self::next_event_with`]).
    pub fn next_event(&mut self) -> Result<MainEvent, MainChannelError> {
        self.next_event_with(&mut |sid, _| {
            Err(MainChannelError::Unexpected {
                what: format!("precopy data for section {sid}, which this reader does not take"),
            })
        })
    }

    /// The body of a precopy SECTION_PART: data items to `on_data`, then END_OF_STATE or
    /// DEV_INIT_DATA_SENT, then the footer.
    fn precopy_part(
        &mut self,
        sid: u32,
        on_data: &mut PrecopySink<'_>,
    ) -> Result<PartEnd, MainChannelError> {
        let what = "a precopy SECTION_PART";
        loop {
            let item = self.stream.next(what, |buf| {
                if data_size(buf).is_some_and(|size| size > PRECOPY_CHUNK as u64) {
                    return Err(WireError::ItemTooLong {
                        max: PRECOPY_CHUNK,
                        offset: 8,
                    });
                }
                Ok(decode_vfio_item(buf)?.map(|(item, n)| {
                    let owned = match item {
                        VfioItem::Marker(m) => Err(m),
                        VfioItem::Data(data) => Ok(data.to_vec()),
                    };
                    (owned, n)
                }))
            })?;
            match item {
                Ok(data) => on_data(sid, &data)?,
                Err(VfioMarker::EndOfState) => {
                    self.footer(what, sid)?;
                    return Ok(PartEnd::EndOfState);
                }
                Err(VfioMarker::DevInitDataSent) => {
                    self.footer(what, sid)?;
                    return Ok(PartEnd::InitDataSent);
                }
                Err(other) => {
                    return Err(self
                        .stream
                        .malformed(format!("{} in precopy section {sid}", other.name())))
                }
            }
        }
    }

    /// [`Self::next_event`], handing each precopy data item of an announced precopy section to
    /// `on_data(section, bytes)` in stream order; returns [`MainEvent::InitDataSent`] once per
    /// precopy section.
    pub fn next_event_with(
        &mut self,
        on_data: &mut PrecopySink<'_>,
    ) -> Result<MainEvent, MainChannelError> {
        loop {
            let what = if self.switched_over {
                "a device SECTION_END or EOF"
            } else {
                "SWITCHOVER_START"
            };
            match self.record(what)? {
                Owned::Switchover if !self.switched_over => {
                    self.switched_over = true;
                    return Ok(MainEvent::SwitchoverStart);
                }
                Owned::SectionPart(sid) if !self.switched_over => {
                    let announced = self.precopy.get(sid as usize).copied().flatten();
                    let Some(init_sent) = announced else {
                        return Err(self.stream.malformed(format!(
                                "SECTION_PART for section {sid}, which the setup did not announce as a precopy device"
                            )));
                    };
                    let part = self.precopy_part(sid, on_data);
                    match self.in_section(sid, part)? {
                        PartEnd::EndOfState => {}
                        PartEnd::InitDataSent if init_sent => {
                            return Err(self
                                .stream
                                .malformed(format!("second DEV_INIT_DATA_SENT for section {sid}")))
                        }
                        PartEnd::InitDataSent => {
                            self.precopy[sid as usize] = Some(true);
                            return Ok(MainEvent::InitDataSent(sid));
                        }
                    }
                }
                Owned::SectionEnd(sid) if self.switched_over => {
                    let seen = self.ended.get_mut(sid as usize).ok_or_else(|| {
                        self.stream
                            .malformed(format!("SECTION_END for unknown section {sid}"))
                    })?;
                    if std::mem::replace(seen, true) {
                        return Err(self
                            .stream
                            .malformed(format!("second SECTION_END for section {sid}")));
                    }
                    let body = self
                        .vfio_marker("a device END section", VfioMarker::EndOfState)
                        .and_then(|()| self.footer("a device END section", sid));
                    self.in_section(sid, body)?;
                }
                Owned::Eof if self.switched_over => {
                    if let Some(missing) = self.ended.iter().position(|e| !e) {
                        return Err(self.stream.malformed(format!(
                            "EOF before the END section of device section {missing}"
                        )));
                    }
                    return Ok(MainEvent::Eof);
                }
                other => {
                    return Err(self.stream.malformed(format!(
                        "unexpected {} where {what} belongs",
                        other.describe(&self.ids)
                    )))
                }
            }
        }
    }
}

/// Wraps the record errors of a section's body (not a closed or failed socket, which callers
/// tell apart, and not a sink's error, which names its device already).
fn in_section<T>(
    sid: u32,
    id: &DeviceId,
    result: Result<T, MainChannelError>,
) -> Result<T, MainChannelError> {
    result.map_err(|err| match err {
        MainChannelError::Wire { .. }
        | MainChannelError::Malformed { .. }
        | MainChannelError::TooLong { .. } => MainChannelError::InSection {
            section: sid,
            device: id.clone(),
            source: Box::new(err),
        },
        other => other,
    })
}

/// The source's reader of the return path.
#[derive(Debug)]
pub struct ReturnReader<R> {
    stream: Buffered<R>,
}

enum OwnedRp {
    Ack,
    Shut(u32),
    Result(Vec<u8>),
    Other(String),
}

impl<R: Read> ReturnReader<R> {
    pub fn new(inner: R) -> Self {
        Self {
            stream: Buffered::new(inner),
        }
    }

    pub fn next_message(&mut self) -> Result<ReturnMessage, MainChannelError> {
        let message = self.stream.next("a return-path message", |buf| {
            // Ours first: QEMU's decoder rightly rejects types above 7.
            if buf.len() >= 4
                && u16::from_be_bytes([buf[0], buf[1]]) == MIG_RP_MSG_VFIO_MULTIFD_RESULT
            {
                let len = usize::from(u16::from_be_bytes([buf[2], buf[3]]));
                return Ok(buf
                    .get(4..4 + len)
                    .map(|json| (OwnedRp::Result(json.to_vec()), 4 + len)));
            }
            Ok(decode_rp_message(buf)?.map(|(m, n)| {
                let owned = match m.msg_type {
                    RpMessageType::SwitchoverAck => OwnedRp::Ack,
                    RpMessageType::Shut => OwnedRp::Shut(m.value_u32().unwrap_or(1)),
                    other => OwnedRp::Other(other.name().to_string()),
                };
                (owned, n)
            }))
        })?;
        match message {
            OwnedRp::Ack => Ok(ReturnMessage::SwitchoverAck),
            OwnedRp::Shut(status) => Ok(ReturnMessage::Shut(status)),
            OwnedRp::Result(json) => serde_json::from_slice(&json)
                .map(ReturnMessage::Result)
                .map_err(|source| MainChannelError::Json {
                    what: "result",
                    source,
                }),
            OwnedRp::Other(name) => Err(self.stream.malformed(format!(
                "return-path message {name} is not used by vfio-multifd"
            ))),
        }
    }
}

/// `uuid` as text, for messages.
pub fn uuid_text(uuid: &[u8; 16]) -> String {
    fmt_uuid(uuid)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup() -> Setup {
        Setup {
            uuid: [0x11; 16],
            channels: 6,
            chunk: 1 << 20,
            devices: vec![
                DeviceId::new("0000:00:02.0/vfio", 0).unwrap(),
                DeviceId::new("0000:01:02.0/vfio", 0).unwrap(),
            ],
            precopy: Vec::new(),
        }
    }

    #[test]
    fn precopy_parts_are_qemu_framed_and_reach_the_sink_in_order() {
        let mut with_precopy = setup();
        with_precopy.precopy = vec![1];
        let mut out = encode_setup(&with_precopy).unwrap();
        let part_at = out.len();
        let mut buf = vec![0u8; PRECOPY_HEAD + 5 + PRECOPY_TAIL];
        buf[PRECOPY_HEAD..PRECOPY_HEAD + 5].copy_from_slice(b"hello");
        out.extend_from_slice(frame_precopy_part(1, &mut buf, 5));
        // QEMU: 02 <sid>, DEV_DATA_STATE, be64 size, data, END_OF_STATE, 7e <sid>.
        assert_eq!(&out[part_at..part_at + 5], &[0x02, 0, 0, 0, 1]);
        assert_eq!(
            &out[part_at + 5..part_at + 13],
            &[0xff, 0xff, 0xff, 0xff, 0xef, 0x10, 0x00, 0x04]
        );
        assert_eq!(&out[part_at + 13..part_at + 21], &5u64.to_be_bytes());
        assert_eq!(&out[out.len() - 5..], &[0x7e, 0, 0, 0, 1]);
        out.extend(encode_init_data_sent(1));
        let mut second = vec![0u8; PRECOPY_HEAD + 3 + PRECOPY_TAIL];
        second[PRECOPY_HEAD..PRECOPY_HEAD + 3].copy_from_slice(b"abc");
        out.extend_from_slice(frame_precopy_part(1, &mut second, 3));
        out.extend(encode_switchover_start());
        out.extend(encode_completion(2));

        let mut reader = MainReader::new(&out[..]);
        assert_eq!(reader.read_setup(8).unwrap(), with_precopy);
        let mut got = Vec::new();
        let mut sink = |sid: u32, data: &[u8]| {
            got.push((sid, data.to_vec()));
            Ok(())
        };
        assert_eq!(
            reader.next_event_with(&mut sink).unwrap(),
            MainEvent::InitDataSent(1)
        );
        assert_eq!(
            reader.next_event_with(&mut sink).unwrap(),
            MainEvent::SwitchoverStart
        );
        assert_eq!(reader.next_event_with(&mut sink).unwrap(), MainEvent::Eof);
        assert_eq!(got, vec![(1, b"hello".to_vec()), (1, b"abc".to_vec())]);

        // Precopy data for a section not announced, and a second INIT_DATA_SENT, are errors.
        let mut out = encode_setup(&with_precopy).unwrap();
        out.extend(encode_init_data_sent(0));
        let mut reader = MainReader::new(&out[..]);
        reader.read_setup(8).unwrap();
        let err = reader.next_event().unwrap_err();
        assert!(err.to_string().contains("did not announce"), "{err}");
        let mut out = encode_setup(&with_precopy).unwrap();
        out.extend(encode_init_data_sent(1));
        out.extend(encode_init_data_sent(1));
        let mut reader = MainReader::new(&out[..]);
        reader.read_setup(8).unwrap();
        assert_eq!(reader.next_event().unwrap(), MainEvent::InitDataSent(1));
        let err = reader.next_event().unwrap_err();
        assert!(
            err.to_string().contains("second DEV_INIT_DATA_SENT"),
            "{err}"
        );
    }

    #[test]
    fn source_stream_is_qemu_framed_and_round_trips() {
        let mut out = encode_setup(&setup()).unwrap();
        assert_eq!(&out[..8], b"QEVM\x00\x00\x00\x03");
        assert_eq!(out[8], 0x07, "CONFIGURATION follows the header");
        let switchover_at = out.len();
        out.extend(encode_switchover_start());
        assert_eq!(&out[switchover_at..], &[0x08, 0x00, 0x0b, 0x00, 0x00]);
        let end_at = out.len();
        out.extend(encode_completion(2));
        // SECTION_END 0, END_OF_STATE, footer 0, ... EOF.
        assert_eq!(&out[end_at..end_at + 5], &[0x03, 0, 0, 0, 0]);
        assert_eq!(
            &out[end_at + 5..end_at + 13],
            &[0xff, 0xff, 0xff, 0xff, 0xef, 0x10, 0x00, 0x01]
        );
        assert_eq!(out.last(), Some(&0x00));

        let mut reader = MainReader::new(&out[..]);
        assert_eq!(reader.read_setup(8).unwrap(), setup());
        assert_eq!(reader.next_event().unwrap(), MainEvent::SwitchoverStart);
        assert_eq!(reader.next_event().unwrap(), MainEvent::Eof);
        assert!(matches!(
            reader.next_event(),
            Err(MainChannelError::Closed { .. })
        ));
    }

    #[test]
    fn the_stream_decodes_with_qemu_record_rules_one_byte_at_a_time() {
        struct Trickle<'a>(&'a [u8]);
        impl Read for Trickle<'_> {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                let Some((&first, rest)) = self.0.split_first() else {
                    return Ok(0);
                };
                buf[0] = first;
                self.0 = rest;
                Ok(1)
            }
        }
        let mut out = encode_setup(&setup()).unwrap();
        out.extend(encode_switchover_start());
        out.extend(encode_completion(2));
        let mut reader = MainReader::new(Trickle(&out));
        assert_eq!(reader.read_setup(8).unwrap().devices.len(), 2);
        assert_eq!(reader.next_event().unwrap(), MainEvent::SwitchoverStart);
        assert_eq!(reader.next_event().unwrap(), MainEvent::Eof);
    }

    #[test]
    fn a_source_listing_more_devices_than_the_destination_has_is_refused() {
        let listed = setup();
        let out = encode_setup(&listed).unwrap();
        let err = MainReader::new(&out[..]).read_setup(1).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains(&listed.devices[1].to_string()) && text.contains("1 devices"),
            "{text}"
        );
        // The offending SECTION_START: type, section id, idstr length, then the idstr.
        let idstr = listed.devices[1].idstr.as_bytes();
        let at = out.windows(idstr.len()).position(|w| w == idstr).unwrap() - 6;
        assert!(
            matches!(err, MainChannelError::Malformed { offset, .. } if offset == at as u64),
            "{err:?}, expected offset {at}"
        );
        assert_eq!(
            MainReader::new(&out[..])
                .read_setup(2)
                .unwrap()
                .devices
                .len(),
            2
        );
    }

    #[test]
    fn eof_before_every_end_section_and_bad_commands_are_errors() {
        let mut out = encode_setup(&setup()).unwrap();
        out.extend(encode_switchover_start());
        out.extend(encode_completion(1));
        let mut reader = MainReader::new(&out[..]);
        reader.read_setup(8).unwrap();
        reader.next_event().unwrap();
        let err = reader.next_event().unwrap_err();
        assert!(
            err.to_string().contains(&format!(
                "END section of device section 1 (the record at stream offset {})",
                out.len() - 1
            )),
            "{err}"
        );

        let mut out = encode_setup(&setup()).unwrap();
        out.extend([0x08, 0x00, 0x0b, 0x00, 0x01, 0xff]);
        let mut reader = MainReader::new(&out[..]);
        reader.read_setup(8).unwrap();
        let err = reader.next_event().unwrap_err();
        let chain = format!("{err}: {}", std::error::Error::source(&err).unwrap());
        assert!(
            chain.contains("SWITCHOVER_START received with bad length"),
            "{chain}"
        );

        let mut reader = MainReader::new(&b"QEVM\x00\x00\x00\x02"[..]);
        let err = reader.read_setup(8).unwrap_err();
        assert!(matches!(
            err,
            MainChannelError::Wire {
                source: WireError::StreamVersion { got: 2, .. },
                ..
            }
        ));
    }

    #[test]
    fn return_path_is_qemu_framed() {
        let mut out = encode_switchover_ack();
        assert_eq!(out, [0x00, 0x07, 0x00, 0x00]);
        let result = ResultRecord::failure("device 0000:00:02.0/vfio/0: bad");
        out.extend(encode_result(&result).unwrap());
        assert_eq!(&out[4..6], &[0x01, 0x00]);
        assert_eq!(&out[out.len() - 8..], &[0x00, 0x01, 0x00, 0x04, 0, 0, 0, 1]);
        let mut r = ReturnReader::new(&out[..]);
        assert_eq!(r.next_message().unwrap(), ReturnMessage::SwitchoverAck);
        assert_eq!(r.next_message().unwrap(), ReturnMessage::Result(result));
        assert_eq!(r.next_message().unwrap(), ReturnMessage::Shut(1));
        assert!(matches!(
            r.next_message(),
            Err(MainChannelError::Closed { .. })
        ));
        let pong = [0x00, 0x02, 0x00, 0x04, 0, 0, 0, 0];
        assert!(ReturnReader::new(&pong[..]).next_message().is_err());
    }

    /// Hands out `bytes`, then fails every read as a peer that stalls past a read timeout:
    /// a reader that waits for more than the bytes already here fails with a Read error.
    struct ThenStall<'a>(&'a [u8]);
    impl Read for ThenStall<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            if self.0.is_empty() {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            let n = buf.len().min(self.0.len());
            buf[..n].copy_from_slice(&self.0[..n]);
            self.0 = &self.0[n..];
            Ok(n)
        }
    }

    #[test]
    fn a_length_field_above_the_limit_is_refused_at_the_field_naming_the_section() {
        let mut with_precopy = setup();
        with_precopy.precopy = vec![1];
        let dev_data = VfioMarker::DevDataState.value().to_be_bytes();

        // Precopy data of 4 GiB, of which only the size field ever arrives.
        let mut out = encode_setup(&with_precopy).unwrap();
        let part_at = out.len();
        out.extend([0x02, 0, 0, 0, 1]);
        out.extend(dev_data);
        out.extend((4u64 << 30).to_be_bytes());
        let mut reader = MainReader::new(ThenStall(&out));
        reader.read_setup(8).unwrap();
        let err = reader.next_event_with(&mut |_, _| Ok(())).unwrap_err();
        let chain = crate::error::error_chain(&err);
        assert!(
            matches!(&err, MainChannelError::InSection { section: 1, device, .. }
                if *device == with_precopy.devices[1]),
            "{chain}"
        );
        assert!(
            chain.contains(&format!("stream offset {}", part_at + 5 + 8))
                && chain.contains(&format!("longer than {PRECOPY_CHUNK} bytes")),
            "{chain}"
        );

        // A VMDESCRIPTION of 4 GiB - 1.
        let mut out = encode_setup(&with_precopy).unwrap();
        let desc_at = out
            .iter()
            .rposition(|&b| b == QEMU_VM_VMDESCRIPTION)
            .unwrap();
        out.truncate(desc_at);
        out.extend([QEMU_VM_VMDESCRIPTION, 0xff, 0xff, 0xff, 0xff]);
        let err = MainReader::new(ThenStall(&out)).read_setup(8).unwrap_err();
        assert!(
            matches!(
                err,
                MainChannelError::Wire {
                    source: WireError::ItemTooLong { .. },
                    offset,
                    ..
                } if offset == desc_at as u64 + 1
            ),
            "{err:?}"
        );

        // Data inside a device's setup section, with a size no reader should wait for.
        let mut out = encode_setup(&with_precopy).unwrap();
        let id = with_precopy.devices[0].idstr.as_bytes();
        let setup_at = out.windows(id.len()).position(|w| w == id).unwrap() + id.len() + 8;
        out.truncate(setup_at);
        out.extend(dev_data);
        out.extend(u64::MAX.to_be_bytes());
        let err = MainReader::new(ThenStall(&out)).read_setup(8).unwrap_err();
        let chain = crate::error::error_chain(&err);
        assert!(
            matches!(&err, MainChannelError::InSection { section: 0, device, .. }
                if *device == with_precopy.devices[0])
                && chain.contains("expected DEV_SETUP_STATE, found DEV_DATA_STATE"),
            "{chain}"
        );
    }

    #[test]
    fn a_record_out_of_place_is_named_with_its_section_and_device() {
        let mut with_precopy = setup();
        with_precopy.precopy = vec![1];
        let event_error = |tail: &[u8], switch: bool| {
            let mut out = encode_setup(&with_precopy).unwrap();
            if switch {
                out.extend(encode_switchover_start());
            }
            out.extend_from_slice(tail);
            let mut reader = MainReader::new(&out[..]);
            reader.read_setup(8).unwrap();
            if switch {
                reader.next_event().unwrap();
            }
            reader.next_event().unwrap_err().to_string()
        };
        let dev1 = &with_precopy.devices[1];
        // Precopy data after switchover, END before SWITCHOVER_START.
        let text = event_error(&encode_init_data_sent(1), true);
        assert!(
            text.contains(&format!(
                "unexpected SECTION_PART for section 1 (device {dev1}) where a device SECTION_END"
            )),
            "{text}"
        );
        let text = event_error(&encode_completion(2), false);
        assert!(
            text.contains("unexpected SECTION_END for section 0 (device 0000:00:02.0/vfio/0)"),
            "{text}"
        );
        // A command with 64 KiB of data is named by kind and size, not printed.
        let mut advise = vec![0x08, 0x00, 0x03, 0xff, 0xff];
        advise.resize(5 + 0xffff, 0xab);
        let text = event_error(&advise, false);
        assert!(
            text.contains("unexpected MIG_CMD POSTCOPY_ADVISE (65535 bytes of data)")
                && text.len() < 200,
            "{text}"
        );
    }

    #[test]
    fn failure_text_is_cut_at_a_char_boundary() {
        let long = "é".repeat(MAX_ERROR_TEXT);
        let text = ResultRecord::failure(&long).error.unwrap();
        assert!(text.len() <= MAX_ERROR_TEXT);
        assert!(text.chars().all(|c| c == 'é'));
    }
}
