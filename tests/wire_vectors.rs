//! The test vectors of `../shared/docs/qemu-wire.md` section 9, byte for byte, and every strict
//! error the decoders promise (field, value and offset).

// Test helpers unwrap too: a failed step is a failed test (clippy allows it only in #[test] fns).
#![allow(clippy::unwrap_used)]

use vfio_multifd::wire::main_stream::*;
use vfio_multifd::wire::*;
use zerocopy::IntoBytes;

fn hex(s: &str) -> Vec<u8> {
    let s: String = s.split_whitespace().collect();
    assert_eq!(s.len() % 2, 0, "odd hex string");
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

const UUID: &str = "12345678-9abc-def0-1122-334455667788";

fn uuid() -> [u8; 16] {
    parse_uuid(UUID).unwrap()
}

// ---- vector 1: init packet ------------------------------------------------------------------

#[test]
fn vector1_init_packet_with_uuid_and_default() {
    let packet = MultifdInitPacket::new(uuid(), 2);
    let mut expected =
        hex("11 22 33 44 00 00 00 01 12 34 56 78 9a bc de f0 11 22 33 44 55 66 77 88 02");
    expected.resize(64, 0);
    assert_eq!(packet.as_bytes(), &expected[..]);

    let packet = MultifdInitPacket::new([0; 16], 0);
    let mut expected = hex("11223344 00000001");
    expected.resize(64, 0);
    assert_eq!(packet.as_bytes(), &expected[..]);
}

#[test]
fn init_packets_checked_like_qemu_and_stricter() {
    let expect = InitExpectation {
        uuid: uuid(),
        channels: 3,
    };
    let mut set = ChannelSet::new(expect);
    let p2 = MultifdInitPacket::new(uuid(), 2);
    assert_eq!(set.accept(p2.as_bytes().try_into().unwrap()), Ok(2));
    assert_eq!(set.missing().collect::<Vec<_>>(), vec![0, 1]);
    // Duplicate channel id.
    let err = set.accept(p2.as_bytes().try_into().unwrap()).unwrap_err();
    assert_eq!(err, WireError::DuplicateChannel { id: 2, offset: 24 });
    assert_eq!(err.to_string(), "received id '2' already setup (offset 24)");
    assert_eq!(err.field(), "id");
    // id == N: QEMU lets it through, we do not.
    let p3 = MultifdInitPacket::new(uuid(), 3);
    let err = set.accept(p3.as_bytes().try_into().unwrap()).unwrap_err();
    assert_eq!(
        err,
        WireError::ChannelIdOutOfRange {
            id: 3,
            channels: 3,
            offset: 24
        }
    );
    // uuid mismatch names both uuids.
    let other = MultifdInitPacket::new([0; 16], 0);
    let err = set
        .accept(other.as_bytes().try_into().unwrap())
        .unwrap_err();
    assert_eq!(err.offset(), 8);
    assert_eq!(err.field(), "uuid");
    assert!(err.to_string().contains(UUID), "{err}");
    // Magic and version.
    let mut bytes = p2.as_bytes().to_vec();
    bytes[1] = 0;
    let err = set.accept(bytes[..].try_into().unwrap()).unwrap_err();
    assert_eq!(
        err,
        WireError::BadMagic {
            got: 0x1100_3344,
            offset: 0
        }
    );
    assert_eq!(
        err.to_string(),
        "received packet magic 11003344, expected 11223344 (offset 0)"
    );
    let mut bytes = p2.as_bytes().to_vec();
    bytes[7] = 2;
    let err = set.accept(bytes[..].try_into().unwrap()).unwrap_err();
    assert_eq!(err, WireError::BadVersion { got: 2, offset: 4 });
    // Nothing was recorded by the failures.
    assert_eq!(set.missing().collect::<Vec<_>>(), vec![0, 1]);
}

// ---- vector 2: device-state header ----------------------------------------------------------

fn device_state_packet(idstr: &str, instance: u32, idx: u32, config: bool, data: &[u8]) -> Vec<u8> {
    let id = DeviceId::new(idstr, instance).unwrap();
    let mut room = [0u8; PACKET_HEADER_ROOM];
    write_packet_headers(
        &mut room,
        &id.idstr_field(),
        instance,
        idx,
        config,
        data.len() as u32,
    );
    let mut out = room.to_vec();
    out.extend_from_slice(data);
    out
}

#[test]
fn vector2_device_state_header_and_whole_packet() {
    let data = vec![0x5a; 4084];
    let bytes = device_state_packet("0000:00:02.0/vfio", 0, 0, false, &data);
    assert_eq!(
        &bytes[0..12],
        &hex("11 22 33 44 00 00 00 01 00 00 00 40")[..]
    );
    assert_eq!(
        &bytes[12..29],
        &hex("30 30 30 30 3a 30 30 3a 30 32 2e 30 2f 76 66 69 6f")[..]
    );
    assert!(bytes[29..268].iter().all(|&b| b == 0));
    assert_eq!(&bytes[268..276], &hex("00 00 00 00 00 00 10 00")[..]);
    assert_eq!(bytes.len(), 276 + 4096);

    let limits = PacketLimits::default();
    let (packet, used) = decode_packet(&bytes, &limits).unwrap().unwrap();
    assert_eq!(used, bytes.len());
    assert_eq!(packet.wire_len(), bytes.len());
    let MultifdPacket::DeviceState {
        header,
        vfio,
        data: got,
    } = packet
    else {
        panic!("not a device-state packet: {packet:?}");
    };
    assert_eq!(header.idstr, b"0000:00:02.0/vfio");
    assert_eq!(header.instance_id, 0);
    assert_eq!(header.next_packet_size, 4096);
    assert_eq!(
        vfio,
        VfioHeaderView {
            idx: 0,
            config: false
        }
    );
    assert_eq!(got, &data[..]);
    // Every strict prefix asks for more bytes.
    for cut in [0, 11, 12, 275, 276, 287, 288, bytes.len() - 1] {
        assert_eq!(decode_packet(&bytes[..cut], &limits), Ok(None), "cut {cut}");
    }
}

// ---- vector 3: VFIO payload headers ---------------------------------------------------------

#[test]
fn vector3_vfio_headers_and_config_blob() {
    let mut out = [0u8; VFIO_HEADER_LEN];
    VfioDeviceStatePacketHeader::write(&mut out, 0, false);
    assert_eq!(out.to_vec(), hex("00 00 00 00 00 00 00 00 00 00 00 00"));
    VfioDeviceStatePacketHeader::write(&mut out, 5, true);
    assert_eq!(out.to_vec(), hex("00 00 00 00 00 00 00 05 00 00 00 01"));

    let mut blob = Vec::new();
    VfioMarker::DevConfigState.encode(&mut blob);
    blob.extend_from_slice(b"vmstate");
    VfioMarker::EndOfState.encode(&mut blob);
    assert_eq!(&blob[..8], &hex("ff ff ff ff ef 10 00 02")[..]);
    assert_eq!(&blob[blob.len() - 8..], &hex("ff ff ff ff ef 10 00 01")[..]);
    let bytes = device_state_packet("0000:00:02.0/vfio", 0, 5, true, &blob);
    assert_eq!(
        &bytes[276..288],
        &hex("00 00 00 00 00 00 00 05 00 00 00 01")[..]
    );
    let (packet, _) = decode_packet(&bytes, &PacketLimits::default())
        .unwrap()
        .unwrap();
    let MultifdPacket::DeviceState { vfio, data, .. } = packet else {
        panic!("{packet:?}");
    };
    assert_eq!(
        vfio,
        VfioHeaderView {
            idx: 5,
            config: true
        }
    );
    assert_eq!(
        decode_vfio_item(data),
        Ok(Some((VfioItem::Marker(VfioMarker::DevConfigState), 8)))
    );
}

// ---- vector 4: SYNC packet ------------------------------------------------------------------

#[test]
fn vector4_sync_packet() {
    let mut expected = hex("11 22 33 44 00 00 00 01 00 00 00 01");
    expected.extend_from_slice(&[0; 12]);
    expected.extend_from_slice(&hex("00 00 00 00 00 00 00 07"));
    expected.extend_from_slice(&[0; 1312]);
    assert_eq!(expected.len(), 1344);
    let sync = MultifdRamPacket::sync(7);
    assert_eq!(sync.as_bytes(), &expected[..]);

    let (packet, used) = decode_packet(&expected, &PacketLimits::default())
        .unwrap()
        .unwrap();
    assert_eq!(used, RAM_PACKET_LEN);
    let MultifdPacket::Ram { header, data } = packet else {
        panic!("{packet:?}");
    };
    assert!(header.is_sync());
    assert_eq!(header.packet_num, 7);
    assert_eq!((header.normal_pages, header.zero_pages), (0, 0));
    assert!(data.is_empty());
}

// ---- vector 5: RAM packet -------------------------------------------------------------------

fn vector5_bytes() -> Vec<u8> {
    let mut v = hex(
        "11223344 00000001 00000000 00000080 00000002 00002000 0000000000000005 00000001 00000000",
    );
    v.extend_from_slice(&[0; 8]);
    assert_eq!(v.len(), 48);
    v.extend_from_slice(&[0; 16]);
    v.extend_from_slice(&hex("70 63 2e 72 61 6d"));
    v.extend_from_slice(&[0; 250]);
    assert_eq!(v.len(), 320);
    v.extend_from_slice(&hex("0000000000000000 0000000000001000 0000000000002000"));
    v.extend_from_slice(&[0; 125 * 8]);
    assert_eq!(v.len(), 1344);
    v
}

#[test]
fn vector5_ram_packet() {
    let expected = vector5_bytes();
    let packet = MultifdRamPacket::ram(5, b"pc.ram", &[0, 0x1000], &[0x2000]).unwrap();
    assert_eq!(packet.as_bytes(), &expected[..]);

    let mut stream = expected.clone();
    stream.extend((0..8192u32).map(|i| i as u8));
    let (packet, used) = decode_packet(&stream, &PacketLimits::default())
        .unwrap()
        .unwrap();
    assert_eq!(used, 1344 + 8192);
    let MultifdPacket::Ram { header, data } = packet else {
        panic!("{packet:?}");
    };
    assert!(!header.is_sync());
    assert_eq!(header.packet_num, 5);
    assert_eq!(header.pages_alloc, 128);
    assert_eq!(header.ramblock, b"pc.ram");
    assert_eq!(header.normal_offsets().collect::<Vec<_>>(), vec![0, 0x1000]);
    assert_eq!(header.zero_offsets().collect::<Vec<_>>(), vec![0x2000]);
    assert_eq!(data, &stream[1344..]);
    assert_eq!(
        decode_packet(&stream[..1344 + 8191], &PacketLimits::default()),
        Ok(None)
    );
}

#[test]
fn ram_packet_checks_of_multifd_ram_unfill_packet() {
    let good = vector5_bytes();
    fn decode(b: &[u8]) -> Result<RamPacketView<'_>, WireError> {
        MultifdRamPacket::decode(b.try_into().unwrap())
    }
    let set =
        |b: &mut Vec<u8>, off: usize, v: u32| b[off..off + 4].copy_from_slice(&v.to_be_bytes());

    let mut b = good.clone();
    set(&mut b, 12, 129);
    let err = decode(&b).unwrap_err();
    assert_eq!(
        err,
        WireError::RamPagesAlloc {
            got: 129,
            max: 128,
            offset: 12
        }
    );
    assert_eq!(
        err.to_string(),
        "received packet with 129 pages, expected 128 (offset 12)"
    );
    assert_eq!(err.field(), "pages_alloc");

    let mut b = good.clone();
    set(&mut b, 12, 1);
    assert_eq!(
        decode(&b).unwrap_err(),
        WireError::RamNormalPages {
            got: 2,
            max: 1,
            offset: 16
        }
    );

    let mut b = good.clone();
    set(&mut b, 32, 127);
    let err = decode(&b).unwrap_err();
    assert_eq!(
        err,
        WireError::RamZeroPages {
            got: 127,
            max: 126,
            offset: 32
        }
    );
    assert_eq!(
        err.to_string(),
        "received packet with 127 zero pages, expected maximum 126 (offset 32)"
    );

    let mut b = good.clone();
    set(&mut b, 20, 4096);
    assert_eq!(
        decode(&b).unwrap_err(),
        WireError::RamPayloadSize {
            size: 4096,
            expected: 8192,
            offset: 20
        }
    );

    let mut b = good.clone();
    b[64 + 255] = b'x';
    assert_eq!(
        decode(&b).unwrap_err(),
        WireError::RamUnterminatedBlock { offset: 319 }
    );

    let mut b = good.clone();
    b[64..70].fill(0);
    assert_eq!(
        decode(&b).unwrap_err(),
        WireError::RamMissingBlock { offset: 64 }
    );

    let mut b = good.clone();
    b[320 + 8 + 7] = 1;
    assert_eq!(
        decode(&b).unwrap_err(),
        WireError::RamPageOffset {
            value: 0x1001,
            offset: 328
        }
    );

    let mut b = good.clone();
    b[11] = 0x02;
    let err = decode(&b).unwrap_err();
    assert_eq!(
        err,
        WireError::RamCompressed {
            flags: 2,
            offset: 8
        }
    );
    assert_eq!(
        err.to_string(),
        "flags received 2 flags expected 0 (offset 8)"
    );

    let mut b = good.clone();
    b[10] = 0x01;
    assert_eq!(
        decode(&b).unwrap_err(),
        WireError::UnknownFlags {
            flags: 0x100,
            offset: 8
        }
    );
    // The generic decoder stops at the same error, before awaiting any payload.
    assert_eq!(
        decode_packet(&b[..12], &PacketLimits::default()).unwrap_err(),
        WireError::UnknownFlags {
            flags: 0x100,
            offset: 8
        }
    );
}

