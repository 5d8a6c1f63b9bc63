//! One measured migration (a "run") of one row, and what it measured.
//!
//! Helper rows (`uring`, `threads`, `single`) start `vfio-multifd recv --events` and
//! `vfio-multifd send --events`, each under `__measure`, and read the `REPORT` event each prints
//! at its end (the helpers' `SideReport`, per-packet timestamps included). The ceiling's two
//! pump processes print the same events in the same shape.

use std::ffi::OsString;
use std::path::Path;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::{Duration, Instant, SystemTime};

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use crate::hist;
use crate::measure::Rusage;
use crate::proc::{Line, Measured, Spec};

pub const GIB: f64 = (1u64 << 30) as f64;
const SOURCE: usize = 0;
const DEST: usize = 1;

/// One device in a side's report (the helpers' `DeviceTimes`, the fields the bench reads).
///
/// A copy, not the helper's type (`vfio-multifd`'s `metrics::DeviceTimes`): the ceiling's pumps
/// print the same shape without linking the helper. Every field a number is computed from is
/// required, so a renamed field fails the run ("a REPORT that does not parse") instead of
/// reading as 0; only what the helper itself may leave out has a default.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DeviceTimes {
    pub idstr: String,
    pub instance_id: u32,
    pub bytes: u64,
    pub data_packets: u32,
    /// Destination: when the device was loaded (CLOCK_MONOTONIC).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loaded_ns: Option<u64>,
    /// Per data packet idx: read issued (source) or written (destination), CLOCK_MONOTONIC.
    /// The helper leaves it out when empty; [`pair_metrics`] refuses a device with data packets
    /// and none.
    #[serde(default)]
    pub timestamps_ns: Vec<u64>,
}

/// What one side reports at its end (the helpers' `SideReport`, the fields the bench reads;
/// unknown fields are ignored; see [`DeviceTimes`] for which may be missing).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SideReport {
    pub side: String,
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub engine: String,
    #[serde(default)]
    pub notes: Vec<String>,
    pub channels: u32,
    pub chunk: u64,
    pub bytes: u64,
    pub devices: Vec<DeviceTimes>,
    /// Source: switchover start (downtime starts); destination: its own view of it. Absent
    /// only in a failed side's report; [`pair_metrics`] requires it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub switchover_ns: Option<u64>,
    /// Destination: the last device loaded. Absent only in a failed side's report;
    /// [`pair_metrics`] requires it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_ns: Option<u64>,
    /// CPU seconds of the whole process from its switchover (source: SWITCHOVER_START sent;
    /// destination: read) until its engine is done (getrusage(RUSAGE_SELF) deltas); set-up
    /// before it is not counted.
    pub cpu_s: f64,
    pub verified: bool,
    /// io_uring workers that ran (the helpers' uring engine only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workers: Option<u32>,
}

/// What QEMU itself said about a `qemu-ram` run.
#[derive(Debug, Clone, Default, Serialize)]
pub struct QemuStats {
    pub total_time_ms: f64,
    pub downtime_ms: f64,
    pub setup_time_ms: f64,
    pub ram_total: u64,
    pub transferred: u64,
    pub mbps: f64,
    /// migrate command -> the destination reported `completed` (polled every 5 ms).
    pub dest_completed_ms: f64,
}

