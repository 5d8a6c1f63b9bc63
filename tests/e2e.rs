//! End to end through the built binary: real processes, real loopback sockets, simulated
//! devices on real fds (memfds, or pipes with `--device-speed`). The destination's devices
//! check every byte at RESUMING -> STOP and its session checks every config blob, so a run
//! that reports `verified` moved every byte exactly.

// Test helpers unwrap too: a failed step is a failed test (clippy allows it only in #[test] fns).
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_vfio-multifd");
/// Any single run taking longer than this is a hang.
const LIMIT: Duration = Duration::from_secs(60);

/// A child helper with its stdout lines and its stderr collected.
struct Proc {
    child: Child,
    lines: Receiver<String>,
    stderr: thread::JoinHandle<String>,
}

fn spawn(args: &[&str], env: &[(&str, &str)]) -> Proc {
    spawn_under(&[], args, env)
}

/// The helper as the last argument of `prefix` (a wrapper such as `strace -f`).
fn spawn_under(prefix: &[&str], args: &[&str], env: &[(&str, &str)]) -> Proc {
    let mut cmd = match prefix.split_first() {
        Some((wrapper, wrapper_args)) => {
            let mut cmd = Command::new(wrapper);
            cmd.args(wrapper_args).arg(BIN);
            cmd
        }
        None => Command::new(BIN),
    };
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .env_remove("RUST_LOG")
        .env_remove("VFIO_MULTIFD_FORBID");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("spawn vfio-multifd");
    let stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let (tx, lines) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let stderr = thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });
    Proc {
        child,
        lines,
        stderr,
    }
}

/// Everything a finished helper said.
struct Done {
    status: ExitStatus,
    stdout: Vec<String>,
    stderr: String,
}

impl Done {
    /// The last stdout line that parses as JSON.
    fn json(&self) -> Value {
        self.stdout
            .iter()
            .rev()
            .find_map(|l| serde_json::from_str::<Value>(l).ok())
            .unwrap_or_else(|| {
                panic!(
                    "no JSON on stdout: {:?}\nstderr: {}",
                    self.stdout, self.stderr
                )
            })
    }

    /// The data of the REPORT event (helpers run with --events).
    fn report(&self) -> Value {
        self.stdout
            .iter()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .find(|v| v["event"] == "REPORT")
            .map(|v| v["data"].clone())
            .unwrap_or_else(|| {
                panic!(
                    "no REPORT event: {:?}\nstderr: {}",
                    self.stdout, self.stderr
                )
            })
    }
}

impl Proc {
    /// The next stdout line, within the limit.
    fn line(&self) -> String {
        self.lines
            .recv_timeout(LIMIT)
            .expect("the helper printed nothing within the limit")
    }

    fn finish(mut self) -> Done {
        let deadline = Instant::now() + LIMIT;
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() > deadline {
                self.child.kill().unwrap();
                self.child.wait().unwrap();
                panic!("vfio-multifd ran past {LIMIT:?}");
            }
            thread::sleep(Duration::from_millis(10));
        };
        let stderr = self.stderr.join().unwrap();
        let mut stdout = Vec::new();
        while let Ok(line) = self.lines.recv_timeout(Duration::from_secs(5)) {
            stdout.push(line);
        }
        Done {
            status,
            stdout,
            stderr,
        }
    }
}

fn run(args: &[&str], env: &[(&str, &str)]) -> Done {
    spawn(args, env).finish()
}

/// `demo ... --json`; returns the summary after checking the exit status matches `verified`.
fn demo(args: &[&str], env: &[(&str, &str)]) -> (Value, Done) {
    let mut argv = vec!["demo", "--json", "--no-progress"];
    argv.extend_from_slice(args);
    let done = run(&argv, env);
    let summary = done.json();
    assert_eq!(
        done.status.success(),
        summary["verified"] == true,
        "exit status must follow verified: {summary}\nstderr: {}",
        done.stderr
    );
    (summary, done)
}

fn assert_verified(args: &[&str]) -> Value {
    let (summary, done) = demo(args, &[]);
    assert_eq!(
        summary["verified"], true,
        "{args:?}: {summary}\nstderr: {}",
        done.stderr
    );
    summary
}

/// `recv` then `send` as two processes with --events; returns (send, recv).
fn pair(
    common: &[&str],
    send_extra: &[&str],
    recv_extra: &[&str],
    env: &[(&str, &str)],
) -> (Done, Done) {
    pair_under(&[], common, send_extra, recv_extra, env)
}

