//! A bounded, deterministic fuzz target for every decoder, run by the normal `cargo test` on
//! stable Rust: valid streams (multifd channel, main channel, return path) are mutated (bit
//! flips, interesting bytes and BE u32 values, truncation, deletion, duplication, splicing,
//! random insertions) and random byte strings are added. For every input it asserts that no
//! decoder panics, that a decoded item used at least one and at most the available bytes, that
//! every error's offset lies within the input, and that records re-encode to the bytes they were
//! decoded from. Every tenth input also goes through `inspect` as files.
//!
//! Run it longer, or from another seed:
//! `FUZZ_ITERS=1000000 FUZZ_SEED=42 cargo test --release -p vfio-multifd --test fuzz_decoders -- --nocapture`

// Test helpers unwrap too: a failed step is a failed test (clippy allows it only in #[test] fns).
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;

use vfio_multifd::inspect::{inspect_files, InspectArgs};
use vfio_multifd::wire::main_stream::*;
use vfio_multifd::wire::*;
use zerocopy::IntoBytes;

mod common;
use common::{env_u64, Rng};

const UUID: [u8; 16] = [7; 16];

fn multifd_seed() -> Vec<u8> {
    let mut s = MultifdInitPacket::new(UUID, 1).as_bytes().to_vec();
    let id = DeviceId::new("0000:00:02.0/vfio", 0).unwrap();
    for (idx, config, len) in [(0u32, false, 40usize), (2, false, 0), (3, true, 24)] {
        let mut room = [0u8; PACKET_HEADER_ROOM];
        write_packet_headers(&mut room, &id.idstr_field(), 0, idx, config, len as u32);
        s.extend_from_slice(&room);
        s.extend((0..len).map(|i| i as u8));
    }
    s.extend_from_slice(
        MultifdRamPacket::ram(4, b"pc.ram", &[0x1000], &[0x2000, 0x3000])
            .unwrap()
            .as_bytes(),
    );
    s.extend(std::iter::repeat_n(0xa5, RAM_PAGE_SIZE));
    s.extend_from_slice(MultifdRamPacket::sync(5).as_bytes());
    s
}

fn main_seed() -> Vec<u8> {
    let mut s = Vec::new();
    encode_file_header(&mut s);
    Record::Configuration(Configuration {
        machine: b"pc-i440fx-10.0",
        target_page_bits: None,
        capabilities: None,
        uuid: Some(UUID),
    })
    .encode(&mut s);
    let ram = SectionHeader {
        section_id: 1,
        idstr: b"ram",
        instance_id: 0,
        version_id: 4,
    };
    Record::SectionStart(ram).encode(&mut s);
    let mut blocks = Vec::new();
    encode_ram_block(b"pc.ram", 0x4000, &mut blocks);
    RamItem::MemSize {
        total: 0x4000,
        blocks: &blocks,
    }
    .encode(&mut s);
    RamItem::MultifdFlush.encode(&mut s);
    RamItem::Eos.encode(&mut s);
    Record::Footer { section_id: 1 }.encode(&mut s);
    let vfio = SectionHeader {
        section_id: 2,
        idstr: b"0000:00:02.0/vfio",
        instance_id: 0,
        version_id: 1,
    };
    Record::SectionStart(vfio).encode(&mut s);
    VfioMarker::DevSetupState.encode(&mut s);
    VfioMarker::EndOfState.encode(&mut s);
    Record::Footer { section_id: 2 }.encode(&mut s);
    Record::switchover_start().encode(&mut s);
    Record::SectionEnd { section_id: 1 }.encode(&mut s);
    RamItem::Eos.encode(&mut s);
    Record::Footer { section_id: 1 }.encode(&mut s);
    Record::SectionEnd { section_id: 2 }.encode(&mut s);
    VfioMarker::EndOfState.encode(&mut s);
    Record::Footer { section_id: 2 }.encode(&mut s);
    Record::SectionFull(SectionHeader {
        section_id: 3,
        idstr: b"timer",
        instance_id: 0,
        version_id: 2,
    })
    .encode(&mut s);
    s.extend_from_slice(&[0, 1, 2, 3, 0x7e, 0, 0, 0, 4, 5]);
    Record::Footer { section_id: 3 }.encode(&mut s);
    Record::Eof.encode(&mut s);
    Record::VmDescription {
        json: br#"{"page_size": 4096}"#,
    }
    .encode(&mut s);
    s
}

