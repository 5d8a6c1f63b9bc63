//! Simulated devices through their real fds: memfd, pipe and FUSE data_fds read and written
//! with plain read()/write(), as the data plane will.

#![allow(clippy::unwrap_used)] // test helpers outside #[test] fns

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::time::{Duration, Instant};

use vfio_multifd_vfio::planner::{classify_read, ReadOutcome};
use vfio_multifd_vfio::sim::fault::{fuse_available, Fault};
use vfio_multifd_vfio::sim::{config_blob, fill};
use vfio_multifd_vfio::{
    sim_pair, DeviceSpeed, MigState, MigrationDevice, MigrationFlags, Owner, PlanError, SimSink,
    SimSource, SimSpec, StreamMismatch, VfioError,
};

const MIB: u64 = 1 << 20;

/// Reads `fd` until EOF (or `limit` bytes) with `buf_size` reads; returns (bytes, largest read).
fn read_to_end(file: &mut File, buf_size: usize, mut sink: impl FnMut(&[u8])) -> (u64, usize) {
    let mut buf = vec![0u8; buf_size];
    let mut total = 0u64;
    let mut largest = 0;
    loop {
        let n = file.read(&mut buf).unwrap();
        if n == 0 {
            return (total, largest);
        }
        largest = largest.max(n);
        total += n as u64;
        sink(&buf[..n]);
    }
}

fn start_save(src: &mut SimSource, target: MigState) -> File {
    File::from(src.set_state(target).unwrap().expect("a saving data_fd"))
}

fn start_load(sink: &mut SimSink) -> File {
    sink.set_state(MigState::Stop).unwrap();
    File::from(
        sink.set_state(MigState::Resuming)
            .unwrap()
            .expect("a resuming data_fd"),
    )
}

/// Moves a whole STOP_COPY stream from `src` to `sink`; returns the bytes moved.
fn migrate(src: &mut SimSource, sink: &mut SimSink, buf_size: usize) -> u64 {
    let mut out = start_save(src, MigState::StopCopy);
    let mut inp = start_load(sink);
    let (n, _) = read_to_end(&mut out, buf_size, |b| inp.write_all(b).unwrap());
    drop(inp);
    src.set_state(MigState::Stop).unwrap();
    n
}

#[test]
fn memfd_pair_moves_every_byte() {
    for size in [8 * MIB, 8 * MIB + 13, 1] {
        let spec = SimSpec::new(size, 42);
        let (mut src, mut sink) = sim_pair("dev0", spec).unwrap();
        assert_eq!(src.state().unwrap(), MigState::Running);
        assert_eq!(
            src.migration_flags().unwrap(),
            MigrationFlags::STOP_COPY | MigrationFlags::P2P
        );
        assert_eq!(src.stop_copy_size().unwrap(), size);
        let moved = migrate(&mut src, &mut sink, 1 << 20);
        assert_eq!(moved, size);
        sink.set_state(MigState::Stop).unwrap();
        assert_eq!(sink.loaded_bytes(), Some(size));
        sink.set_state(MigState::Running).unwrap();
        src.set_state(MigState::Running).unwrap();
    }
}

#[test]
fn memfd_source_reads_are_whole_and_end_with_zero() {
    let spec = SimSpec::new(3 * MIB + 5, 7);
    let mut src = SimSource::new("d", spec).unwrap();
    let mut f = start_save(&mut src, MigState::StopCopy);
    let mut buf = vec![0u8; 1 << 20];
    assert_eq!(
        f.read(&mut buf).unwrap(),
        1 << 20,
        "a memfd read returns all it asks for"
    );
    let (rest, _) = read_to_end(&mut f, 1 << 20, |_| {});
    assert_eq!(rest + MIB, spec.size);
    assert_eq!(f.read(&mut buf).unwrap(), 0);
    assert_eq!(classify_read(MigState::StopCopy, Ok(0)), ReadOutcome::Eof);
    // A second session (after a cancel) streams the same content again.
    src.set_state(MigState::Running).unwrap();
    let mut f = start_save(&mut src, MigState::StopCopy);
    let mut first = [0u8; 64];
    f.read_exact(&mut first).unwrap();
    let mut want = [0u8; 64];
    fill(7, 0, &mut want);
    assert_eq!(first, want);
}

#[test]
fn sink_fails_resuming_to_stop_on_missing_extra_or_corrupt_data() {
    let paced = SimSpec {
        speed: Some(DeviceSpeed {
            save_bytes_per_sec: 0,
            load_bytes_per_sec: 1024 * MIB,
            per_read_latency: Duration::ZERO,
        }),
        ..SimSpec::new(2 * MIB, 9)
    };
    for spec in [SimSpec::new(2 * MIB, 9), paced] {
        sink_rejects_missing_extra_or_corrupt_data(spec);
    }
}

