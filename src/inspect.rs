//! `vfio-multifd inspect FILE...`: decodes captured channels of one migration.
//!
//! Each file holds the raw bytes one side sent on one connection. A file is a main channel when
//! its first four bytes are `QEVM` and a multifd channel otherwise, as QEMU 10.0's destination
//! decides (`migration_ioc_process_incoming`). Every byte is decoded with the strict decoders
//! of [`crate::wire`]:
//! - multifd channel: the init packet, then RAM, SYNC and device-state packets to EOF; a clean
//!   EOF must fall on a packet boundary ("truncated final packet" otherwise);
//! - main channel: the file header, CONFIGURATION, every section header and footer, RAM and
//!   VFIO section bodies item by item, commands, EOF and the VMDESCRIPTION trailer. The body of
//!   any other device's section is that device's vmstate (its layout lives in QEMU's C code and
//!   the VMDESCRIPTION JSON): it is delimited by its footer, which must be followed by a valid
//!   record.
//!
//! Across files: the uuid of every init packet must match (`--uuid`, or the first multifd
//! channel's), channel ids must be below N (`--channels`, or the number of multifd files) and
//! distinct; per device, idx must not repeat, only one config packet may come and no data idx
//! may lie above it. Semantic errors are reported and decoding goes on; a framing error stops
//! that file. The exit code is 0 when nothing was wrong, 1 when any error was found, 2 when a
//! file could not be read.
//!
//! Memory stays bounded whatever a capture holds: the text listing is written as it is decoded,
//! one item may span at most 64 MiB (or `--max-packet-size`), and errors, duplicate idx,
//! devices and sections are capped (the caps are far above what a VM has).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::wire::main_stream::{
    self, decode_footer, decode_ram_item, decode_record, decode_vfio_item, ram_blocks, RamItem,
    Record, SectionHeader, VfioItem, VfioMarker, FILE_HEADER_LEN, QEMU_VM_COMMAND, QEMU_VM_EOF,
    QEMU_VM_FILE_MAGIC, QEMU_VM_SECTION_END, QEMU_VM_SECTION_FOOTER, QEMU_VM_SECTION_FULL,
    QEMU_VM_SECTION_PART, QEMU_VM_SECTION_START, QEMU_VM_VMDESCRIPTION,
};
use crate::wire::{
    decode_packet, fmt_uuid, parse_uuid, DeviceIdxTracker, DeviceStatePacketHeader,
    InitExpectation, MultifdInitPacket, MultifdPacket, PacketLimits, WireError, COMMON_HEADER_LEN,
    DEVICE_STATE_HEADER_LEN, INIT_PACKET_LEN, MULTIFD_FLAG_DEVICE_STATE, RAM_PACKET_LEN,
    RAM_PAGE_SIZE, VFIO_HEADER_LEN,
};

/// Arguments of `inspect`.
#[derive(Debug, clap::Args)]
pub struct InspectArgs {
    /// Raw bytes one side sent on one connection, one file per connection.
    #[arg(required = true)]
    pub files: Vec<std::path::PathBuf>,
    /// One JSON object instead of the listing.
    #[arg(long)]
    pub json: bool,
    /// Print only the summaries, not one line per record and packet.
    #[arg(long)]
    pub summary: bool,
    /// The uuid every init packet must carry (default: the first multifd channel's).
    #[arg(long, value_parser = parse_uuid_arg)]
    pub uuid: Option<[u8; 16]>,
    /// Multifd channel count N (default: the number of multifd files given).
    #[arg(long, value_parser = clap::value_parser!(u8).range(1..))]
    pub channels: Option<u8>,
    /// Largest device-state `next_packet_size` accepted.
    #[arg(long, default_value_t = PacketLimits::default().max_packet_size)]
    pub max_packet_size: u32,
}

fn parse_uuid_arg(text: &str) -> Result<[u8; 16], String> {
    parse_uuid(text)
        .ok_or_else(|| format!("{text:?} is not a uuid (12345678-9abc-def0-1122-334455667788)"))
}

/// Runs `inspect`; returns the process exit code.
pub fn run(args: &InspectArgs) -> i32 {
    let stdout = io::stdout();
    let mut out = stdout.lock();
    let mut text = (!args.json).then(|| TextOut::new(&mut out, !args.summary));
    let report = match inspect_files_listing(args, text.as_mut()) {
        Ok(report) => report,
        Err(err) => return fail(&err),
    };
    let written = match text {
        Some(text) => text.finish(&report),
        None => serde_json::to_writer_pretty(&mut out, &report)
            .map_err(io::Error::from)
            .and_then(|()| writeln!(out)),
    };
    if let Err(err) = written.and_then(|()| out.flush()) {
        if err.kind() != io::ErrorKind::BrokenPipe {
            eprintln!("inspect: writing the report: {err}");
            return 2;
        }
    }
    // Best effort: stderr is where a caller piping stdout away still sees what was wrong.
    let _ = write_errors(&mut io::stderr().lock(), &report);
    i32::from(!report.errors.is_empty())
}

/// Reports why `inspect` could not run; returns its exit code.
fn fail(err: &InspectError) -> i32 {
    eprintln!("inspect: {err}");
    let mut source = std::error::Error::source(err);
    while let Some(cause) = source {
        eprintln!("  caused by: {cause}");
        source = cause.source();
    }
    2
}

/// Why `inspect` could not run at all (as opposed to errors found in the streams).
#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    #[error("opening {}", path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("reading {} at offset {offset}", path.display())]
    Read {
        path: PathBuf,
        offset: u64,
        #[source]
        source: io::Error,
    },
    #[error("{count} multifd files, more than the 255 channels QEMU allows")]
    TooManyChannels { count: usize },
}

/// The whole result, as `--json` prints it.
#[derive(Debug, Default, Serialize)]
pub struct Report {
    pub channels: Vec<ChannelReport>,
    pub devices: Vec<DeviceReport>,
    /// The first [`MAX_LISTED_ERRORS`] errors found.
    pub errors: Vec<ErrorReport>,
    /// Errors found after those.
    pub errors_not_listed: u64,
}

/// One file.
#[derive(Debug, Default, Serialize)]
pub struct ChannelReport {
    pub file: String,
    /// `main` or `multifd`.
    pub kind: &'static str,
    pub channel_id: Option<u8>,
    pub uuid: Option<String>,
    /// Bytes in the file.
    pub bytes: u64,
    /// Multifd: whole packets after the init packet. Main: records.
    pub packets: u64,
    pub sync_packets: u64,
    /// RAM packets that are not SYNC packets.
    pub ram_packets: u64,
    pub ram_normal_pages: u64,
    pub ram_zero_pages: u64,
    pub device_state_packets: u64,
    /// Device-state packets: bytes of payload (`next_packet_size`, VFIO header included).
    pub device_state_bytes: u64,
    /// The file ends inside a packet or record.
    pub truncated: bool,
    /// Main channel only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub main: Option<MainSummary>,
}

/// What a main channel carried.
#[derive(Debug, Default, Serialize)]
pub struct MainSummary {
    pub machine: Option<String>,
    pub sections: Vec<SectionSummary>,
    /// How many of each command came (the listing has their order).
    pub commands: BTreeMap<&'static str, u64>,
    /// RAM_SAVE_FLAG_MEM_SIZE total and the block list (the first [`MAX_LISTED_BLOCKS`]).
    pub ram_total: Option<u64>,
    pub ram_blocks: Vec<RamBlockSummary>,
    /// Blocks of the MEM_SIZE item past those listed.
    pub ram_blocks_not_listed: u64,
    pub ram_multifd_flushes: u64,
    pub ram_eos: u64,
    /// Pages sent on the main channel itself (none with multifd, normally).
    pub ram_main_pages: u64,
    pub ram_main_zero_pages: u64,
    pub vfio_markers: u64,
    pub eof: bool,
    pub vmdescription_bytes: Option<u64>,
}

