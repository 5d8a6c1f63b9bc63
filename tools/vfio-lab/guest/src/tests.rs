//! The lab tests. Each one opens both mdevs through our vfio layer, brings them to RUNNING
//! with empty FIFOs, runs, and closes them again, so tests run alone or in any order (and a
//! later test can hand the mdevs to helper processes: a group has one opener at a time).

use std::io::Write;

use vfio::device::VfioDevice;

use crate::dev::{self, End, MigState, MigrationDevice, MigrationFlags};
use crate::error::{ensure, Context, LabError, Result};
use crate::mtty::{self, Regs};
use crate::Lab;

/// One guest test: `run` returns the PASS detail.
pub struct Test {
    pub name: &'static str,
    pub about: &'static str,
    pub run: fn(&Lab) -> Result<String>,
}

/// Every guest test, in the default order.
pub const TESTS: &[Test] = &[
    Test {
        name: "stop-copy",
        about: "save A in STOP_COPY, resume into B, registers equal",
        run: stop_copy,
    },
    Test {
        name: "pre-copy",
        about: "PRE_COPY with PRECOPY_INFO, then STOP_COPY on the same data_fd, B into A",
        run: pre_copy,
    },
    Test {
        name: "corrupt",
        about: "corrupted stream rejected by the driver, reported, device recovered by RESET",
        run: corrupt,
    },
    Test {
        name: "multifd",
        about: "send helper on A -> 4 multifd channels on loopback -> recv helper on B, registers equal",
        run: multifd,
    },
];

/// The helper binary, copied into the guest by lab.sh.
const HELPER: &str = "/bin/vfio-multifd";

