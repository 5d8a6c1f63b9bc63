//! The wire format against the real QEMU 10.0 binary, both directions.
//!
//! - QEMU -> us: a paused TCG VM whose RAM is a file of random bytes migrates with multifd to
//!   a real QEMU destination through a recording proxy (one capture per connection); `inspect
//!   --json` must decode every captured byte and its counts must equal `query-migrate`'s.
//! - us -> QEMU: our encoder opens the main channel and N multifd channels to a real QEMU
//!   destination and sends a device-state packet for an idstr QEMU does not have; QEMU must
//!   accept the init packets and fail with its own unknown-idstr message naming our idstr and
//!   instance id.
//!
//! The tests skip (and pass) only when `qemu-system-x86_64` is missing or is not 10.x. Every
//! QEMU runs under a guard that kills it on every path; every wait has a deadline.

// Test helpers unwrap too: a failed step is a failed test (clippy allows it only in #[test] fns).
#![allow(clippy::unwrap_used)]

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use vfio_multifd::wire::main_stream::encode_file_header;
use vfio_multifd::wire::{
    parse_uuid, write_packet_headers, DeviceId, MultifdInitPacket, PACKET_HEADER_ROOM,
};
use zerocopy::IntoBytes;

const QEMU: &str = "qemu-system-x86_64";
const UUID: &str = "5f6e0a3c-1d2b-4c5d-8e9f-a0b1c2d3e4f5";
const CHANNELS: u8 = 3;
const RAM_MIB: usize = 64;
/// No single wait in these tests may take longer.
const DEADLINE: Duration = Duration::from_secs(40);

/// `Some(reason)` when the real-QEMU tests cannot run here.
fn skip_reason() -> Option<String> {
    let out = match Command::new(QEMU).arg("--version").output() {
        Ok(out) => out,
        Err(e) => return Some(format!("{QEMU} not found ({e})")),
    };
    let text = String::from_utf8_lossy(&out.stdout);
    let first = text.lines().next().unwrap_or("");
    if !first.contains("version 10.") {
        return Some(format!("{QEMU} is not QEMU 10.x: {first:?}"));
    }
    None
}

macro_rules! require_qemu {
    () => {
        if let Some(reason) = skip_reason() {
            eprintln!("SKIP: {reason}; the real-QEMU wire tests need QEMU 10.x (tools/install-test-deps.sh installs it)");
            return;
        }
    };
}