/// Bytes an unpaced sink's memfd takes past the device's size before its writes fail.
const SINK_SLACK: u64 = 4096;

fn sink_rejects_missing_extra_or_corrupt_data(spec: SimSpec) {
    let paced = spec.speed.is_some();
    let mut stream = vec![0u8; spec.size as usize];
    fill(spec.seed, 0, &mut stream);
    let cases: Vec<(&str, Vec<u8>, StreamMismatch)> = vec![
        (
            "missing",
            stream[..stream.len() - 100].to_vec(),
            StreamMismatch::Missing {
                missing: 100,
                got: spec.size - 100,
                expected: spec.size,
            },
        ),
        (
            "extra",
            [stream.as_slice(), &[0u8; 3]].concat(),
            StreamMismatch::Extra {
                extra: 3,
                expected: spec.size,
            },
        ),
        (
            "far too much",
            [stream.as_slice(), &vec![0u8; 300_000]].concat(),
            // A paced sink counts and drops what is past the device's size; an unpaced one's
            // writes fail a page past it (below), so it counts only that page.
            StreamMismatch::Extra {
                extra: if paced { 300_000 } else { SINK_SLACK },
                expected: spec.size,
            },
        ),
        (
            "corrupt",
            {
                let mut s = stream.clone();
                s[1_000_003] ^= 1;
                s
            },
            StreamMismatch::Corrupt { offset: 1_000_003 },
        ),
    ];
    for (what, data, want) in cases {
        let mut sink = SimSink::new("sink-dev", spec).unwrap();
        let mut f = start_load(&mut sink);
        match f.write_all(&data) {
            Err(e) if what == "far too much" && !paced => {
                assert_eq!(e.raw_os_error(), Some(libc::EPERM), "{e}");
            }
            other => other.unwrap(),
        }
        drop(f);
        let err = sink.set_state(MigState::Stop).unwrap_err();
        match &err {
            VfioError::LoadRejected {
                device,
                now,
                source,
            } => {
                assert_eq!(device, "sink-dev");
                assert_eq!(*now, MigState::Error);
                assert_eq!(*source, want, "{what}, paced: {:?}", spec.speed);
            }
            other => panic!("{what}: unexpected {other:?}"),
        }
        let msg = err.to_string();
        assert!(
            msg.contains("sink-dev") && msg.contains("RESUMING -> STOP"),
            "{msg}"
        );
        let cause = std::error::Error::source(&err).unwrap().to_string();
        assert!(
            cause.contains(match what {
                "corrupt" => "offset 1000003",
                "missing" => "100 bytes missing",
                "far too much" if paced => "300000 extra bytes",
                "far too much" => "4096 extra bytes",
                _ => "3 extra bytes",
            }),
            "{cause}"
        );
        // ERROR: no SET; the helper owns the sink, so RESET recovers it.
        assert_eq!(sink.state().unwrap(), MigState::Error);
        assert!(matches!(
            sink.set_state(MigState::Running),
            Err(VfioError::Plan {
                source: PlanError::FromError,
                ..
            })
        ));
        sink.reset().unwrap();
        assert_eq!(sink.state().unwrap(), MigState::Running);
        assert_eq!(sink.loaded_bytes(), None);
    }
}

/// A source that never stops sending costs an unpaced sink at most a page past the device's
/// size (tmpfs pages do not show in RSS, so the file itself is measured), and the load fails.
#[test]
fn unpaced_sink_memory_stays_bounded_under_an_endless_stream() {
    let spec = SimSpec::new(MIB + 13, 19);
    let mut sink = SimSink::new("endless", spec).unwrap();
    let mut f = start_load(&mut sink);
    let mut buf = vec![0u8; 1 << 20];
    let mut accepted = 0u64;
    let err = loop {
        fill(spec.seed, accepted, &mut buf);
        match f.write(&buf) {
            Ok(n) => {
                accepted += n as u64;
                assert!(accepted <= 64 * MIB, "a 1 MiB device took {accepted} bytes");
            }
            Err(e) => break e,
        }
    };
    assert_eq!(err.raw_os_error(), Some(libc::EPERM), "{err}");
    // tmpfs takes whole pages under the bound: between the size and a page past it.
    assert!(
        accepted > spec.size && accepted <= spec.size + SINK_SLACK,
        "accepted {accepted}"
    );
    use std::os::unix::fs::MetadataExt;
    let meta = f.metadata().unwrap();
    assert_eq!(meta.len(), spec.size + SINK_SLACK);
    assert!(
        meta.blocks() * 512 <= spec.size + 2 * SINK_SLACK,
        "{} bytes allocated",
        meta.blocks() * 512
    );
    drop(f);
    match sink.set_state(MigState::Stop).unwrap_err() {
        VfioError::LoadRejected { source, .. } => assert_eq!(
            source,
            StreamMismatch::Extra {
                extra: accepted - spec.size,
                expected: spec.size
            }
        ),
        other => panic!("unexpected {other:?}"),
    }
}

