//! Round trips: whatever the encoders write, the decoders give back field for field, using
//! exactly the bytes written; every strict prefix asks for more bytes instead of failing.

// Test helpers unwrap too: a failed step is a failed test (clippy allows it only in #[test] fns).
#![allow(clippy::unwrap_used)]

use proptest::collection::vec;
use proptest::prelude::*;
use vfio_multifd::wire::main_stream::*;
use vfio_multifd::wire::*;
use zerocopy::IntoBytes;

fn idstr() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9:./_-]{1,255}"
}

fn name_bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
    vec(1u8..=255, 1..=max)
}

/// A device-state packet and what decoding must give back.
#[derive(Debug, Clone)]
struct DsPacket {
    idstr: String,
    instance_id: u32,
    idx: u32,
    config: bool,
    data: Vec<u8>,
}

impl DsPacket {
    fn encode(&self, out: &mut Vec<u8>) {
        let id = DeviceId::new(self.idstr.clone(), self.instance_id).unwrap();
        let mut room = [0u8; PACKET_HEADER_ROOM];
        write_packet_headers(
            &mut room,
            &id.idstr_field(),
            self.instance_id,
            self.idx,
            self.config,
            self.data.len() as u32,
        );
        out.extend_from_slice(&room);
        out.extend_from_slice(&self.data);
    }
}

fn ds_packet() -> impl Strategy<Value = DsPacket> {
    (
        idstr(),
        any::<u32>(),
        0..u32::MAX,
        any::<bool>(),
        vec(any::<u8>(), 0..600),
    )
        .prop_map(|(idstr, instance_id, idx, config, data)| DsPacket {
            idstr,
            instance_id,
            idx,
            config,
            data,
        })
}

/// A RAM packet: block name, normal and zero page offsets, and whether it is a SYNC packet.
#[derive(Debug, Clone)]
enum RamOrSync {
    Ram {
        packet_num: u64,
        block: Vec<u8>,
        normal: Vec<u64>,
        zero: Vec<u64>,
    },
    Sync(u64),
}

impl RamOrSync {
    fn encode(&self, out: &mut Vec<u8>) {
        match self {
            RamOrSync::Ram {
                packet_num,
                block,
                normal,
                zero,
            } => {
                let p = MultifdRamPacket::ram(*packet_num, block, normal, zero).unwrap();
                out.extend_from_slice(p.as_bytes());
                for (i, _) in normal.iter().enumerate() {
                    out.extend(std::iter::repeat_n(i as u8, RAM_PAGE_SIZE));
                }
            }
            RamOrSync::Sync(n) => out.extend_from_slice(MultifdRamPacket::sync(*n).as_bytes()),
        }
    }
}

fn ram_or_sync() -> impl Strategy<Value = RamOrSync> {
    prop_oneof![
        any::<u64>().prop_map(RamOrSync::Sync),
        (any::<u64>(), name_bytes(255), 0usize..=8, 0usize..=120).prop_flat_map(
            |(packet_num, block, n_normal, n_zero)| {
                (
                    vec((0u64..1 << 40).prop_map(|p| p * 4096), n_normal),
                    vec((0u64..1 << 40).prop_map(|p| p * 4096), n_zero),
                )
                    .prop_map(move |(normal, zero)| RamOrSync::Ram {
                        packet_num,
                        block: block.clone(),
                        normal,
                        zero,
                    })
            }
        ),
    ]
}

#[derive(Debug, Clone)]
enum AnyPacket {
    Ds(DsPacket),
    Ram(RamOrSync),
}

