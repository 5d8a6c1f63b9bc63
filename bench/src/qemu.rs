//! The `qemu-ram` row: real QEMU 10.x migrating as many bytes of random RAM as the scenario's
//! device state, over as many multifd channels, on loopback. Two paused TCG VMs (`-S`): the
//! source's RAM is a `memory-backend-file` of random bytes (no zero pages; the file is a memfd
//! the bench holds, opened as `/proc/<pid>/fd/<n>`), the destination's a `memory-backend-ram`;
//! `multifd` on, `multifd-channels` N, and `max-bandwidth` raised from its 128 MiB/s default (a
//! throttle, not a data-plane cost) to 1 TiB/s. Everything else is QEMU's default.
//!
//! Its downtime equivalent is QEMU's own `total-time` (the `migrate` command -> `completed` on
//! the source; the VM is paused throughout, so it is transfer plus QEMU's 1-5 ms `setup-time`,
//! and the destination may finish a few ms after it). CPU per side is the QEMU process's CPU-time
//! clock from just before `migrate` to the destination's `completed` as polled; the whole
//! process's totals and peak RSS come from `__measure`.

use std::ffi::OsString;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::proc::{Measured, Spec};
use crate::runs::{QemuStats, RunMetrics, GIB};

pub const QEMU: &str = "qemu-system-x86_64";
const MIB: u64 = 1 << 20;

/// `Ok(version line)` when QEMU 10.x is installed, else why not.
pub fn probe() -> Result<String, String> {
    let out = Command::new(QEMU)
        .arg("--version")
        .output()
        .map_err(|e| format!("{QEMU} not found ({e})"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let first = text.lines().next().unwrap_or("").trim().to_string();
    if first.contains("version 10.") {
        Ok(first)
    } else {
        Err(format!("{QEMU} is not QEMU 10.x: {first:?}"))
    }
}

/// RAM size in MiB for `bytes` of device state (QEMU sizes RAM in whole MiB here).
pub fn ram_mib(bytes: u64) -> u64 {
    bytes.div_ceil(MIB).max(2)
}

/// `mib` MiB of xorshift64* bytes (no zero pages) in a memfd this process holds, so nothing is
/// left behind however the bench ends. QEMU opens it as `/proc/<our pid>/fd/<fd>`.
pub struct RamImage {
    file: std::fs::File,
}

impl RamImage {
    pub fn new(mib: u64) -> Result<RamImage, String> {
        let fd = vfio::fd::memfd(c"vfio-multifd-bench-qemu-ram")
            .map_err(|e| format!("creating the RAM memfd: {e}"))?;
        let mut file = std::fs::File::from(fd);
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut block = vec![0u8; 4 * MIB as usize];
        let mut left = mib * MIB;
        while left > 0 {
            for word in block.chunks_exact_mut(8) {
                state ^= state >> 12;
                state ^= state << 25;
                state ^= state >> 27;
                word.copy_from_slice(&state.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
            }
            let n = left.min(block.len() as u64) as usize;
            file.write_all(&block[..n])
                .map_err(|e| format!("writing the RAM memfd: {e}"))?;
            left -= n as u64;
        }
        Ok(RamImage { file })
    }

    /// A path another process can open the memfd by.
    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!(
            "/proc/{}/fd/{}",
            std::process::id(),
            std::os::fd::AsRawFd::as_raw_fd(&self.file)
        ))
    }
}

/// A QMP connection over a unix socket; every read has a timeout.
struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    fn connect(path: &Path, proc: &Measured, within: Duration) -> Result<Qmp, String> {
        let deadline = Instant::now() + within;
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if Instant::now() >= deadline => {
                    return Err(format!(
                        "QMP socket {}: {e}{}",
                        path.display(),
                        proc.stderr_tail()
                    ))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        };
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .map_err(|e| format!("QMP timeout: {e}"))?;
        let reader = stream
            .try_clone()
            .map_err(|e| format!("QMP socket clone: {e}"))?;
        let mut q = Qmp {
            reader: BufReader::new(reader),
            writer: stream,
        };
        let greeting = q.read()?;
        if greeting.get("QMP").is_none() {
            return Err(format!("not a QMP greeting: {greeting}"));
        }
        q.ok("qmp_capabilities", json!({}))?;
        Ok(q)
    }

    fn read(&mut self) -> Result<Value, String> {
        let mut line = String::new();
        let n = self
            .reader
            .read_line(&mut line)
            .map_err(|e| format!("QMP read: {e}"))?;
        if n == 0 {
            return Err("QMP connection closed".into());
        }
        serde_json::from_str(&line).map_err(|e| format!("QMP reply {line:?}: {e}"))
    }

    /// Runs a command; returns its `return` value or its error's description.
    fn ok(&mut self, cmd: &str, args: Value) -> Result<Value, String> {
        let msg = json!({ "execute": cmd, "arguments": args });
        writeln!(self.writer, "{msg}").map_err(|e| format!("QMP write {cmd}: {e}"))?;
        loop {
            let reply = self.read()?;
            if reply.get("event").is_some() {
                continue;
            }
            return match reply.get("return") {
                Some(r) => Ok(r.clone()),
                None => Err(format!("{cmd}: {}", reply["error"]["desc"])),
            };
        }
    }
}