#[derive(Debug, Default, Serialize)]
pub struct SectionSummary {
    pub section_id: u32,
    pub idstr: String,
    pub instance_id: u32,
    pub version_id: u32,
    pub start: u64,
    pub part: u64,
    pub end: u64,
    pub full: u64,
    /// Bytes between section headers and footers.
    pub body_bytes: u64,
}

#[derive(Debug, Serialize)]
pub struct RamBlockSummary {
    pub name: String,
    pub used_length: u64,
}

/// One device seen in device-state packets.
#[derive(Debug, Serialize)]
pub struct DeviceReport {
    pub idstr: String,
    pub instance_id: u32,
    /// Device-state packets, duplicates included.
    pub packets: u64,
    /// VFIO data bytes, excluding the 12-byte VFIO headers, config blob included.
    pub data_bytes: u64,
    pub config_idx: Option<u32>,
    /// Idx below the config idx (or the highest idx) that never arrived; at most
    /// [`MAX_LISTED_IDX`] listed, `missing_idx_count` counts them all.
    pub missing_idx: Vec<u32>,
    pub missing_idx_count: u64,
    /// Idx that came more than once; at most [`MAX_LISTED_IDX`] listed.
    pub duplicate_idx: Vec<u32>,
    pub duplicate_idx_count: u64,
    /// The config packet and every lower idx arrived exactly once.
    pub complete: bool,
    /// Channel ids that carried the device's packets.
    pub channels: Vec<u8>,
}

/// An error found in a stream.
#[derive(Debug, Serialize)]
pub struct ErrorReport {
    pub file: String,
    /// Byte offset within the file.
    pub offset: u64,
    /// The wire field, where the error is about one.
    pub field: Option<&'static str>,
    pub message: String,
}

/// Missing idx, and duplicate idx, listed per device at most.
pub const MAX_LISTED_IDX: usize = 4096;
/// Errors listed at most; the rest are counted. The limits here bound inspect's memory
/// whatever a capture holds.
pub const MAX_LISTED_ERRORS: usize = 1000;
/// Distinct devices tracked across the files (a VM has tens).
const MAX_DEVICES: usize = 4096;
/// Distinct sections tracked on a main channel (a VM has hundreds).
const MAX_SECTIONS: usize = 65536;
/// RAM blocks of a MEM_SIZE item listed (a VM has tens); the rest are counted. Zero-length
/// blocks of one-byte names are 10 bytes each on the wire and about 60 listed.
pub const MAX_LISTED_BLOCKS: usize = 4096;
/// Items named on one line of a RAM or VFIO section body; the rest are counted.
const MAX_LISTED_ITEMS: usize = 64;
/// Bytes of one section body searched for its footer before giving up.
const MAX_OPAQUE_BODY: usize = 64 << 20;
/// Bytes read from a file at a time.
const READ_CHUNK: usize = 1 << 20;

/// A file read in chunks: `buf[pos..]` are the bytes not consumed yet; `base` is the file
/// offset of `buf[0]`.
struct Input {
    path: PathBuf,
    file: File,
    buf: Vec<u8>,
    pos: usize,
    base: u64,
    eof: bool,
    /// The most bytes one item may span: a length field asking for more is an error, not a
    /// reason to read the rest of the file into memory.
    max_item: usize,
}

impl Input {
    fn open(path: &Path, max_item: usize) -> Result<Self, InspectError> {
        let file = File::open(path).map_err(|source| InspectError::Open {
            path: path.to_owned(),
            source,
        })?;
        Ok(Self {
            path: path.to_owned(),
            file,
            buf: Vec::new(),
            pos: 0,
            base: 0,
            eof: false,
            max_item,
        })
    }

    /// Bytes in the file.
    fn len(&self) -> Result<u64, InspectError> {
        self.file
            .metadata()
            .map(|m| m.len())
            .map_err(|source| InspectError::Read {
                path: self.path.clone(),
                offset: 0,
                source,
            })
    }

    fn avail(&self) -> &[u8] {
        &self.buf[self.pos..]
    }

    /// File offset of the first unconsumed byte.
    fn offset(&self) -> u64 {
        self.base + self.pos as u64
    }

    fn consume(&mut self, n: usize) {
        self.pos = (self.pos + n).min(self.buf.len());
    }

    /// Reads at least one more chunk (or up to EOF); returns false at EOF.
    fn more(&mut self) -> Result<bool, InspectError> {
        if self.eof {
            return Ok(false);
        }
        if self.pos > 0 {
            self.buf.drain(..self.pos);
            self.base += self.pos as u64;
            self.pos = 0;
        }
        let start = self.buf.len();
        self.buf.resize(start + READ_CHUNK, 0);
        let mut filled = start;
        while filled < self.buf.len() {
            match self.file.read(&mut self.buf[filled..]) {
                Ok(0) => {
                    self.eof = true;
                    break;
                }
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(source) => {
                    return Err(InspectError::Read {
                        path: self.path.clone(),
                        offset: self.base + filled as u64,
                        source,
                    })
                }
            }
        }
        self.buf.truncate(filled);
        Ok(filled > start || !self.eof)
    }

    /// Makes at least `n` unconsumed bytes available; false when the file ends first.
    fn want(&mut self, n: usize) -> Result<bool, InspectError> {
        while self.avail().len() < n {
            if !self.more()? {
                return Ok(false);
            }
        }
        Ok(true)
    }
}

/// Outcome of decoding one item from an [`Input`].
enum Step<T> {
    Item(T, usize),
    /// The file ended inside the item: `have` bytes were left.
    Truncated {
        have: usize,
    },
}

/// Runs `decode` on the unconsumed bytes, reading more until it returns an item or the file
/// ends. `decode` returns owned data (the borrow ends before more bytes are read).
fn step<T>(
    input: &mut Input,
    mut decode: impl FnMut(&[u8]) -> Result<Option<(T, usize)>, WireError>,
) -> Result<Result<Step<T>, WireError>, InspectError> {
    loop {
        match decode(input.avail()) {
            Ok(Some((item, used))) => return Ok(Ok(Step::Item(item, used))),
            Ok(None) => {
                if input.avail().len() >= input.max_item {
                    return Ok(Err(WireError::ItemTooLong {
                        max: input.max_item,
                        offset: 0,
                    }));
                }
                if !input.more()? {
                    return Ok(Ok(Step::Truncated {
                        have: input.avail().len(),
                    }));
                }
            }
            Err(e) => return Ok(Err(e)),
        }
    }
}

/// Per-device bookkeeping across channels.
#[derive(Default)]
struct DeviceState {
    tracker: DeviceIdxTracker,
    packets: u64,
    data_bytes: u64,
    duplicates: Vec<u32>,
    duplicate_count: u64,
    channels: Vec<u8>,
}

/// State shared by all files of one run.
struct Ctx<'t, 'o> {
    limits: PacketLimits,
    expect: Option<InitExpectation>,
    seen_ids: [bool; 256],
    devices: BTreeMap<(String, u32), DeviceState>,
    errors: Vec<ErrorReport>,
    errors_not_listed: u64,
    main_channels: usize,
    text: Option<&'t mut TextOut<'o>>,
}