fn rp_seed() -> Vec<u8> {
    let mut s = Vec::new();
    RpMessage::SWITCHOVER_ACK.encode(&mut s);
    encode_rp_pong(1, &mut s);
    encode_rp_shut(0, &mut s);
    s
}

const INTERESTING_U32: [u32; 12] = [
    0,
    1,
    11,
    12,
    13,
    0x40,
    0x41,
    128,
    129,
    0x7fff_ffff,
    0xffff_fffe,
    0xffff_ffff,
];

fn mutate(rng: &mut Rng, input: &[u8], other: &[u8]) -> Vec<u8> {
    let mut v = input.to_vec();
    for _ in 0..1 + rng.below(4) {
        let len = v.len();
        match rng.below(9) {
            0 if len > 0 => {
                let i = rng.below(len);
                v[i] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let i = rng.below(len);
                v[i] = [0, 1, 0x7e, 0x7f, 0x80, 0xff, 0x05, 0x08][rng.below(8)];
            }
            2 if len >= 4 => {
                let i = rng.below(len - 3);
                let x = INTERESTING_U32[rng.below(INTERESTING_U32.len())];
                v[i..i + 4].copy_from_slice(&x.to_be_bytes());
            }
            3 => v.truncate(rng.below(len + 1)),
            4 if len > 0 => {
                let a = rng.below(len);
                let b = (a + rng.below(64)).min(len);
                v.drain(a..b);
            }
            5 if len > 0 => {
                let a = rng.below(len);
                let b = (a + rng.below(300)).min(len);
                let chunk = v[a..b].to_vec();
                let at = rng.below(len + 1);
                v.splice(at..at, chunk);
            }
            6 if !other.is_empty() => {
                let a = rng.below(other.len());
                let b = (a + rng.below(400)).min(other.len());
                let at = rng.below(len + 1);
                v.truncate(at);
                v.extend_from_slice(&other[a..b]);
            }
            7 => {
                let at = rng.below(len + 1);
                let n = rng.below(16);
                let bytes = rng.bytes(n);
                v.splice(at..at, bytes);
            }
            _ => {}
        }
    }
    v
}

/// Checks one decoder outcome: a used count within `len`, an error offset within the input.
fn check<T: std::fmt::Debug>(what: &str, len: usize, r: &Result<Option<(T, usize)>, WireError>) {
    match r {
        Ok(Some((item, used))) => {
            assert!(
                *used > 0 && *used <= len,
                "{what}: used {used} of {len}: {item:?}"
            )
        }
        Ok(None) => {}
        Err(e) => check_err(what, len, e),
    }
}

fn check_err(what: &str, len: usize, e: &WireError) {
    assert!(
        e.offset() < len,
        "{what}: {e} (offset {} of {len})",
        e.offset()
    );
    // Every message names the offset it reports (after shifting, too).
    let text = e.to_string();
    assert!(
        text.ends_with(&format!("(offset {})", e.offset())),
        "{what}: {text}"
    );
}

/// Walks `input` as a multifd channel.
fn drive_multifd(input: &[u8]) {
    let Some(init) = input.first_chunk::<INIT_PACKET_LEN>() else {
        return;
    };
    let mut set = ChannelSet::new(InitExpectation {
        uuid: UUID,
        channels: 4,
    });
    if let Err(e) = set.accept(init) {
        check_err("init", input.len(), &e);
    }
    let limits = PacketLimits {
        max_packet_size: 1 << 16,
    };
    let mut tracker = DeviceIdxTracker::new();
    let mut at = INIT_PACKET_LEN;
    loop {
        let rest = &input[at..];
        let r = decode_packet(rest, &limits);
        check("decode_packet", rest.len(), &r);
        match r {
            Ok(Some((p, used))) => {
                assert_eq!(p.wire_len(), used);
                if let MultifdPacket::DeviceState { vfio, .. } = p {
                    if let Err(e) = tracker.record(vfio, at + 280) {
                        assert!(e.offset() < input.len(), "{e}");
                    }
                }
                at += used;
            }
            _ => break,
        }
    }
    let _ = tracker.missing_ranges();
}