/// A full migration by two `vfio-multifd` processes, each opening its mdev itself through
/// /dev/vfio: the source saves A in STOP_COPY over 4 multifd channels (io_uring engine), the
/// destination resumes B; B's registers must then equal what was written to A.
fn multifd(lab: &Lab) -> Result<String> {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};

    let want = Regs {
        scr: [0x3c, 0xc3],
        fifo: [b"MULTI".to_vec(), b"fd".to_vec()],
    };
    {
        let (a, _b) = open_pair(lab)?;
        mtty::write(&a, &want)?;
    } // closed: each helper opens its own group
    fn step(what: &'static str) -> impl Fn(std::io::Error) -> LabError {
        move |e| LabError::Step {
            step: what.to_string(),
            source: Some(Box::new(e)),
        }
    }
    let mut recv = Command::new(HELPER)
        .args([
            "recv",
            "--listen",
            "127.0.0.1:0",
            "--channels",
            "4",
            "--timeout",
            "20",
        ])
        .args(["--vfio", &lab.mdevs[1], "--json", "--log-level", "info"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(step("starting the recv helper"))?;
    let stderr = recv
        .stderr
        .take()
        .ok_or_else(|| LabError::check("recv has no stderr"))?;
    let mut lines = BufReader::new(stderr).lines();
    let addr = loop {
        let line = lines
            .next()
            .ok_or_else(|| LabError::check("recv exited before listening"))?
            .map_err(step("reading recv's stderr"))?;
        if let Some(addr) = line.strip_prefix("recv: listening on ") {
            break addr.trim().to_string();
        }
    };
    let send = Command::new(HELPER)
        .args([
            "send",
            "--connect",
            &addr,
            "--channels",
            "4",
            "--timeout",
            "20",
        ])
        .args(["--vfio", &lab.mdevs[0], "--json"])
        .output()
        .map_err(step("running the send helper"))?;
    let recv_log: Vec<String> = lines.map_while(|l| l.ok()).collect();
    let recv = recv.wait_with_output().map_err(step("waiting for recv"))?;
    let send_json = String::from_utf8_lossy(&send.stdout).into_owned();
    ensure(send.status.success() && recv.status.success(), || {
        format!(
            "send {} ({}), recv {} ({})",
            send.status,
            String::from_utf8_lossy(&send.stderr).trim(),
            recv.status,
            recv_log.join(" | ")
        )
    })?;
    let bytes = json_number(&send_json, "bytes").unwrap_or(0);
    println!("LAB-BYTES multifd A {bytes} stop-copy bytes over 4 channels");
    let (a, b) = dev::open_pair(&lab.mdevs[0], &lab.mdevs[1])?;
    let got_b = mtty::read(&b)?;
    ensure(got_b == want, || {
        format!("B reads back {got_b}, A had {want}")
    })?;
    ensure(b.state()? == MigState::Running, || {
        "B is not RUNNING after recv".into()
    })?;
    drop(a);
    let engine = if send_json.contains("\"engine\":\"uring\"") {
        "uring"
    } else {
        "threads"
    };
    Ok(format!(
        "{bytes} bytes A->B by two helpers ({engine} engine), B reads back {got_b}"
    ))
}

/// The first `"key": <integer>` in a JSON text (the guest crate has no JSON parser).
fn json_number(text: &str, key: &str) -> Option<u64> {
    let at = text.find(&format!("\"{key}\":"))? + key.len() + 3;
    let digits: String = text[at..]
        .trim_start()
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

/// Opens A and B, each RUNNING with empty FIFOs.
fn open_pair(lab: &Lab) -> Result<(VfioDevice, VfioDevice)> {
    let (mut a, mut b) = dev::open_pair(&lab.mdevs[0], &lab.mdevs[1])?;
    let want = MigrationFlags::STOP_COPY | MigrationFlags::P2P | MigrationFlags::PRE_COPY;
    for d in [&mut a, &mut b] {
        let flags = d.migration_flags()?;
        ensure(flags.contains(want), || {
            format!("{}: migration flags {flags}, want {want}", d.name())
        })?;
        // The lab (the helper) owns the devices: RESET is allowed.
        if d.state()? != MigState::Running {
            d.reset()?;
        }
        mtty::read(d)?;
    }
    Ok((a, b))
}

fn bytes_line(test: &str, label: &str, dev: &VfioDevice, precopy: usize, stop_copy: usize) {
    println!(
        "LAB-BYTES {test} {label}:{} precopy={precopy} stop_copy={stop_copy} total={}",
        dev.name(),
        precopy + stop_copy
    );
}

/// Saves `dev` in STOP_COPY: -> STOP_COPY, read to EOF, -> STOP.
fn save_stop_copy(dev: &mut VfioDevice) -> Result<Vec<u8>> {
    let fd = dev.set_state(MigState::StopCopy)?;
    let mut fd = dev::data_file(fd, dev, "-> STOP_COPY")?;
    let mut stream = Vec::new();
    dev::read_saving(dev, MigState::StopCopy, &mut fd, &mut stream)?;
    drop(fd);
    dev.set_state(MigState::Stop)?;
    Ok(stream)
}

/// Resumes `stream` into `dev` (-> RESUMING, write, -> STOP) and brings it to RUNNING.
fn resume(dev: &mut VfioDevice, stream: &[u8]) -> Result<()> {
    let fd = dev.set_state(MigState::Resuming)?;
    let mut fd = dev::data_file(fd, dev, "-> RESUMING")?;
    fd.write_all(stream).context(|| {
        format!(
            "{}: writing {} bytes to the RESUMING data_fd",
            dev.name(),
            stream.len()
        )
    })?;
    drop(fd);
    dev.set_state(MigState::Stop)?;
    dev.set_state(MigState::Running)?;
    Ok(())
}

fn stop_copy(lab: &Lab) -> Result<String> {
    let (mut a, mut b) = open_pair(lab)?;
    let want = Regs {
        scr: [0x5a, 0xa5],
        fifo: [b"HELLO".to_vec(), b"hi".to_vec()],
    };
    mtty::write(&a, &want)?;
    let estimate = a.stop_copy_size()?;
    let stream = save_stop_copy(&mut a)?;
    bytes_line("stop-copy", "A", &a, 0, stream.len());
    ensure(stream.len() as u64 == estimate, || {
        format!(
            "A produced {} bytes, MIG_DATA_SIZE said {estimate}",
            stream.len()
        )
    })?;
    resume(&mut b, &stream)?;
    a.set_state(MigState::Running)?;
    let got_b = mtty::read(&b)?;
    let got_a = mtty::read(&a)?;
    ensure(got_b == want, || {
        format!("B reads back {got_b}, A had {want}")
    })?;
    ensure(got_a == want, || {
        format!("A reads back {got_a} after the save, wrote {want}")
    })?;
    Ok(format!(
        "A->B {} bytes (MIG_DATA_SIZE {estimate}), B reads back {got_b}",
        stream.len()
    ))
}

fn pre_copy(lab: &Lab) -> Result<String> {
    let (mut a, mut b) = open_pair(lab)?;
    let want = Regs {
        scr: [0x3c, 0xc3],
        fifo: [b"WORLD".to_vec(), b"!".to_vec()],
    };
    mtty::write(&b, &want)?;
    let fd = b.set_state(MigState::PreCopy)?;
    let mut fd = dev::data_file(fd, &b, "-> PRE_COPY")?;
    let info = b.precopy_info()?;
    ensure(info.initial_bytes > 0, || {
        format!(
            "PRECOPY_INFO initial_bytes={}, want > 0",
            info.initial_bytes
        )
    })?;
    let mut stream = Vec::new();
    let (pre, end) = dev::read_saving(&b, MigState::PreCopy, &mut fd, &mut stream)?;
    let End::Drained(drained_by) = end else {
        return Err(LabError::check("PRE_COPY read ended as EOF"));
    };
    ensure(pre as u64 == info.initial_bytes, || {
        format!(
            "read {pre} precopy bytes, PRECOPY_INFO said {}",
            info.initial_bytes
        )
    })?;
    let info2 = b.precopy_info()?;
    ensure(info2.initial_bytes == 0, || {
        format!(
            "PRECOPY_INFO initial_bytes={} after draining",
            info2.initial_bytes
        )
    })?;
    // STOP_COPY straight from PRE_COPY: the saving session and its data_fd continue.
    ensure(b.set_state(MigState::StopCopy)?.is_none(), || {
        "PRE_COPY -> STOP_COPY opened a second data_fd".into()
    })?;
    let (stop, _) = dev::read_saving(&b, MigState::StopCopy, &mut fd, &mut stream)?;
    drop(fd);
    b.set_state(MigState::Running)?;
    bytes_line("pre-copy", "B", &b, pre, stop);
    resume(&mut a, &stream)?;
    let got = mtty::read(&a)?;
    ensure(got == want, || format!("A reads back {got}, B had {want}"))?;
    Ok(format!(
        "B->A precopy={pre} (PRECOPY_INFO {}/{} then {}/{}, drained by {drained_by}) \
         stop_copy={stop} on the same data_fd, total={}, A reads back {got}",
        info.initial_bytes,
        info.dirty_bytes,
        info2.initial_bytes,
        info2.dirty_bytes,
        stream.len()
    ))
}

fn corrupt(lab: &Lab) -> Result<String> {
    let (mut a, mut b) = open_pair(lab)?;
    let want = Regs {
        scr: [0x11, 0x22],
        fifo: [b"CORRUPT".to_vec(), Vec::new()],
    };
    mtty::write(&a, &want)?;
    let good = save_stop_copy(&mut a)?;
    a.set_state(MigState::Running)?;
    bytes_line("corrupt", "A", &a, 0, good.len());
    ensure(good.len() >= 8, || {
        format!("stream of {} bytes is too short", good.len())
    })?;
    let mut bad = good.clone();
    bad[0] ^= 0xff; // the header's magic

    // The driver must refuse it: at write() (mtty: EFAULT) or at RESUMING -> STOP.
    let rejected = match resume(&mut b, &bad) {
        Ok(()) => {
            return Err(LabError::check(
                "B accepted a stream with a corrupted magic",
            ))
        }
        Err(e) => LabError::chain(&e),
    };
    let state = b.state()?;
    b.reset()?;
    let after = b.state()?;
    ensure(after == MigState::Running, || {
        format!("B is in {after} after RESET")
    })?;

    // Recovered: the clean stream now resumes and reads back.
    resume(&mut b, &good)?;
    let got = mtty::read(&b)?;
    ensure(got == want, || {
        format!("B reads back {got} after recovery, A had {want}")
    })?;
    Ok(format!(
        "rejected: [{rejected}]; B was in {state}, RESET -> {after}; clean {} bytes then resumed, {got}",
        good.len()
    ))
}