/// [`pair`] with the destination run under `recv_prefix`.
fn pair_under(
    recv_prefix: &[&str],
    common: &[&str],
    send_extra: &[&str],
    recv_extra: &[&str],
    env: &[(&str, &str)],
) -> (Done, Done) {
    let mut recv_args = vec!["recv", "--listen", "127.0.0.1:0", "--events"];
    recv_args.extend_from_slice(common);
    recv_args.extend_from_slice(recv_extra);
    let recv = spawn_under(recv_prefix, &recv_args, env);
    let listening: Value = serde_json::from_str(&recv.line()).expect("LISTENING event");
    assert_eq!(listening["event"], "LISTENING", "{listening}");
    let addr = listening["data"]["addr"].as_str().unwrap().to_string();
    let mut send_args = vec!["send", "--connect", addr.as_str(), "--events"];
    send_args.extend_from_slice(common);
    send_args.extend_from_slice(send_extra);
    let send = spawn(&send_args, env);
    let send = send.finish();
    let recv = recv.finish();
    (send, recv)
}

fn assert_pair_verified(send: &Done, recv: &Done) {
    let (s, r) = (send.report(), recv.report());
    assert!(
        send.status.success() && recv.status.success(),
        "send: {s}\n{}\nrecv: {r}\n{}",
        send.stderr,
        recv.stderr
    );
    assert_eq!(r["verified"], true, "{r}");
    assert_eq!(s["ok"], true, "{s}");
    assert_eq!(s["bytes"], r["bytes"]);
}

fn matrix(engine: &str) {
    for channels in ["1", "4", "16"] {
        for devices in ["1", "4"] {
            // 3,000,000 is no multiple of 256 KiB: every device ends with a short read.
            let summary = assert_verified(&[
                "--engine",
                engine,
                "--channels",
                channels,
                "--devices",
                devices,
                "--size",
                "3000000",
                "--chunk",
                "256KiB",
            ]);
            let devices: u64 = devices.parse().unwrap();
            assert_eq!(summary["bytes"], devices * 3_000_000);
            assert_eq!(summary["channels"], channels.parse::<u64>().unwrap());
            assert_eq!(summary["latency_us"]["count"], devices * 12, "{summary}");
            if summary["engine"] != engine {
                eprintln!(
                    "note: {engine} requested, {} ran: {}",
                    summary["engine"], summary["notes"]
                );
            }
        }
    }
}

#[test]
fn byte_exact_with_the_uring_engine_over_1_4_16_channels_and_1_4_devices() {
    matrix("uring");
}

#[test]
fn byte_exact_with_the_threads_engine_over_1_4_16_channels_and_1_4_devices() {
    let summary = assert_verified(&["--engine", "threads", "--devices", "1", "--size", "1MiB"]);
    assert_eq!(summary["engine"], "threads");
    matrix("threads");
}

#[test]
fn short_reads_from_a_paced_pipe_device() {
    for engine in ["uring", "threads"] {
        // The device streams through a 1 MiB pipe: reads return what is buffered.
        assert_verified(&[
            "--engine",
            engine,
            "--devices",
            "2",
            "--channels",
            "3",
            "--size",
            "4MiB",
            "--chunk",
            "1MiB",
            "--device-speed",
            "2GiB/s",
        ]);
        // An odd chunk against a pipe: short reads land at odd offsets.
        assert_verified(&[
            "--engine",
            engine,
            "--devices",
            "2",
            "--channels",
            "2",
            "--size",
            "1000003",
            "--chunk",
            "4097",
            "--device-speed",
            "1GiB/s",
        ]);
    }
}

#[test]
fn zero_byte_one_byte_and_exactly_one_chunk_devices() {
    for engine in ["uring", "threads"] {
        let zero = assert_verified(&[
            "--engine",
            engine,
            "--devices",
            "3",
            "--channels",
            "4",
            "--size",
            "0",
        ]);
        assert_eq!(zero["bytes"], 0);
        assert_eq!(zero["latency_us"]["count"], 0);
        let one = assert_verified(&[
            "--engine",
            engine,
            "--devices",
            "2",
            "--channels",
            "2",
            "--size",
            "1",
        ]);
        assert_eq!(one["bytes"], 2);
        assert_eq!(one["latency_us"]["count"], 2);
        let chunk = assert_verified(&[
            "--engine",
            engine,
            "--devices",
            "2",
            "--channels",
            "3",
            "--size",
            "64KiB",
            "--chunk",
            "64KiB",
        ]);
        assert_eq!(
            chunk["latency_us"]["count"], 2,
            "one data packet per device"
        );
    }
}