/// A scratch directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        let dir =
            std::env::temp_dir().join(format!("vfio-multifd-{tag}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A QEMU process, killed and reaped on drop; stderr goes to a file.
struct Qemu {
    child: Child,
    stderr: PathBuf,
    qmp: Option<Qmp>,
}

impl Qemu {
    fn spawn(dir: &TempDir, name: &str, extra: &[&str]) -> Self {
        let qmp_path = dir.path(&format!("{name}.qmp"));
        let stderr = dir.path(&format!("{name}.stderr"));
        let mut cmd = Command::new(QEMU);
        cmd.args(["-accel", "tcg", "-nodefaults", "-display", "none", "-S"])
            .args(["-uuid", UUID])
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp_path.display()))
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&stderr).unwrap());
        let child = cmd.spawn().unwrap();
        let mut q = Self {
            child,
            stderr,
            qmp: None,
        };
        q.qmp = Some(Qmp::connect(&qmp_path, &mut q.child));
        q
    }

    fn qmp(&mut self) -> &mut Qmp {
        self.qmp.as_mut().unwrap()
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Waits for the process to exit; `None` at the deadline.
    fn wait_exit(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let end = Instant::now() + within;
        while Instant::now() < end {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// Sets multifd with `CHANNELS` channels.
    fn enable_multifd(&mut self) {
        let q = self.qmp();
        q.ok(
            "migrate-set-capabilities",
            json!({"capabilities": [{"capability": "multifd", "state": true}]}),
        );
        q.ok(
            "migrate-set-parameters",
            json!({"multifd-channels": CHANNELS}),
        );
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A QMP connection over a unix socket.
struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    fn connect(path: &Path, child: &mut Child) -> Self {
        let end = Instant::now() + DEADLINE;
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) => {
                    if let Some(status) = child.try_wait().unwrap() {
                        panic!("QEMU exited ({status}) before its QMP socket came up");
                    }
                    assert!(Instant::now() < end, "QMP socket {path:?}: {e}");
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        };
        stream.set_read_timeout(Some(DEADLINE)).unwrap();
        let mut q = Self {
            reader: BufReader::new(stream.try_clone().unwrap()),
            writer: stream,
        };
        let greeting = q.read();
        assert!(greeting.get("QMP").is_some(), "{greeting}");
        q.ok("qmp_capabilities", json!({}));
        q
    }

    fn read(&mut self) -> Value {
        let mut line = String::new();
        let n = self
            .reader
            .read_line(&mut line)
            .expect("QMP read (timed out?)");
        assert!(n > 0, "QMP connection closed");
        serde_json::from_str(&line).unwrap()
    }

    /// Runs a command; returns the whole reply (`return` or `error`), skipping events.
    fn execute(&mut self, cmd: &str, args: Value) -> Value {
        let msg = json!({"execute": cmd, "arguments": args});
        writeln!(self.writer, "{msg}").unwrap();
        loop {
            let reply = self.read();
            if reply.get("event").is_none() {
                return reply;
            }
        }
    }

    fn ok(&mut self, cmd: &str, args: Value) -> Value {
        let reply = self.execute(cmd, args);
        assert!(reply.get("return").is_some(), "{cmd}: {reply}");
        reply["return"].clone()
    }

    fn query_migrate(&mut self) -> Value {
        self.ok("query-migrate", json!({}))
    }
}

/// Polls `query-migrate` until `done` says so; panics at the deadline.
fn poll_migrate(qemu: &mut Qemu, what: &str, done: impl Fn(&Value) -> bool) -> Value {
    let end = Instant::now() + DEADLINE;
    loop {
        let info = qemu.qmp().query_migrate();
        if done(&info) {
            return info;
        }
        assert!(
            Instant::now() < end,
            "timed out waiting for {what}: {info}\nstderr: {}",
            qemu.stderr()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A proxy between two unix sockets that records, per accepted connection, what the
/// connecting side sent (`conn<N>.bin`).
struct RecordingProxy {
    stop: Arc<AtomicBool>,
    accept: Option<JoinHandle<Vec<JoinHandle<()>>>>,
}

impl RecordingProxy {
    fn start(listen: &Path, target: PathBuf, capture_dir: PathBuf) -> Self {
        let listener = UnixListener::bind(listen).unwrap();
        listener.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let accept = std::thread::spawn(move || {
            let mut pumps = Vec::new();
            let mut n = 0;
            while !flag.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((client, _)) => {
                        client.set_nonblocking(false).unwrap();
                        let upstream = UnixStream::connect(&target).unwrap();
                        let capture =
                            File::create(capture_dir.join(format!("conn{n}.bin"))).unwrap();
                        n += 1;
                        pumps.push(pump(
                            client.try_clone().unwrap(),
                            upstream.try_clone().unwrap(),
                            Some(capture),
                            flag.clone(),
                        ));
                        pumps.push(pump(upstream, client, None, flag.clone()));
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    Err(e) => panic!("proxy accept: {e}"),
                }
            }
            pumps
        });
        Self {
            stop,
            accept: Some(accept),
        }
    }

    /// Stops accepting and waits for every pump to finish (they end at EOF, or at the
    /// stop flag within their read timeout).
    fn finish(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(accept) = self.accept.take() {
            for p in accept.join().unwrap() {
                p.join().unwrap();
            }
        }
    }
}

impl Drop for RecordingProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(accept) = self.accept.take() {
            // Never panic in drop; pumps stop within their read timeout.
            if let Ok(pumps) = accept.join() {
                for p in pumps {
                    let _ = p.join();
                }
            }
        }
    }
}

fn pump(
    mut from: UnixStream,
    mut to: UnixStream,
    mut capture: Option<File>,
    stop: Arc<AtomicBool>,
) -> JoinHandle<()> {
    std::thread::spawn(move || {
        from.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let mut buf = vec![0u8; 1 << 16];
        loop {
            match from.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    if let Some(f) = capture.as_mut() {
                        f.write_all(&buf[..n]).unwrap();
                    }
                    if to.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        let _ = to.shutdown(std::net::Shutdown::Write);
    })
}

fn random_file(path: &Path, len: usize) {
    // xorshift64*: fast, deterministic, no zero pages.
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut data = vec![0u8; len];
    for chunk in data.chunks_mut(8) {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        let v = state.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes();
        chunk.copy_from_slice(&v[..chunk.len()]);
    }
    std::fs::write(path, data).unwrap();
}

fn as_u64(v: &Value, key: &str) -> u64 {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("{key} missing or not a number in {v}"))
}

#[test]
fn qemu_to_us_multifd_capture_decodes_and_matches_query_migrate() {
    require_qemu!();
    let dir = TempDir::new("q2us");
    let ram = dir.path("ram.bin");
    random_file(&ram, RAM_MIB << 20);
    let captures = dir.path("cap");
    std::fs::create_dir_all(&captures).unwrap();
    let size = format!("{RAM_MIB}M");
    let machine = ["-machine", "pc,memory-backend=mem", "-m", &size];

    let mut dst = Qemu::spawn(
        &dir,
        "dst",
        &[
            &machine[..],
            &[
                "-object",
                &format!("memory-backend-ram,id=mem,size={size}"),
                "-incoming",
                "defer",
            ],
        ]
        .concat(),
    );
    let mut src = Qemu::spawn(
        &dir,
        "src",
        &[
            &machine[..],
            &[
                "-object",
                &format!(
                    "memory-backend-file,id=mem,size={size},mem-path={},share=off",
                    ram.display()
                ),
            ],
        ]
        .concat(),
    );
    dst.enable_multifd();
    src.enable_multifd();
    let dst_sock = dir.path("dst.sock");
    let proxy_sock = dir.path("proxy.sock");
    dst.qmp().ok(
        "migrate-incoming",
        json!({"uri": format!("unix:{}", dst_sock.display())}),
    );
    let mut proxy = RecordingProxy::start(&proxy_sock, dst_sock, captures.clone());
    src.qmp().ok(
        "migrate",
        json!({"uri": format!("unix:{}", proxy_sock.display())}),
    );
    let stats = poll_migrate(&mut src, "the source to complete", |i| {
        matches!(
            i["status"].as_str(),
            Some("completed" | "failed" | "cancelled")
        )
    });
    assert_eq!(
        stats["status"],
        "completed",
        "{stats}\nsrc: {}",
        src.stderr()
    );
    poll_migrate(&mut dst, "the destination to complete", |i| {
        matches!(i["status"].as_str(), Some("completed" | "failed"))
    });
    let dst_status = dst.qmp().query_migrate();
    assert_eq!(
        dst_status["status"],
        "completed",
        "{dst_status}\ndst: {}",
        dst.stderr()
    );
    drop(src);
    drop(dst);
    proxy.finish();

    let mut files: Vec<PathBuf> = std::fs::read_dir(&captures)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert_eq!(files.len(), 1 + usize::from(CHANNELS), "{files:?}");
    let out = Command::new(env!("CARGO_BIN_EXE_vfio-multifd"))
        .arg("inspect")
        .arg("--json")
        .args(&files)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "inspect failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(report["errors"], json!([]), "{report}");
    let channels = report["channels"].as_array().unwrap();
    let main: Vec<&Value> = channels.iter().filter(|c| c["kind"] == "main").collect();
    let multifd: Vec<&Value> = channels.iter().filter(|c| c["kind"] == "multifd").collect();
    assert_eq!(main.len(), 1, "{report}");
    assert_eq!(multifd.len(), usize::from(CHANNELS), "{report}");
    let mut ids: Vec<u64> = multifd.iter().map(|c| as_u64(c, "channel_id")).collect();
    ids.sort();
    assert_eq!(ids, (0..u64::from(CHANNELS)).collect::<Vec<_>>());
    for c in &multifd {
        assert_eq!(c["uuid"], UUID, "{c}");
        assert_eq!(c["truncated"], false, "{c}");
        assert_eq!(as_u64(c, "device_state_packets"), 0);
        assert!(
            as_u64(c, "ram_packets") > 0,
            "every channel carried pages: {c}"
        );
    }
    let sum = |key: &str| multifd.iter().map(|c| as_u64(c, key)).sum::<u64>();
    let ram = &stats["ram"];

    // How QEMU 10.0 counts (migration/multifd*.c, ram.c, migration-stats.c):
    // - ram.normal: pages sent as data. With multifd every normal page travels in a multifd
    //   RAM packet, so it is the sum of normal_pages over all RAM packets.
    // - ram.duplicate: zero pages; multifd-zero-page-detection defaults to "multifd", so they
    //   are the zero_pages entries of the RAM packets, not main-channel ZERO items.
    // - ram.normal-bytes = ram.normal × page size.
    // - ram.multifd-bytes: every byte written on the multifd channels: the 64-byte init
    //   packets, each packet header (1344 bytes for RAM and SYNC) and its page data.
    // - ram.transferred = multifd-bytes + what went through the main channel's QEMUFile
    //   (records, section bodies, the VMDESCRIPTION trailer): the sum of all captures.
    // - ram.total = the RAM_SAVE_FLAG_MEM_SIZE total on the main channel (all RAM blocks).
    assert_eq!(sum("ram_normal_pages"), as_u64(ram, "normal"), "{ram}");
    assert_eq!(sum("ram_zero_pages"), as_u64(ram, "duplicate"), "{ram}");
    assert_eq!(
        sum("ram_normal_pages") * as_u64(ram, "page-size"),
        as_u64(ram, "normal-bytes")
    );
    assert_eq!(sum("bytes"), as_u64(ram, "multifd-bytes"), "{ram}");
    assert_eq!(
        sum("bytes") + as_u64(main[0], "bytes"),
        as_u64(ram, "transferred"),
        "{ram}"
    );
    let summary = &main[0]["main"];
    assert_eq!(as_u64(summary, "ram_total"), as_u64(ram, "total"));
    assert_eq!(as_u64(summary, "ram_main_pages"), 0);
    // The random RAM has no zero page: all of it went as normal pages.
    assert!(sum("ram_normal_pages") >= (RAM_MIB as u64) << 8, "{ram}");
    // Each MULTIFD_FLUSH on the main channel pairs with one SYNC packet on every channel.
    let flushes = as_u64(summary, "ram_multifd_flushes");
    assert!(flushes > 0);
    for c in &multifd {
        assert_eq!(as_u64(c, "sync_packets"), flushes, "{c}");
    }
    assert_eq!(summary["commands"]["SWITCHOVER_START"], 1, "{summary}");
    assert_eq!(summary["eof"], true);
    assert!(summary["vmdescription_bytes"].as_u64().unwrap() > 0);

    // One corrupted byte in a real capture: inspect names the field and its offset.
    let multifd_file = files
        .iter()
        .find(|f| {
            let mut magic = [0u8; 4];
            File::open(f).unwrap().read_exact(&mut magic).unwrap();
            magic != *b"QEVM"
        })
        .unwrap();
    let mut bytes = std::fs::read(multifd_file).unwrap();
    // The first packet after the init packet: its normal_pages field (offset 16 of the packet).
    let at = 64 + 16;
    bytes[at] = 0x7f;
    let bad = dir.path("corrupt.bin");
    std::fs::write(&bad, &bytes).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_vfio-multifd"))
        .args(["inspect", "--json", "--channels", &CHANNELS.to_string()])
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    let errors = report["errors"].as_array().unwrap();
    assert_eq!(errors.len(), 1, "{report}");
    assert_eq!(errors[0]["offset"], at as u64, "{report}");
    assert_eq!(errors[0]["field"], "normal_pages", "{report}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("offset {at}: normal_pages")),
        "{stderr}"
    );
}

/// The destination side of the us -> QEMU tests: a QEMU waiting on `sock` with multifd.
fn incoming_qemu(dir: &TempDir) -> (Qemu, PathBuf) {
    let mut dst = Qemu::spawn(
        dir,
        "dst",
        &["-machine", "pc", "-m", "32M", "-incoming", "defer"],
    );
    dst.enable_multifd();
    let sock = dir.path("dst.sock");
    dst.qmp().ok(
        "migrate-incoming",
        json!({"uri": format!("unix:{}", sock.display())}),
    );
    (dst, sock)
}

/// Opens the main channel (QEVM header) and `CHANNELS` multifd channels whose init packets
/// carry `uuid`; returns them main first. A connect or write that fails (QEMU already gone)
/// ends the list early.
fn open_channels(sock: &Path, uuid: [u8; 16]) -> Vec<UnixStream> {
    let mut out = Vec::new();
    let mut header = Vec::new();
    encode_file_header(&mut header);
    let mut first = header;
    for id in 0..=CHANNELS {
        let Ok(mut c) = UnixStream::connect(sock) else {
            break;
        };
        if id > 0 {
            first = MultifdInitPacket::new(uuid, id - 1).as_bytes().to_vec();
        }
        if c.write_all(&first).is_err() {
            break;
        }
        out.push(c);
    }
    out
}

#[test]
fn us_to_qemu_device_state_packet_reaches_qemus_idstr_lookup() {
    require_qemu!();
    let dir = TempDir::new("us2q");
    let (mut dst, sock) = incoming_qemu(&dir);
    let uuid = parse_uuid(UUID).unwrap();
    let mut channels = open_channels(&sock, uuid);

    // QEMU 10.0 starts the incoming migration ("active") only once the main channel and all N
    // multifd channels are set up, and it sets up a multifd channel only after its init
    // packet passed the magic, version, uuid and id checks. Without a main channel it stays
    // in "setup" (it still reads multifd packets).
    let info = poll_migrate(&mut dst, "all channels accepted", |i| {
        i["status"] == "active"
    });
    assert!(info.get("error-desc").is_none(), "{info}");

    let id = DeviceId::new("vfio-multifd-test/vfio", 7).unwrap();
    let data = b"device state that no QEMU device will ever load";
    let mut packet = [0u8; PACKET_HEADER_ROOM].to_vec();
    write_packet_headers(
        (&mut packet[..]).try_into().unwrap(),
        &id.idstr_field(),
        id.instance_id,
        0,
        false,
        data.len() as u32,
    );
    packet.extend_from_slice(data);
    channels[2].write_all(&packet).unwrap();

    let expected = "Unknown idstr vfio-multifd-test/vfio or instance id 7 for load state buffer";
    let info = poll_migrate(&mut dst, "QEMU's unknown-idstr error", |i| {
        i.get("error-desc").is_some()
    });
    assert_eq!(info["error-desc"], expected, "{info}");
    // Closing the main channel ends the load: QEMU exits non-zero and prints the same error.
    drop(channels);
    let status = dst.wait_exit(DEADLINE).expect("QEMU did not exit");
    assert!(!status.success());
    let stderr = dst.stderr();
    assert!(stderr.contains(expected), "{stderr}");
    for init_error in [
        "magic",
        "version",
        "uuid",
        "already setup",
        "failed to receive packet",
    ] {
        assert!(!stderr.contains(init_error), "{init_error}: {stderr}");
    }
}

/// The control experiment: QEMU does check what the test above says it accepted.
#[test]
fn us_to_qemu_wrong_uuid_is_rejected_by_qemu() {
    require_qemu!();
    let dir = TempDir::new("us2q-uuid");
    let (mut dst, sock) = incoming_qemu(&dir);
    let mut uuid = parse_uuid(UUID).unwrap();
    uuid[15] ^= 1;
    let channels = open_channels(&sock, uuid);
    // QEMU 10.0 checks the init packet as the channel is accepted and exits at once.
    let status = dst.wait_exit(DEADLINE).expect("QEMU did not exit");
    assert!(!status.success());
    let stderr = dst.stderr();
    let ours = vfio_multifd::wire::fmt_uuid(&uuid);
    let expected = format!(
        "failed to receive packet via multifd channel 0: multifd: received uuid '{ours}' and expected uuid '{UUID}'"
    );
    assert!(stderr.contains(&expected), "{stderr}");
    drop(channels);
}