fn check_decoded(expected: &AnyPacket, got: &MultifdPacket<'_>) {
    match (expected, got) {
        (AnyPacket::Ds(p), MultifdPacket::DeviceState { header, vfio, data }) => {
            assert_eq!(header.idstr, p.idstr.as_bytes());
            assert_eq!(header.instance_id, p.instance_id);
            assert_eq!(header.next_packet_size as usize, p.data.len() + 12);
            assert_eq!(vfio.idx, p.idx);
            assert_eq!(vfio.config, p.config);
            assert_eq!(*data, &p.data[..]);
        }
        (AnyPacket::Ram(RamOrSync::Sync(n)), MultifdPacket::Ram { header, data }) => {
            assert!(header.is_sync());
            assert_eq!(header.packet_num, *n);
            assert!(data.is_empty());
        }
        (
            AnyPacket::Ram(RamOrSync::Ram {
                packet_num,
                block,
                normal,
                zero,
            }),
            MultifdPacket::Ram { header, data },
        ) => {
            assert!(!header.is_sync());
            assert_eq!(header.packet_num, *packet_num);
            assert_eq!(header.ramblock, &block[..]);
            assert_eq!(&header.normal_offsets().collect::<Vec<_>>(), normal);
            assert_eq!(&header.zero_offsets().collect::<Vec<_>>(), zero);
            assert_eq!(data.len(), normal.len() * RAM_PAGE_SIZE);
        }
        _ => panic!("decoded {got:?} for {expected:?}"),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn init_packet_round_trips(
        uuid in any::<[u8; 16]>(),
        (channels, id) in (1u8..=255).prop_flat_map(|n| (Just(n), 0..n)),
    ) {
        let p = MultifdInitPacket::new(uuid, id);
        let bytes: &[u8; 64] = p.as_bytes().try_into().unwrap();
        let expect = InitExpectation { uuid, channels };
        prop_assert_eq!(MultifdInitPacket::decode(bytes, &expect), Ok(id));
        let mut set = ChannelSet::new(expect);
        prop_assert_eq!(set.accept(bytes), Ok(id));
        prop_assert_eq!(set.accept(bytes), Err(WireError::DuplicateChannel { id, offset: 24 }));
        prop_assert_eq!(set.missing().count(), usize::from(channels) - 1);
    }

    #[test]
    fn channel_streams_round_trip(packets in vec(prop_oneof![
        ds_packet().prop_map(AnyPacket::Ds),
        ram_or_sync().prop_map(AnyPacket::Ram),
    ], 1..6)) {
        let mut stream = Vec::new();
        let mut ends = Vec::new();
        for p in &packets {
            match p {
                AnyPacket::Ds(d) => d.encode(&mut stream),
                AnyPacket::Ram(r) => r.encode(&mut stream),
            }
            ends.push(stream.len());
        }
        let limits = PacketLimits::default();
        let mut at = 0;
        for (p, end) in packets.iter().zip(&ends) {
            // Every strict prefix of this packet asks for more bytes.
            for cut in [at, at + 1, at + 12, (at + end) / 2, end - 1] {
                if cut < *end && cut >= at {
                    prop_assert_eq!(decode_packet(&stream[at..cut], &limits), Ok(None));
                }
            }
            let (got, used) = decode_packet(&stream[at..], &limits).unwrap().unwrap();
            prop_assert_eq!(at + used, *end);
            prop_assert_eq!(got.wire_len(), used);
            check_decoded(p, &got);
            at = *end;
        }
    }

    #[test]
    fn device_idx_tracker_accepts_any_order_of_a_complete_stream(
        n in 0u32..40,
        seed in any::<u64>(),
    ) {
        // idx 0..n data, n config, shuffled deterministically.
        let mut order: Vec<u32> = (0..=n).collect();
        let mut s = seed | 1;
        for i in (1..order.len()).rev() {
            s ^= s << 13; s ^= s >> 7; s ^= s << 17;
            order.swap(i, (s % (i as u64 + 1)) as usize);
        }
        let mut t = DeviceIdxTracker::new();
        for (k, idx) in order.iter().enumerate() {
            prop_assert!(!t.complete());
            t.record(VfioHeaderView { idx: *idx, config: *idx == n }, k).unwrap();
        }
        prop_assert!(t.complete());
        prop_assert!(t.missing_ranges().is_empty());
        prop_assert_eq!(t.config_idx(), Some(n));
    }

    #[test]
    fn main_records_round_trip(
        section_id in any::<u32>(),
        idstr in name_bytes(255),
        instance_id in any::<u32>(),
        version_id in any::<u32>(),
        json in vec(any::<u8>(), 0..300),
        machine in vec(any::<u8>(), 0..40),
        page_bits in proptest::option::of(any::<u32>()),
        uuid in proptest::option::of(any::<[u8; 16]>()),
        cmd_data in vec(any::<u8>(), 0..64),
    ) {
        let h = SectionHeader { section_id, idstr: &idstr, instance_id, version_id };
        let config = Configuration { machine: &machine, target_page_bits: page_bits, capabilities: None, uuid };
        let mut records = vec![
            Record::Eof,
            Record::SectionStart(h),
            Record::SectionFull(h),
            Record::SectionPart { section_id },
            Record::SectionEnd { section_id },
            Record::Footer { section_id },
            Record::VmDescription { json: &json },
            Record::Configuration(config),
        ];
        let fixed: Vec<Vec<u8>> = MigCommand::ALL
            .iter()
            .map(|c| match c.expected_len() {
                Some(n) => vec![0xab; usize::from(n)],
                None => cmd_data.clone(),
            })
            .collect();
        for (cmd, data) in MigCommand::ALL.iter().zip(&fixed) {
            records.push(Record::Command { cmd: *cmd, data });
        }
        let mut stream = Vec::new();
        for r in &records {
            let before = stream.len();
            r.encode(&mut stream);
            prop_assert_eq!(stream.len() - before, r.encoded_len());
        }
        // A trailing EOF gives the CONFIGURATION record its look-ahead byte.
        stream.push(QEMU_VM_EOF);
        let mut at = 0;
        for r in &records {
            let (got, used) = decode_record(&stream[at..]).unwrap().unwrap();
            prop_assert_eq!(&got, r);
            prop_assert_eq!(used, r.encoded_len());
            let mut slice = vec![0u8; used];
            prop_assert_eq!(r.encode_to_slice(&mut slice), Ok(used));
            prop_assert_eq!(&slice[..], &stream[at..at + used]);
            at += used;
        }
    }

    #[test]
    fn ram_and_vfio_items_round_trip(
        blocks in vec((name_bytes(255), 1u64..1 << 40), 1..5),
        offset in (0u64..1 << 40).prop_map(|p| p * 4096),
        block in proptest::option::of(name_bytes(255)),
        page in vec(any::<u8>(), 4096),
        xbzrle in vec(any::<u8>(), 0..100),
        vfio_data in vec(any::<u8>(), 0..300),
    ) {
        let mut list = Vec::new();
        let mut total = 0u64;
        for (name, len) in &blocks {
            encode_ram_block(name, len * 4096, &mut list);
            total += len * 4096;
        }
        let block = block.as_deref();
        let items = [
            RamItem::MemSize { total, blocks: &list },
            RamItem::Zero { block, offset },
            RamItem::Page { block, offset, data: &page },
            RamItem::Xbzrle { block, offset, data: &xbzrle },
            RamItem::MultifdFlush,
            RamItem::Eos,
        ];
        let mut stream = Vec::new();
        for item in &items {
            item.encode(&mut stream);
        }
        let mut at = 0;
        for item in &items {
            let (got, used) = decode_ram_item(&stream[at..], 4096).unwrap().unwrap();
            prop_assert_eq!(&got, item);
            prop_assert_eq!(decode_ram_item(&stream[at..at + used - 1], 4096), Ok(None));
            at += used;
        }
        prop_assert_eq!(at, stream.len());
        let RamItem::MemSize { blocks: got, .. } = items[0] else { unreachable!() };
        let decoded: Vec<(Vec<u8>, u64)> = ram_blocks(got).map(|(n, l)| (n.to_vec(), l)).collect();
        let expected: Vec<(Vec<u8>, u64)> = blocks.iter().map(|(n, l)| (n.clone(), l * 4096)).collect();
        prop_assert_eq!(decoded, expected);

        let mut stream = Vec::new();
        let vfio = [
            VfioItem::Marker(VfioMarker::DevSetupState),
            VfioItem::Data(&vfio_data),
            VfioItem::Marker(VfioMarker::DevInitDataSent),
            VfioItem::Marker(VfioMarker::DevConfigState),
            VfioItem::Marker(VfioMarker::DevConfigLoadReady),
            VfioItem::Marker(VfioMarker::EndOfState),
        ];
        for v in &vfio {
            v.encode(&mut stream);
        }
        let mut at = 0;
        for v in &vfio {
            let (got, used) = decode_vfio_item(&stream[at..]).unwrap().unwrap();
            prop_assert_eq!(&got, v);
            at += used;
        }
        prop_assert_eq!(at, stream.len());
    }

    #[test]
    fn return_path_round_trips(value in any::<u32>(), data in vec(any::<u8>(), 0..=512)) {
        let mut stream = Vec::new();
        encode_rp_shut(value, &mut stream);
        encode_rp_pong(value, &mut stream);
        RpMessage::SWITCHOVER_ACK.encode(&mut stream);
        let var = RpMessage { msg_type: RpMessageType::RecvBitmap, data: &data };
        var.encode(&mut stream);
        let (m, used) = decode_rp_message(&stream).unwrap().unwrap();
        prop_assert_eq!((m.msg_type, m.value_u32(), used), (RpMessageType::Shut, Some(value), 8));
        let (m, _) = decode_rp_message(&stream[8..]).unwrap().unwrap();
        prop_assert_eq!((m.msg_type, m.value_u32()), (RpMessageType::Pong, Some(value)));
        prop_assert_eq!(decode_rp_message(&stream[16..]), Ok(Some((RpMessage::SWITCHOVER_ACK, 4))));
        prop_assert_eq!(decode_rp_message(&stream[20..]), Ok(Some((var, 4 + data.len()))));
        prop_assert_eq!(decode_rp_message(&stream[20..stream.len() - 1]), Ok(None));
    }
}