impl Ctx<'_, '_> {
    /// Records a decoder error; `base` is the file offset its offsets are relative to.
    fn error(&mut self, file: &str, base: u64, err: WireError) {
        let err = err.shifted(usize::try_from(base).unwrap_or(usize::MAX));
        self.report(ErrorReport {
            file: file.to_owned(),
            offset: err.offset() as u64,
            field: Some(err.field()),
            message: err.to_string(),
        });
    }

    /// [`Ctx::error`] with what the packet names (channel, device) before the message.
    fn error_in(&mut self, file: &str, base: u64, err: WireError, context: Option<String>) {
        let err = err.shifted(usize::try_from(base).unwrap_or(usize::MAX));
        let message = match context {
            Some(context) => format!("{context}: {err}"),
            None => err.to_string(),
        };
        self.report(ErrorReport {
            file: file.to_owned(),
            offset: err.offset() as u64,
            field: Some(err.field()),
            message,
        });
    }

    fn report(&mut self, error: ErrorReport) {
        if self.errors.len() < MAX_LISTED_ERRORS {
            self.errors.push(error);
        } else {
            self.errors_not_listed += 1;
        }
    }

    /// One line of the text listing for the channel `ch`.
    fn list(&mut self, ch: &ChannelReport, line: String) {
        if let Some(text) = self.text.as_deref_mut().filter(|t| t.records) {
            text.write(ch, |out| writeln!(out, "  {line}"));
        }
    }
}

/// The text output as the files are decoded: per channel a header line, a line per record
/// and packet, a summary line. Lines are written as they are found, so a listing of any
/// length costs no memory.
struct TextOut<'o> {
    out: &'o mut dyn Write,
    /// Lines per record and packet (not under `--summary`).
    records: bool,
    /// The current channel's header line is out.
    header_written: bool,
    /// The first write error; nothing is written after it.
    failed: Option<io::Error>,
}

impl<'o> TextOut<'o> {
    fn new(out: &'o mut dyn Write, records: bool) -> Self {
        Self {
            out,
            records,
            header_written: false,
            failed: None,
        }
    }

    /// Writes the channel's header line first if it is not out yet: the header names the
    /// channel id and uuid, known only once its init packet has been decoded.
    fn write(&mut self, ch: &ChannelReport, f: impl FnOnce(&mut dyn Write) -> io::Result<()>) {
        if self.failed.is_some() {
            return;
        }
        let mut written = Ok(());
        if !std::mem::replace(&mut self.header_written, true) {
            written = write_channel_header(self.out, ch);
        }
        if let Err(err) = written.and_then(|()| f(self.out)) {
            self.failed = Some(err);
        }
    }

    fn end_channel(&mut self, ch: &ChannelReport) {
        self.write(ch, |out| write_channel_summary(out, ch));
        self.header_written = false;
    }

    /// What comes after the channels, then the first write error, if any.
    fn finish(self, report: &Report) -> io::Result<()> {
        match self.failed {
            Some(err) => Err(err),
            None => write_report_tail(self.out, report),
        }
    }
}

/// Decodes every file; the report holds what was found, errors included.
pub fn inspect_files(args: &InspectArgs) -> Result<Report, InspectError> {
    inspect_files_listing(args, None)
}

/// [`inspect_files`], writing the text listing to `text` as it decodes.
fn inspect_files_listing(
    args: &InspectArgs,
    text: Option<&mut TextOut<'_>>,
) -> Result<Report, InspectError> {
    // A device-state packet may be as long as --max-packet-size allows; a section body is
    // searched for its footer up to MAX_OPAQUE_BODY.
    let max_item = (args.max_packet_size as usize)
        .saturating_add(DEVICE_STATE_HEADER_LEN)
        .max(MAX_OPAQUE_BODY);
    // Classify first: the channel count defaults to the number of multifd files.
    let mut kinds = Vec::with_capacity(args.files.len());
    for path in &args.files {
        let mut input = Input::open(path, max_item)?;
        input.want(4)?;
        let main = input
            .avail()
            .first_chunk::<4>()
            .is_some_and(|m| u32::from_be_bytes(*m) == QEMU_VM_FILE_MAGIC);
        kinds.push(main);
    }
    let multifd_files = kinds.iter().filter(|m| !**m).count();
    let channels = match args.channels {
        Some(n) => n,
        None => u8::try_from(multifd_files)
            .map_err(|_| InspectError::TooManyChannels {
                count: multifd_files,
            })?
            .max(1),
    };
    let mut ctx = Ctx {
        limits: PacketLimits {
            max_packet_size: args.max_packet_size,
        },
        expect: args.uuid.map(|uuid| InitExpectation { uuid, channels }),
        seen_ids: [false; 256],
        devices: BTreeMap::new(),
        errors: Vec::new(),
        errors_not_listed: 0,
        main_channels: 0,
        text,
    };
    let mut report = Report::default();
    for (path, main) in args.files.iter().zip(kinds) {
        let mut input = Input::open(path, max_item)?;
        let mut ch = ChannelReport {
            file: path.display().to_string(),
            kind: if main { "main" } else { "multifd" },
            bytes: input.len()?,
            ..ChannelReport::default()
        };
        if main {
            walk_main(&mut input, &mut ch, &mut ctx)?;
        } else {
            walk_multifd(&mut input, &mut ch, &mut ctx, channels)?;
        }
        if let Some(text) = ctx.text.as_deref_mut() {
            text.end_channel(&ch);
        }
        report.channels.push(ch);
    }
    for ((idstr, instance_id), d) in ctx.devices {
        let ranges = d.tracker.missing_ranges();
        let missing_idx_count = ranges.iter().map(|(a, b)| u64::from(b - a) + 1).sum();
        let missing_idx = ranges
            .iter()
            .flat_map(|&(a, b)| a..=b)
            .take(MAX_LISTED_IDX)
            .collect();
        report.devices.push(DeviceReport {
            idstr,
            instance_id,
            packets: d.packets,
            data_bytes: d.data_bytes,
            config_idx: d.tracker.config_idx(),
            missing_idx,
            missing_idx_count,
            complete: d.tracker.complete() && d.duplicate_count == 0,
            duplicate_idx: d.duplicates,
            duplicate_idx_count: d.duplicate_count,
            channels: d.channels,
        });
    }
    report.errors = ctx.errors;
    report.errors_not_listed = ctx.errors_not_listed;
    Ok(report)
}

fn truncated_error(
    ctx: &mut Ctx,
    ch: &mut ChannelReport,
    at: u64,
    what: &'static str,
    need: usize,
    have: usize,
) {
    ch.truncated = true;
    let err = WireError::Truncated {
        what,
        need,
        have,
        offset: 0,
    };
    let file = ch.file.clone();
    ctx.error(&file, at, err);
}

// ---------------------------------------------------------------------------------------------
// Multifd channels