// ---- strict device-state errors -------------------------------------------------------------

#[test]
fn device_state_strict_errors_name_field_value_offset() {
    let limits = PacketLimits {
        max_packet_size: 1000,
    };
    let good = device_state_packet("dev/vfio", 3, 1, false, &[1, 2, 3]);

    let mut b = good.clone();
    b[12 + 255] = b'x';
    let err = decode_packet(&b, &limits).unwrap_err();
    assert_eq!(err, WireError::UnterminatedIdstr { offset: 267 - 255 });
    assert_eq!(err.field(), "idstr");
    assert!(err
        .to_string()
        .starts_with("unterminated multifd device state idstr"));

    let mut b = good.clone();
    b[272..276].copy_from_slice(&0u32.to_be_bytes());
    let err = decode_packet(&b, &limits).unwrap_err();
    assert_eq!(err, WireError::EmptyDeviceState { offset: 272 });
    assert_eq!(
        err.to_string(),
        "received empty device state packet (offset 272)"
    );

    let mut b = good.clone();
    b[11] |= 0x01;
    let err = decode_packet(&b, &limits).unwrap_err();
    assert_eq!(err, WireError::SyncDeviceState { offset: 8 });
    assert_eq!(
        err.to_string(),
        "received SYNC device state packet (offset 8)"
    );

    let mut b = good.clone();
    b[272..276].copy_from_slice(&1001u32.to_be_bytes());
    let err = decode_packet(&b[..276], &limits).unwrap_err();
    assert_eq!(
        err,
        WireError::PacketTooLarge {
            size: 1001,
            max: 1000,
            offset: 272
        }
    );
    assert_eq!(err.field(), "next_packet_size");

    let mut b = good.clone();
    b[276..280].copy_from_slice(&1u32.to_be_bytes());
    let err = decode_packet(&b, &limits).unwrap_err();
    assert_eq!(
        err,
        WireError::VfioVersion {
            got: 1,
            offset: 276
        }
    );
    assert_eq!(err.to_string(), "packet has unknown version 1 (offset 276)");

    let mut b = good.clone();
    b[280..284].copy_from_slice(&u32::MAX.to_be_bytes());
    let err = decode_packet(&b, &limits).unwrap_err();
    assert_eq!(err, WireError::InvalidIdx { offset: 280 });
    assert_eq!(err.to_string(), "packet index is invalid (offset 280)");

    let mut b = good.clone();
    b[272..276].copy_from_slice(&11u32.to_be_bytes());
    assert_eq!(
        decode_packet(&b, &limits).unwrap_err(),
        WireError::PacketTooShort {
            size: 11,
            offset: 272
        }
    );
}