/// CPU time of a process so far, seconds (whole thread group, exited threads included), from
/// its CPU-time clock: nanoseconds, where `/proc/<pid>/stat` counts 10 ms ticks (up to 8 % of a
/// seed-sized run).
fn proc_cpu_s(pid: nix::unistd::Pid) -> Option<f64> {
    let clock = nix::time::clock_getcpuclockid(pid).ok()?;
    let ts = nix::time::clock_gettime(clock).ok()?;
    Some(ts.tv_sec() as f64 + ts.tv_nsec() as f64 * 1e-9)
}

/// One QEMU -> QEMU migration of `mib` MiB of RAM from `ram_file` over `channels` channels.
pub fn run(
    bench_exe: &Path,
    dir: &Path,
    ram_file: &Path,
    mib: u64,
    channels: u8,
    timeout: Duration,
) -> Result<RunMetrics, String> {
    let size = format!("{mib}M");
    let common = |qmp: &PathBuf| -> Vec<OsString> {
        [
            "-accel",
            "tcg",
            "-nodefaults",
            "-display",
            "none",
            "-S",
            "-machine",
            "pc,memory-backend=mem",
            "-m",
            &size,
            "-qmp",
            &format!("unix:{},server=on,wait=off", qmp.display()),
        ]
        .iter()
        .map(OsString::from)
        .collect()
    };
    let dst_qmp = dir.join("dst.qmp");
    let src_qmp = dir.join("src.qmp");
    let mut dst_args = common(&dst_qmp);
    dst_args.extend(
        [
            "-object",
            &format!("memory-backend-ram,id=mem,size={size}"),
            "-incoming",
            "defer",
        ]
        .iter()
        .map(OsString::from),
    );
    let mut src_args = common(&src_qmp);
    src_args.extend(
        [
            "-object",
            &format!(
                "memory-backend-file,id=mem,size={size},mem-path={},share=off",
                ram_file.display()
            ),
        ]
        .iter()
        .map(OsString::from),
    );
    let qemu = OsString::from(QEMU);
    let deadline = Instant::now() + timeout;
    let dst = Measured::spawn(
        bench_exe,
        Spec {
            name: "qemu-destination",
            program: &qemu,
            args: dst_args,
            dir,
            timeout,
            events: None,
        },
    )?;
    let src = Measured::spawn(
        bench_exe,
        Spec {
            name: "qemu-source",
            program: &qemu,
            args: src_args,
            dir,
            timeout,
            events: None,
        },
    )?;
    let mut dq = Qmp::connect(&dst_qmp, &dst, Duration::from_secs(30))?;
    let mut sq = Qmp::connect(&src_qmp, &src, Duration::from_secs(30))?;
    for q in [&mut dq, &mut sq] {
        q.ok(
            "migrate-set-capabilities",
            json!({"capabilities": [{"capability": "multifd", "state": true}]}),
        )?;
        q.ok(
            "migrate-set-parameters",
            json!({"multifd-channels": channels, "max-bandwidth": 1u64 << 40}),
        )?;
    }
    dq.ok("migrate-incoming", json!({"uri": "tcp:127.0.0.1:0"}))?;
    let info = dq.ok("query-migrate", json!({}))?;
    let port = info["socket-address"]
        .as_array()
        .and_then(|a| a.first())
        .and_then(|a| a["port"].as_str().map(String::from))
        .ok_or_else(|| format!("the destination reports no listening port: {info}"))?;
    let (Some(src_pid), Some(dst_pid)) = (src.target_pid(), dst.target_pid()) else {
        return Err("QEMU's pid is unknown".into());
    };
    let cpu_before = (proc_cpu_s(src_pid), proc_cpu_s(dst_pid));
    let started = Instant::now();
    sq.ok("migrate", json!({"uri": format!("tcp:127.0.0.1:{port}")}))?;
    let stats = loop {
        let info = sq.ok("query-migrate", json!({}))?;
        match info["status"].as_str() {
            Some("completed") => break info,
            Some("failed" | "cancelled") => {
                return Err(format!(
                    "the source QEMU's migration {}: {}",
                    info["status"],
                    info.get("error-desc").unwrap_or(&Value::Null)
                ))
            }
            _ if Instant::now() >= deadline => {
                return Err(format!("QEMU did not complete within {timeout:?}: {info}"))
            }
            _ => std::thread::sleep(Duration::from_millis(5)),
        }
    };
    let dest_completed_ms = loop {
        let info = dq.ok("query-migrate", json!({}))?;
        match info["status"].as_str() {
            Some("completed") => break started.elapsed().as_secs_f64() * 1e3,
            Some("failed" | "cancelled") => {
                return Err(format!("the destination QEMU's migration failed: {info}"))
            }
            _ if Instant::now() >= deadline => {
                return Err(format!("the destination QEMU did not complete: {info}"))
            }
            _ => std::thread::sleep(Duration::from_millis(5)),
        }
    };
    let cpu_after = (proc_cpu_s(src_pid), proc_cpu_s(dst_pid));
    let _ = sq.ok("quit", json!({}));
    let _ = dq.ok("quit", json!({}));
    let src_usage = src.finish(Duration::from_secs(20))?;
    let dst_usage = dst.finish(Duration::from_secs(20))?;

    let num = |v: &Value| v.as_f64().unwrap_or(0.0);
    let q = QemuStats {
        total_time_ms: num(&stats["total-time"]),
        downtime_ms: num(&stats["downtime"]),
        setup_time_ms: num(&stats["setup-time"]),
        ram_total: stats["ram"]["total"].as_u64().unwrap_or(0),
        transferred: stats["ram"]["transferred"].as_u64().unwrap_or(0),
        mbps: num(&stats["ram"]["mbps"]),
        dest_completed_ms,
    };
    if q.total_time_ms <= 0.0 {
        return Err(format!("query-migrate has no total-time: {stats}"));
    }
    let bytes = mib * MIB;
    let gib = bytes as f64 / GIB;
    let window = |before: Option<f64>, after: Option<f64>| Some((after? - before?) / gib);
    Ok(RunMetrics {
        bytes,
        downtime_ms: q.total_time_ms,
        throughput_gib_s: gib / (q.total_time_ms / 1e3),
        cpu_src_s_per_gib: window(cpu_before.0, cpu_after.0),
        cpu_dst_s_per_gib: window(cpu_before.1, cpu_after.1),
        proc_src: Some(src_usage),
        proc_dst: Some(dst_usage),
        latency: None,
        switchover_at: None,
        workers_src: None,
        workers_dst: None,
        engines: "qemu".into(),
        notes: Vec::new(),
        qemu: Some(q),
        other_load_cores: None,
    })
}