fn walk_multifd(
    input: &mut Input,
    ch: &mut ChannelReport,
    ctx: &mut Ctx,
    channels: u8,
) -> Result<(), InspectError> {
    let file = ch.file.clone();
    if !input.want(INIT_PACKET_LEN)? {
        let have = input.avail().len();
        truncated_error(ctx, ch, 0, "init packet", INIT_PACKET_LEN, have);
        return Ok(());
    }
    let Some(init) = input.avail().first_chunk::<INIT_PACKET_LEN>().copied() else {
        return Ok(());
    };
    // The first channel fixes the uuid unless --uuid did; a packet with a bad magic or
    // version fixes nothing.
    let mut own_uuid = [0u8; 16];
    own_uuid.copy_from_slice(&init[8..24]);
    let expect = ctx.expect.unwrap_or(InitExpectation {
        uuid: own_uuid,
        channels,
    });
    match MultifdInitPacket::decode(&init, &expect) {
        Err(err @ (WireError::BadMagic { .. } | WireError::BadVersion { .. })) => {
            ctx.error(&file, 0, err);
            return Ok(());
        }
        result => {
            ctx.expect.get_or_insert(expect);
            let id = init[24];
            ch.channel_id = Some(id);
            ch.uuid = Some(fmt_uuid(&own_uuid));
            ctx.list(
                ch,
                format!("@0 init packet: channel {id}, uuid {}", fmt_uuid(&own_uuid)),
            );
            match result {
                Ok(_) => {
                    if std::mem::replace(&mut ctx.seen_ids[usize::from(id)], true) {
                        ctx.error(&file, 0, WireError::DuplicateChannel { id, offset: 24 });
                    }
                }
                // uuid or id: the framing is intact, keep decoding.
                Err(err) => ctx.error(&file, 0, err),
            }
        }
    }
    input.consume(INIT_PACKET_LEN);
    let limits = ctx.limits;
    loop {
        let at = input.offset();
        let outcome = step(input, |buf| {
            decode_packet(buf, &limits).map(|o| o.map(|(p, used)| (Owned::from(&p), used)))
        })?;
        match outcome {
            Ok(Step::Item(p, used)) => {
                if !account_packet(ch, ctx, &file, at, p) {
                    return Ok(());
                }
                input.consume(used);
            }
            Ok(Step::Truncated { have: 0 }) => return Ok(()),
            Ok(Step::Truncated { have }) => {
                let need = expected_packet_len(input.avail());
                truncated_error(ctx, ch, at, "final packet", need, have);
                ctx.list(
                    ch,
                    format!("@{at} truncated final packet: {have} of {need} bytes"),
                );
                return Ok(());
            }
            Err(err) => {
                let context = packet_context(ch.channel_id, input.avail());
                ctx.error_in(&file, at, err, Some(context));
                return Ok(());
            }
        }
    }
}

/// "channel N" and, when `buf` starts with a whole device-state header, the device it names.
fn packet_context(channel: Option<u8>, buf: &[u8]) -> String {
    let channel = channel.map_or_else(|| "channel ?".to_owned(), |id| format!("channel {id}"));
    let device = buf
        .first_chunk::<DEVICE_STATE_HEADER_LEN>()
        .and_then(|h| DeviceStatePacketHeader::decode(h, u32::MAX).ok())
        .map(|h| {
            format!(
                ", device {:?} instance {}",
                String::from_utf8_lossy(h.idstr),
                h.instance_id
            )
        });
    channel + device.as_deref().unwrap_or("")
}

/// What the listing and summaries keep of a packet (no payload).
enum Owned {
    Ram {
        sync: bool,
        packet_num: u64,
        block: String,
        normal: u32,
        zero: u32,
        payload: u32,
    },
    Device {
        idstr: String,
        instance_id: u32,
        idx: u32,
        config: bool,
        payload: u32,
    },
}

impl From<&MultifdPacket<'_>> for Owned {
    fn from(p: &MultifdPacket<'_>) -> Self {
        match p {
            MultifdPacket::Ram { header, .. } => Owned::Ram {
                sync: header.is_sync(),
                packet_num: header.packet_num,
                block: String::from_utf8_lossy(header.ramblock).into_owned(),
                normal: header.normal_pages,
                zero: header.zero_pages,
                payload: header.next_packet_size,
            },
            MultifdPacket::DeviceState { header, vfio, .. } => Owned::Device {
                idstr: String::from_utf8_lossy(header.idstr).into_owned(),
                instance_id: header.instance_id,
                idx: vfio.idx,
                config: vfio.config,
                payload: header.next_packet_size,
            },
        }
    }
}

/// Returns false, after reporting it, when the packet names one device more than inspect
/// tracks.
fn account_packet(ch: &mut ChannelReport, ctx: &mut Ctx, file: &str, at: u64, p: Owned) -> bool {
    ch.packets += 1;
    match p {
        Owned::Ram {
            sync: true,
            packet_num,
            normal,
            zero,
            ..
        } => {
            ch.sync_packets += 1;
            ch.ram_normal_pages += u64::from(normal);
            ch.ram_zero_pages += u64::from(zero);
            ctx.list(ch, format!("@{at} SYNC packet_num {packet_num}"));
        }
        Owned::Ram {
            packet_num,
            block,
            normal,
            zero,
            payload,
            ..
        } => {
            ch.ram_packets += 1;
            ch.ram_normal_pages += u64::from(normal);
            ch.ram_zero_pages += u64::from(zero);
            ctx.list(ch, format!(
                "@{at} RAM packet_num {packet_num} block {block:?}: {normal} normal, {zero} zero pages, {payload} bytes"
            ));
        }
        Owned::Device {
            idstr,
            instance_id,
            idx,
            config,
            payload,
        } => {
            ch.device_state_packets += 1;
            ch.device_state_bytes += u64::from(payload);
            let data = payload.saturating_sub(VFIO_HEADER_LEN as u32);
            ctx.list(ch, format!(
                "@{at} device state {idstr:?} instance {instance_id}: idx {idx}{}, {data} data bytes",
                if config { " (config)" } else { "" }
            ));
            let context = format!(
                "channel {}, device {idstr:?} instance {instance_id}",
                ch.channel_id
                    .map_or_else(|| "?".to_owned(), |id| id.to_string())
            );
            let key = (idstr, instance_id);
            if ctx.devices.len() >= MAX_DEVICES && !ctx.devices.contains_key(&key) {
                ctx.report(ErrorReport {
                    file: file.to_owned(),
                    offset: at + COMMON_HEADER_LEN as u64,
                    field: Some("idstr"),
                    message: format!(
                        "device {:?} instance {instance_id} is one more than the {MAX_DEVICES} devices inspect tracks; the rest of the file is not decoded",
                        key.0
                    ),
                });
                return false;
            }
            let dev = ctx.devices.entry(key).or_default();
            dev.packets += 1;
            dev.data_bytes += u64::from(data);
            if let Some(id) = ch.channel_id {
                if !dev.channels.contains(&id) {
                    dev.channels.push(id);
                }
            }
            let vfio = crate::wire::VfioHeaderView { idx, config };
            // The idx field sits 4 bytes into the VFIO header.
            let idx_at = DEVICE_STATE_HEADER_LEN + 4;
            if let Err(err) = dev.tracker.record(vfio, idx_at) {
                if matches!(err, WireError::DuplicateIdx { .. }) {
                    dev.duplicate_count += 1;
                    if dev.duplicates.len() < MAX_LISTED_IDX {
                        dev.duplicates.push(idx);
                    }
                }
                ctx.error_in(file, at, err, Some(context));
            }
        }
    }
    true
}

/// The length the packet at the start of `buf` would have, from whatever header bytes exist.
fn expected_packet_len(buf: &[u8]) -> usize {
    let Some(common) = buf.first_chunk::<COMMON_HEADER_LEN>() else {
        return COMMON_HEADER_LEN;
    };
    let flags = u32::from_be_bytes([common[8], common[9], common[10], common[11]]);
    let (header, size_at) = if flags & MULTIFD_FLAG_DEVICE_STATE != 0 {
        (DEVICE_STATE_HEADER_LEN, 272)
    } else {
        (RAM_PACKET_LEN, 20)
    };
    match buf.get(size_at..size_at + 4) {
        Some(b) if buf.len() >= header => {
            header + u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize
        }
        _ => header,
    }
}