#[test]
fn device_idx_tracker_rejects_what_qemu_only_asserts() {
    let data = |idx| VfioHeaderView { idx, config: false };
    let config = |idx| VfioHeaderView { idx, config: true };

    let mut t = DeviceIdxTracker::new();
    t.record(data(0), 280).unwrap();
    t.record(data(2), 1000).unwrap();
    assert_eq!(t.missing_ranges(), vec![(1, 1)]);
    let err = t.record(data(2), 2000).unwrap_err();
    assert_eq!(
        err,
        WireError::DuplicateIdx {
            idx: 2,
            offset: 2000
        }
    );
    assert_eq!(
        err.to_string(),
        "state buffer 2 already filled (offset 2000)"
    );
    // A config packet below a data idx already seen.
    let err = t.record(config(1), 3000).unwrap_err();
    assert_eq!(
        err,
        WireError::IdxAboveConfig {
            idx: 2,
            config_idx: 1,
            offset: 3000
        }
    );
    t.record(config(3), 4000).unwrap();
    assert!(!t.complete());
    assert_eq!(t.config_idx(), Some(3));
    let err = t.record(config(4), 5000).unwrap_err();
    assert_eq!(
        err,
        WireError::SecondConfigPacket {
            idx: 4,
            first: 3,
            offset: 5000
        }
    );
    assert_eq!(err.field(), "idx");
    let err = t.record(data(4), 6000).unwrap_err();
    assert_eq!(
        err,
        WireError::IdxAboveConfig {
            idx: 4,
            config_idx: 3,
            offset: 6000
        }
    );
    t.record(data(1), 7000).unwrap();
    assert!(t.complete());
    assert_eq!(t.packets(), 4);
    assert!(t.missing_ranges().is_empty());
}