#[test]
fn a_zero_queued_bytes_limit_still_delivers_one_device_in_order() {
    // Nothing may wait out of order: the destination reads only what it can write next.
    for engine in ["uring", "threads"] {
        assert_verified(&[
            "--engine",
            engine,
            "--devices",
            "1",
            "--channels",
            "4",
            "--size",
            "4MiB",
            "--chunk",
            "128KiB",
            "--queued-bytes-limit",
            "0",
        ]);
    }
}

/// The destination's workers end in whatever order `strace -f` (which slows each syscall by
/// its own amount) makes them. A worker used to leave, holding the device's next buffers,
/// when another worker's write started between its two end checks; the run then hung until
/// the source's no-progress timeout, or ended incomplete. In this shape that failed 1 run in
/// 60 under strace (5 in 100 with 256 MiB devices); 150 runs take 45 s here.
#[test]
fn every_run_of_a_destination_under_strace_finishes() {
    let strace = Command::new("strace").arg("-V").output();
    assert!(
        strace.is_ok_and(|o| o.status.success()),
        "strace is missing (tools/install-test-deps.sh installs it)"
    );
    let common = [
        "--devices",
        "1",
        "--size",
        "64M",
        "--channels",
        "8",
        "--chunk",
        "8M",
        "--timeout",
        "10",
    ];
    for run in 0..150 {
        let (send, recv) = pair_under(
            &["strace", "-f", "-qq", "-o", "/dev/null"],
            &common,
            &[],
            &[],
            &[],
        );
        assert!(
            send.status.success() && recv.status.success(),
            "run {run}: send: {}\n{}\nrecv: {}\n{}",
            send.report(),
            send.stderr,
            recv.report(),
            recv.stderr
        );
    }
}

/// A destination worker's ring holds a duplicate of every device's data_fd: with 32 devices
/// and 8 workers that is more fds than a soft limit of 200, which the helper raises to the
/// hard limit when it runs out.
#[test]
fn a_low_soft_open_file_limit_is_raised_when_the_rings_need_more() {
    let wrapper = ["sh", "-c", "ulimit -S -n 200 && exec \"$0\" \"$@\""];
    let args = [
        "demo",
        "--json",
        "--no-progress",
        "--engine",
        "uring",
        "--devices",
        "32",
        "--size",
        "256KiB",
        "--chunk",
        "64KiB",
        "--workers",
        "8",
        "--channels",
        "8",
    ];
    let done = spawn_under(&wrapper, &args, &[]).finish();
    let summary = done.json();
    assert_eq!(
        summary["verified"], true,
        "{summary}\nstderr: {}",
        done.stderr
    );
    assert_eq!(summary["engine"], "uring", "{summary}");
}

#[test]
fn channels_connecting_in_any_order() {
    let common = [
        "--devices",
        "2",
        "--channels",
        "8",
        "--size",
        "2MiB",
        "--chunk",
        "128KiB",
        "--engine",
        "threads",
    ];
    for order in ["reverse", "shuffle"] {
        let (send, recv) = pair(
            &common,
            &["--channel-order", order, "--seed", "7"],
            &["--seed", "7"],
            &[],
        );
        assert_pair_verified(&send, &recv);
    }
    let uring = [
        "--devices",
        "2",
        "--channels",
        "5",
        "--size",
        "2MiB",
        "--engine",
        "uring",
    ];
    let (send, recv) = pair(&uring, &["--channel-order", "shuffle"], &[], &[]);
    assert_pair_verified(&send, &recv);
}

#[test]
fn cross_engine_runs_in_both_directions() {
    let common = [
        "--devices",
        "3",
        "--channels",
        "4",
        "--size",
        "3MiB",
        "--chunk",
        "512KiB",
    ];
    let (send, recv) = pair(
        &common,
        &["--engine", "uring"],
        &["--engine", "threads"],
        &[],
    );
    assert_pair_verified(&send, &recv);
    assert_eq!(recv.report()["engine"], "threads");
    let (send, recv) = pair(
        &common,
        &["--engine", "threads"],
        &["--engine", "uring"],
        &[],
    );
    assert_pair_verified(&send, &recv);
    assert_eq!(send.report()["engine"], "threads");
    let summary = assert_verified(&[
        "--engine",
        "uring",
        "--dest-engine",
        "threads",
        "--size",
        "2MiB",
    ]);
    assert_eq!(summary["dest_engine"], "threads");
}