// ---------------------------------------------------------------------------------------------
// Main channel

/// What a section id stands for, from its START or FULL header.
#[derive(Clone)]
struct SectionInfo {
    idstr: Vec<u8>,
    index: usize,
}

fn walk_main(input: &mut Input, ch: &mut ChannelReport, ctx: &mut Ctx) -> Result<(), InspectError> {
    let file = ch.file.clone();
    ctx.main_channels += 1;
    if ctx.main_channels > 1 {
        ctx.report(ErrorReport {
            file: file.clone(),
            offset: 0,
            field: Some("magic"),
            message: "a second main channel (QEVM) in one migration".to_owned(),
        });
    }
    let mut main = MainSummary::default();
    let result = walk_main_records(input, ch, ctx, &mut main, &file);
    ch.main = Some(main);
    result
}

fn walk_main_records(
    input: &mut Input,
    ch: &mut ChannelReport,
    ctx: &mut Ctx,
    main: &mut MainSummary,
    file: &str,
) -> Result<(), InspectError> {
    match step(input, |b| {
        main_stream::decode_file_header(b).map(|o| o.map(|n| ((), n)))
    })? {
        Ok(Step::Item((), used)) => input.consume(used),
        Ok(Step::Truncated { have }) => {
            truncated_error(ctx, ch, 0, "file header", FILE_HEADER_LEN, have);
            return Ok(());
        }
        Err(err) => {
            ctx.error(file, 0, err);
            return Ok(());
        }
    }
    ctx.list(ch, "@0 file header QEVM version 3".to_owned());
    let mut sections: BTreeMap<u32, SectionInfo> = BTreeMap::new();
    let mut page_size = RAM_PAGE_SIZE;
    loop {
        let at = input.offset();
        let outcome = step(input, |b| {
            decode_record(b).map(|o| o.map(|(r, n)| (OwnedRecord::from(&r), n)))
        })?;
        let (record, used) = match outcome {
            Ok(Step::Item(r, used)) => (r, used),
            Ok(Step::Truncated { have: 0 }) => {
                if !main.eof {
                    truncated_error(ctx, ch, at, "main stream (no EOF record)", 1, 0);
                }
                return Ok(());
            }
            Ok(Step::Truncated { have }) => {
                truncated_error(ctx, ch, at, "final record", have + 1, have);
                return Ok(());
            }
            Err(err) => {
                ctx.error(file, at, err);
                return Ok(());
            }
        };
        ch.packets += 1;
        input.consume(used);
        if main.eof && !matches!(record, OwnedRecord::VmDescription { .. }) {
            ctx.report(ErrorReport {
                file: file.to_owned(),
                offset: at,
                field: Some("section type"),
                message: "record after EOF other than VMDESCRIPTION".to_owned(),
            });
            return Ok(());
        }
        let (section_id, kind) = match record {
            OwnedRecord::Eof => {
                main.eof = true;
                ctx.list(ch, format!("@{at} EOF"));
                continue;
            }
            OwnedRecord::VmDescription { len } => {
                main.vmdescription_bytes = Some(len);
                ctx.list(ch, format!("@{at} VMDESCRIPTION: {len} bytes of JSON"));
                // Our standalone main channel sends its setup description early, before any
                // device data (`session::main_channel`); QEMU sends it after EOF only.
                let ours = main.machine.as_deref() == Some(crate::session::main_channel::MACHINE);
                if !main.eof && !ours {
                    ctx.report(ErrorReport {
                        file: file.to_owned(),
                        offset: at,
                        field: Some("section type"),
                        message: "VMDESCRIPTION before EOF".to_owned(),
                    });
                    return Ok(());
                }
                continue;
            }
            OwnedRecord::Configuration { machine, page_bits } => {
                if let Some(bits) = page_bits {
                    // QEMU's targets have 1 KiB to 64 KiB pages.
                    if !(10..=16).contains(&bits) {
                        ctx.report(ErrorReport {
                            file: file.to_owned(),
                            offset: at,
                            field: Some("target_page_bits"),
                            message: format!("target_page_bits {bits}, expected 10..=16"),
                        });
                        return Ok(());
                    }
                    page_size = 1 << bits;
                }
                ctx.list(ch, format!("@{at} CONFIGURATION machine {machine:?}"));
                main.machine = Some(machine);
                continue;
            }
            OwnedRecord::Command { name, len } => {
                ctx.list(ch, format!("@{at} COMMAND {name} ({len} bytes)"));
                *main.commands.entry(name).or_default() += 1;
                continue;
            }
            OwnedRecord::Footer { section_id } => {
                ctx.report(ErrorReport {
                    file: file.to_owned(),
                    offset: at,
                    field: Some("section footer"),
                    message: format!("section footer for {section_id} outside a section"),
                });
                return Ok(());
            }
            OwnedRecord::Start { header, full } => {
                let idstr = header.idstr.clone();
                let index = match sections.get(&header.section_id) {
                    Some(known) => known.index,
                    None if sections.len() >= MAX_SECTIONS => {
                        ctx.report(ErrorReport {
                            file: file.to_owned(),
                            offset: at + 1,
                            field: Some("section_id"),
                            message: format!(
                                "section {} is one more than the {MAX_SECTIONS} sections inspect tracks; the rest of the file is not decoded",
                                header.section_id
                            ),
                        });
                        return Ok(());
                    }
                    None => {
                        main.sections.push(SectionSummary {
                            section_id: header.section_id,
                            idstr: String::from_utf8_lossy(&idstr).into_owned(),
                            instance_id: header.instance_id,
                            version_id: header.version_id,
                            ..SectionSummary::default()
                        });
                        main.sections.len() - 1
                    }
                };
                sections.insert(header.section_id, SectionInfo { idstr, index });
                ctx.list(
                    ch,
                    format!(
                        "@{at} SECTION_{} {} {:?} instance {} version {}",
                        if full { "FULL" } else { "START" },
                        header.section_id,
                        String::from_utf8_lossy(&header.idstr),
                        header.instance_id,
                        header.version_id
                    ),
                );
                (header.section_id, if full { 'F' } else { 'S' })
            }
            OwnedRecord::Part { section_id, end } => {
                ctx.list(
                    ch,
                    format!(
                        "@{at} SECTION_{} {section_id}",
                        if end { "END" } else { "PART" }
                    ),
                );
                (section_id, if end { 'E' } else { 'P' })
            }
        };
        let Some(info) = sections.get(&section_id).cloned() else {
            ctx.report(ErrorReport {
                file: file.to_owned(),
                offset: at + 1,
                field: Some("section_id"),
                message: format!("Unknown savevm section {section_id}"),
            });
            return Ok(());
        };
        if let Some(s) = main.sections.get_mut(info.index) {
            match kind {
                'S' => s.start += 1,
                'P' => s.part += 1,
                'E' => s.end += 1,
                _ => s.full += 1,
            }
        }
        let body_start = input.offset();
        let ok = if info.idstr == b"ram" {
            walk_ram_body(input, ch, ctx, main, file, page_size)?
        } else if info.idstr.ends_with(b"/vfio") {
            walk_vfio_body(input, ch, ctx, main, file, section_id)?
        } else {
            walk_opaque_body(input, ch, ctx, file, section_id, &sections)?
        };
        if !ok {
            return Ok(());
        }
        let body = input.offset() - body_start;
        if let Some(s) = main.sections.get_mut(info.index) {
            s.body_bytes += body;
        }
        let at = input.offset();
        match step(input, |b| {
            decode_footer(b, section_id).map(|o| o.map(|n| ((), n)))
        })? {
            Ok(Step::Item((), used)) => input.consume(used),
            Ok(Step::Truncated { have }) => {
                truncated_error(ctx, ch, at, "section footer", 5, have);
                return Ok(());
            }
            Err(err) => {
                ctx.error(file, at, err);
                return Ok(());
            }
        }
    }
}