// ---- vector 6: main stream ------------------------------------------------------------------

#[test]
fn vector6_main_stream_pieces() {
    let mut out = Vec::new();
    Record::switchover_start().encode(&mut out);
    assert_eq!(out, hex("08 00 0b 00 00"));
    assert_eq!(SWITCHOVER_START.to_vec(), out);
    assert_eq!(
        decode_record(&out),
        Ok(Some((
            Record::Command {
                cmd: MigCommand::SwitchoverStart,
                data: &[]
            },
            5
        )))
    );

    // VFIO dummy EOS at completion.
    let sid = 0x0102_0304;
    let mut out = Vec::new();
    Record::SectionEnd { section_id: sid }.encode(&mut out);
    VfioMarker::EndOfState.encode(&mut out);
    Record::Footer { section_id: sid }.encode(&mut out);
    assert_eq!(out, hex("03 01020304 ff ff ff ff ef 10 00 01 7e 01020304"));
    let (rec, used) = decode_record(&out).unwrap().unwrap();
    assert_eq!((rec, used), (Record::SectionEnd { section_id: sid }, 5));
    assert_eq!(
        decode_vfio_item(&out[5..]),
        Ok(Some((VfioItem::Marker(VfioMarker::EndOfState), 8)))
    );
    assert_eq!(decode_footer(&out[13..], sid), Ok(Some(5)));

    let mut out = Vec::new();
    RpMessage::SWITCHOVER_ACK.encode(&mut out);
    assert_eq!(out, hex("00 07 00 00"));
    assert_eq!(RP_SWITCHOVER_ACK.to_vec(), out);
    assert_eq!(
        decode_rp_message(&out),
        Ok(Some((RpMessage::SWITCHOVER_ACK, 4)))
    );

    let mut out = Vec::new();
    VfioMarker::DevConfigLoadReady.encode(&mut out);
    assert_eq!(out, hex("ff ff ff ff ef 10 00 06"));
}