/// What one run measured.
#[derive(Debug, Clone, Default)]
pub struct RunMetrics {
    /// Device (or RAM) bytes moved.
    pub bytes: u64,
    /// Switchover start -> every device loaded (see the row for its equivalent).
    pub downtime_ms: f64,
    pub throughput_gib_s: f64,
    /// CPU seconds per GiB over each side's switchover (the kernel's accounting of that
    /// process from SWITCHOVER_START to its engine's end).
    pub cpu_src_s_per_gib: Option<f64>,
    pub cpu_dst_s_per_gib: Option<f64>,
    /// The kernel's totals for each whole process (setup and device simulation included).
    pub proc_src: Option<Rusage>,
    pub proc_dst: Option<Rusage>,
    /// Per data packet, read issued on the source -> written on the destination, ns.
    pub latency: Option<Histogram<u64>>,
    /// The source's switchover (its `switchover_ns`) on the wall clock: where the run's
    /// packets, and its `.hlog` interval, start.
    pub switchover_at: Option<SystemTime>,
    /// io_uring workers each helper ran with (uring rows).
    pub workers_src: Option<u32>,
    pub workers_dst: Option<u32>,
    pub engines: String,
    pub notes: Vec<String>,
    pub qemu: Option<QemuStats>,
    /// CPU seconds the whole machine spent outside the measured processes during the run
    /// (other tenants, the bench itself, kernel threads): the noise this run saw, in cores.
    pub other_load_cores: Option<f64>,
}

impl RunMetrics {
    pub fn cpu_total_s_per_gib(&self) -> Option<f64> {
        Some(self.cpu_src_s_per_gib? + self.cpu_dst_s_per_gib?)
    }
}

/// One run of one row.
#[derive(Debug)]
pub struct Run {
    pub round: u32,
    pub warmup: bool,
    pub started: SystemTime,
    pub wall: Duration,
    pub result: Result<RunMetrics, String>,
}

/// The source's and the destination's reports and totals.
pub struct Pair {
    pub src: SideReport,
    pub dst: SideReport,
    pub src_usage: Rusage,
    pub dst_usage: Rusage,
}

/// Starts the destination, waits for its `LISTENING` event, starts the source with the address,
/// and collects both `REPORT`s and both processes' totals. Everything is killed at `timeout`.
pub fn run_pair(
    bench_exe: &Path,
    dir: &Path,
    timeout: Duration,
    dest: (&OsString, Vec<OsString>),
    source: impl FnOnce(&str) -> (OsString, Vec<OsString>),
) -> Result<Pair, String> {
    let deadline = Instant::now() + timeout;
    let (tx, rx) = mpsc::channel();
    let dst = Measured::spawn(
        bench_exe,
        Spec {
            name: "destination",
            program: dest.0,
            args: dest.1,
            dir,
            timeout,
            events: Some((tx.clone(), DEST)),
        },
    )?;
    let mut reports: [Option<SideReport>; 2] = [None, None];
    let mut open = [true, true];
    let addr = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(Line::Event(_, e)) if e.event == "LISTENING" => {
                match e.data.get("addr").and_then(|a| a.as_str()) {
                    Some(addr) => break addr.to_string(),
                    None => return Err(format!("LISTENING without an address: {}", e.data)),
                }
            }
            Ok(Line::Event(_, e)) if e.event == "REPORT" => {
                let report: SideReport = serde_json::from_value(e.data).unwrap_or_default();
                return Err(format!(
                    "the destination ended before listening: {}{}",
                    report.error.unwrap_or_default(),
                    dst.stderr_tail()
                ));
            }
            Ok(Line::Event(..)) => {}
            Ok(Line::Closed(_)) => {
                return Err(format!(
                    "the destination exited before listening{}",
                    dst.stderr_tail()
                ))
            }
            Err(_) => {
                return Err(format!(
                    "the destination did not listen within {timeout:?}{}",
                    dst.stderr_tail()
                ))
            }
        }
    };
    let (program, args) = source(&addr);
    let src = Measured::spawn(
        bench_exe,
        Spec {
            name: "source",
            program: &program,
            args,
            dir,
            timeout: deadline.saturating_duration_since(Instant::now()),
            events: Some((tx, SOURCE)),
        },
    )?;
    while open.iter().any(|o| *o) {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!(
                "no end within {timeout:?}; killed{}{}",
                src.stderr_tail(),
                dst.stderr_tail()
            ));
        }
        match rx.recv_timeout(left.min(Duration::from_millis(200))) {
            Ok(Line::Event(side, e)) if e.event == "REPORT" => {
                match serde_json::from_value::<SideReport>(e.data) {
                    Ok(report) => reports[side] = Some(report),
                    Err(e) => return Err(format!("a REPORT that does not parse: {e}")),
                }
            }
            Ok(Line::Event(..)) => {}
            Ok(Line::Closed(side)) => open[side] = false,
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => break,
        }
    }
    let src_tail = src.stderr_tail();
    let dst_tail = dst.stderr_tail();
    let src_usage = src.finish(Duration::from_secs(10))?;
    let dst_usage = dst.finish(Duration::from_secs(10))?;
    let [src_report, dst_report] = reports;
    let src = src_report.ok_or_else(|| {
        format!(
            "the source printed no report ({}){src_tail}",
            src_usage.exit
        )
    })?;
    let dst = dst_report.ok_or_else(|| {
        format!(
            "the destination printed no report ({}){dst_tail}",
            dst_usage.exit
        )
    })?;
    for (report, usage, tail) in [(&src, &src_usage, &src_tail), (&dst, &dst_usage, &dst_tail)] {
        if !report.ok || !usage.success {
            return Err(format!(
                "the {} failed ({}): {}{tail}",
                report.side,
                usage.exit,
                report
                    .error
                    .clone()
                    .unwrap_or_else(|| "no error given".into())
            ));
        }
    }
    Ok(Pair {
        src,
        dst,
        src_usage,
        dst_usage,
    })
}