/// A record without borrows, so more input can be read after decoding it.
enum OwnedRecord {
    Eof,
    Start {
        header: OwnedSection,
        full: bool,
    },
    Part {
        section_id: u32,
        end: bool,
    },
    Footer {
        section_id: u32,
    },
    Command {
        name: &'static str,
        len: usize,
    },
    VmDescription {
        len: u64,
    },
    Configuration {
        machine: String,
        page_bits: Option<u32>,
    },
}

struct OwnedSection {
    section_id: u32,
    idstr: Vec<u8>,
    instance_id: u32,
    version_id: u32,
}

impl From<&SectionHeader<'_>> for OwnedSection {
    fn from(h: &SectionHeader<'_>) -> Self {
        Self {
            section_id: h.section_id,
            idstr: h.idstr.to_vec(),
            instance_id: h.instance_id,
            version_id: h.version_id,
        }
    }
}

impl From<&Record<'_>> for OwnedRecord {
    fn from(r: &Record<'_>) -> Self {
        match r {
            Record::Eof => Self::Eof,
            Record::SectionStart(h) => Self::Start {
                header: h.into(),
                full: false,
            },
            Record::SectionFull(h) => Self::Start {
                header: h.into(),
                full: true,
            },
            Record::SectionPart { section_id } => Self::Part {
                section_id: *section_id,
                end: false,
            },
            Record::SectionEnd { section_id } => Self::Part {
                section_id: *section_id,
                end: true,
            },
            Record::Footer { section_id } => Self::Footer {
                section_id: *section_id,
            },
            Record::Command { cmd, data } => Self::Command {
                name: cmd.name(),
                len: data.len(),
            },
            Record::VmDescription { json } => Self::VmDescription {
                len: json.len() as u64,
            },
            Record::Configuration(c) => Self::Configuration {
                machine: String::from_utf8_lossy(c.machine).into_owned(),
                page_bits: c.target_page_bits,
            },
        }
    }
}

enum OwnedRam {
    MemSize {
        total: u64,
        blocks: Vec<(String, u64)>,
        not_listed: u64,
    },
    Zero,
    Page,
    Xbzrle,
    Flush,
    Eos,
}

/// RAM items up to and including EOS. Returns false after reporting an error.
fn walk_ram_body(
    input: &mut Input,
    ch: &mut ChannelReport,
    ctx: &mut Ctx,
    main: &mut MainSummary,
    file: &str,
    page_size: usize,
) -> Result<bool, InspectError> {
    let mut items = ItemLine::default();
    loop {
        let at = input.offset();
        let outcome = step(input, |b| {
            decode_ram_item(b, page_size).map(|o| {
                o.map(|(item, used)| {
                    let owned = match item {
                        RamItem::MemSize { total, blocks } => OwnedRam::MemSize {
                            total,
                            blocks: ram_blocks(blocks)
                                .take(MAX_LISTED_BLOCKS)
                                .map(|(n, l)| (String::from_utf8_lossy(n).into_owned(), l))
                                .collect(),
                            not_listed: ram_blocks(blocks).skip(MAX_LISTED_BLOCKS).count() as u64,
                        },
                        RamItem::Zero { .. } => OwnedRam::Zero,
                        RamItem::Page { .. } => OwnedRam::Page,
                        RamItem::Xbzrle { .. } => OwnedRam::Xbzrle,
                        RamItem::MultifdFlush => OwnedRam::Flush,
                        RamItem::Eos => OwnedRam::Eos,
                    };
                    (owned, used)
                })
            })
        })?;
        let item = match outcome {
            Ok(Step::Item(item, used)) => {
                input.consume(used);
                item
            }
            Ok(Step::Truncated { have }) => {
                truncated_error(ctx, ch, at, "RAM section item", have + 1, have);
                return Ok(false);
            }
            Err(err) => {
                ctx.error(file, at, err);
                return Ok(false);
            }
        };
        match item {
            OwnedRam::MemSize {
                total,
                blocks,
                not_listed,
            } => {
                let count = blocks.len() as u64 + not_listed;
                items.push(|| format!("MEM_SIZE {total} ({count} blocks)"));
                main.ram_blocks_not_listed = not_listed;
                main.ram_total = Some(total);
                main.ram_blocks = blocks
                    .into_iter()
                    .map(|(name, used_length)| RamBlockSummary { name, used_length })
                    .collect();
            }
            OwnedRam::Zero => {
                main.ram_main_zero_pages += 1;
            }
            OwnedRam::Page | OwnedRam::Xbzrle => {
                main.ram_main_pages += 1;
            }
            OwnedRam::Flush => {
                main.ram_multifd_flushes += 1;
                items.push(|| "MULTIFD_FLUSH".to_owned());
            }
            OwnedRam::Eos => {
                main.ram_eos += 1;
                items.end("EOS");
                ctx.list(ch, format!("    ram: {items}"));
                return Ok(true);
            }
        }
    }
}

/// The items of one section body for its listing line: the first [`MAX_LISTED_ITEMS`] named,
/// the rest counted, and the item that ends the body, so a body of millions of markers costs
/// no memory.
#[derive(Default)]
struct ItemLine {
    names: Vec<String>,
    not_listed: u64,
    end: Option<String>,
}

impl ItemLine {
    fn push(&mut self, name: impl FnOnce() -> String) {
        if self.names.len() < MAX_LISTED_ITEMS {
            self.names.push(name());
        } else {
            self.not_listed += 1;
        }
    }

    fn end(&mut self, name: &str) {
        self.end = Some(name.to_owned());
    }
}

impl std::fmt::Display for ItemLine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let more = (self.not_listed > 0).then(|| format!("{} more", self.not_listed));
        let all: Vec<&str> = self
            .names
            .iter()
            .map(String::as_str)
            .chain(more.as_deref())
            .chain(self.end.as_deref())
            .collect();
        f.write_str(&all.join(", "))
    }
}

