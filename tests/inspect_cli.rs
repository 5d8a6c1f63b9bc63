//! `vfio-multifd inspect` on synthetic captures written by our encoders: the listing, the
//! summaries, the `--json` keys, and errors that name the field and the byte offset.

// Test helpers unwrap too: a failed step is a failed test (clippy allows it only in #[test] fns).
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::process::{Command, Output};

use serde_json::{json, Value};
use vfio_multifd::wire::main_stream::*;
use vfio_multifd::wire::*;
use zerocopy::IntoBytes;

const UUID: [u8; 16] = [0x11; 16];

struct Dir(PathBuf);

impl Dir {
    fn new(tag: &str) -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        let dir = std::env::temp_dir().join(format!(
            "vfio-multifd-inspect-{tag}-{}-{nanos}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
    fn write(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let p = self.0.join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn inspect(args: &[&str], files: &[PathBuf]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vfio-multifd"))
        .arg("inspect")
        .args(args)
        .args(files)
        .output()
        .unwrap()
}

fn inspect_json(files: &[PathBuf]) -> (i32, Value, String) {
    let out = inspect(&["--json"], files);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let v: Value = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("{e}: {stdout}\n{}", String::from_utf8_lossy(&out.stderr)));
    (
        out.status.code().unwrap(),
        v,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A multifd channel: init packet, then the packets, each returned with its offset.
struct Channel {
    bytes: Vec<u8>,
    offsets: Vec<usize>,
}

impl Channel {
    fn new(id: u8, uuid: [u8; 16]) -> Self {
        Self {
            bytes: MultifdInitPacket::new(uuid, id).as_bytes().to_vec(),
            offsets: Vec::new(),
        }
    }
    fn device(mut self, idstr: &str, instance: u32, idx: u32, config: bool, len: usize) -> Self {
        self.offsets.push(self.bytes.len());
        let id = DeviceId::new(idstr, instance).unwrap();
        let mut room = [0u8; PACKET_HEADER_ROOM];
        write_packet_headers(
            &mut room,
            &id.idstr_field(),
            instance,
            idx,
            config,
            len as u32,
        );
        self.bytes.extend_from_slice(&room);
        self.bytes.extend((0..len).map(|i| (i * 7) as u8));
        self
    }
    fn ram(mut self, packet_num: u64, normal: &[u64], zero: &[u64]) -> Self {
        self.offsets.push(self.bytes.len());
        let p = MultifdRamPacket::ram(packet_num, b"pc.ram", normal, zero).unwrap();
        self.bytes.extend_from_slice(p.as_bytes());
        self.bytes
            .extend(std::iter::repeat_n(0x3c, normal.len() * RAM_PAGE_SIZE));
        self
    }
    fn sync(mut self, packet_num: u64) -> Self {
        self.offsets.push(self.bytes.len());
        self.bytes
            .extend_from_slice(MultifdRamPacket::sync(packet_num).as_bytes());
        self
    }
}

/// A main channel as a standalone sender writes it, plus a VFIO device's sections.
fn main_channel() -> Vec<u8> {
    let mut s = Vec::new();
    encode_file_header(&mut s);
    let vfio = SectionHeader {
        section_id: 0,
        idstr: b"0000:00:02.0/vfio",
        instance_id: 0,
        version_id: 1,
    };
    Record::SectionStart(vfio).encode(&mut s);
    VfioMarker::DevSetupState.encode(&mut s);
    VfioMarker::EndOfState.encode(&mut s);
    Record::Footer { section_id: 0 }.encode(&mut s);
    Record::switchover_start().encode(&mut s);
    Record::SectionEnd { section_id: 0 }.encode(&mut s);
    VfioMarker::EndOfState.encode(&mut s);
    Record::Footer { section_id: 0 }.encode(&mut s);
    Record::SectionFull(vfio).encode(&mut s);
    VfioMarker::EndOfState.encode(&mut s);
    Record::Footer { section_id: 0 }.encode(&mut s);
    Record::Eof.encode(&mut s);
    s
}

const DEV: &str = "0000:00:02.0/vfio";

#[test]
fn clean_capture_lists_and_summarises_in_text_and_json() {
    let dir = Dir::new("clean");
    let ch0 = Channel::new(0, UUID)
        .device(DEV, 0, 0, false, 100)
        .ram(0, &[0, 0x1000], &[0x2000])
        .device(DEV, 0, 2, false, 50)
        .sync(1)
        .device("other/vfio", 3, 0, false, 10);
    let ch1 = Channel::new(1, UUID)
        .device(DEV, 0, 1, false, 70)
        .device(DEV, 0, 3, true, 20)
        .device("other/vfio", 3, 1, true, 5);
    let files = vec![
        dir.write("main.bin", &main_channel()),
        dir.write("ch1.bin", &ch1.bytes),
        dir.write("ch0.bin", &ch0.bytes),
    ];
    let (code, v, stderr) = inspect_json(&files);
    assert_eq!(code, 0, "{v}\n{stderr}");
    assert_eq!(v["errors"], json!([]));
    let channels = v["channels"].as_array().unwrap();
    assert_eq!(channels.len(), 3);
    for c in channels {
        for key in [
            "file",
            "kind",
            "channel_id",
            "uuid",
            "bytes",
            "packets",
            "sync_packets",
            "ram_packets",
            "ram_normal_pages",
            "ram_zero_pages",
            "device_state_packets",
        ] {
            assert!(c.get(key).is_some(), "{key} missing in {c}");
        }
    }
    assert_eq!(channels[0]["kind"], "main");
    assert_eq!(channels[0]["channel_id"], Value::Null);
    assert_eq!(channels[0]["bytes"], main_channel().len());
    let main = &channels[0]["main"];
    assert_eq!(main["commands"], json!({"SWITCHOVER_START": 1}));
    assert_eq!(main["sections"][0]["start"], 1);
    assert_eq!(main["sections"][0]["end"], 1);
    assert_eq!(main["sections"][0]["full"], 1);
    assert_eq!(main["vfio_markers"], 4);
    assert_eq!(main["eof"], true);

    let c0 = &channels[2];
    assert_eq!(c0["kind"], "multifd");
    assert_eq!(c0["channel_id"], 0);
    assert_eq!(c0["uuid"], fmt_uuid(&UUID));
    assert_eq!(c0["bytes"], ch0.bytes.len());
    assert_eq!(c0["packets"], 5);
    assert_eq!(c0["sync_packets"], 1);
    assert_eq!(c0["ram_packets"], 1);
    assert_eq!(c0["ram_normal_pages"], 2);
    assert_eq!(c0["ram_zero_pages"], 1);
    assert_eq!(c0["device_state_packets"], 3);
    assert_eq!(channels[1]["channel_id"], 1);

    let devices = v["devices"].as_array().unwrap();
    assert_eq!(devices.len(), 2);
    let d = &devices[0];
    assert_eq!(d["idstr"], DEV);
    assert_eq!(d["instance_id"], 0);
    assert_eq!(d["packets"], 4);
    assert_eq!(d["data_bytes"], 100 + 50 + 70 + 20);
    assert_eq!(d["config_idx"], 3);
    assert_eq!(d["missing_idx"], json!([]));
    assert_eq!(d["duplicate_idx"], json!([]));
    assert_eq!(d["complete"], true);
    assert_eq!(d["channels"], json!([1, 0]));
    assert_eq!(devices[1]["idstr"], "other/vfio");
    assert_eq!(devices[1]["instance_id"], 3);
    assert_eq!(devices[1]["config_idx"], 1);

    let out = inspect(&[], &files);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    let ram_at = ch0.offsets[1];
    for expected in [
        "main channel".to_owned(),
        "@8 SECTION_START 0 \"0000:00:02.0/vfio\" instance 0 version 1".to_owned(),
        "vfio: DEV_SETUP_STATE, END_OF_STATE".to_owned(),
        "COMMAND SWITCHOVER_START".to_owned(),
        format!("multifd channel 0, uuid {}", fmt_uuid(&UUID)),
        format!("@{ram_at} RAM packet_num 0 block \"pc.ram\": 2 normal, 1 zero pages, 8192 bytes"),
        "SYNC packet_num 1".to_owned(),
        "idx 3 (config), 20 data bytes".to_owned(),
        "device \"0000:00:02.0/vfio\" instance 0: 4 packets, 240 data bytes, config idx 3, missing idx none".to_owned(),
        "0 errors".to_owned(),
    ] {
        assert!(text.contains(&expected), "{expected:?} not in\n{text}");
    }
    let summary = inspect(&["--summary"], &files);
    let summary = String::from_utf8_lossy(&summary.stdout);
    assert!(!summary.contains("SYNC packet_num"), "{summary}");
    assert!(summary.contains("summary: 5 packets"), "{summary}");
}

#[test]
fn gaps_duplicates_and_config_order_are_reported() {
    let dir = Dir::new("gaps");
    let ch0 = Channel::new(0, UUID)
        .device(DEV, 0, 0, false, 10)
        .device(DEV, 0, 0, false, 10)
        .device(DEV, 0, 2, false, 10)
        .device(DEV, 0, 5, true, 10)
        .device(DEV, 0, 6, false, 10)
        .device(DEV, 0, 7, true, 10);
    let files = vec![dir.write("ch0.bin", &ch0.bytes)];
    let (code, v, stderr) = inspect_json(&files);
    assert_eq!(code, 1);
    let d = &v["devices"][0];
    assert_eq!(d["packets"], 6);
    assert_eq!(d["config_idx"], 5);
    assert_eq!(d["missing_idx"], json!([1, 3, 4]));
    assert_eq!(d["missing_idx_count"], 3);
    assert_eq!(d["duplicate_idx"], json!([0]));
    assert_eq!(d["complete"], false);
    let errors = v["errors"].as_array().unwrap();
    let idx_at = |p: usize| (ch0.offsets[p] + 280) as u64;
    assert_eq!(errors.len(), 3, "{errors:?}");
    assert_eq!(errors[0]["offset"], idx_at(1));
    assert_eq!(errors[0]["field"], "idx");
    let context = format!("channel 0, device {DEV:?} instance 0: ");
    assert_eq!(
        errors[0]["message"],
        format!(
            "{context}state buffer 0 already filled (offset {})",
            idx_at(1)
        )
    );
    assert_eq!(errors[1]["offset"], idx_at(4));
    assert!(errors[1]["message"].as_str().unwrap().starts_with(&format!(
        "{context}packet idx 6 is above the config packet idx 5"
    )));
    assert_eq!(errors[2]["offset"], idx_at(5));
    assert!(errors[2]["message"]
        .as_str()
        .unwrap()
        .starts_with(&format!("{context}second config packet idx 7")));
    assert!(
        stderr.contains(&format!(
            "offset {}: idx: {context}state buffer 0",
            idx_at(1)
        )),
        "{stderr}"
    );
}

#[test]
fn truncated_final_packet_is_reported_as_such() {
    let dir = Dir::new("trunc");
    let ch = Channel::new(0, UUID)
        .device(DEV, 0, 0, false, 100)
        .device(DEV, 0, 1, true, 100);
    let cut = ch.bytes.len() - 30;
    let files = vec![dir.write("ch.bin", &ch.bytes[..cut])];
    let (code, v, _) = inspect_json(&files);
    assert_eq!(code, 1);
    assert_eq!(v["channels"][0]["truncated"], true);
    assert_eq!(v["channels"][0]["device_state_packets"], 1);
    let errors = v["errors"].as_array().unwrap();
    assert_eq!(errors.len(), 1);
    let at = ch.offsets[1];
    assert_eq!(errors[0]["offset"], at as u64);
    assert_eq!(errors[0]["field"], "final packet");
    assert_eq!(
        errors[0]["message"],
        format!("truncated final packet: needs 388 bytes, only 358 left (offset {at})")
    );
    // A cut at a packet boundary is a clean end.
    let files = vec![dir.write("clean.bin", &ch.bytes[..ch.offsets[1]])];
    let (code, v, _) = inspect_json(&files);
    assert_eq!(code, 0, "{v}");
    assert_eq!(v["channels"][0]["truncated"], false);
}

#[test]
fn one_corrupted_byte_names_field_and_offset() {
    let dir = Dir::new("corrupt");
    let ch = Channel::new(0, UUID)
        .device(DEV, 0, 0, false, 64)
        .device(DEV, 0, 1, true, 64);
    let cases: [(usize, u8, &str, usize, &str); 6] = [
        // (byte, value, field, error offset, message start)
        (
            ch.offsets[1] + 276 + 3,
            1,
            "vfio version",
            ch.offsets[1] + 276,
            "packet has unknown version 1",
        ),
        (
            ch.offsets[1] + 1,
            0,
            "magic",
            ch.offsets[1],
            "received packet magic 11003344",
        ),
        (
            ch.offsets[0] + 11,
            0x41,
            "flags",
            ch.offsets[0] + 8,
            "received SYNC device state packet",
        ),
        (
            ch.offsets[0] + 12 + 255,
            b'x',
            "idstr",
            ch.offsets[0] + 12,
            "unterminated multifd device state idstr",
        ),
        (
            ch.offsets[0] + 272,
            0x10,
            "next_packet_size",
            ch.offsets[0] + 272,
            "next_packet_size 268435532 is above the maximum",
        ),
        (
            24,
            5,
            "id",
            24,
            "received channel id 5 is out of range: 1 channels",
        ),
    ];
    for (byte, value, field, offset, message) in cases {
        let mut bytes = ch.bytes.clone();
        bytes[byte] = value;
        let files = vec![dir.write("bad.bin", &bytes)];
        let (code, v, stderr) = inspect_json(&files);
        assert_eq!(code, 1, "{v}");
        let e = &v["errors"][0];
        assert_eq!(e["field"], field, "{v}");
        assert_eq!(e["offset"], offset as u64, "{v}");
        let text = e["message"].as_str().unwrap();
        // A packet's error names its channel, and its device once the header names one.
        let context = match field {
            "id" => String::new(),
            "vfio version" | "next_packet_size" => {
                format!("channel 0, device {DEV:?} instance 0: ")
            }
            _ => "channel 0: ".to_owned(),
        };
        assert!(text.starts_with(&format!("{context}{message}")), "{v}");
        assert!(
            stderr.contains(&format!("offset {offset}: {field}: {context}{message}")),
            "{stderr}"
        );
    }

    // The main channel too.
    let mut main = main_channel();
    let switchover = main.windows(5).position(|w| w == SWITCHOVER_START).unwrap();
    main[switchover + 4] = 1;
    let files = vec![dir.write("main.bin", &main)];
    let (code, v, _) = inspect_json(&files);
    assert_eq!(code, 1);
    assert_eq!(v["errors"][0]["offset"], (switchover + 3) as u64);
    assert_eq!(v["errors"][0]["field"], "command length");
    assert!(v["errors"][0]["message"]
        .as_str()
        .unwrap()
        .starts_with("SWITCHOVER_START received with bad length - expecting 0, got 1"));
}

#[test]
fn channel_set_errors_across_files() {
    let dir = Dir::new("chset");
    let mut other = UUID;
    other[0] = 0x22;
    let files = vec![
        dir.write("a.bin", &Channel::new(0, UUID).bytes),
        dir.write("b.bin", &Channel::new(0, UUID).bytes),
        dir.write("c.bin", &Channel::new(1, other).bytes),
    ];
    let (code, v, _) = inspect_json(&files);
    assert_eq!(code, 1);
    let errors = v["errors"].as_array().unwrap();
    assert_eq!(errors.len(), 2, "{errors:?}");
    assert_eq!(errors[0]["file"], files[1].display().to_string());
    assert_eq!(errors[0]["offset"], 24);
    assert_eq!(
        errors[0]["message"],
        "received id '0' already setup (offset 24)"
    );
    assert_eq!(errors[1]["file"], files[2].display().to_string());
    assert_eq!(errors[1]["offset"], 8);
    assert_eq!(errors[1]["field"], "uuid");
    // --uuid and --channels override what the files imply.
    let out = inspect(
        &["--json", "--channels", "1", "--uuid", &fmt_uuid(&other)],
        &files[2..],
    );
    assert_eq!(out.status.code(), Some(1));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["errors"][0]["field"], "id");
}

#[test]
fn unreadable_file_and_bad_arguments_exit_2() {
    let out = inspect(&[], &[PathBuf::from("/nonexistent/capture.bin")]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("opening /nonexistent/capture.bin"),
        "{stderr}"
    );
    // A bad argument, with a file that decodes cleanly: the argument is what fails.
    let dir = Dir::new("bad-args");
    let clean = dir.write("ch.bin", &Channel::new(0, UUID).bytes);
    let out = inspect(&[], std::slice::from_ref(&clean));
    assert_eq!(out.status.code(), Some(0));
    for uuid in [
        "nope",
        "----123456789abcdef01122334455667788",
        "+2345678-9abc-def0-1122-334455667788",
    ] {
        let arg = format!("--uuid={uuid}");
        let out = inspect(&[&arg], std::slice::from_ref(&clean));
        assert_eq!(out.status.code(), Some(2), "{uuid}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("is not a uuid"), "{uuid}: {stderr}");
    }
}

/// The main channel our standalone source really writes: CONFIGURATION, the setup description
/// early (before any device data), a precopy part ended by DEV_INIT_DATA_SENT as QEMU's
/// `vfio_save_iterate` ends it with switchover-ack, then switchover and completion.
#[test]
fn our_standalone_main_channel_with_precopy_decodes_without_errors() {
    use vfio_multifd::session::main_channel::{
        encode_completion, encode_init_data_sent, encode_setup, encode_switchover_start,
        frame_precopy_part, Setup, PRECOPY_HEAD, PRECOPY_TAIL,
    };
    let setup = Setup {
        uuid: [7; 16],
        channels: 2,
        chunk: 1 << 20,
        devices: vec![
            vfio_multifd::wire::DeviceId::new(DEV.to_owned(), 0).unwrap(),
            vfio_multifd::wire::DeviceId::new("0000:00:03.0/vfio".to_owned(), 0).unwrap(),
        ],
        precopy: vec![1],
    };
    let mut s = encode_setup(&setup).unwrap();
    let mut part = vec![0u8; PRECOPY_HEAD + 5 + PRECOPY_TAIL];
    part[PRECOPY_HEAD..PRECOPY_HEAD + 5].copy_from_slice(b"hello");
    s.extend_from_slice(frame_precopy_part(1, &mut part, 5));
    s.extend(encode_init_data_sent(1));
    s.extend(encode_switchover_start());
    s.extend(encode_completion(2));
    let dir = Dir::new("standalone");
    let file = dir.write("main.bin", &s);
    let (code, v, stderr) = inspect_json(std::slice::from_ref(&file));
    assert_eq!(code, 0, "{v}\n{stderr}");
    assert_eq!(v["errors"], json!([]));
    assert_eq!(v["channels"][0]["main"]["eof"], true, "{v}");
    let text = inspect(&[], &[file]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("DEV_INIT_DATA_SENT"), "{text}");
}

/// Runs inspect with its address space capped at `limit_mib`, so that a capture that makes it
/// buffer more than that fails the test instead of passing on a big machine.
fn inspect_with_memory_limit(limit_mib: u64, args: &[&str], files: &[PathBuf]) -> Output {
    let script = format!(
        "ulimit -v {} && exec \"$0\" inspect \"$@\"",
        limit_mib * 1024
    );
    Command::new("sh")
        .arg("-c")
        .arg(&script)
        .arg(env!("CARGO_BIN_EXE_vfio-multifd"))
        .args(args)
        .args(files)
        .output()
        .unwrap()
}

#[test]
fn a_length_field_past_any_item_is_reported_without_reading_the_file_into_memory() {
    let dir = Dir::new("huge-length");
    let mut s = Vec::new();
    encode_file_header(&mut s);
    Record::Eof.encode(&mut s);
    let at = s.len();
    // A VMDESCRIPTION claiming 4 GiB of JSON, in a 3 GiB (sparse) file.
    s.push(0x06);
    s.extend_from_slice(&0xffff_fff0u32.to_be_bytes());
    let path = dir.write("main.bin", &s);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(3 << 30)
        .unwrap();

    let out = inspect_with_memory_limit(512, &["--json"], std::slice::from_ref(&path));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let errors = v["errors"].as_array().unwrap();
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(errors[0]["offset"], at as u64);
    assert_eq!(errors[0]["field"], "length");
    assert!(
        errors[0]["message"]
            .as_str()
            .unwrap()
            .starts_with("item longer than "),
        "{errors:?}"
    );
}

#[test]
fn errors_past_the_listed_thousand_are_counted_and_duplicates_are_all_counted() {
    let dir = Dir::new("many-errors");
    let repeats = 1500;
    let mut ch = Channel::new(0, UUID);
    for _ in 0..repeats {
        ch = ch.device(DEV, 0, 0, false, 1);
    }
    ch = ch.device(DEV, 0, 1, true, 1);
    let files = vec![dir.write("ch0.bin", &ch.bytes)];
    let (code, v, stderr) = inspect_json(&files);
    assert_eq!(code, 1);
    let errors = v["errors"].as_array().unwrap();
    assert_eq!(errors.len(), 1000);
    assert_eq!(v["errors_not_listed"], repeats - 1 - 1000);
    let d = &v["devices"][0];
    assert_eq!(d["duplicate_idx_count"], repeats - 1);
    assert_eq!(d["duplicate_idx"].as_array().unwrap().len(), repeats - 1);
    assert_eq!(d["complete"], false);
    assert!(
        stderr.ends_with(&format!(
            "error: {} more errors, not listed\n",
            repeats - 1 - 1000
        )),
        "{}",
        &stderr[stderr.len().saturating_sub(300)..]
    );

    let text = inspect(&["--summary"], &files);
    let stdout = String::from_utf8_lossy(&text.stdout);
    assert!(
        stdout.contains(&format!(
            "duplicate idx {} [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]",
            repeats - 1
        )),
        "{stdout}"
    );
    assert!(stdout.contains(&format!(
        "{} device state packets, {} errors",
        repeats + 1,
        repeats - 1
    )));
    assert!(!stdout.contains("@"), "--summary lists no packet");
}

/// A device body full of `7e <section id>` followed by CONFIGURATION look-alikes with a forged
/// capabilities count: each candidate footer is judged on its first byte, so the walk stays
/// linear (it was quadratic: 8 MiB took 35 s).
#[test]
fn footer_look_alikes_in_a_body_are_rejected_in_linear_time() {
    let dir = Dir::new("look-alikes");
    let mut s = Vec::new();
    encode_file_header(&mut s);
    Record::SectionFull(SectionHeader {
        section_id: 5,
        idstr: b"timer",
        instance_id: 0,
        version_id: 1,
    })
    .encode(&mut s);
    let mut candidate = vec![QEMU_VM_SECTION_FOOTER];
    candidate.extend_from_slice(&5u32.to_be_bytes());
    candidate.push(QEMU_VM_CONFIGURATION);
    candidate.extend_from_slice(&0u32.to_be_bytes());
    candidate.push(QEMU_VM_SUBSECTION);
    candidate.push(26);
    candidate.extend_from_slice(b"configuration/capabilities");
    candidate.extend_from_slice(&1u32.to_be_bytes());
    candidate.extend_from_slice(&u32::MAX.to_be_bytes());
    while s.len() < 16 << 20 {
        s.extend_from_slice(&candidate);
    }
    let path = dir.write("main.bin", &s);
    let started = std::time::Instant::now();
    let (code, v, _) = inspect_json(std::slice::from_ref(&path));
    assert!(
        started.elapsed() < std::time::Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(code, 1);
    assert_eq!(v["errors"][0]["field"], "section footer", "{v}");

    // The same record at the top level is refused at its count.
    let mut s = Vec::new();
    encode_file_header(&mut s);
    s.extend_from_slice(&candidate[5..]);
    let (code, v, _) = inspect_json(&[dir.write("config.bin", &s)]);
    assert_eq!(code, 1);
    assert_eq!(v["errors"][0]["field"], "caps_count", "{v}");
}

/// Millions of tiny records (commands, VFIO markers) cost counters, not memory: under a
/// 256 MiB address-space limit inspect decodes 8 M of each (it used to keep a string for each:
/// about 14 bytes of memory per byte of capture).
#[test]
fn millions_of_commands_and_markers_keep_memory_bounded() {
    let dir = Dir::new("many-records");
    const N: usize = 8 << 20;
    let mut commands = Vec::with_capacity(N * 5 + 16);
    encode_file_header(&mut commands);
    for _ in 0..N {
        commands.extend_from_slice(&[QEMU_VM_COMMAND, 0, 1, 0, 0]); // OPEN_RETURN_PATH
    }
    Record::Eof.encode(&mut commands);
    let mut markers = Vec::with_capacity(N * 8 + 64);
    encode_file_header(&mut markers);
    Record::SectionStart(SectionHeader {
        section_id: 1,
        idstr: b"a/vfio",
        instance_id: 0,
        version_id: 1,
    })
    .encode(&mut markers);
    for _ in 0..N {
        VfioMarker::DevSetupState.encode(&mut markers);
    }
    VfioMarker::EndOfState.encode(&mut markers);
    Record::Footer { section_id: 1 }.encode(&mut markers);
    Record::Eof.encode(&mut markers);
    let files = [
        dir.write("commands.bin", &commands),
        dir.write("markers.bin", &markers),
    ];
    drop((commands, markers));
    for file in &files {
        let out = inspect_with_memory_limit(256, &["--json"], std::slice::from_ref(file));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{}: {stderr}", file.display());
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        let main = &v["channels"][0]["main"];
        if file.ends_with("commands.bin") {
            assert_eq!(main["commands"]["OPEN_RETURN_PATH"], N as u64, "{main}");
        } else {
            assert_eq!(main["vfio_markers"], N as u64 + 1, "{main}");
        }
    }
    // The listing names the first markers and counts the rest.
    let out = inspect_with_memory_limit(256, &[], &files[1..]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("{} more, END_OF_STATE", N - 64)),
        "{}",
        &text[..text.len().min(2000)]
    );
}