#[test]
fn main_stream_header_sections_and_commands() {
    let mut out = Vec::new();
    encode_file_header(&mut out);
    assert_eq!(out, hex("51 45 56 4d 00 00 00 03"));
    assert_eq!(decode_file_header(&out), Ok(Some(8)));
    assert_eq!(decode_file_header(&out[..7]), Ok(None));
    let err = decode_file_header(&hex("11 22 33 44 00 00 00 01")).unwrap_err();
    assert_eq!(
        err,
        WireError::NotMigrationStream {
            got: 0x1122_3344,
            offset: 0
        }
    );
    assert_eq!(err.field(), "magic");
    assert_eq!(
        decode_file_header(&hex("51 45 56 4d 00 00 00 02")).unwrap_err(),
        WireError::StreamVersion { got: 2, offset: 4 }
    );

    let h = SectionHeader {
        section_id: 2,
        idstr: b"0000:00:02.0/vfio",
        instance_id: 0,
        version_id: 1,
    };
    let mut out = Vec::new();
    Record::SectionStart(h).encode(&mut out);
    let mut expected = hex("01 00000002 11");
    expected.extend_from_slice(b"0000:00:02.0/vfio");
    expected.extend_from_slice(&hex("00000000 00000001"));
    assert_eq!(out, expected);
    assert_eq!(
        decode_record(&out),
        Ok(Some((Record::SectionStart(h), out.len())))
    );
    out[0] = QEMU_VM_SECTION_FULL;
    assert_eq!(
        decode_record(&out),
        Ok(Some((Record::SectionFull(h), out.len())))
    );
    for cut in 0..out.len() {
        assert_eq!(decode_record(&out[..cut]), Ok(None), "cut {cut}");
    }
    let mut buf = [0u8; 64];
    assert_eq!(
        Record::SectionFull(h).encode_to_slice(&mut buf),
        Ok(out.len())
    );
    assert_eq!(&buf[..out.len()], &out[..]);
    assert!(matches!(
        Record::SectionFull(h).encode_to_slice(&mut buf[..10]),
        Err(WireError::BufferTooSmall { .. })
    ));

    // Strict: unknown record type, unknown command, bad SWITCHOVER_START length, empty idstr.
    let err = decode_record(&[0x09]).unwrap_err();
    assert_eq!(err, WireError::UnknownSectionType { got: 9, offset: 0 });
    assert_eq!(err.to_string(), "Unknown savevm section type 9 (offset 0)");
    let err = decode_record(&hex("08 00 0c 00 00")).unwrap_err();
    assert_eq!(
        err,
        WireError::UnknownCommand {
            cmd: 12,
            len: 0,
            offset: 1
        }
    );
    assert_eq!(err.to_string(), "MIG_CMD 0xc unknown (len 0x0) (offset 1)");
    let err = decode_record(&hex("08 00 0b 00 01 00")).unwrap_err();
    assert_eq!(
        err.to_string(),
        "SWITCHOVER_START received with bad length - expecting 0, got 1 (offset 3)"
    );
    assert_eq!(err.field(), "command length");
    assert_eq!(
        decode_record(&hex("01 00000002 00 00000000 00000001")).unwrap_err(),
        WireError::EmptySectionIdstr { offset: 5 }
    );
    // Every command by number, with its fixed length where it has one.
    for cmd in MigCommand::ALL {
        let data = vec![0u8; usize::from(cmd.expected_len().unwrap_or(3))];
        let mut out = Vec::new();
        Record::Command { cmd, data: &data }.encode(&mut out);
        assert_eq!(&out[1..3], &(cmd as u16).to_be_bytes());
        assert_eq!(
            decode_record(&out),
            Ok(Some((Record::Command { cmd, data: &data }, out.len())))
        );
    }
    assert_eq!(MigCommand::from_u16(0), None);
    assert_eq!(MigCommand::from_u16(3), Some(MigCommand::PostcopyAdvise));

    // Footers.
    assert_eq!(
        decode_footer(&hex("7e 00000003"), 2).unwrap_err(),
        WireError::FooterMismatch {
            expected: 2,
            got: 3,
            offset: 1
        }
    );
    assert_eq!(
        decode_footer(&hex("00"), 2).unwrap_err(),
        WireError::MissingFooter {
            got: 0,
            section_id: 2,
            offset: 0
        }
    );
    assert_eq!(decode_record(&hex("00")), Ok(Some((Record::Eof, 1))));
}