/// A paced sink reports when the device consumed its last byte: after the helper's last write
/// returned (that write only filled the sink's pipe), and about size / rate after the start.
#[test]
fn paced_sink_reports_when_its_last_byte_was_consumed() {
    let rate = 32 * MIB;
    let spec = SimSpec {
        speed: Some(DeviceSpeed {
            save_bytes_per_sec: 0,
            load_bytes_per_sec: rate,
            per_read_latency: Duration::ZERO,
        }),
        ..SimSpec::new(4 * MIB, 23)
    };
    let mut stream = vec![0u8; spec.size as usize];
    fill(spec.seed, 0, &mut stream);
    let mut sink = SimSink::new("drained", spec).unwrap();
    let mut f = start_load(&mut sink);
    let start = monotonic_ns();
    f.write_all(&stream).unwrap();
    let written = monotonic_ns();
    drop(f);
    sink.set_state(MigState::Stop).unwrap();
    let consumed = sink
        .load_done_ns()
        .expect("a paced sink says when it loaded");
    assert_eq!(sink.load_done_ns(), Some(consumed));
    // 4 MiB at 32 MiB/s: 125 ms; the pipe (up to 1 MiB, 31 ms) was still full at the write.
    assert!(
        consumed > written,
        "consumed {consumed} <= written {written}"
    );
    assert!(
        consumed - start >= 110_000_000,
        "loaded after {} ns",
        consumed - start
    );
    // An unpaced sink's writes are its load.
    let mut sink = SimSink::new(
        "drained",
        SimSpec {
            speed: None,
            ..spec
        },
    )
    .unwrap();
    let mut f = start_load(&mut sink);
    f.write_all(&stream).unwrap();
    drop(f);
    sink.set_state(MigState::Stop).unwrap();
    assert_eq!(sink.load_done_ns(), None);
}

fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: the kernel writes one timespec into `ts`, which lives across the call.
    let ret = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    assert_eq!(ret, 0);
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// A sink with a load speed takes the stream at its pace into held pipes (a memfd where the
/// pipes cannot be had) and checks it on RESUMING -> STOP: every byte still counts.
#[test]
fn paced_sink_accepts_the_stream_and_rejects_a_corrupt_one() {
    let spec = SimSpec {
        speed: Some(DeviceSpeed {
            save_bytes_per_sec: 0,
            load_bytes_per_sec: 256 * MIB,
            per_read_latency: Duration::ZERO,
        }),
        ..SimSpec::new(3 * MIB + 17, 4)
    };
    let mut stream = vec![0u8; spec.size as usize];
    fill(spec.seed, 0, &mut stream);
    let mut sink = SimSink::new("paced-sink", spec).unwrap();
    let mut f = start_load(&mut sink);
    f.write_all(&stream).unwrap();
    drop(f);
    sink.set_state(MigState::Stop).unwrap();
    assert_eq!(sink.loaded_bytes(), Some(spec.size));

    stream[2 * MIB as usize + 5] ^= 0x40;
    let mut sink = SimSink::new("paced-sink", spec).unwrap();
    let mut f = start_load(&mut sink);
    f.write_all(&stream).unwrap();
    drop(f);
    match sink.set_state(MigState::Stop).unwrap_err() {
        VfioError::LoadRejected { source, .. } => assert_eq!(
            source,
            StreamMismatch::Corrupt {
                offset: 2 * MIB + 5
            }
        ),
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn vmm_owned_sim_is_not_reset() {
    let spec = SimSpec::new(4096, 1);
    let mut sink = SimSink::new("vmm-sink", spec)
        .unwrap()
        .with_owner(Owner::Vmm);
    let f = start_load(&mut sink);
    drop(f);
    assert!(sink.set_state(MigState::Stop).is_err());
    let err = sink.reset().unwrap_err();
    assert!(matches!(err, VfioError::NotOwner { .. }), "{err}");
    assert_eq!(sink.state().unwrap(), MigState::Error);
}

#[test]
fn precopy_then_stop_copy_on_the_same_fd() {
    let spec = SimSpec {
        size: 4 * MIB,
        seed: 5,
        precopy_initial: MIB,
        precopy_dirty: 256 << 10,
        ..SimSpec::default()
    };
    let (mut src, mut sink) = sim_pair("pre", spec).unwrap();
    assert!(src
        .migration_flags()
        .unwrap()
        .contains(MigrationFlags::PRE_COPY));
    let mut out = start_save(&mut src, MigState::PreCopy);
    let info = src.precopy_info().unwrap();
    assert_eq!((info.initial_bytes, info.dirty_bytes), (MIB, 256 << 10));
    let mut inp = start_load(&mut sink);
    let mut buf = vec![0u8; 512 << 10];
    let n = out.read(&mut buf).unwrap();
    assert_eq!(n, 512 << 10);
    inp.write_all(&buf[..n]).unwrap();
    let info = src.precopy_info().unwrap();
    assert_eq!(
        (info.initial_bytes, info.dirty_bytes),
        (MIB - n as u64, 256 << 10)
    );
    // Drain the precopy part: it ends with 0, which in PRE_COPY means "drained for now".
    let (pre, _) = read_to_end(&mut out, 1 << 20, |b| inp.write_all(b).unwrap());
    assert_eq!(pre + n as u64, spec.precopy_total());
    assert_eq!(
        classify_read(MigState::PreCopy, Ok(0)),
        ReadOutcome::Drained
    );
    let info = src.precopy_info().unwrap();
    assert_eq!((info.initial_bytes, info.dirty_bytes), (0, 0));
    assert_eq!(out.read(&mut buf).unwrap(), 0, "still drained");
    assert_eq!(
        src.stop_copy_size().unwrap(),
        spec.size - spec.precopy_total()
    );
    // STOP_COPY: no new fd, the same one continues to the end.
    assert!(src.set_state(MigState::StopCopy).unwrap().is_none());
    assert!(src.precopy_info().is_err());
    let (rest, _) = read_to_end(&mut out, 1 << 20, |b| inp.write_all(b).unwrap());
    assert_eq!(rest, spec.size - spec.precopy_total());
    drop(inp);
    sink.set_state(MigState::Stop).unwrap();
    assert_eq!(sink.loaded_bytes(), Some(spec.size));
}

#[test]
fn undrained_or_skipped_precopy_still_gives_the_whole_stream() {
    let spec = SimSpec {
        size: 3 * MIB + 77,
        seed: 11,
        precopy_initial: MIB + 3,
        precopy_dirty: 0,
        ..SimSpec::default()
    };
    // Half the precopy part, then STOP_COPY.
    let (mut src, mut sink) = sim_pair("half", spec).unwrap();
    let mut out = start_save(&mut src, MigState::PreCopy);
    let mut inp = start_load(&mut sink);
    let mut buf = vec![0u8; 300_000];
    let n = out.read(&mut buf).unwrap();
    inp.write_all(&buf[..n]).unwrap();
    assert!(src.set_state(MigState::StopCopy).unwrap().is_none());
    let (rest, _) = read_to_end(&mut out, 1 << 20, |b| inp.write_all(b).unwrap());
    assert_eq!(rest + n as u64, spec.size);
    drop(inp);
    sink.set_state(MigState::Stop).unwrap();
    // Straight to STOP_COPY on a precopy-capable device.
    let (mut src, mut sink) = sim_pair("skip", spec).unwrap();
    assert_eq!(migrate(&mut src, &mut sink, 1 << 20), spec.size);
    sink.set_state(MigState::Stop).unwrap();
}

#[test]
fn paced_source_and_sink_take_about_the_modelled_time() {
    let rate = 64 * MIB;
    let spec = SimSpec {
        size: 16 * MIB,
        seed: 3,
        speed: Some(DeviceSpeed {
            save_bytes_per_sec: rate,
            load_bytes_per_sec: 0,
            per_read_latency: Duration::ZERO,
        }),
        ..SimSpec::default()
    };
    let mut src = SimSource::new("slow", spec).unwrap();
    let mut sink = SimSink::new("fast", spec).unwrap(); // load unpaced: memfd
    let t = Instant::now();
    let mut out = start_save(&mut src, MigState::StopCopy);
    let mut inp = start_load(&mut sink);
    let (n, largest) = read_to_end(&mut out, 1 << 20, |b| inp.write_all(b).unwrap());
    let took = t.elapsed();
    assert_eq!(n, spec.size);
    assert!(
        largest <= 1 << 20,
        "pipe reads return at most what is buffered"
    );
    // 16 MiB at 64 MiB/s = 250 ms; generous bounds.
    assert!(took >= Duration::from_millis(180), "too fast: {took:?}");
    assert!(took < Duration::from_secs(10), "too slow: {took:?}");
    drop(inp);
    sink.set_state(MigState::Stop).unwrap();
    assert_eq!(sink.loaded_bytes(), Some(spec.size));

    // Paced sink: the load is not done until the device consumed it all.
    let spec = SimSpec {
        speed: Some(DeviceSpeed {
            save_bytes_per_sec: 0,
            load_bytes_per_sec: rate,
            per_read_latency: Duration::ZERO,
        }),
        ..spec
    };
    let (mut src, mut sink) = sim_pair("slow-load", spec).unwrap();
    let t = Instant::now();
    migrate(&mut src, &mut sink, 1 << 20);
    sink.set_state(MigState::Stop).unwrap();
    let took = t.elapsed();
    assert!(took >= Duration::from_millis(180), "too fast: {took:?}");
    assert!(took < Duration::from_secs(10), "too slow: {took:?}");
    assert_eq!(sink.loaded_bytes(), Some(spec.size));
}

/// 8 chunks of 1 MiB at 25 ms each: about 200 ms, on whichever side has the latency.
#[test]
fn per_read_latency_adds_up_on_the_source_and_on_the_sink() {
    let unpaced = SimSpec::new(8 * MIB, 4);
    let slow = SimSpec {
        speed: Some(DeviceSpeed {
            save_bytes_per_sec: 0,
            load_bytes_per_sec: 0,
            per_read_latency: Duration::from_millis(25),
        }),
        ..unpaced
    };
    for (side, src_spec, sink_spec) in [("source", slow, unpaced), ("sink", unpaced, slow)] {
        let mut src = SimSource::new("lat", src_spec).unwrap();
        let mut sink = SimSink::new("lat", sink_spec).unwrap();
        let t = Instant::now();
        assert_eq!(migrate(&mut src, &mut sink, 1 << 20), unpaced.size);
        sink.set_state(MigState::Stop).unwrap();
        let took = t.elapsed();
        assert!(
            took >= Duration::from_millis(190),
            "{side}: too fast: {took:?}"
        );
        assert!(
            took < Duration::from_millis(600),
            "{side}: too slow: {took:?}"
        );
        assert_eq!(sink.loaded_bytes(), Some(unpaced.size));
    }
}

#[test]
fn paced_precopy_device_follows_precopy_info() {
    let spec = SimSpec {
        size: 4 * MIB,
        seed: 8,
        precopy_initial: MIB,
        precopy_dirty: 0,
        speed: Some(DeviceSpeed {
            save_bytes_per_sec: 256 * MIB,
            load_bytes_per_sec: 256 * MIB,
            per_read_latency: Duration::ZERO,
        }),
        ..SimSpec::default()
    };
    let (mut src, mut sink) = sim_pair("paced-pre", spec).unwrap();
    let mut out = start_save(&mut src, MigState::PreCopy);
    let mut inp = start_load(&mut sink);
    let mut buf = vec![0u8; 1 << 20];
    let mut pre = 0u64;
    while src.precopy_info().unwrap().pending() > 0 {
        let n = out.read(&mut buf).unwrap();
        assert!(n > 0);
        pre += n as u64;
        inp.write_all(&buf[..n]).unwrap();
    }
    assert_eq!(pre, MIB);
    src.set_state(MigState::StopCopy).unwrap();
    let (rest, _) = read_to_end(&mut out, 1 << 20, |b| inp.write_all(b).unwrap());
    assert_eq!(pre + rest, spec.size);
    drop(inp);
    sink.set_state(MigState::Stop).unwrap();
}

#[test]
fn config_blob_is_qemu_shaped_and_checked() {
    let spec = SimSpec {
        config_len: 100,
        ..SimSpec::new(4096, 77)
    };
    let blob = config_blob(&spec);
    assert_eq!(blob.len(), 116);
    assert_eq!(blob[..8], 0xffff_ffff_ef10_0002u64.to_be_bytes());
    assert_eq!(blob[108..], 0xffff_ffff_ef10_0001u64.to_be_bytes());
    assert_eq!(config_blob(&spec), blob, "deterministic");
    assert_ne!(config_blob(&SimSpec { seed: 78, ..spec }), blob);
    let (src, sink) = sim_pair("cfg", spec).unwrap();
    assert_eq!(src.config_blob(), blob);
    sink.verify_config(&blob).unwrap();
    let mut bad = blob.clone();
    bad[50] ^= 0xff;
    let err = sink.verify_config(&bad).unwrap_err();
    assert!(matches!(
        err,
        VfioError::ConfigRejected {
            source: StreamMismatch::Corrupt { offset: 50 },
            ..
        }
    ));
    assert!(matches!(
        sink.verify_config(&blob[..100]),
        Err(VfioError::ConfigRejected {
            source: StreamMismatch::Missing { missing: 16, .. },
            ..
        })
    ));
}

#[test]
fn states_and_plans_on_sim_devices() {
    let spec = SimSpec {
        precopy_initial: 4096,
        ..SimSpec::new(MIB, 2)
    };
    let mut src = SimSource::new("sm", spec).unwrap();
    assert!(matches!(
        src.set_state(MigState::Error),
        Err(VfioError::Plan {
            source: PlanError::ErrorRequested,
            ..
        })
    ));
    let _fd = src.set_state(MigState::PreCopy).unwrap().unwrap();
    assert!(matches!(
        src.set_state(MigState::Stop),
        Err(VfioError::Plan {
            source: PlanError::EndsSavingSession { .. },
            ..
        })
    ));
    assert_eq!(src.state().unwrap(), MigState::PreCopy);
    assert!(src.set_state(MigState::PreCopyP2p).unwrap().is_none());
    assert!(src.set_state(MigState::StopCopy).unwrap().is_none());
    assert!(matches!(
        src.set_state(MigState::PreCopy),
        Err(VfioError::Plan {
            source: PlanError::BackToPrecopy { .. },
            ..
        })
    ));
    // A source does not resume and a sink does not save: the arc fails, the state is kept.
    src.set_state(MigState::Stop).unwrap();
    let err = src.set_state(MigState::Resuming).unwrap_err();
    assert_eq!(err.state_after(), Some(MigState::Stop));
    let mut sink = SimSink::new("sm", spec).unwrap();
    assert!(sink.set_state(MigState::StopCopy).is_err());
    assert!(matches!(
        SimSource::new(
            "bad",
            SimSpec {
                precopy_initial: 2 * MIB,
                ..spec
            }
        ),
        Err(VfioError::InvalidSpec { .. })
    ));
}

#[test]
fn generation_of_a_large_device_is_fast_enough() {
    let spec = SimSpec::new(256 * MIB, 99);
    let t = Instant::now();
    let (mut src, mut sink) = sim_pair("big", spec).unwrap();
    let generated = t.elapsed();
    let t = Instant::now();
    assert_eq!(migrate(&mut src, &mut sink, 1 << 20), spec.size);
    sink.set_state(MigState::Stop).unwrap();
    let moved = t.elapsed();
    eprintln!("256 MiB: generated in {generated:?}, moved and verified in {moved:?}");
    assert_eq!(sink.loaded_bytes(), Some(spec.size));
    // Generous (a loaded 2-core VM does each in under 2 s): a regression to a byte-at-a-time
    // generator or verifier takes tens of seconds.
    assert!(
        generated < Duration::from_secs(10),
        "generation took {generated:?}"
    );
    assert!(
        moved < Duration::from_secs(15),
        "move and verify took {moved:?}"
    );
}

// ---- fault devices ----

fn pipe_fault_source(fault: Fault, size: u64) -> (SimSource, File) {
    let spec = SimSpec::new(size, 21);
    let mut src = SimSource::with_fault("fault", spec, fault).unwrap();
    let f = start_save(&mut src, MigState::StopCopy);
    (src, f)
}

#[test]
fn short_reads_fault() {
    let (_src, mut f) = pipe_fault_source(Fault::ShortReads { max: 4096 }, 512 << 10);
    let mut sink = SimSink::new("fault", SimSpec::new(512 << 10, 21)).unwrap();
    let mut inp = start_load(&mut sink);
    let (n, largest) = read_to_end(&mut f, 1 << 20, |b| inp.write_all(b).unwrap());
    assert_eq!(n, 512 << 10);
    assert!(largest <= 4096, "read of {largest} bytes");
    drop(inp);
    sink.set_state(MigState::Stop).unwrap();
}

#[test]
fn end_early_fault_is_rejected_by_the_sink() {
    let (_src, mut f) = pipe_fault_source(Fault::EndEarly { at: 300_001 }, MIB);
    let mut sink = SimSink::new("fault", SimSpec::new(MIB, 21)).unwrap();
    let mut inp = start_load(&mut sink);
    let (n, _) = read_to_end(&mut f, 1 << 20, |b| inp.write_all(b).unwrap());
    assert_eq!(n, 300_001);
    drop(inp);
    let err = sink.set_state(MigState::Stop).unwrap_err();
    assert!(matches!(
        err,
        VfioError::LoadRejected {
            source: StreamMismatch::Missing { got: 300_001, .. },
            ..
        }
    ));
}

#[test]
fn stall_fault_pauses_the_stream() {
    let (_src, mut f) = pipe_fault_source(
        Fault::Stall {
            at: 100_000,
            duration: Duration::from_millis(300),
        },
        MIB,
    );
    let mut buf = vec![0u8; 1 << 20];
    let mut got = 0u64;
    let mut longest = Duration::ZERO;
    loop {
        let t = Instant::now();
        let n = f.read(&mut buf).unwrap();
        longest = longest.max(t.elapsed());
        if n == 0 {
            break;
        }
        got += n as u64;
    }
    assert_eq!(got, MIB);
    assert!(
        longest >= Duration::from_millis(250),
        "longest read {longest:?}"
    );

    // A stalling sink holds the writer back.
    let spec = SimSpec::new(4 * MIB, 21);
    let mut sink = SimSink::with_fault(
        "stall-sink",
        spec,
        Fault::Stall {
            at: 0,
            duration: Duration::from_millis(300),
        },
    )
    .unwrap();
    let mut src = SimSource::new("stall-sink", spec).unwrap();
    let t = Instant::now();
    migrate(&mut src, &mut sink, 1 << 20);
    sink.set_state(MigState::Stop).unwrap();
    assert!(t.elapsed() >= Duration::from_millis(250));
}

fn fuse_or_skip() -> bool {
    match fuse_available() {
        Ok(()) => true,
        Err(e) => {
            eprintln!(
                "SKIP: FUSE fault devices unavailable here: {e} ({:?})",
                std::error::Error::source(&e)
            );
            false
        }
    }
}

#[test]
fn errno_fault_on_read_at_the_chosen_offset() {
    if !fuse_or_skip() {
        return;
    }
    for (at, errno) in [
        (1_500_000u64, libc::EIO),
        (0, libc::ENODEV),
        (4096, libc::EFAULT),
    ] {
        let spec = SimSpec::new(4 * MIB, 31);
        let mut src = SimSource::with_fault("eio", spec, Fault::Errno { at, errno }).unwrap();
        let mut f = start_save(&mut src, MigState::StopCopy);
        let mut buf = vec![0u8; 1 << 20];
        let mut got = Vec::new();
        let err = loop {
            match f.read(&mut buf) {
                Ok(0) => panic!("EOF before the fault"),
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) => break e,
            }
        };
        assert_eq!(err.raw_os_error(), Some(errno));
        assert_eq!(got.len() as u64, at, "bytes before the fault");
        let mut want = vec![0u8; got.len()];
        fill(31, 0, &mut want);
        assert!(got == want, "content before the fault");
        // The error sticks, like a disabled data_fd.
        assert_eq!(f.read(&mut buf).unwrap_err().raw_os_error(), Some(errno));
        // pread on a data_fd: ESPIPE, as on a real one.
        use std::os::unix::fs::FileExt;
        assert_eq!(
            f.read_at(&mut buf, 0).unwrap_err().raw_os_error(),
            Some(libc::ESPIPE)
        );
        drop(f);
        src.set_state(MigState::Stop).unwrap();
    }
}

#[test]
fn errno_fault_on_write_at_the_chosen_offset() {
    if !fuse_or_skip() {
        return;
    }
    let spec = SimSpec::new(4 * MIB, 32);
    let mut sink = SimSink::with_fault(
        "enomem-sink",
        spec,
        Fault::Errno {
            at: 2 * MIB + 10,
            errno: libc::ENOMEM,
        },
    )
    .unwrap();
    let mut f = start_load(&mut sink);
    let mut data = vec![0u8; 1 << 20];
    let mut written = 0u64;
    let err = loop {
        fill(32, written, &mut data);
        match f.write(&data) {
            Ok(n) => written += n as u64,
            Err(e) => break e,
        }
    };
    assert_eq!(err.raw_os_error(), Some(libc::ENOMEM));
    assert_eq!(written, 2 * MIB + 10);
    drop(f);
    let err = sink.set_state(MigState::Stop).unwrap_err();
    assert!(matches!(
        err,
        VfioError::LoadRejected {
            source: StreamMismatch::Missing { .. },
            ..
        }
    ));
}

#[test]
fn fuse_precopy_device_reports_enomsg_when_drained() {
    if !fuse_or_skip() {
        return;
    }
    let spec = SimSpec {
        precopy_initial: 10_000,
        ..SimSpec::new(MIB, 33)
    };
    let mut src = SimSource::with_fault(
        "mlx5-like",
        spec,
        Fault::Errno {
            at: MIB - 1,
            errno: libc::EIO,
        },
    )
    .unwrap();
    let mut f = start_save(&mut src, MigState::PreCopy);
    let mut buf = vec![0u8; 1 << 20];
    assert_eq!(f.read(&mut buf).unwrap(), 10_000);
    assert_eq!(src.precopy_info().unwrap().pending(), 0);
    let e = f.read(&mut buf).unwrap_err().raw_os_error().unwrap();
    assert_eq!(
        classify_read(MigState::PreCopy, Err(e)),
        ReadOutcome::Drained
    );
    src.set_state(MigState::StopCopy).unwrap();
    let mut rest = 0;
    let err = loop {
        match f.read(&mut buf) {
            Ok(n) => rest += n,
            Err(e) => break e,
        }
    };
    assert_eq!(10_000 + rest as u64, MIB - 1);
    assert_eq!(err.raw_os_error(), Some(libc::EIO));
}

#[test]
fn dropping_a_fuse_device_does_not_hang_a_reader() {
    if !fuse_or_skip() {
        return;
    }
    let spec = SimSpec::new(MIB, 34);
    let mut src = SimSource::with_fault(
        "drop",
        spec,
        Fault::Errno {
            at: 10,
            errno: libc::EIO,
        },
    )
    .unwrap();
    let fd: OwnedFd = src.set_state(MigState::StopCopy).unwrap().unwrap();
    drop(src);
    let mut f = File::from(fd);
    let mut buf = [0u8; 64];
    // The connection is gone: an error (ENOTCONN), not a hang.
    assert!(f.read(&mut buf).is_err());
}

#[test]
fn parallel_verification_reports_the_first_bad_byte() {
    let spec = SimSpec::new(96 * MIB, 12);
    let mut sink = SimSink::new("big-sink", spec).unwrap();
    let mut f = start_load(&mut sink);
    let mut buf = vec![0u8; 1 << 20];
    for i in 0..96u64 {
        fill(spec.seed, i * MIB, &mut buf);
        if i == 70 || i == 80 {
            buf[12345] ^= 0x80;
        }
        f.write_all(&buf).unwrap();
    }
    drop(f);
    let err = sink.set_state(MigState::Stop).unwrap_err();
    assert!(
        matches!(
            err,
            VfioError::LoadRejected {
                source: StreamMismatch::Corrupt { offset },
                ..
            } if offset == 70 * MIB + 12345
        ),
        "{err:?}"
    );
}

#[test]
fn cancelled_sessions_restart_the_stream() {
    let spec = SimSpec {
        precopy_initial: 64 << 10,
        ..SimSpec::new(MIB, 14)
    };
    let mut src = SimSource::new("again", spec).unwrap();
    for round in 0..3 {
        let mut f = start_save(&mut src, MigState::PreCopy);
        let mut buf = vec![0u8; 10_000];
        f.read_exact(&mut buf).unwrap();
        let mut want = vec![0u8; 10_000];
        fill(14, 0, &mut want);
        assert!(buf == want, "round {round}");
        if round < 2 {
            src.set_state(MigState::Running).unwrap(); // cancel
        } else {
            src.set_state(MigState::StopCopy).unwrap();
            let (rest, _) = read_to_end(&mut f, 1 << 20, |_| {});
            assert_eq!(rest + 10_000, spec.size);
        }
    }
    // After a completed session the next one regenerates the image.
    src.set_state(MigState::Stop).unwrap();
    src.set_state(MigState::Running).unwrap();
    let mut sink = SimSink::new("again", spec).unwrap();
    assert_eq!(migrate(&mut src, &mut sink, 1 << 20), spec.size);
    sink.set_state(MigState::Stop).unwrap();
}

#[test]
fn a_paced_source_hands_its_image_to_the_next_session() {
    let spec = SimSpec {
        size: 4 * MIB,
        seed: 15,
        precopy_initial: MIB,
        speed: Some(DeviceSpeed {
            save_bytes_per_sec: 512 * MIB,
            load_bytes_per_sec: 0,
            per_read_latency: Duration::ZERO,
        }),
        ..SimSpec::default()
    };
    let mut src = SimSource::new("paced-again", spec).unwrap();
    // A whole session, a cancelled one, and a whole one again: every stream the sink checks
    // comes from the image the first session handed back.
    for round in 0..3 {
        let mut sink = SimSink::new("paced-again", spec).unwrap();
        if round == 1 {
            let mut f = start_save(&mut src, MigState::PreCopy);
            let mut buf = vec![0u8; 10_000];
            f.read_exact(&mut buf).unwrap();
            src.set_state(MigState::Running).unwrap();
            continue;
        }
        assert_eq!(
            migrate(&mut src, &mut sink, 1 << 20),
            spec.size,
            "round {round}"
        );
        sink.set_state(MigState::Stop).unwrap();
        assert_eq!(sink.loaded_bytes(), Some(spec.size), "round {round}");
        src.set_state(MigState::Stop).unwrap();
        src.set_state(MigState::Running).unwrap();
    }
}
