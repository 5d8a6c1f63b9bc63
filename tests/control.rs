//! The control protocol through the built binary: `serve` helpers on real unix sockets, fds
//! passed with SCM_RIGHTS, simulated devices whose data_fds are real memfds and pipes, the
//! test playing both VMMs (it drives the device states, as a QEMU-like VMM does in `data-fd`
//! mode). Every scenario checks what the VMM must be able to rely on: the events, the bytes
//! (destination devices verify every byte, source devices are checked intact after a
//! rollback), and that the helper lets go of every fd and thread it was given.

#![allow(clippy::unwrap_used)]

use std::fs::File;
use std::io::Read;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use vfio::sim::{DeviceSpeed, SimSink, SimSource, SimSpec};
use vfio::{MigState, MigrationDevice};
use vfio_multifd::control::client::Client;
use vfio_multifd::control::schema::{base64_decode, base64_encode, ErrorBody, EventLine, COMMANDS};

mod common;
use common::{env_u64, Rng};

const BIN: &str = env!("CARGO_BIN_EXE_vfio-multifd");
const WAIT: Duration = Duration::from_secs(20);
const UUID: &str = "12345678-9abc-def0-1122-334455667788";

// ---------------------------------------------------------------------------------------------
// Helpers and the test VMM

struct Helper {
    child: Child,
    socket: PathBuf,
    dir: PathBuf,
}