/// Walks `input` as a main channel, choosing the body decoder by section idstr; re-encodes
/// every record and checks it gives back the same bytes.
fn drive_main(input: &[u8]) {
    let mut at = match decode_file_header(input) {
        Ok(Some(n)) => n,
        Ok(None) => return,
        Err(e) => return check_err("file header", input.len(), &e),
    };
    let mut ram_ids = Vec::new();
    let mut vfio_ids = Vec::new();
    while at < input.len() {
        let rest = &input[at..];
        let r = decode_record(rest);
        check("decode_record", rest.len(), &r);
        let Ok(Some((record, used))) = r else { return };
        if !matches!(record, Record::Configuration(_)) {
            let mut again = Vec::new();
            record.encode(&mut again);
            assert_eq!(again, &rest[..used], "{record:?} does not re-encode");
        }
        at += used;
        let id = match record {
            Record::SectionStart(h) | Record::SectionFull(h) => {
                if h.idstr == b"ram" {
                    ram_ids.push(h.section_id);
                } else if h.idstr.ends_with(b"/vfio") {
                    vfio_ids.push(h.section_id);
                }
                h.section_id
            }
            Record::SectionPart { section_id } | Record::SectionEnd { section_id } => section_id,
            _ => continue,
        };
        loop {
            let rest = &input[at..];
            if ram_ids.contains(&id) {
                let r = decode_ram_item(rest, 4096);
                check("decode_ram_item", rest.len(), &r);
                match r {
                    Ok(Some((RamItem::MemSize { blocks, .. }, used))) => {
                        let _ = ram_blocks(blocks).count();
                        at += used;
                    }
                    Ok(Some((RamItem::Eos, used))) => {
                        at += used;
                        break;
                    }
                    Ok(Some((_, used))) => at += used,
                    _ => return,
                }
            } else if vfio_ids.contains(&id) {
                let r = decode_vfio_item(rest);
                check("decode_vfio_item", rest.len(), &r);
                match r {
                    Ok(Some((VfioItem::Marker(VfioMarker::EndOfState), used))) => {
                        at += used;
                        break;
                    }
                    Ok(Some((_, used))) => at += used,
                    _ => return,
                }
            } else {
                // Opaque body: skip to this section's footer.
                let mut footer = vec![QEMU_VM_SECTION_FOOTER];
                footer.extend_from_slice(&id.to_be_bytes());
                match rest.windows(5).position(|w| w == footer) {
                    Some(p) => {
                        at += p;
                        break;
                    }
                    None => return,
                }
            }
        }
        let rest = &input[at..];
        let r = decode_footer(rest, id).map(|o| o.map(|n| ((), n)));
        check("decode_footer", rest.len(), &r);
        match r {
            Ok(Some(((), used))) => at += used,
            _ => return,
        }
    }
}

fn drive_rp(input: &[u8]) {
    let mut at = 0;
    while at < input.len() {
        let rest = &input[at..];
        let r = decode_rp_message(rest);
        check("decode_rp_message", rest.len(), &r);
        let Ok(Some((m, used))) = r else { return };
        let mut again = Vec::new();
        m.encode(&mut again);
        assert_eq!(again, &rest[..used]);
        at += used;
    }
}

/// Every decoder at a few arbitrary positions, whatever the bytes are.
fn drive_anywhere(rng: &mut Rng, input: &[u8]) {
    for _ in 0..4 {
        let at = rng.below(input.len() + 1);
        let rest = &input[at..];
        let len = rest.len();
        check("decode_record", len, &decode_record(rest));
        check("decode_ram_item", len, &decode_ram_item(rest, 4096));
        check("decode_vfio_item", len, &decode_vfio_item(rest));
        check("decode_rp_message", len, &decode_rp_message(rest));
        check(
            "decode_packet",
            len,
            &decode_packet(rest, &PacketLimits::default()),
        );
        if let Some(h) = rest.first_chunk::<COMMON_HEADER_LEN>() {
            if let Err(e) = decode_common_header(h) {
                check_err("decode_common_header", len, &e);
            }
        }
        if let Some(h) = rest.first_chunk::<RAM_PACKET_LEN>() {
            if let Err(e) = MultifdRamPacket::decode(h) {
                check_err("MultifdRamPacket::decode", len, &e);
            }
        }
        if let Some(h) = rest.first_chunk::<DEVICE_STATE_HEADER_LEN>() {
            if let Err(e) = DeviceStatePacketHeader::decode(h, 1 << 20) {
                check_err("DeviceStatePacketHeader::decode", len, &e);
            }
        }
        if let Some(h) = rest.first_chunk::<VFIO_HEADER_LEN>() {
            if let Err(e) = VfioDeviceStatePacketHeader::decode(h, 0) {
                check_err("VfioDeviceStatePacketHeader::decode", len, &e);
            }
        }
    }
}