#[test]
fn forbidding_io_uring_uses_threads_with_one_log_line_and_verifies() {
    let env = [("VFIO_MULTIFD_FORBID", "io-uring")];
    let common = [
        "--devices",
        "2",
        "--channels",
        "3",
        "--size",
        "2MiB",
        "--engine",
        "uring",
    ];
    let (send, recv) = pair(&common, &[], &[], &env);
    assert_pair_verified(&send, &recv);
    for done in [&send, &recv] {
        assert_eq!(done.report()["engine"], "threads");
        let lines = done
            .stderr
            .lines()
            .filter(|l| l.contains("forbidden"))
            .count();
        assert_eq!(lines, 1, "one log line saying why: {}", done.stderr);
        assert!(
            done.stderr.contains("VFIO_MULTIFD_FORBID"),
            "{}",
            done.stderr
        );
    }
    let (summary, done) = demo(&["--size", "2MiB", "--devices", "2"], &env);
    assert_eq!(summary["verified"], true, "{}", done.stderr);
    assert_eq!(summary["engine"], "threads");
}

#[test]
fn demo_json_has_every_field_and_verifies() {
    let (summary, _) = demo(
        &["--devices", "4", "--size", "4MiB", "--channels", "6"],
        &[],
    );
    assert_eq!(summary["verified"], true, "{summary}");
    assert_eq!(summary["bytes"], 16u64 << 20);
    assert_eq!(summary["devices"], 4);
    assert_eq!(summary["channels"], 6);
    assert!(summary["engine"].is_string());
    assert!(
        summary["throughput_gib_s"].as_f64().unwrap() > 0.0,
        "{summary}"
    );
    assert!(summary["downtime_ms"].as_f64().unwrap() > 0.0, "{summary}");
    for side in ["source", "destination", "total"] {
        assert!(
            summary["cpu_s_per_gib"][side].as_f64().unwrap() >= 0.0,
            "{side}: {summary}"
        );
    }
    let latency = &summary["latency_us"];
    for p in ["p50", "p99", "p999", "max"] {
        assert!(latency[p].as_f64().unwrap() > 0.0, "{p}: {summary}");
    }
    assert!(latency["p50"].as_f64() <= latency["p99"].as_f64());
    assert!(latency["p999"].as_f64() <= latency["max"].as_f64());
}

#[test]
fn demo_human_summary_ends_with_the_numbers() {
    let done = run(
        &[
            "demo",
            "--devices",
            "2",
            "--size",
            "2MiB",
            "--channels",
            "2",
            "--no-progress",
        ],
        &[],
    );
    assert!(done.status.success(), "{}", done.stderr);
    let text = done.stdout.join("\n");
    let order = [
        "throughput",
        "downtime",
        "CPU",
        "latency",
        "verified    yes",
    ];
    let mut at = 0;
    for word in order {
        let found = text[at..]
            .find(word)
            .unwrap_or_else(|| panic!("{word} missing after {at}: {text}"));
        at += found;
    }
    assert!(
        text.contains("source") && text.contains("destination"),
        "{text}"
    );
    assert!(
        !done.stderr.contains('\r'),
        "no progress bar when stderr is not a terminal"
    );
}

#[test]
fn destination_failure_returns_source_devices_to_running() {
    // Different seeds: the destination's devices expect other bytes and reject the stream at
    // RESUMING -> STOP.
    let common = [
        "--devices",
        "2",
        "--channels",
        "3",
        "--size",
        "1MiB",
        "--engine",
        "threads",
    ];
    let (send, recv) = pair(&common, &["--seed", "1"], &["--seed", "2"], &[]);
    assert!(!send.status.success(), "source must fail");
    assert!(!recv.status.success(), "destination must fail");
    let s = send.report();
    assert_eq!(s["ok"], false);
    for device in s["devices"].as_array().unwrap() {
        assert_eq!(
            device["state"], "RUNNING",
            "source device back to RUNNING: {s}"
        );
    }
    let error = s["error"].as_str().unwrap();
    assert!(error.contains("the destination failed"), "{error}");
    assert!(
        error.contains("0000:00:02.0/vfio"),
        "names the device: {error}"
    );
    assert!(send.stderr.contains("0000:00:02.0/vfio"), "{}", send.stderr);
    let r = recv.report();
    assert_eq!(r["ok"], false);
    assert!(
        r["error"].as_str().unwrap().contains("0000:00:02.0/vfio"),
        "{r}"
    );
    assert!(recv.stderr.contains("0000:00:02.0/vfio"), "{}", recv.stderr);
}