#[test]
fn configuration_section_and_vmdescription() {
    let c = Configuration {
        machine: b"pc-i440fx-10.0",
        target_page_bits: Some(12),
        capabilities: Some((1, b"\x0fx-ignore-shared")),
        uuid: Some(uuid()),
    };
    let mut out = Vec::new();
    Record::Configuration(c).encode(&mut out);
    assert_eq!(&out[..5], &hex("07 0000000e")[..]);
    // One byte of look-ahead is needed after the last subsection.
    assert_eq!(decode_record(&out), Ok(None));
    out.push(QEMU_VM_SECTION_START);
    assert_eq!(
        decode_record(&out),
        Ok(Some((Record::Configuration(c), out.len() - 1)))
    );
    out.truncate(5 + 14 + 2);
    out.extend_from_slice(b"configuration/nope\x00\x00\x00\x01\x00");
    out[5 + 14 + 1] = 18;
    assert!(matches!(
        decode_record(&out),
        Err(WireError::UnknownSubsection { offset: 19, .. })
    ));

    let json = br#"{"page_size":4096}"#;
    let mut out = Vec::new();
    Record::VmDescription { json }.encode(&mut out);
    assert_eq!(
        decode_record(&out),
        Ok(Some((Record::VmDescription { json }, out.len())))
    );
}