/// Pairs each source read-issued timestamp with the destination's written timestamp of the
/// same device and idx.
pub fn pair_latencies(src: &[DeviceTimes], dst: &[DeviceTimes]) -> Histogram<u64> {
    let mut histogram = hist::new_histogram();
    for s in src {
        let Some(d) = dst
            .iter()
            .find(|d| d.idstr == s.idstr && d.instance_id == s.instance_id)
        else {
            continue;
        };
        for (issued, written) in s.timestamps_ns.iter().zip(&d.timestamps_ns) {
            histogram.saturating_record(written.saturating_sub(*issued).max(1));
        }
    }
    histogram
}

/// The metrics of a finished pair; fails unless every byte arrived and was verified.
pub fn pair_metrics(pair: Pair, expected_bytes: u64) -> Result<RunMetrics, String> {
    let Pair {
        src,
        dst,
        src_usage,
        dst_usage,
    } = pair;
    if !dst.verified || dst.bytes != expected_bytes || src.bytes != expected_bytes {
        return Err(format!(
            "not verified: source moved {} bytes, destination {} (verified: {}), expected {expected_bytes}",
            src.bytes, dst.bytes, dst.verified
        ));
    }
    let (Some(start), Some(end)) = (src.switchover_ns, dst.end_ns) else {
        return Err("a report lacks its switchover or end timestamp".into());
    };
    for (side, report) in [("source", &src), ("destination", &dst)] {
        if let Some(d) = report
            .devices
            .iter()
            .find(|d| d.data_packets > 0 && d.timestamps_ns.is_empty())
        {
            return Err(format!(
                "the {side}'s report has no per-packet timestamps for {} ({} data packets)",
                d.idstr, d.data_packets
            ));
        }
    }
    // Loaded means the device consumed its last byte: where a device reports that later than
    // the side's end (a paced sink draining its pipe), it ends the downtime.
    let end = dst
        .devices
        .iter()
        .filter_map(|d| d.loaded_ns)
        .fold(end, u64::max);
    let downtime_ms = end.saturating_sub(start) as f64 / 1e6;
    let per_gib = |cpu: f64, bytes: u64| (bytes > 0).then(|| cpu / (bytes as f64 / GIB));
    let latency = pair_latencies(&src.devices, &dst.devices);
    let mut notes: Vec<String> = Vec::new();
    for (side, report) in [("source", &src), ("destination", &dst)] {
        for note in collapse_channel_notes(&report.notes) {
            let line = format!("{side}: {note}");
            if !notes.contains(&line) {
                notes.push(line);
            }
        }
    }
    let engines = if src.engine == dst.engine {
        src.engine.clone()
    } else {
        format!("{} -> {}", src.engine, dst.engine)
    };
    Ok(RunMetrics {
        bytes: dst.bytes,
        downtime_ms,
        throughput_gib_s: if downtime_ms > 0.0 {
            dst.bytes as f64 / GIB / (downtime_ms / 1e3)
        } else {
            0.0
        },
        cpu_src_s_per_gib: per_gib(src.cpu_s, src.bytes),
        cpu_dst_s_per_gib: per_gib(dst.cpu_s, dst.bytes),
        proc_src: Some(src_usage),
        proc_dst: Some(dst_usage),
        latency: (!latency.is_empty()).then_some(latency),
        switchover_at: Some(monotonic_to_wall(start)),
        workers_src: src.workers,
        workers_dst: dst.workers,
        engines,
        notes,
        qemu: None,
        other_load_cores: None,
    })
}