/// Writes the inputs as files and runs `inspect` on them: it must return a report whose
/// error offsets lie within (or, for "file ends here" errors, at the end of) their file.
fn drive_inspect(dir: &std::path::Path, round: u64, inputs: &[&[u8]]) {
    let files: Vec<PathBuf> = inputs
        .iter()
        .enumerate()
        .map(|(i, bytes)| {
            let path = dir.join(format!("in-{round}-{i}.bin"));
            std::fs::write(&path, bytes).unwrap();
            path
        })
        .collect();
    let args = InspectArgs {
        files: files.clone(),
        json: true,
        summary: true,
        uuid: None,
        channels: None,
        max_packet_size: 1 << 16,
    };
    let report = inspect_files(&args).unwrap();
    assert_eq!(report.channels.len(), inputs.len());
    for e in &report.errors {
        let i = files
            .iter()
            .position(|f| f.display().to_string() == e.file)
            .unwrap();
        assert!(
            e.offset <= inputs[i].len() as u64,
            "{e:?} beyond {} bytes",
            inputs[i].len()
        );
    }
    for f in files {
        std::fs::remove_file(f).unwrap();
    }
}

#[test]
fn fuzz_decoders_bounded() {
    let iters = env_u64("FUZZ_ITERS", 4000);
    let seed = env_u64("FUZZ_SEED", 0x5eed_f00d);
    let mut rng = Rng(seed | 1);
    let seeds = [multifd_seed(), main_seed(), rp_seed()];
    // The seeds go through every driver first.
    drive_multifd(&seeds[0]);
    drive_main(&seeds[1]);
    drive_rp(&seeds[2]);
    let dir = std::env::temp_dir().join(format!("vfio-multifd-fuzz-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for round in 0..iters {
        let which = rng.below(4);
        let input = if which == 3 {
            let n = rng.below(2000);
            rng.bytes(n)
        } else {
            let other = &seeds[rng.below(seeds.len())];
            mutate(&mut rng, &seeds[which], other)
        };
        drive_multifd(&input);
        drive_main(&input);
        drive_rp(&input);
        drive_anywhere(&mut rng, &input);
        if round % 10 == 0 {
            // A main channel and a multifd channel side by side, one of them mutated.
            if which == 1 {
                drive_inspect(&dir, round, &[&input, &seeds[0]]);
            } else {
                drive_inspect(&dir, round, &[&seeds[1], &input]);
            }
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn seeds_are_valid_streams_for_inspect() {
    let dir = std::env::temp_dir().join(format!("vfio-multifd-fuzz-seeds-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let main = main_seed();
    let multifd = multifd_seed();
    let files = [dir.join("main.bin"), dir.join("multifd.bin")];
    std::fs::write(&files[0], &main).unwrap();
    std::fs::write(&files[1], &multifd).unwrap();
    let report = inspect_files(&InspectArgs {
        files: files.to_vec(),
        json: true,
        summary: true,
        uuid: Some(UUID),
        channels: Some(2),
        max_packet_size: 1 << 16,
    })
    .unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    // The seed device misses idx 1 on purpose: that is a summary fact, not a stream error.
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert_eq!(report.devices.len(), 1);
    assert_eq!(report.devices[0].missing_idx, vec![1]);
    assert_eq!(report.devices[0].config_idx, Some(3));
    let main = report.channels[0].main.as_ref().unwrap();
    assert_eq!(main.sections.len(), 3);
    assert!(main.eof);
}