#[test]
fn ram_section_items() {
    let mut out = Vec::new();
    encode_ram_word(0x2000, RAM_SAVE_FLAG_MEM_SIZE, &mut out);
    out.push(6);
    out.extend_from_slice(b"pc.ram");
    out.extend_from_slice(&0x1000u64.to_be_bytes());
    out.push(7);
    out.extend_from_slice(b"pc.bios");
    out.extend_from_slice(&0x1000u64.to_be_bytes());
    let (item, used) = decode_ram_item(&out, 4096).unwrap().unwrap();
    assert_eq!(used, out.len());
    let RamItem::MemSize { total, blocks } = item else {
        panic!("{item:?}")
    };
    assert_eq!(total, 0x2000);
    assert_eq!(
        ram_blocks(blocks).collect::<Vec<_>>(),
        vec![(&b"pc.ram"[..], 0x1000), (&b"pc.bios"[..], 0x1000)]
    );
    // A block list that overshoots the total.
    let mut bad = out.clone();
    bad[15..23].copy_from_slice(&0x3000u64.to_be_bytes());
    assert_eq!(
        decode_ram_item(&bad, 4096).unwrap_err(),
        WireError::RamBlockList {
            total: 0x2000,
            offset: 8
        }
    );

    let mut out = Vec::new();
    encode_ram_word(0, RAM_SAVE_FLAG_MULTIFD_FLUSH, &mut out);
    encode_ram_word(0, RAM_SAVE_FLAG_EOS, &mut out);
    assert_eq!(out, hex("0000000000000200 0000000000000010"));
    assert_eq!(
        decode_ram_item(&out, 4096),
        Ok(Some((RamItem::MultifdFlush, 8)))
    );
    assert_eq!(
        decode_ram_item(&out[8..], 4096),
        Ok(Some((RamItem::Eos, 8)))
    );

    let mut out = Vec::new();
    encode_ram_word(
        0x3000,
        RAM_SAVE_FLAG_ZERO | RAM_SAVE_FLAG_CONTINUE,
        &mut out,
    );
    out.push(1);
    assert_eq!(
        decode_ram_item(&out, 4096).unwrap_err(),
        WireError::RamZeroFill {
            value: 1,
            offset: 8
        }
    );
    let err = decode_ram_item(&hex("0000000000000001"), 4096).unwrap_err();
    assert_eq!(
        err,
        WireError::UnknownRamFlags {
            flags: 1,
            offset: 0
        }
    );
    assert_eq!(
        err.to_string(),
        "Unknown combination of migration flags: 0x1 (offset 0)"
    );
}

#[test]
fn return_path_messages() {
    let mut out = Vec::new();
    encode_rp_shut(0, &mut out);
    encode_rp_pong(9, &mut out);
    assert_eq!(out, hex("0001 0004 00000000 0002 0004 00000009"));
    let (m, used) = decode_rp_message(&out).unwrap().unwrap();
    assert_eq!(
        (m.msg_type, m.value_u32(), used),
        (RpMessageType::Shut, Some(0), 8)
    );
    let (m, _) = decode_rp_message(&out[8..]).unwrap().unwrap();
    assert_eq!((m.msg_type, m.value_u32()), (RpMessageType::Pong, Some(9)));
    let err = decode_rp_message(&hex("0008 0000")).unwrap_err();
    assert_eq!(
        err.to_string(),
        "Received invalid message 0x0008 length 0x0000 (offset 0)"
    );
    let err = decode_rp_message(&hex("0007 0001 00")).unwrap_err();
    assert_eq!(
        err.to_string(),
        "Received 'SWITCHOVER_ACK' message (0x0007) with incorrect length 1 expecting 0 (offset 2)"
    );
    assert_eq!(decode_rp_message(&hex("0001 0004 0000")), Ok(None));
}

#[test]
fn errors_shift_to_stream_offsets() {
    let err = WireError::InvalidIdx { offset: 280 }.shifted(1000);
    assert_eq!(err.offset(), 1280);
    assert_eq!(err.to_string(), "packet index is invalid (offset 1280)");
}