#[test]
fn a_wrong_uuid_fails_both_sides_and_the_source_keeps_running_devices() {
    let common = ["--devices", "1", "--channels", "2", "--size", "1MiB"];
    let (send, recv) = pair(
        &common,
        &["--uuid", "11111111-2222-3333-4444-555555555555"],
        &["--uuid", "99999999-2222-3333-4444-555555555555"],
        &[],
    );
    assert!(!send.status.success() && !recv.status.success());
    let s = send.report();
    assert!(s["error"].as_str().unwrap().contains("uuid"), "{s}");
    assert_eq!(s["devices"][0]["state"], "RUNNING");
    assert!(recv.report()["error"].as_str().unwrap().contains("uuid"));
}

#[test]
fn a_channel_count_mismatch_fails_fast_with_both_counts() {
    let started = Instant::now();
    let (send, recv) = pair(
        &["--devices", "1", "--size", "64KiB"],
        &["--channels", "3"],
        &["--channels", "5"],
        &[],
    );
    assert!(!send.status.success() && !recv.status.success());
    let error = send.report()["error"].as_str().unwrap().to_string();
    assert!(error.contains('3') && error.contains('5'), "{error}");
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "no waiting for the timeout"
    );
}

#[test]
fn nobody_listening_is_a_clear_error() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    drop(listener);
    let done = run(
        &[
            "send",
            "--connect",
            &addr,
            "--devices",
            "1",
            "--size",
            "4KiB",
            "--timeout",
            "5",
        ],
        &[],
    );
    assert!(!done.status.success());
    assert!(
        done.stderr.contains("connecting the main channel"),
        "{}",
        done.stderr
    );
}

/// A destination frozen (SIGSTOP) mid-stream, with SEND_ZC in use: one 64 MiB chunk per
/// channel, each channel's first send a real zero-copy one even on loopback, whose
/// notification waits for data a zero window never lets go. The source must stall, stop its
/// engine within its timeout and roll back: before the channels were aborted on failure, each
/// worker waited 5 s + 5 s for those sends, the session gave up on the engine ("did not stop
/// within") and rolled back under it, and the rings leaked their buffers.
#[test]
fn a_frozen_destination_with_zero_copy_sends_in_flight_stops_the_source_within_its_timeout() {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    let common = [
        "--devices",
        "1",
        "--size",
        "512MiB",
        "--channels",
        "8",
        "--chunk",
        "64MiB",
    ];
    // The destination waits for the source as long as a loaded machine may need to start it
    // (filling its 512 MiB device first): its 3 s were once over before the source connected.
    let mut recv_args = vec![
        "recv",
        "--listen",
        "127.0.0.1:0",
        "--events",
        "--timeout",
        "60",
    ];
    recv_args.extend_from_slice(&common);
    let mut recv = spawn(&recv_args, &[]);
    let listening: Value = serde_json::from_str(&recv.line()).expect("LISTENING event");
    let addr = listening["data"]["addr"].as_str().unwrap().to_string();
    let mut send_args = vec![
        "send",
        "--connect",
        addr.as_str(),
        "--events",
        "--timeout",
        "3",
    ];
    send_args.extend_from_slice(&common);
    let send = spawn(&send_args, &[]);
    let recv_pid = Pid::from_raw(recv.child.id() as i32);
    // Frozen at the first progress with bytes read: the first chunks are on the sockets.
    let mut early = Vec::new();
    loop {
        let line = send.line();
        let event: Value = serde_json::from_str(&line).unwrap_or(Value::Null);
        early.push(line);
        if event["event"] == "PROGRESS" && event["data"]["bytes"].as_u64().unwrap_or(0) > 0 {
            break;
        }
        assert!(
            event["event"] != "REPORT",
            "ended before streaming: {early:?}"
        );
    }
    kill(recv_pid, Signal::SIGSTOP).unwrap();
    let stopped = Instant::now();
    let mut send = send.finish();
    let after = stopped.elapsed();
    kill(recv_pid, Signal::SIGCONT).unwrap();
    recv.child.kill().unwrap();
    recv.child.wait().unwrap();
    send.stdout.splice(0..0, early);
    let report = send.report();
    assert_eq!(report["ok"], false);
    assert_eq!(report["devices"][0]["state"], "RUNNING", "{report}");
    let error = report["error"].as_str().unwrap();
    assert!(error.contains("no progress for 3s"), "{error}");
    assert!(error.contains("(outstanding: channel "), "{error}");
    for bad in ["did not stop within", "did not finish after cancel"] {
        assert!(!send.stderr.contains(bad), "{bad}: {}", send.stderr);
    }
    // The stall's 3 s, then the engine's stop and the rollback (they took 5 s + 5 s).
    assert!(
        after < Duration::from_secs(6),
        "exited {after:?} after the stop"
    );
}