/// VFIO markers up to END_OF_STATE (or DEV_CONFIG_LOAD_READY, which ends a FULL section in
/// QEMU 10.1+). A DEV_CONFIG_STATE blob (non-multifd transfer) is skipped up to the
/// END_OF_STATE marker that precedes the section footer.
fn walk_vfio_body(
    input: &mut Input,
    ch: &mut ChannelReport,
    ctx: &mut Ctx,
    main: &mut MainSummary,
    file: &str,
    section_id: u32,
) -> Result<bool, InspectError> {
    let mut items = ItemLine::default();
    loop {
        let at = input.offset();
        let outcome = step(input, |b| {
            decode_vfio_item(b).map(|o| {
                o.map(|(item, used)| match item {
                    VfioItem::Marker(m) => (Ok(m), used),
                    VfioItem::Data(d) => (Err(d.len()), used),
                })
            })
        })?;
        let item = match outcome {
            Ok(Step::Item(item, used)) => {
                input.consume(used);
                item
            }
            Ok(Step::Truncated { have }) => {
                truncated_error(ctx, ch, at, "VFIO section item", have + 1, have);
                return Ok(false);
            }
            Err(err) => {
                ctx.error(file, at, err);
                return Ok(false);
            }
        };
        main.vfio_markers += 1;
        match item {
            Err(len) => items.push(|| format!("DEV_DATA_STATE {len} bytes")),
            // DEV_INIT_DATA_SENT ends a precopy part in place of END_OF_STATE
            // (`vfio_save_iterate` with switchover-ack).
            Ok(
                m @ (VfioMarker::EndOfState
                | VfioMarker::DevConfigLoadReady
                | VfioMarker::DevInitDataSent),
            ) => {
                items.end(m.name());
                ctx.list(ch, format!("    vfio: {items}"));
                return Ok(true);
            }
            Ok(VfioMarker::DevConfigState) => {
                items.push(|| "DEV_CONFIG_STATE".to_owned());
                let mut pattern = [0u8; 13];
                pattern[..8].copy_from_slice(&VfioMarker::EndOfState.value().to_be_bytes());
                pattern[8] = QEMU_VM_SECTION_FOOTER;
                pattern[9..].copy_from_slice(&section_id.to_be_bytes());
                let Some(len) = find_pattern_from(input, &pattern, 0)? else {
                    let have = input.avail().len();
                    truncated_error(ctx, ch, at + 8, "VFIO config blob", have + 1, have);
                    return Ok(false);
                };
                items.end(&format!("config {len} bytes, END_OF_STATE"));
                input.consume(len + 8);
                ctx.list(ch, format!("    vfio: {items}"));
                return Ok(true);
            }
            Ok(m) => items.push(|| m.name().to_owned()),
        }
    }
}

/// A device's vmstate: skipped to the first `7e <section id>` that is followed by a valid
/// record (or by the end of the file). Returns false after reporting an error.
fn walk_opaque_body(
    input: &mut Input,
    ch: &mut ChannelReport,
    ctx: &mut Ctx,
    file: &str,
    section_id: u32,
    sections: &BTreeMap<u32, SectionInfo>,
) -> Result<bool, InspectError> {
    let at = input.offset();
    let mut footer = [0u8; 5];
    footer[0] = QEMU_VM_SECTION_FOOTER;
    footer[1..].copy_from_slice(&section_id.to_be_bytes());
    let mut from = 0;
    loop {
        let Some(rel) = find_pattern_from(input, &footer, from)? else {
            let have = input.avail().len();
            ctx.report(ErrorReport {
                file: file.to_owned(),
                offset: at,
                field: Some("section footer"),
                message: format!(
                    "Missing section footer for section {section_id}: none found in the {have} bytes that follow"
                ),
            });
            ch.truncated = !input.eof || have > 0;
            return Ok(false);
        };
        // Look at what follows the candidate footer; read more if needed.
        let next = rel + footer.len();
        loop {
            let tail = input.avail().get(next..).unwrap_or(&[]);
            match plausible_next_record(tail, sections, input.eof) {
                Some(true) => {
                    ctx.list(ch, format!("    {rel} bytes of device state"));
                    input.consume(rel);
                    return Ok(true);
                }
                Some(false) => break,
                // A record whose length field asks for more than one item may hold is no
                // record.
                None if tail.len() >= input.max_item => break,
                // At EOF `plausible_next_record` always decides, so this ends.
                None => {
                    input.more()?;
                }
            }
        }
        from = rel + 1;
    }
}

/// Position of `pattern` in the unconsumed bytes at or after `from`, reading on up to
/// [`MAX_OPAQUE_BODY`] bytes.
fn find_pattern_from(
    input: &mut Input,
    pattern: &[u8],
    from: usize,
) -> Result<Option<usize>, InspectError> {
    let mut from = from;
    loop {
        let avail = input.avail();
        if let Some(i) = avail
            .get(from..)
            .and_then(|tail| tail.windows(pattern.len()).position(|w| w == pattern))
        {
            // A match past the limit counts as none: a body of look-alikes, each rejected by
            // the record after it, would otherwise keep the whole file in memory.
            return Ok((from + i <= MAX_OPAQUE_BODY).then_some(from + i));
        }
        from = from.max(avail.len().saturating_sub(pattern.len() - 1));
        if avail.len() > MAX_OPAQUE_BODY || !input.more()? {
            return Ok(None);
        }
    }
}

/// Whether `tail` (the bytes after a candidate footer) starts a record that can follow a
/// section: `Some(true)` yes, `Some(false)` no, `None` more bytes needed.
fn plausible_next_record(
    tail: &[u8],
    sections: &BTreeMap<u32, SectionInfo>,
    eof: bool,
) -> Option<bool> {
    if tail.is_empty() {
        // The stream may end right after a footer only when truncated; let the caller report it.
        return if eof { Some(true) } else { None };
    }
    match tail[0] {
        QEMU_VM_EOF => {
            return match tail.get(1) {
                None if eof => Some(true),
                None => None,
                Some(&b) => Some(b == QEMU_VM_VMDESCRIPTION),
            }
        }
        // Only these records can follow a section; deciding on the first byte keeps a body
        // full of `7e <section id>` look-alikes linear to walk.
        QEMU_VM_SECTION_START
        | QEMU_VM_SECTION_PART
        | QEMU_VM_SECTION_END
        | QEMU_VM_SECTION_FULL
        | QEMU_VM_COMMAND => {}
        _ => return Some(false),
    }
    match decode_record(tail) {
        Ok(None) => {
            if eof {
                Some(false)
            } else {
                None
            }
        }
        Err(_) => Some(false),
        Ok(Some((record, _))) => Some(match record {
            Record::SectionStart(h) | Record::SectionFull(h) => {
                h.idstr.iter().all(|b| b.is_ascii_graphic())
                    && sections
                        .get(&h.section_id)
                        .is_none_or(|s| s.idstr == h.idstr)
            }
            Record::SectionPart { section_id } | Record::SectionEnd { section_id } => {
                sections.contains_key(&section_id)
            }
            Record::Command { .. } => true,
            _ => false,
        }),
    }
}

// ---------------------------------------------------------------------------------------------
// Text output

fn write_channel_header(out: &mut dyn Write, ch: &ChannelReport) -> io::Result<()> {
    match ch.kind {
        "main" => writeln!(out, "{}: main channel, {} bytes", ch.file, ch.bytes),
        _ => writeln!(
            out,
            "{}: multifd channel {}, uuid {}, {} bytes",
            ch.file,
            ch.channel_id
                .map_or_else(|| "?".to_owned(), |id| id.to_string()),
            ch.uuid.as_deref().unwrap_or("?"),
            ch.bytes
        ),
    }
}

fn write_channel_summary(out: &mut dyn Write, ch: &ChannelReport) -> io::Result<()> {
    if let Some(m) = &ch.main {
        writeln!(
            out,
            "  summary: {} records, machine {}, {} sections, commands [{}], ram total {}, {} MULTIFD_FLUSH, {} EOS, {} pages on main, EOF {}, VMDESCRIPTION {}",
            ch.packets,
            m.machine.as_deref().unwrap_or("-"),
            m.sections.len(),
            m.commands
                .iter()
                .map(|(name, n)| if *n == 1 { (*name).to_owned() } else { format!("{name} x{n}") })
                .collect::<Vec<_>>()
                .join(", "),
            m.ram_total.map_or_else(|| "-".to_owned(), |t| t.to_string()),
            m.ram_multifd_flushes,
            m.ram_eos,
            m.ram_main_pages + m.ram_main_zero_pages,
            if m.eof { "yes" } else { "no" },
            m.vmdescription_bytes.map_or_else(|| "no".to_owned(), |b| format!("{b} bytes")),
        )
    } else {
        writeln!(
            out,
            "  summary: {} packets: {} RAM ({} normal pages, {} zero pages), {} SYNC, {} device state ({} bytes){}",
            ch.packets,
            ch.ram_packets,
            ch.ram_normal_pages,
            ch.ram_zero_pages,
            ch.sync_packets,
            ch.device_state_packets,
            ch.device_state_bytes,
            if ch.truncated { ", TRUNCATED" } else { "" }
        )
    }
}