fn scratch(name: &str) -> PathBuf {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("vmf-control-{}-{name}-{n}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // A client of another uid must reach the socket inside.
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

impl Helper {
    fn start(name: &str) -> Helper {
        Helper::start_with(name, &[])
    }

    /// With more `serve` flags.
    fn start_with(name: &str, flags: &[&str]) -> Helper {
        let dir = scratch(name);
        let socket = dir.join("control.sock");
        Helper::start_at(dir, socket, flags)
    }

    /// At `socket`, in `dir` (removed with the helper).
    fn start_at(dir: PathBuf, socket: PathBuf, flags: &[&str]) -> Helper {
        let child = Command::new(BIN)
            .args(["serve", "--socket-path"])
            .arg(&socket)
            .args(["--timeout", "10", "--log-level", "warn"])
            .args(flags)
            .env_remove("RUST_LOG")
            .env_remove("VFIO_MULTIFD_FORBID")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !socket.exists() {
            assert!(Instant::now() < deadline, "no control socket at {socket:?}");
            std::thread::sleep(Duration::from_millis(5));
        }
        Helper { child, socket, dir }
    }

    fn client(&self) -> Client {
        let client = Client::connect(&self.socket).unwrap();
        assert_eq!(client.greeting["return"]["vfio-multifd"]["protocol"], 1);
        client
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .unwrap()
            .count()
    }

    fn threads(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/task", self.pid()))
            .unwrap()
            .count()
    }

    /// The helper holds no more fds than `fds` (at once: the final event comes only after
    /// every fd of the migration is closed) and, shortly, no more threads than `threads` (the
    /// migration thread exits right after its last event).
    fn settles_to(&self, fds: usize, threads: usize) {
        let now = self.fds();
        assert!(
            now <= fds,
            "helper {} holds {now} fds (baseline {fds})",
            self.pid()
        );
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let (f, t) = (self.fds(), self.threads());
            if f <= fds && t <= threads {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "helper {} holds {f} fds (baseline {fds}) and {t} threads (baseline {threads})",
                self.pid()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn wait_exit(&mut self) -> std::process::ExitStatus {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "helper did not exit");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Helper {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn ok(client: &mut Client, command: &str, args: Value, fds: &[BorrowedFd<'_>]) -> Value {
    match client.execute(command, args.clone(), fds).unwrap() {
        Ok(ret) => ret,
        Err(e) => panic!("{command} {args} refused: {}", e.desc),
    }
}

fn refused(client: &mut Client, command: &str, args: Value, fds: &[BorrowedFd<'_>]) -> ErrorBody {
    match client.execute(command, args.clone(), fds).unwrap() {
        Ok(ret) => panic!("{command} {args} accepted: {ret}"),
        Err(e) => e,
    }
}

fn refused_with(
    client: &mut Client,
    command: &str,
    args: Value,
    fds: &[BorrowedFd<'_>],
    text: &str,
) {
    let e = refused(client, command, args, fds);
    assert!(
        e.desc.contains(text),
        "{command}: expected {text:?} in {:?}",
        e.desc
    );
}

/// Waits for an event `pick` accepts; panics on timeout. Returns it and everything seen.
fn wait_for(
    client: &mut Client,
    what: &str,
    pick: impl Fn(&EventLine) -> bool,
) -> (EventLine, Vec<EventLine>) {
    let mut seen = Vec::new();
    let event = client
        .wait_event(what, WAIT, |e| seen.push(clone_event(e)), |e| pick(e))
        .unwrap_or_else(|e| panic!("{what}: {e}; seen {:?}", names(&seen)));
    (event, seen)
}

fn status_is(status: &'static str) -> impl Fn(&EventLine) -> bool {
    move |e| e.event == "MIGRATION" && e.data["status"] == status
}

fn terminal(e: &EventLine) -> bool {
    e.event == "MIGRATION"
        && matches!(
            e.data["status"].as_str(),
            Some("completed" | "failed" | "cancelled")
        )
}

fn clone_event(e: &EventLine) -> EventLine {
    EventLine {
        event: e.event.clone(),
        data: e.data.clone(),
        timestamp: e.timestamp,
    }
}

fn names(events: &[EventLine]) -> Vec<String> {
    events
        .iter()
        .map(|e| match e.data.get("status") {
            Some(s) => format!("{}:{}", e.event, s.as_str().unwrap_or("?")),
            None => e.event.clone(),
        })
        .collect()
}

fn borrowed(fds: &[OwnedFd]) -> Vec<BorrowedFd<'_>> {
    fds.iter().map(|f| f.as_fd()).collect()
}

/// Socketpairs for the main channel and `channels` multifd channels: (source ends, destination
/// ends, names). Both ends are O_NONBLOCK, as an event-loop VMM's sockets often are: the
/// helpers must make them blocking themselves.
fn channel_pairs(channels: u8) -> (Vec<OwnedFd>, Vec<OwnedFd>, Vec<String>) {
    let nonblocking = |fd: OwnedFd| {
        let s = std::os::unix::net::UnixStream::from(fd);
        s.set_nonblocking(true).unwrap();
        OwnedFd::from(s)
    };
    let mut a = Vec::new();
    let mut b = Vec::new();
    for _ in 0..=channels {
        let (x, y) = vfio::fd::socketpair().unwrap();
        a.push(nonblocking(x));
        b.push(nonblocking(y));
    }
    let names = std::iter::once("main".to_string())
        .chain((0..channels).map(|i| format!("multifd-{i}")))
        .collect();
    (a, b, names)
}

/// One simulated device on both sides.
struct Dev {
    idstr: String,
    spec: SimSpec,
    source: SimSource,
    sink: SimSink,
    precopy: bool,
}

impl Dev {
    fn new(i: u32, size: u64, precopy: bool, speed: Option<u64>) -> Dev {
        let idstr = format!("0000:{i:02x}:02.0/vfio");
        let spec = SimSpec {
            size,
            seed: 77 + u64::from(i),
            precopy_initial: if precopy { size / 4 } else { 0 },
            precopy_dirty: 0,
            speed: speed.map(|rate| DeviceSpeed {
                save_bytes_per_sec: rate,
                load_bytes_per_sec: 0,
                per_read_latency: Duration::ZERO,
            }),
            config_len: 300,
        };
        Dev {
            source: SimSource::new(&idstr, spec).unwrap(),
            sink: SimSink::new(&format!("sink-{i}"), spec).unwrap(),
            idstr,
            spec,
            precopy,
        }
    }

    fn handle(&self) -> String {
        format!("{}/0", self.idstr)
    }

    /// Destination VMM: RESUMING, the data_fd to the helper.
    fn add_to_dest(&mut self, d: &mut Client, extra: Value) {
        let fd = self.sink.set_state(MigState::Resuming).unwrap().unwrap();
        let mut args = json!({ "idstr": self.idstr, "mode": "data-fd", "fds": ["data-fd"] });
        merge(&mut args, extra);
        ok(d, "add-device", args, &[fd.as_fd()]);
    }

    /// Source VMM: a precopy device goes to PRE_COPY and hands its data_fd over now.
    fn add_to_source(&mut self, s: &mut Client) {
        let config = base64_encode(&self.source.config_blob());
        if self.precopy {
            let fd = self.source.set_state(MigState::PreCopy).unwrap().unwrap();
            ok(
                s,
                "add-device",
                json!({ "idstr": self.idstr, "mode": "data-fd", "precopy": true,
                        "config": config, "fds": ["data-fd"] }),
                &[fd.as_fd()],
            );
        } else {
            ok(
                s,
                "add-device",
                json!({ "idstr": self.idstr, "mode": "data-fd", "config": config }),
                &[],
            );
        }
    }

    /// Source VMM, VM stopped: STOP_COPY; a new data_fd goes to the helper.
    fn stop_copy(&mut self, s: &mut Client) {
        if let Some(fd) = self.source.set_state(MigState::StopCopy).unwrap() {
            ok(
                s,
                "update-device",
                json!({ "device": self.handle(), "fds": ["data-fd"] }),
                &[fd.as_fd()],
            );
        }
    }

    /// After a failed or cancelled migration the source VMM puts the device back to RUNNING;
    /// its state must be intact: a new saving session streams exactly the device's content.
    fn source_back_and_intact(&mut self) {
        let state = self.source.state().unwrap();
        if state != MigState::Running {
            self.source.set_state(MigState::Running).unwrap();
        }
        assert_eq!(self.source.state().unwrap(), MigState::Running);
        let fd = self.source.set_state(MigState::StopCopy).unwrap().unwrap();
        let mut data = Vec::new();
        File::from(fd).read_to_end(&mut data).unwrap();
        assert_eq!(
            data.len() as u64,
            self.spec.size,
            "{}: stream length",
            self.idstr
        );
        assert_eq!(
            vfio::sim::first_mismatch(self.spec.seed, 0, &data),
            None,
            "{}: stream content",
            self.idstr
        );
        self.source.set_state(MigState::Stop).unwrap();
        self.source.set_state(MigState::Running).unwrap();
    }

    /// Destination VMM after a failure: the half-loaded device is reset.
    fn sink_reset(&mut self) {
        self.sink.reset().unwrap();
        assert_eq!(self.sink.state().unwrap(), MigState::Running);
    }
}

fn merge(into: &mut Value, extra: Value) {
    if let (Value::Object(a), Value::Object(b)) = (into, extra) {
        a.extend(b);
    }
}

/// Two helpers, both VMM connections, `devs` registered, channels passed: the migration runs
/// up to SWITCHOVER_ACK on the source.
struct Run {
    src: Helper,
    dst: Helper,
    s: Client,
    d: Client,
    devs: Vec<Dev>,
    base: [(usize, usize); 2],
}

impl Run {
    fn new(devs: Vec<Dev>, channels: u8, hold_last: bool) -> Run {
        let order: Vec<usize> = (0..devs.len()).collect();
        Run::with_dest_order(devs, channels, hold_last, &order)
    }

    /// `dest_order`: the order in which the destination VMM adds the devices (the source adds
    /// them in `devs` order).
    fn with_dest_order(devs: Vec<Dev>, channels: u8, hold_last: bool, dest_order: &[usize]) -> Run {
        let src = Helper::start("src");
        let dst = Helper::start("dst");
        let s = src.client();
        let d = dst.client();
        let base = [(src.fds(), src.threads()), (dst.fds(), dst.threads())];
        let mut run = Run {
            src,
            dst,
            s,
            d,
            devs,
            base,
        };
        let last = run.devs.len() - 1;
        for &i in dest_order {
            let hold = if hold_last && i == last { "on" } else { "off" };
            run.devs[i].add_to_dest(&mut run.d, json!({ "load-config-after-iter": hold }));
        }
        for dev in run.devs.iter_mut() {
            dev.add_to_source(&mut run.s);
        }
        let (a, b, names) = channel_pairs(channels);
        ok(
            &mut run.d,
            "migrate-incoming",
            json!({ "channels": channels, "uuid": UUID, "fds": names }),
            &borrowed(&b),
        );
        ok(
            &mut run.s,
            "migrate-outgoing",
            json!({ "channels": channels, "uuid": UUID, "fds": names }),
            &borrowed(&a),
        );
        run
    }

    fn switchover(&mut self) {
        for dev in self.devs.iter_mut() {
            dev.stop_copy(&mut self.s);
        }
        ok(&mut self.s, "switchover-start", json!({}), &[]);
    }

    /// Both helpers hold no more fds or threads than before the migration.
    fn settled(&self) {
        self.src.settles_to(self.base[0].0, self.base[0].1);
        self.dst.settles_to(self.base[1].0, self.base[1].1);
    }
}

// ---------------------------------------------------------------------------------------------
// The whole protocol

#[test]
fn full_migration_with_precopy_switchover_ack_and_a_held_config() {
    let devs = vec![
        Dev::new(0, 6 << 20, true, None),
        Dev::new(1, 5 << 20, true, None),
        Dev::new(2, 4 << 20, false, None),
        Dev::new(3, 3 << 20, false, None),
    ];
    let mut run = Run::new(devs, 3, true);

    // Before the ack the source refuses to switch over; then precopy runs and the ack comes.
    let (_, seen) = wait_for(&mut run.s, "SWITCHOVER_ACK", |e| {
        e.event == "SWITCHOVER_ACK"
    });
    let seen = names(&seen);
    assert_eq!(
        seen,
        [
            "MIGRATION:setup",
            "MIGRATION:precopy",
            "INITIAL_DATA_SENT",
            "INITIAL_DATA_SENT",
            "SWITCHOVER_ACK"
        ],
        "source events"
    );
    let (loaded, mut dest_seen) = wait_for(&mut run.d, "INITIAL_DATA_LOADED", |e| {
        e.event == "INITIAL_DATA_LOADED"
    });
    assert_eq!(
        loaded.data["precopy-bytes"],
        (6u64 << 20) / 4 + (5u64 << 20) / 4
    );
    let q = ok(&mut run.s, "query", json!({}), &[]);
    assert_eq!(q["status"], "precopy");
    assert_eq!(q["switchover-ack"], true);
    // The destination does not switch over; a data_fd is still missing on the source.
    refused_with(
        &mut run.d,
        "switchover-start",
        json!({}),
        &[],
        "only the source",
    );
    refused_with(
        &mut run.s,
        "switchover-start",
        json!({}),
        &[],
        "has no data_fd in STOP_COPY",
    );

    run.switchover();
    let mut configs = std::collections::BTreeMap::new();
    let (_, seen) = wait_for(&mut run.d, "MIGRATION loaded", status_is("loaded"));
    dest_seen.extend(seen.iter().map(clone_event));
    for e in seen.iter().filter(|e| e.event == "DEVICE_LOADED") {
        configs.insert(
            e.data["device"].as_str().unwrap().to_string(),
            base64_decode(e.data["config"].as_str().unwrap()).unwrap(),
        );
    }
    assert_eq!(
        configs.len(),
        3,
        "the last device's config is held: {:?}",
        names(&seen)
    );
    let q = ok(&mut run.d, "query", json!({}), &[]);
    assert_eq!(q["status"], "loaded");
    assert_eq!(q["devices"][3]["status"], "config-held");
    let ret = ok(&mut run.d, "load-config-ready", json!({}), &[]);
    assert_eq!(ret["held"], 0);
    let (_, seen) = wait_for(&mut run.d, "completed", status_is("completed"));
    dest_seen.extend(seen.iter().map(clone_event));
    assert_eq!(
        names(&dest_seen),
        [
            "MIGRATION:setup",
            "MIGRATION:precopy",
            "INITIAL_DATA_LOADED",
            "MIGRATION:stop-copy",
            "DEVICE_LOADED",
            "DEVICE_LOADED",
            "DEVICE_LOADED",
            "MIGRATION:loaded",
            "DEVICE_LOADED",
            "MIGRATION:completed"
        ],
        "destination events"
    );
    let last = seen.iter().find(|e| e.event == "DEVICE_LOADED").unwrap();
    configs.insert(
        last.data["device"].as_str().unwrap().to_string(),
        base64_decode(last.data["config"].as_str().unwrap()).unwrap(),
    );
    wait_for(&mut run.s, "completed", status_is("completed"));

    // Every byte and config: the sinks check their stream at RESUMING -> STOP.
    for dev in run.devs.iter_mut() {
        dev.sink.verify_config(&configs[&dev.handle()]).unwrap();
        dev.sink.set_state(MigState::Stop).unwrap();
        dev.sink.set_state(MigState::Running).unwrap();
        dev.source.set_state(MigState::Stop).unwrap();
    }
    let q = ok(&mut run.s, "query", json!({ "timestamps": true }), &[]);
    assert_eq!(q["status"], "completed");
    assert_eq!(q["bytes"]["precopy"], loaded.data["precopy-bytes"]);
    assert_eq!(q["per-channel"].as_array().unwrap().len(), 3);
    assert!(q["devices"][0]["timestamps-ns"].as_array().unwrap().len() > 1);
    assert!(q["latency"]["count"].as_u64().unwrap() > 0);
    let q = ok(&mut run.d, "query", json!({}), &[]);
    assert!(q["downtime-ms"].as_f64().unwrap() > 0.0);
    let total: u64 = run.devs.iter().map(|d| d.spec.size).sum();
    assert_eq!(
        q["bytes"]["precopy"].as_u64().unwrap() + q["bytes"]["stop-copy"].as_u64().unwrap(),
        total
    );
    run.settled();

    // The helper serves the next migration; quit ends it with exit code 0.
    ok(&mut run.s, "quit", json!({}), &[]);
    assert!(run.src.wait_exit().success());
    assert!(
        !run.src.socket.exists(),
        "the socket file is removed at exit"
    );
}

/// load-config-ready for one device during stop-copy, before any config is held, does not
/// release the config the other device holds later: the destination stays `loaded` until
/// that one is released too, and its DEVICE_LOADED comes then. On the source, a second
/// switchover-start and a late update-device are refused.
#[test]
fn an_early_load_config_ready_for_one_device_does_not_release_another() {
    // The held device is the slow one (0.5 s of stop-copy), so the early release comes first.
    let devs = vec![
        Dev::new(0, 1 << 20, false, None),
        Dev::new(1, 4 << 20, false, Some(8 << 20)),
    ];
    let mut run = Run::new(devs, 2, true);
    wait_for(&mut run.s, "SWITCHOVER_ACK", |e| {
        e.event == "SWITCHOVER_ACK"
    });
    run.switchover();
    // Straight after it, before the source may say stop-copy: a second one is refused, and
    // so is a device update nothing would read any more.
    refused(&mut run.s, "switchover-start", json!({}), &[]);
    let first = run.devs[0].handle();
    refused(
        &mut run.s,
        "update-device",
        json!({ "device": first, "config": "" }),
        &[],
    );
    wait_for(&mut run.d, "stop-copy", status_is("stop-copy"));
    let ret = ok(
        &mut run.d,
        "load-config-ready",
        json!({ "device": first }),
        &[],
    );
    assert_eq!(ret["held"], 0, "nothing is held yet");
    wait_for(&mut run.d, "loaded", status_is("loaded"));
    // Time for the migration thread to (wrongly) take the early release as the last one.
    std::thread::sleep(Duration::from_millis(500));
    let q = ok(&mut run.d, "query", json!({}), &[]);
    assert_eq!(q["status"], "loaded", "{q}");
    assert_eq!(q["devices"][1]["status"], "config-held", "{q}");
    ok(&mut run.d, "load-config-ready", json!({}), &[]);
    let (_, seen) = wait_for(&mut run.d, "completed", status_is("completed"));
    let second = run.devs[1].handle();
    assert!(
        seen.iter()
            .any(|e| e.event == "DEVICE_LOADED" && e.data["device"] == second.as_str()),
        "no DEVICE_LOADED for {second}: {:?}",
        names(&seen)
    );
    wait_for(&mut run.s, "completed", status_is("completed"));
}

/// Precopy data is routed by device id, not by position: the destination adds the devices in
/// the other order than the source, and each sink still gets its own stream.
#[test]
fn precopy_reaches_the_right_device_when_the_sides_list_devices_in_different_orders() {
    let devs = vec![
        Dev::new(0, 4 << 20, true, None),
        Dev::new(1, 3 << 20, true, None),
        Dev::new(2, 2 << 20, false, None),
    ];
    let mut run = Run::with_dest_order(devs, 2, false, &[2, 1, 0]);
    wait_for(&mut run.s, "SWITCHOVER_ACK", |e| {
        e.event == "SWITCHOVER_ACK"
    });
    run.switchover();
    let (_, seen) = wait_for(&mut run.d, "completed", status_is("completed"));
    let configs: std::collections::BTreeMap<String, Vec<u8>> = seen
        .iter()
        .filter(|e| e.event == "DEVICE_LOADED")
        .map(|e| {
            (
                e.data["device"].as_str().unwrap().to_string(),
                base64_decode(e.data["config"].as_str().unwrap()).unwrap(),
            )
        })
        .collect();
    wait_for(&mut run.s, "completed", status_is("completed"));
    for dev in run.devs.iter_mut() {
        dev.sink.verify_config(&configs[&dev.handle()]).unwrap();
        dev.sink.set_state(MigState::Stop).unwrap();
        dev.source.set_state(MigState::Stop).unwrap();
    }
}

#[test]
fn tcp_addresses_multifd_transfer_off_and_a_queued_bytes_limit() {
    let src = Helper::start("tcp-src");
    let dst = Helper::start("tcp-dst");
    let mut s = src.client();
    let mut d = dst.client();
    let mut dev = Dev::new(0, 4 << 20, false, None);
    let mut other = Dev::new(1, 1 << 20, false, None);
    dev.add_to_dest(&mut d, json!({ "max-queued-buffers-size": 2 << 20 }));
    ok(
        &mut d,
        "set-limits",
        json!({ "max-queued-buffers-size": 3 << 20 }),
        &[],
    );
    // The VMM moves this device on its own main channel.
    ok(
        &mut s,
        "add-device",
        json!({ "idstr": other.idstr, "mode": "data-fd", "multifd-transfer": "off" }),
        &[],
    );
    dev.add_to_source(&mut s);
    // Multifd transfer "on" with an unsupported setting is refused at setup, as in QEMU.
    ok(
        &mut d,
        "add-device",
        json!({ "idstr": "0000:7f:00.0/vfio", "mode": "data-fd", "multifd-transfer": "on" }),
        &[],
    );
    refused_with(
        &mut d,
        "migrate-incoming",
        json!({ "channels": 2, "listen": "127.0.0.1:0", "multifd-compression": "zstd" }),
        &[],
        "Multifd device transfer requested but unsupported",
    );
    ok(
        &mut d,
        "remove-device",
        json!({ "device": "0000:7f:00.0/vfio/0" }),
        &[],
    );
    let ret = ok(
        &mut d,
        "migrate-incoming",
        json!({ "channels": 2, "listen": "127.0.0.1:0" }),
        &[],
    );
    let addr = ret["address"].as_str().unwrap().to_string();
    assert!(addr.starts_with("127.0.0.1:"), "{addr}");
    let ret = ok(
        &mut s,
        "migrate-outgoing",
        json!({ "channels": 2, "connect": addr }),
        &[],
    );
    assert_eq!(ret["not-moved"], json!([other.handle()]));
    wait_for(&mut s, "SWITCHOVER_ACK", |e| e.event == "SWITCHOVER_ACK");
    // No precopy device: the destination acks at once and says so.
    let (loaded, _) = wait_for(&mut d, "INITIAL_DATA_LOADED", |e| {
        e.event == "INITIAL_DATA_LOADED"
    });
    assert_eq!(loaded.data["precopy-bytes"], 0);
    dev.stop_copy(&mut s);
    ok(&mut s, "switchover-start", json!({}), &[]);
    let (_, seen) = wait_for(&mut d, "completed", status_is("completed"));
    let loaded = seen.iter().find(|e| e.event == "DEVICE_LOADED").unwrap();
    dev.sink
        .verify_config(&base64_decode(loaded.data["config"].as_str().unwrap()).unwrap())
        .unwrap();
    // set-limits without a device replaced the limit add-device gave; every packet passes
    // through the device's queue, so at least one 1 MiB chunk was held.
    let q = ok(&mut d, "query", json!({}), &[]);
    let device = &q["devices"][0];
    assert_eq!(device["max-queued-buffers-size"], 3 << 20, "{q}");
    let peak = device["peak-queued-bytes"].as_u64().unwrap();
    assert!((1 << 20..=4 << 20).contains(&peak), "{q}");
    dev.sink.set_state(MigState::Stop).unwrap();
    wait_for(&mut s, "completed", status_is("completed"));
    let q = ok(&mut s, "query", json!({}), &[]);
    assert!(
        q["devices"][0].get("max-queued-buffers-size").is_none(),
        "{q}"
    );
    dev.source.set_state(MigState::Stop).unwrap();
    other.source.set_state(MigState::Running).unwrap();
}

// ---------------------------------------------------------------------------------------------
// Bad input

#[test]
fn bad_input_gets_an_error_and_the_helper_keeps_serving() {
    let helper = Helper::start("bad");
    let mut c = helper.client();
    let base_fds = helper.fds();
    // main, control and the connection's writer.
    let base_threads = helper.threads();
    assert_eq!(base_threads, 3);

    // Raw lines: each gets exactly one error reply.
    for (line, expect) in [
        (&b"{not json\n"[..], "malformed JSON"),
        (b"[1,2,3]\n", "not a command"),
        (b"{\"arguments\":{}}\n", "not a command"),
        (b"{\"execute\":\"query\",\"bogus\":1}\n", "not a command"),
        (
            b"{\"execute\":\"query\",\"arguments\":[1]}\n",
            "arguments must be an object",
        ),
        (b"\xff\xfe\n", "malformed JSON"),
        (b"\n", "malformed JSON"),
    ] {
        c.send_raw(line, &[]).unwrap();
        let reply = c.next_reply().unwrap();
        let desc = reply["error"]["desc"].as_str().unwrap_or_default();
        assert!(desc.contains(expect), "{line:?}: {reply}");
    }
    // An unknown command, QMP's class.
    let e = refused(&mut c, "migrate-sideways", json!({}), &[]);
    assert_eq!(
        e.class,
        vfio_multifd::control::schema::ErrorClass::CommandNotFound
    );
    // A line too long is dropped with its fds.
    let (r, _w) = vfio::fd::pipe().unwrap();
    let mut long = vec![b' '; (1 << 20) + 100];
    long.push(b'\n');
    c.send_raw(&long, &[r.as_fd()]).unwrap();
    let reply = c.next_reply().unwrap();
    assert!(
        reply["error"]["desc"]
            .as_str()
            .unwrap()
            .contains("longer than"),
        "{reply}"
    );

    // Arguments.
    refused_with(
        &mut c,
        "add-device",
        json!({ "mode": "data-fd" }),
        &[],
        "missing field `idstr`",
    );
    refused_with(
        &mut c,
        "add-device",
        json!({ "idstr": "x", "mode": "data-fd", "instanceid": 1 }),
        &[],
        "unknown field",
    );
    refused_with(
        &mut c,
        "add-device",
        json!({ "idstr": "", "mode": "data-fd" }),
        &[],
        "idstr",
    );
    // A handle is capped like an idstr.
    refused_with(
        &mut c,
        "add-device",
        json!({ "idstr": "x", "id": "h".repeat(256), "mode": "data-fd" }),
        &[],
        "id is 256 bytes, above the 255-byte limit",
    );
    let longest = "h".repeat(255);
    ok(
        &mut c,
        "add-device",
        json!({ "idstr": "x", "id": longest, "mode": "data-fd" }),
        &[],
    );
    ok(&mut c, "remove-device", json!({ "device": longest }), &[]);
    refused_with(
        &mut c,
        "add-device",
        json!({ "idstr": "x", "mode": "data-fd", "config": "@@" }),
        &[],
        "base64",
    );
    refused_with(
        &mut c,
        "query",
        json!({ "timestamps": "yes" }),
        &[],
        "invalid arguments",
    );

    // Missing, extra and wrong fds.
    let (pipe_r, pipe_w) = vfio::fd::pipe().unwrap();
    let (sock_a, _sock_b) = vfio::fd::socketpair().unwrap();
    let dir = std::fs::File::open(std::env::temp_dir()).unwrap();
    refused_with(
        &mut c,
        "add-device",
        json!({ "idstr": "x", "mode": "data-fd", "fds": ["data-fd"] }),
        &[],
        "but 0 arrived",
    );
    refused_with(
        &mut c,
        "add-device",
        json!({ "idstr": "x", "mode": "data-fd" }),
        &[pipe_r.as_fd()],
        "but 1 arrived",
    );
    refused_with(
        &mut c,
        "add-device",
        json!({ "idstr": "x", "mode": "data-fd", "fds": ["socket"] }),
        &[pipe_r.as_fd()],
        "unknown fd name",
    );
    refused_with(
        &mut c,
        "add-device",
        json!({ "idstr": "x", "mode": "data-fd", "fds": ["data-fd"] }),
        &[sock_a.as_fd()],
        "a socket",
    );
    refused_with(
        &mut c,
        "add-device",
        json!({ "idstr": "x", "mode": "data-fd", "fds": ["data-fd"] }),
        &[dir.as_fd()],
        "a directory",
    );
    refused_with(
        &mut c,
        "add-device",
        json!({ "idstr": "x", "mode": "device", "fds": ["device"] }),
        &[pipe_r.as_fd()],
        "VFIO device fd",
    );
    // A character device answers ioctls, so only a vfio-dev major may pass.
    let null = std::fs::File::open("/dev/null").unwrap();
    refused_with(
        &mut c,
        "add-device",
        json!({ "idstr": "x", "mode": "device", "fds": ["device"] }),
        &[null.as_fd()],
        "found character device 1:3 (not vfio-dev",
    );
    refused_with(
        &mut c,
        "add-device",
        json!({ "idstr": "x", "mode": "device" }),
        &[],
        "needs the VFIO device fd",
    );
    refused_with(
        &mut c,
        "query",
        json!({}),
        &[pipe_r.as_fd()],
        "takes no file descriptors",
    );
    // A write end registered, then used on the source: the direction is checked at setup.
    ok(
        &mut c,
        "add-device",
        json!({ "idstr": "0000:00:02.0/vfio", "mode": "data-fd", "fds": ["data-fd"] }),
        &[pipe_w.as_fd()],
    );
    let (a, _b, names) = channel_pairs(1);
    refused_with(
        &mut c,
        "migrate-outgoing",
        json!({ "channels": 1, "fds": names }),
        &borrowed(&a),
        "readable VFIO data_fd",
    );
    // Passed sockets: wrong names, count, or not a stream socket.
    refused_with(
        &mut c,
        "migrate-outgoing",
        json!({ "channels": 2, "fds": names }),
        &borrowed(&a),
        "must be named",
    );
    refused_with(
        &mut c,
        "migrate-outgoing",
        json!({ "channels": 1, "fds": ["main", "multifd-0"] }),
        &[a[0].as_fd(), pipe_r.as_fd()],
        "multifd-0",
    );
    refused_with(
        &mut c,
        "migrate-outgoing",
        json!({ "channels": 1 }),
        &[],
        "needs connect",
    );
    refused_with(
        &mut c,
        "migrate-outgoing",
        json!({ "channels": 1, "connect": "nowhere:x" }),
        &[],
        "connect",
    );
    refused_with(
        &mut c,
        "migrate-incoming",
        json!({ "channels": 0, "listen": "127.0.0.1:0" }),
        &[],
        "channels must be 1 to 255",
    );
    refused_with(
        &mut c,
        "migrate-incoming",
        json!({ "channels": 1, "listen": "127.0.0.1:0", "uuid": "nope" }),
        &[],
        "uuid",
    );

    // Wrong state.
    refused_with(&mut c, "switchover-start", json!({}), &[], "no migration");
    refused_with(
        &mut c,
        "load-config-ready",
        json!({}),
        &[],
        "only on a destination",
    );
    let e = refused(
        &mut c,
        "update-device",
        json!({ "device": "nope", "config": "" }),
        &[],
    );
    assert_eq!(
        e.class,
        vfio_multifd::control::schema::ErrorClass::DeviceNotFound
    );
    refused_with(
        &mut c,
        "add-device",
        json!({ "idstr": "0000:00:02.0/vfio", "mode": "data-fd" }),
        &[],
        "already registered",
    );
    ok(&mut c, "cancel", json!({}), &[]);
    refused_with(&mut c, "cancel", json!({}), &[], "nothing to cancel");
    refused_with(
        &mut c,
        "migrate-outgoing",
        json!({ "channels": 1, "connect": "127.0.0.1:9" }),
        &[],
        "no devices registered",
    );

    // Still serving, and every refused fd was closed.
    let q = ok(&mut c, "query", json!({}), &[]);
    assert_eq!(q["status"], "none");
    let caps = ok(&mut c, "query-capabilities", json!({}), &[]);
    assert_eq!(caps["protocol"], 1);
    drop((pipe_r, pipe_w, sock_a, dir, a));
    helper.settles_to(base_fds, base_threads);
}

/// The config travels as one packet, which the destination refuses above a chunk: a larger
/// one is refused when the VMM hands it over, naming the device, not after the VM stopped.
#[test]
fn a_config_larger_than_a_chunk_is_refused_when_handed_over() {
    let helper = Helper::start_with("big-config", &["--chunk", "64KiB"]);
    let mut c = helper.client();
    let fits = base64_encode(&vec![7u8; 64 << 10]);
    let too_big = base64_encode(&vec![7u8; (64 << 10) + 1]);
    let (r, _w) = vfio::fd::pipe().unwrap();
    let e = refused(
        &mut c,
        "add-device",
        json!({ "idstr": "big", "mode": "data-fd", "config": too_big, "fds": ["data-fd"] }),
        &[r.as_fd()],
    );
    assert!(
        e.desc.contains("add-device big/0: config of 65537 bytes")
            && e.desc.contains("65536 bytes"),
        "{}",
        e.desc
    );
    ok(
        &mut c,
        "add-device",
        json!({ "idstr": "big", "mode": "data-fd", "config": fits, "fds": ["data-fd"] }),
        &[r.as_fd()],
    );
    let e = refused(
        &mut c,
        "update-device",
        json!({ "device": "big/0", "config": too_big }),
        &[],
    );
    assert!(
        e.desc
            .contains("update-device big/0: config of 65537 bytes"),
        "{}",
        e.desc
    );
}

#[test]
fn a_second_vmm_is_turned_away_and_the_first_keeps_serving() {
    let helper = Helper::start("second");
    let mut first = helper.client();
    ok(
        &mut first,
        "add-device",
        json!({ "idstr": "0000:00:02.0/vfio", "mode": "data-fd" }),
        &[],
    );
    let mut second = UnixStream::connect(&helper.socket).unwrap();
    let mut text = String::new();
    second.read_to_string(&mut text).unwrap();
    assert!(text.contains("another VMM is connected"), "{text}");
    assert!(text.contains("GenericError"), "{text}");
    // The first VMM's state is untouched.
    refused_with(
        &mut first,
        "add-device",
        json!({ "idstr": "0000:00:02.0/vfio", "mode": "data-fd" }),
        &[],
        "already registered",
    );
    ok(&mut first, "query", json!({}), &[]);
    // When the first leaves, the next one is served, with a clean slate.
    drop(first);
    let mut next = helper.client();
    ok(
        &mut next,
        "add-device",
        json!({ "idstr": "0000:00:02.0/vfio", "mode": "data-fd" }),
        &[],
    );
}

/// A VMM that sends far more commands than it reads answers for (past both socket buffers
/// and the helper's backlog limit), and reads nothing for longer than any write timeout, gets
/// every answer in order and keeps its connection: on an inherited non-blocking fd too.
#[test]
fn a_vmm_that_reads_late_gets_every_answer_and_keeps_its_connection() {
    const QUERIES: usize = 30_000;
    let quiet = Duration::from_secs(7);
    fn drive(stream: UnixStream, quiet: Duration) {
        let mut reader = std::io::BufReader::new(stream.try_clone().unwrap());
        let mut greeting = String::new();
        std::io::BufRead::read_line(&mut reader, &mut greeting).unwrap();
        assert!(greeting.contains("vfio-multifd"), "{greeting}");
        let mut writer = stream.try_clone().unwrap();
        let sender = std::thread::spawn(move || {
            for i in 0..QUERIES {
                let line = format!("{{\"execute\":\"query\",\"id\":{i}}}\n");
                std::io::Write::write_all(&mut writer, line.as_bytes()).unwrap();
            }
        });
        std::thread::sleep(quiet);
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        for i in 0..QUERIES {
            let mut line = String::new();
            let n = std::io::BufRead::read_line(&mut reader, &mut line).unwrap();
            assert!(n > 0, "the helper closed the connection after {i} answers");
            let reply: Value = serde_json::from_str(&line).unwrap();
            assert_eq!(reply["id"], i, "{line}");
            assert!(reply["return"].is_object(), "{line}");
        }
        sender.join().unwrap();
        std::io::Write::write_all(&mut &stream, b"{\"execute\":\"quit\"}\n").unwrap();
        let mut line = String::new();
        std::io::BufRead::read_line(&mut reader, &mut line).unwrap();
        assert!(line.contains("return"), "{line}");
    }

    let mut helper = Helper::start("late-reader");
    drive(UnixStream::connect(&helper.socket).unwrap(), quiet);
    assert!(helper.wait_exit().success());

    let (mine, theirs) = UnixStream::pair().unwrap();
    theirs.set_nonblocking(true).unwrap();
    let theirs = OwnedFd::from(theirs);
    nix::fcntl::fcntl(
        &theirs,
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()),
    )
    .unwrap();
    let raw = std::os::fd::AsRawFd::as_raw_fd(&theirs).to_string();
    let mut child = Command::new(BIN)
        .args(["serve", "--fd", &raw, "--log-level", "error"])
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    drop(theirs);
    drive(mine, quiet);
    let deadline = Instant::now() + Duration::from_secs(10);
    while child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "serve --fd did not quit");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// `serve --socket-path socket`, which must fail within 10 s: its stderr.
fn serve_fails(socket: &std::path::Path) -> String {
    let mut child = Command::new(BIN)
        .args(["serve", "--socket-path"])
        .arg(socket)
        .args(["--log-level", "warn"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("serve --socket-path {socket:?} kept running");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success());
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Connects to a helper that may still be replacing a stale socket at `socket`.
fn connect_soon(socket: &std::path::Path) -> Client {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match Client::connect(socket) {
            Ok(client) => return client,
            Err(e) => assert!(Instant::now() < deadline, "{socket:?}: {e}"),
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Fds sent in one message with two lines that name fds reach neither: the second line would
/// otherwise take the first one's data_fd. The same holds for fds beyond 253 on one line, which
/// close on arrival instead of piling up.
#[test]
fn fds_meant_for_another_line_or_beyond_the_limit_are_refused_and_closed() {
    let helper = Helper::start("fd-lines");
    let mut c = helper.client();
    let (r, _w) = vfio::fd::pipe().unwrap();
    let add = |id: u32, bus: u32| {
        json!({ "execute": "add-device", "id": id,
                "arguments": { "idstr": format!("0000:{bus:02x}:02.0/vfio"), "mode": "data-fd",
                               "fds": ["data-fd"] } })
    };
    let two = format!("{}\n{}\n", add(1, 1), add(2, 2));
    c.send_raw(two.as_bytes(), &[r.as_fd()]).unwrap();
    let first = c.next_reply().unwrap();
    assert_eq!(first["id"], 1, "{first}");
    assert!(
        first["error"]["desc"]
            .as_str()
            .unwrap()
            .contains("0 arrived"),
        "{first}"
    );
    let second = c.next_reply().unwrap();
    assert_eq!(second["id"], 2, "{second}");
    assert!(
        second["error"]["desc"]
            .as_str()
            .unwrap()
            .contains("earlier line that names fds"),
        "{second}"
    );
    // Neither took the fd: both devices can still be added, each with its own.
    for bus in [1, 2] {
        let (r, _w) = vfio::fd::pipe().unwrap();
        ok(
            &mut c,
            "add-device",
            add(0, bus)["arguments"].clone(),
            &[r.as_fd()],
        );
    }
    let base_fds = helper.fds();

    // 300 fds on one line, in two messages: at most 253 are held, and the line is refused.
    let many: Vec<OwnedFd> = (0..150).map(|_| vfio::fd::pipe().unwrap().0).collect();
    c.send_raw(b" ", &borrowed(&many)).unwrap();
    c.send_raw(b" ", &borrowed(&many)).unwrap();
    assert!(helper.fds() <= base_fds + 253, "{} fds", helper.fds());
    c.send_raw(format!("{}\n", add(3, 3)).as_bytes(), &[])
        .unwrap();
    let third = c.next_reply().unwrap();
    assert!(
        third["error"]["desc"]
            .as_str()
            .unwrap()
            .contains("more than 253 fds"),
        "{third}"
    );
    helper.settles_to(base_fds, helper.threads());
    ok(&mut c, "query", json!({}), &[]);
}

#[test]
fn a_live_control_socket_is_kept_and_a_helper_removes_only_its_own() {
    let mut first = Helper::start("live");
    let err = serve_fails(&first.socket);
    let shown = first.socket.display().to_string();
    assert!(
        err.contains(&format!("another helper is serving on {shown}")),
        "{err}"
    );
    let mut c = first.client();
    ok(&mut c, "query", json!({}), &[]);
    // The path deleted under the first helper and taken by a second: the first one's exit
    // leaves the second's socket alone.
    std::fs::remove_file(&first.socket).unwrap();
    let mut second = Helper::start_at(scratch("live-second"), first.socket.clone(), &[]);
    ok(&mut c, "quit", json!({}), &[]);
    assert!(first.wait_exit().success());
    ok(&mut second.client(), "query", json!({}), &[]);
    // A socket nobody listens on any more is stale: the next helper replaces it.
    second.kill();
    assert!(first.socket.exists());
    let third = Helper::start_at(scratch("live-third"), first.socket.clone(), &[]);
    ok(&mut connect_soon(&third.socket), "query", json!({}), &[]);
}

#[test]
fn a_socket_path_that_fills_sun_path_works_and_a_longer_one_is_refused_by_name() {
    let dir = scratch("long");
    let at = |len: usize, name_len: usize| {
        let parent = len - name_len - 1 - dir.as_os_str().len() - 1;
        dir.join("d".repeat(parent)).join("s".repeat(name_len))
    };
    for name_len in [60, 3] {
        // 107 bytes: sun_path's 108 with the NUL.
        let socket = at(107, name_len);
        std::fs::create_dir_all(socket.parent().unwrap()).unwrap();
        let helper = Helper::start_at(scratch("long-helper"), socket.clone(), &[]);
        ok(&mut helper.client(), "quit", json!({}), &[]);
    }
    let socket = at(108, 3);
    let err = serve_fails(&socket);
    assert!(
        err.contains(&socket.display().to_string()) && err.contains("108 bytes"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_main_channel_that_goes_quiet_fails_naming_the_wait_and_the_timeout() {
    let helper = Helper::start("quiet-main");
    let mut d = helper.client();
    let (_r, w) = vfio::fd::pipe().unwrap();
    ok(
        &mut d,
        "add-device",
        json!({ "idstr": "0000:00:02.0/vfio", "mode": "data-fd", "fds": ["data-fd"] }),
        &[w.as_fd()],
    );
    let (a, b, names) = channel_pairs(1);
    ok(
        &mut d,
        "migrate-incoming",
        json!({ "channels": 1, "fds": names, "timeout": 1 }),
        &borrowed(&b),
    );
    drop(b);
    // The file header, then the CONFIGURATION section a byte every 300 ms: each read sees a
    // byte well within the 1 s timeout, but the setup as a whole must not take longer.
    let mut main = UnixStream::from(a[0].try_clone().unwrap());
    std::io::Write::write_all(&mut main, b"QEVM\0\0\0\x03").unwrap();
    let started = Instant::now();
    let trickler = std::thread::spawn(move || {
        for b in b"\x07\0\0\0\x08pc-q35-10.0" {
            std::thread::sleep(Duration::from_millis(300));
            if std::io::Write::write_all(&mut main, std::slice::from_ref(b)).is_err() {
                return;
            }
        }
    });
    let (end, _) = wait_for(&mut d, "the migration's end", terminal);
    let took = started.elapsed();
    let error = end.data["error"].as_str().unwrap_or_default();
    assert_eq!(end.data["status"], "failed", "{}", end.data);
    assert!(
        error.contains("timed out after 1s waiting for the CONFIGURATION section"),
        "{error}"
    );
    assert!(took < Duration::from_millis(2500), "{took:?}");
    drop(a);
    trickler.join().unwrap();
}

/// The child half of the credentials test: run as another uid by `setpriv`.
#[test]
fn credentials_client_role() {
    let Ok(path) = std::env::var("VMF_CONTROL_CLIENT_SOCKET") else {
        return;
    };
    let mut stream = UnixStream::connect(path).unwrap();
    let mut text = String::new();
    let _ = stream.read_to_string(&mut text);
    println!("CLIENT-SAW: {text}");
}

#[test]
fn other_credentials_are_turned_away() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!(
            "SKIP other_credentials_are_turned_away: needs root to run a client as another uid"
        );
        return;
    }
    let helper = Helper::start("cred");
    let mode = std::fs::metadata(&helper.socket)
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600, "the control socket is 0600");
    // Open the socket file so the other uid reaches the credential check.
    std::fs::set_permissions(&helper.socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    let me = std::env::current_exe().unwrap();
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(&me)
        .args([
            "--exact",
            "credentials_client_role",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("VMF_CONTROL_CLIENT_SOCKET", &helper.socket)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("CLIENT-SAW:") && stdout.contains("peer uid 65534"),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The helper keeps serving its own uid.
    let mut c = helper.client();
    ok(&mut c, "query", json!({}), &[]);
}

#[test]
fn serve_launch_conventions() {
    let out = Command::new(BIN)
        .args(["serve", "--print-capabilities"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let caps: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(caps["protocol"], 1);
    assert!(caps["engines"]["available"].as_array().unwrap().len() == 2);
    assert!(caps["io-uring"]["features"].is_object());
    assert!(caps["limits"]["max-fds-per-message"].as_u64().unwrap() > 0);
    let out = Command::new(BIN).args(["serve"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let out = Command::new(BIN)
        .args(["serve", "--socket-path", "/tmp/x", "--fd", "3"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    // --fd with a connected socket: serves that VMM, exits when it leaves.
    let (mine, theirs) = UnixStream::pair().unwrap();
    let theirs = OwnedFd::from(theirs);
    let raw = std::os::fd::AsRawFd::as_raw_fd(&theirs);
    nix::fcntl::fcntl(
        &theirs,
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()),
    )
    .unwrap();
    let mut child = Command::new(BIN)
        .args(["serve", "--fd", &raw.to_string(), "--log-level", "error"])
        .spawn()
        .unwrap();
    drop(theirs);
    let mut c = Client::from_stream(mine).unwrap();
    ok(&mut c, "query", json!({}), &[]);
    drop(c);
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "serve --fd did not exit");
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(status.success());
    // --fd with a listening socket: one VMM at a time, as with --socket-path.
    let dir = scratch("fd-listen");
    let path = dir.join("inherited.sock");
    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let listener = OwnedFd::from(listener);
    let raw = std::os::fd::AsRawFd::as_raw_fd(&listener);
    nix::fcntl::fcntl(
        &listener,
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()),
    )
    .unwrap();
    let mut child = Command::new(BIN)
        .args(["serve", "--fd", &raw.to_string(), "--log-level", "error"])
        .spawn()
        .unwrap();
    drop(listener);
    for _ in 0..2 {
        let mut c = Client::connect(&path).unwrap();
        ok(&mut c, "query", json!({}), &[]);
    }
    let mut c = Client::connect(&path).unwrap();
    ok(&mut c, "quit", json!({}), &[]);
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "serve --fd (listening) did not quit"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(status.success());
    let _ = std::fs::remove_dir_all(&dir);
    // --fd that is not a socket.
    let out = Command::new(BIN)
        .args(["serve", "--fd", "0"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
}

// ---------------------------------------------------------------------------------------------
// Cancel and a killed peer, in each phase

/// A source device ends RUNNING and intact; nothing is left in either helper.
fn recovered(run: &mut Run, final_src: &EventLine) {
    for dev in final_src.data["devices"].as_array().unwrap() {
        // Not "the destination's outcome is unknown": nothing was sent to its end here.
        assert_eq!(
            dev["recovery"], "vmm: return the device to RUNNING",
            "{dev}"
        );
    }
    for dev in run.devs.iter_mut() {
        dev.source_back_and_intact();
    }
}

#[test]
fn cancel_in_each_phase() {
    // Destination in setup: its channels' peer never speaks.
    {
        let dst = Helper::start("cancel-setup");
        let mut d = dst.client();
        let base = (dst.fds(), dst.threads());
        let mut dev = Dev::new(0, 1 << 20, false, None);
        dev.add_to_dest(&mut d, json!({}));
        let (_a, b, names) = channel_pairs(2);
        ok(
            &mut d,
            "migrate-incoming",
            json!({ "channels": 2, "fds": names }),
            &borrowed(&b),
        );
        drop(b);
        wait_for(&mut d, "setup", status_is("setup"));
        refused_with(
            &mut d,
            "add-device",
            json!({ "idstr": "y", "mode": "data-fd" }),
            &[],
            "in progress",
        );
        ok(&mut d, "cancel", json!({}), &[]);
        let (end, _) = wait_for(&mut d, "end", terminal);
        assert_eq!(end.data["status"], "cancelled", "{:?}", end.data);
        dev.sink_reset();
        dst.settles_to(base.0, base.1);
    }
    // Source waiting for SWITCHOVER_ACK (the destination never acks: no destination helper),
    // then precopy after the ack, then stop-copy with a slow device; each time the source
    // VMM cancels, and the destination follows with a failure.
    for phase in ["before-ack", "precopy", "stop-copy"] {
        let devs = vec![
            Dev::new(0, 2 << 20, true, None),
            Dev::new(
                1,
                4 << 20,
                false,
                if phase == "stop-copy" {
                    Some(4 << 20)
                } else {
                    None
                },
            ),
        ];
        let mut run = if phase == "before-ack" {
            before_ack_run(devs)
        } else {
            Run::new(devs, 2, false)
        };
        if phase != "before-ack" {
            wait_for(&mut run.s, "SWITCHOVER_ACK", |e| {
                e.event == "SWITCHOVER_ACK"
            });
        }
        if phase == "stop-copy" {
            run.switchover();
            wait_for(&mut run.s, "stop-copy", status_is("stop-copy"));
            std::thread::sleep(Duration::from_millis(200));
            let q = ok(&mut run.s, "query", json!({}), &[]);
            assert_eq!(q["status"], "stop-copy", "{phase}");
        }
        if phase == "precopy" {
            // The VM is stopped and a data_fd handed over, but switchover-start never comes:
            // the cancel's final event still comes after that fd is closed.
            run.devs[1].stop_copy(&mut run.s);
        }
        ok(&mut run.s, "cancel", json!({}), &[]);
        let (end, _) = wait_for(&mut run.s, "end", terminal);
        assert_eq!(end.data["status"], "cancelled", "{phase}: {:?}", end.data);
        // At once: the final event comes after every fd of the migration is closed.
        let (fds, _) = run.base[0];
        assert!(
            run.src.fds() <= fds,
            "{phase}: source helper holds {} fds, baseline {fds}",
            run.src.fds()
        );
        recovered(&mut run, &end);
        if phase != "before-ack" {
            let (end, _) = wait_for(&mut run.d, "end", terminal);
            assert_eq!(end.data["status"], "failed", "{phase}");
            for dev in run.devs.iter_mut() {
                dev.sink_reset();
            }
        }
        run.settled();
        // The helpers serve on.
        ok(&mut run.s, "query", json!({}), &[]);
        ok(&mut run.d, "query", json!({}), &[]);
    }
    // Destination cancelled while it holds a config (loaded, waiting for load-config-ready).
    {
        let mut run = Run::new(vec![Dev::new(0, 1 << 20, false, None)], 1, true);
        wait_for(&mut run.s, "SWITCHOVER_ACK", |e| {
            e.event == "SWITCHOVER_ACK"
        });
        run.switchover();
        wait_for(&mut run.d, "loaded", status_is("loaded"));
        wait_for(&mut run.s, "completed", status_is("completed"));
        ok(&mut run.d, "cancel", json!({}), &[]);
        let (end, seen) = wait_for(&mut run.d, "end", terminal);
        assert_eq!(end.data["status"], "cancelled");
        assert!(
            seen.iter().all(|e| e.event != "DEVICE_LOADED"),
            "the held config is not handed out"
        );
        // The source completed: the destination's error tells the VMM where the state is.
        let q = ok(&mut run.d, "query", json!({}), &[]);
        let desc = q["error"]["desc"].as_str().unwrap_or_default();
        assert!(desc.contains("resume the source VM"), "{q}");
        run.devs[0].sink_reset();
        run.settled();
    }
}

/// A source whose destination is a silent socket: it stays before SWITCHOVER_ACK.
fn before_ack_run(mut devs: Vec<Dev>) -> Run {
    let src = Helper::start("src");
    let dst = Helper::start("dst-unused");
    let mut s = src.client();
    let d = dst.client();
    let base = [(src.fds(), src.threads()), (dst.fds(), dst.threads())];
    for dev in devs.iter_mut() {
        dev.add_to_source(&mut s);
    }
    let (a, b, names) = channel_pairs(2);
    ok(
        &mut s,
        "migrate-outgoing",
        json!({ "channels": 2, "fds": names }),
        &borrowed(&a),
    );
    drop(a);
    std::mem::forget(b); // the "destination" keeps its ends open and never answers
    wait_for(&mut s, "precopy", status_is("precopy"));
    let q = ok(&mut s, "query", json!({}), &[]);
    assert_eq!(q["switchover-ack"], false);
    refused_with(&mut s, "switchover-start", json!({}), &[], "SWITCHOVER_ACK");
    Run {
        src,
        dst,
        s,
        d,
        devs,
        base,
    }
}

#[test]
fn killed_peer_in_each_phase() {
    for (victim, phase) in [
        ("destination", "precopy"),
        ("destination", "stop-copy"),
        ("source", "precopy"),
        ("source", "stop-copy"),
    ] {
        let slow = if phase == "stop-copy" {
            Some(4 << 20)
        } else {
            None
        };
        let devs = vec![
            Dev::new(0, 2 << 20, true, None),
            Dev::new(1, 4 << 20, false, slow),
        ];
        let mut run = Run::new(devs, 2, false);
        wait_for(&mut run.s, "SWITCHOVER_ACK", |e| {
            e.event == "SWITCHOVER_ACK"
        });
        if phase == "stop-copy" {
            run.switchover();
            wait_for(&mut run.d, "stop-copy", status_is("stop-copy"));
            std::thread::sleep(Duration::from_millis(200));
        }
        if victim == "destination" {
            run.dst.kill();
            let (failed, _) = wait_for(&mut run.s, "MIGRATION_FAILED", |e| {
                e.event == "MIGRATION_FAILED"
            });
            assert!(
                failed.data["desc"].as_str().unwrap().len() > 10,
                "{:?}",
                failed.data
            );
            let (end, _) = wait_for(&mut run.s, "end", terminal);
            assert_eq!(end.data["status"], "failed", "{victim} {phase}");
            recovered(&mut run, &end);
            run.src.settles_to(run.base[0].0, run.base[0].1);
        } else {
            run.src.kill();
            let (failed, _) = wait_for(&mut run.d, "MIGRATION_FAILED", |e| {
                e.event == "MIGRATION_FAILED"
            });
            assert!(
                failed.data["desc"].as_str().unwrap().contains("source"),
                "{:?}",
                failed.data
            );
            let (end, _) = wait_for(&mut run.d, "end", terminal);
            assert_eq!(end.data["status"], "failed");
            for dev in run.devs.iter_mut() {
                dev.sink_reset();
                dev.source_back_and_intact();
            }
            run.dst.settles_to(run.base[1].0, run.base[1].1);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Random commands

/// Every command but `quit` (which ends the helper), and one that does not exist.
fn fuzz_command(rng: &mut Rng) -> &'static str {
    let commands: Vec<&str> = COMMANDS
        .iter()
        .copied()
        .filter(|&c| c != "quit")
        .chain(["no-such-command"])
        .collect();
    rng.pick(&commands)
}

const FUZZ_KEYS: &[&str] = &[
    "idstr",
    "instance-id",
    "mode",
    "owner",
    "precopy",
    "config",
    "multifd-transfer",
    "load-config-after-iter",
    "max-queued-buffers-size",
    "fds",
    "device",
    "channels",
    "connect",
    "listen",
    "timeout",
    "timestamps",
    "multifd-compression",
    "uuid",
];

fn random_value(rng: &mut Rng, depth: u32) -> Value {
    match rng.below(if depth < 2 { 7 } else { 5 }) {
        0 => json!(rng.pick(&[
            "",
            "on",
            "off",
            "auto",
            "unlimited",
            "device",
            "data-fd",
            "helper",
            "127.0.0.1:0",
            "0000:00:02.0/vfio",
            "0000:00:02.0/vfio/0",
            "AAAA",
            "\u{0}",
            "data-fd",
            "main",
            "multifd-0"
        ])),
        1 => json!([0u64, 1, 255, 256, 1 << 31, u64::MAX][rng.below(6)]),
        2 => json!([-1i64, i64::MIN][rng.below(2)]),
        3 => json!([json!(true), json!(false), Value::Null, json!(1.5)][rng.below(4)]),
        4 => json!("x".repeat(rng.below(300))),
        5 => Value::Array(
            (0..rng.below(4))
                .map(|_| random_value(rng, depth + 1))
                .collect(),
        ),
        _ => random_object(rng, depth + 1),
    }
}

fn random_object(rng: &mut Rng, depth: u32) -> Value {
    let mut map = serde_json::Map::new();
    for _ in 0..rng.below(6) {
        map.insert(rng.pick(FUZZ_KEYS).to_string(), random_value(rng, depth));
    }
    Value::Object(map)
}

/// A command most likely refused, or one of the few that get somewhere: a device registered
/// (some with a data_fd), a migration to a port nothing listens on, or one that waits for a
/// source that never comes.
fn random_command(rng: &mut Rng) -> (String, Value, bool) {
    let slot = rng.below(40);
    let limit = [json!(0), json!(4096), json!("unlimited")][rng.below(3)].clone();
    let precopy = rng.below(3) == 0;
    let hold = rng.pick(&["on", "off"]);
    match rng.below(20) {
        0 => (
            "add-device".into(),
            json!({ "idstr": format!("0000:00:{slot:02x}.0/vfio"), "mode": "data-fd",
                    "precopy": precopy, "load-config-after-iter": hold,
                    "max-queued-buffers-size": limit }),
            false,
        ),
        1 => (
            "add-device".into(),
            json!({ "idstr": format!("0000:01:{slot:02x}.0/vfio"), "mode": "data-fd",
                    "fds": ["data-fd"] }),
            true,
        ),
        2 => (
            "migrate-incoming".into(),
            json!({ "channels": rng.below(4), "listen": "127.0.0.1:0", "timeout": 1 }),
            false,
        ),
        3 => (
            "migrate-outgoing".into(),
            json!({ "channels": rng.below(4), "connect": "127.0.0.1:1", "timeout": 1 }),
            false,
        ),
        4 => (
            "remove-device".into(),
            json!({ "device": format!("0000:0{}:{slot:02x}.0/vfio/0", rng.below(2)) }),
            false,
        ),
        _ => (fuzz_command(rng).to_string(), random_object(rng, 0), false),
    }
}

/// Random commands, most of them refused, some that register devices (a few with a real
/// pipe as data_fd), start migrations that fail or wait, and cancels, plus truncated lines:
/// every command gets exactly its own reply, and at the end the helper still serves and holds
/// no fd or thread more than before. `CONTROL_FUZZ_COMMANDS` and `CONTROL_FUZZ_SEED` run it
/// longer or elsewhere.
#[test]
fn random_commands_each_get_their_reply_and_leave_nothing_behind() {
    let commands = env_u64("CONTROL_FUZZ_COMMANDS", 5000);
    let mut rng = Rng(env_u64("CONTROL_FUZZ_SEED", 0x5eed) | 1);
    let helper = Helper::start("fuzz");
    let mut c = helper.client();
    let (fds, threads) = (helper.fds(), helper.threads());
    let mut accepted: std::collections::BTreeMap<String, u32> = Default::default();
    for n in 0..commands {
        if rng.below(25) == 0 {
            let line =
                json!({ "execute": "query", "arguments": random_object(&mut rng, 0) }).to_string();
            let cut = rng.below(line.len());
            c.send_raw(format!("{}\n", &line[..cut]).as_bytes(), &[])
                .unwrap();
            let reply = c.next_reply().unwrap();
            assert!(reply.get("error").is_some(), "line {n}: {reply}");
            continue;
        }
        if rng.below(100) == 0 {
            // A destination that waits for a source: only its devices, each with a resuming
            // data_fd (a pipe's write end).
            let _ = c.execute("cancel", json!({}), &[]).unwrap();
            let (_read, write) = std::io::pipe().unwrap();
            let _ = c
                .execute(
                    "add-device",
                    json!({ "idstr": "0000:02:00.0/vfio", "mode": "data-fd", "fds": ["data-fd"] }),
                    &[write.as_fd()],
                )
                .unwrap();
        }
        let (command, args, with_fd) = random_command(&mut rng);
        let pipe = with_fd.then(|| std::io::pipe().unwrap());
        // A saving (read end) or resuming (write end) data_fd.
        let passed: Vec<BorrowedFd<'_>> = match &pipe {
            Some((read, _)) if rng.below(2) == 0 => vec![read.as_fd()],
            Some((_, write)) => vec![write.as_fd()],
            None => Vec::new(),
        };
        // Ok(Err(..)) is a refusal, a reply like any other; Err would be no reply at all.
        match c.execute(&command, args.clone(), &passed) {
            Ok(Ok(_)) => *accepted.entry(command).or_default() += 1,
            Ok(Err(_)) => {}
            Err(e) => panic!("command {n}, {command} {args}: {e}"),
        }
        while c.next_event(Duration::ZERO).unwrap().is_some() {}
    }
    // Whatever still runs is cancelled; registered devices are let go.
    let deadline = Instant::now() + WAIT;
    loop {
        let status = ok(&mut c, "query", json!({}), &[])["status"].clone();
        if matches!(
            status.as_str(),
            Some("none" | "completed" | "failed" | "cancelled")
        ) {
            break;
        }
        assert!(Instant::now() < deadline, "still {status} after cancels");
        let _ = c.execute("cancel", json!({}), &[]).unwrap();
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = c.execute("cancel", json!({}), &[]).unwrap();
    helper.settles_to(fds, threads);
    ok(&mut c, "query-capabilities", json!({}), &[]);
    // The run reached past the argument checks: devices and migrations got somewhere.
    for command in [
        "add-device",
        "migrate-incoming",
        "migrate-outgoing",
        "cancel",
    ] {
        assert!(
            accepted.get(command).is_some_and(|&n| n > 0),
            "{accepted:?}"
        );
    }
}