/// CLOCK_MONOTONIC (system-wide, so any process's) nanoseconds as a wall-clock time: now on
/// the wall clock minus how long ago `ns` was on the monotonic one.
pub fn monotonic_to_wall(ns: u64) -> SystemTime {
    let wall = SystemTime::now();
    let now = match nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC) {
        Ok(ts) => ts.tv_sec() as u64 * 1_000_000_000 + ts.tv_nsec() as u64,
        Err(_) => return wall,
    };
    if ns <= now {
        wall - Duration::from_nanos(now - ns)
    } else {
        wall + Duration::from_nanos(ns - now)
    }
}

/// Folds notes that differ only in a `channel N: ` prefix into one `channels ...: ` note.
pub fn collapse_channel_notes(notes: &[String]) -> Vec<String> {
    let mut out: Vec<(Vec<String>, String)> = Vec::new();
    for note in notes {
        let split = note.strip_prefix("channel ").and_then(|rest| {
            let (id, text) = rest.split_once(": ")?;
            id.bytes()
                .all(|b| b.is_ascii_digit())
                .then(|| (id.to_string(), text.to_string()))
        });
        match split {
            Some((id, text)) => match out
                .iter_mut()
                .find(|(ids, t)| !ids.is_empty() && *t == text)
            {
                Some((ids, _)) => ids.push(id),
                None => out.push((vec![id], text)),
            },
            None => out.push((Vec::new(), note.clone())),
        }
    }
    out.into_iter()
        .map(|(mut ids, text)| {
            ids.sort_by_key(|id| id.parse::<u32>().unwrap_or(u32::MAX));
            (ids, text)
        })
        .map(|(ids, text)| match ids.len() {
            0 => text,
            1 => format!("channel {}: {text}", ids[0]),
            _ => format!("channels {}: {text}", ids.join(", ")),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev(ts: Vec<u64>) -> DeviceTimes {
        DeviceTimes {
            idstr: "d".into(),
            timestamps_ns: ts,
            ..DeviceTimes::default()
        }
    }

    #[test]
    fn latencies_pair_by_device_and_idx() {
        let h = pair_latencies(&[dev(vec![1_000, 2_000])], &[dev(vec![11_000, 52_000])]);
        assert_eq!(h.len(), 2);
        assert!(h.equivalent(h.max(), 50_000));
    }

    #[test]
    fn helper_reports_parse_with_extra_fields() {
        let text = r#"{"bytes":4,"channels":2,"chunk":1048576,"cpu_s":0.03,"devices":[{"bytes":4,"data_packets":1,"idstr":"a","instance_id":0,"loaded_ns":9,"state":"RUNNING","timestamps_ns":[7]}],"end_ns":9,"engine":"uring","notes":[],"ok":true,"side":"destination","switchover_ns":1,"verified":true,"future":1}"#;
        let r: SideReport = serde_json::from_str(text).expect("parses");
        assert_eq!(r.devices[0].timestamps_ns, vec![7]);
        assert_eq!(r.end_ns, Some(9));
    }

    const DST: &str = r#"{"bytes":4,"channels":2,"chunk":1048576,"cpu_s":0.03,"devices":[{"bytes":4,"data_packets":1,"idstr":"a","instance_id":0,"loaded_ns":9,"timestamps_ns":[7]}],"end_ns":9,"engine":"uring","notes":[],"ok":true,"side":"destination","switchover_ns":1,"verified":true}"#;

    #[test]
    fn a_report_with_a_renamed_measured_field_does_not_parse() {
        serde_json::from_str::<SideReport>(DST).expect("the full report parses");
        for field in [
            "\"cpu_s\"",
            "\"bytes\":4,\"channels\"",
            "\"verified\"",
            "\"data_packets\"",
            "\"idstr\"",
        ] {
            let renamed = DST.replacen(field, &field.replacen('"', "\"x_", 1), 1);
            assert_ne!(renamed, DST, "{field}");
            let parsed = serde_json::from_str::<SideReport>(&renamed);
            assert!(parsed.is_err(), "{field} renamed still parses: {parsed:?}");
        }
    }

    fn pair(src: SideReport, dst: SideReport) -> Pair {
        Pair {
            src,
            dst,
            src_usage: Rusage::default(),
            dst_usage: Rusage::default(),
        }
    }

    fn src_report() -> SideReport {
        SideReport {
            side: "source".into(),
            ok: true,
            bytes: 4,
            cpu_s: 0.5,
            switchover_ns: Some(1_000_000),
            devices: vec![DeviceTimes {
                idstr: "a".into(),
                bytes: 4,
                data_packets: 1,
                timestamps_ns: vec![1_000_000],
                ..DeviceTimes::default()
            }],
            ..SideReport::default()
        }
    }

    #[test]
    fn downtime_ends_when_the_last_device_consumed_its_last_byte() {
        let mut dst: SideReport = serde_json::from_str(DST).expect("parses");
        dst.end_ns = Some(11_000_000);
        dst.devices[0].timestamps_ns = vec![10_000_000];
        dst.devices[0].loaded_ns = Some(11_000_000);
        let m = pair_metrics(pair(src_report(), dst.clone()), 4).expect("metrics");
        assert!((m.downtime_ms - 10.0).abs() < 1e-9, "{}", m.downtime_ms);
        // A paced sink still draining at the end: its consumed time ends the downtime.
        dst.devices[0].loaded_ns = Some(13_000_000);
        let m = pair_metrics(pair(src_report(), dst), 4).expect("metrics");
        assert!((m.downtime_ms - 12.0).abs() < 1e-9, "{}", m.downtime_ms);
    }

    #[test]
    fn a_device_with_packets_and_no_timestamps_is_refused() {
        let mut dst: SideReport = serde_json::from_str(DST).expect("parses");
        dst.devices[0].timestamps_ns.clear();
        let err = pair_metrics(pair(src_report(), dst), 4).expect_err("refused");
        assert!(err.contains("no per-packet timestamps"), "{err}");
    }

    #[test]
    fn monotonic_times_convert_to_the_wall_clock() {
        let now = match nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC) {
            Ok(ts) => ts.tv_sec() as u64 * 1_000_000_000 + ts.tv_nsec() as u64,
            Err(e) => panic!("CLOCK_MONOTONIC: {e}"),
        };
        let wall = SystemTime::now();
        let then = monotonic_to_wall(now - 2_000_000_000);
        let ago = wall.duration_since(then).expect("in the past");
        assert!(
            ago > Duration::from_millis(1_990) && ago < Duration::from_millis(2_100),
            "{ago:?}"
        );
    }

    #[test]
    fn channel_notes_fold() {
        let notes: Vec<String> = ["channel 2: x", "y", "channel 0: x"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(
            collapse_channel_notes(&notes),
            vec!["channels 0, 2: x", "y"]
        );
    }
}