/// The devices, the totals and the errors, after every channel.
fn write_report_tail(out: &mut dyn Write, report: &Report) -> io::Result<()> {
    for d in &report.devices {
        writeln!(
            out,
            "device {:?} instance {}: {} packets, {} data bytes, config idx {}, missing idx {}, duplicate idx {}, channels {:?}, {}",
            d.idstr,
            d.instance_id,
            d.packets,
            d.data_bytes,
            d.config_idx.map_or_else(|| "none".to_owned(), |c| c.to_string()),
            fmt_idx_list(d.missing_idx_count, &d.missing_idx),
            fmt_idx_list(d.duplicate_idx_count, &d.duplicate_idx),
            d.channels,
            if d.complete { "complete" } else { "INCOMPLETE" }
        )?;
    }
    let totals = |f: fn(&ChannelReport) -> u64| report.channels.iter().map(f).sum::<u64>();
    writeln!(
        out,
        "total: {} files, {} bytes, {} RAM packets, {} normal pages, {} zero pages, {} SYNC, {} device state packets, {} errors",
        report.channels.len(),
        totals(|c| c.bytes),
        totals(|c| c.ram_packets),
        totals(|c| c.ram_normal_pages),
        totals(|c| c.ram_zero_pages),
        totals(|c| c.sync_packets),
        totals(|c| c.device_state_packets),
        report.errors.len() as u64 + report.errors_not_listed
    )?;
    write_errors(out, report)
}

fn write_errors(out: &mut dyn Write, report: &Report) -> io::Result<()> {
    for e in &report.errors {
        writeln!(
            out,
            "error: {}: offset {}: {}: {}",
            e.file,
            e.offset,
            e.field.unwrap_or("stream"),
            e.message
        )?;
    }
    if report.errors_not_listed > 0 {
        writeln!(
            out,
            "error: {} more errors, not listed",
            report.errors_not_listed
        )?;
    }
    Ok(())
}

/// `none`, or the count and the first 16 idx.
fn fmt_idx_list(count: u64, listed: &[u32]) -> String {
    if count == 0 {
        "none".to_owned()
    } else {
        format!("{count} {:?}", &listed[..listed.len().min(16)])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file removed on drop.
    struct TempFile(PathBuf);

    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    /// A device body past [`MAX_OPAQUE_BODY`] made of footer look-alikes, each followed by a
    /// SECTION_PART of an unknown section, laid so that every 1 MiB read ends inside such a
    /// PART: each candidate needs "more bytes" to be judged, so the walk read on without limit
    /// and held the whole body (a 200 MiB capture took 211 MB).
    #[test]
    fn footer_look_alikes_past_the_body_limit_keep_the_buffer_bounded() {
        let path = std::env::temp_dir().join(format!(
            "vfio-multifd-inspect-look-alikes-{}",
            std::process::id()
        ));
        let file = TempFile(path);
        let mut s = Vec::new();
        main_stream::encode_file_header(&mut s);
        Record::SectionFull(SectionHeader {
            section_id: 5,
            idstr: b"timer",
            instance_id: 0,
            version_id: 1,
        })
        .encode(&mut s);
        let mut candidate = vec![QEMU_VM_SECTION_FOOTER];
        candidate.extend_from_slice(&5u32.to_be_bytes());
        candidate.push(QEMU_VM_SECTION_PART);
        candidate.extend_from_slice(&0x63u32.to_be_bytes());
        candidate.resize(16, 0xff);
        // Each read ends 7 bytes into a candidate, inside its PART record.
        while (READ_CHUNK - s.len()) % candidate.len() != 7 {
            s.push(0xff);
        }
        let body_len = MAX_OPAQUE_BODY + 32 * READ_CHUNK;
        s.reserve(body_len);
        while s.len() < body_len {
            s.extend_from_slice(&candidate);
        }
        std::fs::write(&file.0, &s).expect("writing the capture");
        drop(s);

        let mut input = Input::open(&file.0, MAX_OPAQUE_BODY).expect("opens");
        let mut ch = ChannelReport {
            file: file.0.display().to_string(),
            kind: "main",
            ..ChannelReport::default()
        };
        let mut ctx = Ctx {
            limits: PacketLimits::default(),
            expect: None,
            seen_ids: [false; 256],
            devices: BTreeMap::new(),
            errors: Vec::new(),
            errors_not_listed: 0,
            main_channels: 0,
            text: None,
        };
        walk_main(&mut input, &mut ch, &mut ctx).expect("decodes");
        assert_eq!(ctx.errors.len(), 1, "{:?}", ctx.errors);
        assert_eq!(
            ctx.errors[0].field,
            Some("section footer"),
            "{:?}",
            ctx.errors
        );
        assert!(
            input.buf.len() <= MAX_OPAQUE_BODY + 2 * READ_CHUNK,
            "{} bytes buffered for a {MAX_OPAQUE_BODY}-byte body limit",
            input.buf.len()
        );
    }

    /// A MEM_SIZE item of millions of zero-length blocks (valid: their lengths add up to the
    /// total) lists the first MAX_LISTED_BLOCKS and counts the rest: each listed block cost
    /// about 6 bytes of memory per byte of capture (460 MB for a 60 MiB one) and a line of
    /// JSON.
    #[test]
    fn a_mem_size_of_millions_of_blocks_lists_the_first_and_counts_the_rest() {
        let path = std::env::temp_dir().join(format!(
            "vfio-multifd-inspect-mem-size-{}",
            std::process::id()
        ));
        let file = TempFile(path);
        let blocks = 3 * MAX_LISTED_BLOCKS;
        let mut s = Vec::new();
        main_stream::encode_file_header(&mut s);
        Record::SectionStart(SectionHeader {
            section_id: 2,
            idstr: b"ram",
            instance_id: 0,
            version_id: 4,
        })
        .encode(&mut s);
        main_stream::encode_ram_word(4096, main_stream::RAM_SAVE_FLAG_MEM_SIZE, &mut s);
        for _ in 1..blocks {
            main_stream::encode_ram_block(b"a", 0, &mut s);
        }
        main_stream::encode_ram_block(b"b", 4096, &mut s);
        main_stream::encode_ram_word(0, main_stream::RAM_SAVE_FLAG_EOS, &mut s);
        Record::Footer { section_id: 2 }.encode(&mut s);
        Record::Eof.encode(&mut s);
        std::fs::write(&file.0, &s).expect("writing the capture");

        let report = inspect_files(&InspectArgs {
            files: vec![file.0.clone()],
            json: true,
            summary: true,
            uuid: None,
            channels: None,
            max_packet_size: PacketLimits::default().max_packet_size,
        })
        .expect("decodes");
        assert!(report.errors.is_empty(), "{:?}", report.errors);
        let main = report.channels[0].main.as_ref().expect("a main channel");
        assert_eq!(main.ram_total, Some(4096));
        assert_eq!(main.ram_blocks.len(), MAX_LISTED_BLOCKS);
        assert_eq!(
            main.ram_blocks_not_listed,
            (blocks - MAX_LISTED_BLOCKS) as u64
        );
    }
}
