//! What a migration measured: downtime, throughput, CPU seconds per GiB on each side, and
//! per-packet latency percentiles (hdrhistogram).
//!
//! - **Downtime**: SWITCHOVER_START sent by the source -> the last device loaded on the
//!   destination. CLOCK_MONOTONIC is system-wide, so two helpers on one host compare
//!   timestamps directly (`demo`); each side alone reports its own bound.
//! - **Throughput**: device bytes / downtime (all device state moves while the VM is stopped).
//! - **CPU**: user + system time of the whole helper process (`getrusage(RUSAGE_SELF)`, which
//!   includes every thread: engine threads, io_uring's io-wq workers, the session threads)
//!   from SWITCHOVER_START (sent or received) to its engine's end, the window the ceiling
//!   is charged. Building the simulated devices and the sink's RESUMING set-up before, and
//!   the simulated sink's verification after, are the device's cost and fall outside; a
//!   paced simulated device's feeder and drain threads run inside and are counted. `demo`
//!   runs each side as its own child process, so each side's figure is its own.
//! - **Latency**: per data packet, source read issued (`read_issued_ns[idx]`) -> destination
//!   written to the device (`written_ns[idx]`), paired by device and idx; each side keeps the
//!   timestamps of a device's first [`crate::engine::MAX_PACKET_TIMESTAMPS`] packets only.

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// Bytes in a GiB.
pub const GIB: f64 = (1u64 << 30) as f64;

/// Which helper a report comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Side {
    Source,
    Destination,
}

/// One device in a side's report.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DeviceTimes {
    pub idstr: String,
    pub instance_id: u32,
    pub bytes: u64,
    pub data_packets: u32,
    /// The device's migration state when the helper reported (RUNNING after a rollback).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    /// Destination: CLOCK_MONOTONIC when the device was loaded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loaded_ns: Option<u64>,
    /// Per data packet idx: read issued (source) or written (destination), CLOCK_MONOTONIC; the
    /// first [`crate::engine::MAX_PACKET_TIMESTAMPS`] packets.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub timestamps_ns: Vec<u64>,
}

/// The data path a helper took, in the words and fields of `probe --json`'s `data_path`
/// (engine, setup, buffers, chains, send), so the kernel matrix can compare the two field by
/// field.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PathReport {
    pub engine: String,
    /// None for the threads engine.
    pub setup: Option<String>,
    pub buffers: String,
    pub chains: String,
    pub send: String,
    /// Every distinct path when this side's rings did not all take the same one.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rings_disagree: Vec<String>,
}

/// `probe`'s words for buffers, chains and send.
pub fn path_words(fixed_buffers: bool, linked_chains: bool, send_zc: bool) -> [&'static str; 3] {
    [
        if fixed_buffers { "fixed" } else { "plain" },
        if linked_chains { "linked" } else { "unlinked" },
        if send_zc { "send-zc" } else { "send" },
    ]
}

impl PathReport {
    /// The path of a side whose engine `engine` ran `rings` (one per io_uring worker); None
    /// when an io_uring engine reports no ring, as nothing then says what it took.
    pub fn taken(engine: &str, rings: &[uring::RingPath]) -> Option<Self> {
        let path = |setup: Option<&str>, r: &uring::RingPath| {
            let [buffers, chains, send] = path_words(r.fixed_buffers, r.linked_chains, r.send_zc);
            Self {
                engine: engine.into(),
                setup: setup.map(Into::into),
                buffers: buffers.into(),
                chains: chains.into(),
                send: send.into(),
                rings_disagree: Vec::new(),
            }
        };
        let Some(first) = rings.first() else {
            let threads = uring::RingPath {
                setup: "",
                fixed_buffers: false,
                linked_chains: false,
                send_zc: false,
            };
            return (engine == "threads").then(|| path(None, &threads));
        };
        let mut report = path(Some(first.setup), first);
        if rings.iter().any(|r| r != first) {
            let mut distinct: Vec<&uring::RingPath> = Vec::new();
            for ring in rings {
                if !distinct.contains(&ring) {
                    distinct.push(ring);
                }
            }
            report.rings_disagree = distinct
                .into_iter()
                .map(|r| {
                    let p = path(Some(r.setup), r);
                    format!("{} {} {} {}", r.setup, p.buffers, p.chains, p.send)
                })
                .collect();
        }
        Some(report)
    }
}

/// What one helper (`send` or `recv`) reports at its end.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SideReport {
    pub side: Side,
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The engine that ran (after any fallback).
    pub engine: String,
    /// Fallbacks and other one-line notes (engine and session).
    #[serde(default)]
    pub notes: Vec<String>,
    pub channels: u8,
    pub chunk: usize,
    /// Device data bytes moved.
    pub bytes: u64,
    pub devices: Vec<DeviceTimes>,
    /// Source: SWITCHOVER_START sent; destination: received.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub switchover_ns: Option<u64>,
    /// Source: the destination's result arrived; destination: the last device was loaded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_ns: Option<u64>,
    /// User + system CPU seconds of the whole process over the session (see the module doc).
    pub cpu_s: f64,
    /// Destination: every stream and config blob checked equal to the source's.
    pub verified: bool,
    /// io_uring workers that ran the data plane (absent for the threads engine): fewer than
    /// `--workers` asks where channels or devices are fewer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workers: Option<usize>,
    /// The data path this side's engine took (not a prediction).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathReport>,
}

impl SideReport {
    /// This side's view of downtime, in milliseconds.
    pub fn downtime_ms(&self) -> Option<f64> {
        span_ms(self.switchover_ns?, self.end_ns?)
    }

    /// Bytes per second over this side's downtime, in GiB/s.
    pub fn throughput_gib_s(&self) -> Option<f64> {
        throughput_gib_s(self.bytes, self.downtime_ms()?)
    }

    /// CPU seconds per GiB moved.
    pub fn cpu_s_per_gib(&self) -> Option<f64> {
        cpu_s_per_gib(self.cpu_s, self.bytes)
    }

    /// The report without per-packet timestamps (for people, not for `demo`).
    pub fn without_timestamps(&self) -> Self {
        let mut report = self.clone();
        for device in &mut report.devices {
            device.timestamps_ns = Vec::new();
        }
        report
    }
}

fn span_ms(start_ns: u64, end_ns: u64) -> Option<f64> {
    end_ns.checked_sub(start_ns).map(|ns| ns as f64 / 1e6)
}

/// GiB/s for `bytes` over `ms` milliseconds (`None` for an empty interval).
pub fn throughput_gib_s(bytes: u64, ms: f64) -> Option<f64> {
    (ms > 0.0).then(|| bytes as f64 / GIB / (ms / 1e3))
}

/// CPU seconds per GiB (`None` when nothing moved).
pub fn cpu_s_per_gib(cpu_s: f64, bytes: u64) -> Option<f64> {
    (bytes > 0).then(|| cpu_s / (bytes as f64 / GIB))
}

/// User + system CPU seconds of this process so far, every thread included.
pub fn process_cpu_seconds() -> f64 {
    match nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_SELF) {
        Ok(usage) => {
            let secs = |tv: nix::sys::time::TimeVal| tv.tv_sec() as f64 + tv.tv_usec() as f64 / 1e6;
            secs(usage.user_time()) + secs(usage.system_time())
        }
        Err(e) => {
            log::warn!("getrusage(RUSAGE_SELF): {e}; CPU time reported as 0");
            0.0
        }
    }
}

/// Latency percentiles in microseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct LatencySummary {
    pub p50: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
    /// Packets paired.
    pub count: u64,
}

/// A latency histogram in nanoseconds: 1 ns to 1 hour, 3 significant digits.
pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000_000, 3).expect("static histogram bounds are valid")
}

/// Pairs each source read-issued timestamp with the destination's written timestamp of the
/// same device and idx and records the difference.
pub fn pair_latencies(source: &[DeviceTimes], dest: &[DeviceTimes]) -> Histogram<u64> {
    let mut histogram = new_histogram();
    for src in source {
        let Some(dst) = dest
            .iter()
            .find(|d| d.idstr == src.idstr && d.instance_id == src.instance_id)
        else {
            continue;
        };
        for (issued, written) in src.timestamps_ns.iter().zip(&dst.timestamps_ns) {
            histogram.saturating_record(written.saturating_sub(*issued).max(1));
        }
    }
    histogram
}

/// p50/p99/p99.9/max of a nanosecond histogram, in microseconds.
pub fn summarize(histogram: &Histogram<u64>) -> LatencySummary {
    if histogram.is_empty() {
        return LatencySummary::default();
    }
    let us = |ns: u64| ns as f64 / 1e3;
    LatencySummary {
        p50: us(histogram.value_at_quantile(0.5)),
        p99: us(histogram.value_at_quantile(0.99)),
        p999: us(histogram.value_at_quantile(0.999)),
        max: us(histogram.max()),
        count: histogram.len(),
    }
}

/// CPU seconds per GiB on each side.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct CpuPerGib {
    pub source: Option<f64>,
    pub destination: Option<f64>,
    pub total: Option<f64>,
}

/// `demo`'s numbers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DemoSummary {
    pub verified: bool,
    /// Device data bytes moved (all devices).
    pub bytes: u64,
    pub devices: u32,
    pub device_size: u64,
    pub channels: u8,
    pub chunk: usize,
    /// The source's engine after any fallback.
    pub engine: String,
    pub dest_engine: String,
    /// The path each side's engine took (`SideReport::path`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathReport>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dest_path: Option<PathReport>,
    pub throughput_gib_s: Option<f64>,
    pub downtime_ms: Option<f64>,
    pub cpu_s_per_gib: CpuPerGib,
    pub latency_us: LatencySummary,
    #[serde(default)]
    pub notes: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl DemoSummary {
    /// Combines the two helpers' reports.
    pub fn from_reports(
        source: &SideReport,
        dest: &SideReport,
        devices: u32,
        device_size: u64,
    ) -> Self {
        let downtime_ms = match (source.switchover_ns, dest.end_ns) {
            (Some(start), Some(end)) => span_ms(start, end),
            _ => None,
        };
        let bytes = dest.bytes;
        let cpu_total = cpu_s_per_gib(source.cpu_s + dest.cpu_s, bytes);
        let latency = summarize(&pair_latencies(&source.devices, &dest.devices));
        let mut notes: Vec<String> = collapse_channel_notes(&source.notes)
            .into_iter()
            .map(|n| format!("source: {n}"))
            .collect();
        notes.extend(
            collapse_channel_notes(&dest.notes)
                .into_iter()
                .map(|n| format!("destination: {n}")),
        );
        let verified = source.ok
            && dest.ok
            && dest.verified
            && source.bytes == dest.bytes
            && bytes == u64::from(devices) * device_size;
        Self {
            verified,
            bytes,
            devices,
            device_size,
            channels: source.channels,
            chunk: source.chunk,
            engine: source.engine.clone(),
            dest_engine: dest.engine.clone(),
            path: source.path.clone(),
            dest_path: dest.path.clone(),
            throughput_gib_s: downtime_ms.and_then(|ms| throughput_gib_s(bytes, ms)),
            downtime_ms,
            cpu_s_per_gib: CpuPerGib {
                source: cpu_s_per_gib(source.cpu_s, source.bytes),
                destination: cpu_s_per_gib(dest.cpu_s, dest.bytes),
                total: cpu_total,
            },
            latency_us: latency,
            notes,
            error: source.error.clone().or_else(|| dest.error.clone()),
        }
    }

    /// The human summary; its last lines are throughput, downtime, CPU, latency, verified.
    pub fn human(&self) -> String {
        let opt = |v: Option<f64>, unit: &str, digits: usize| {
            v.map_or_else(|| "n/a".to_string(), |v| format!("{v:.digits$}{unit}"))
        };
        let engines = if self.engine == self.dest_engine {
            format!("engine {}", self.engine)
        } else {
            format!("engines {} -> {}", self.engine, self.dest_engine)
        };
        let mut out = format!(
            "vfio-multifd demo: {} devices x {} over {} channels, chunk {}, {}\n",
            self.devices,
            human_bytes(self.device_size),
            self.channels,
            human_bytes(self.chunk as u64),
            engines
        );
        for note in &self.notes {
            out.push_str(&format!("  note: {note}\n"));
        }
        if let Some(error) = &self.error {
            out.push_str(&format!("  error: {error}\n"));
        }
        out.push_str(&format!("  moved       {}\n", human_bytes(self.bytes)));
        out.push_str(&format!(
            "  throughput  {}\n",
            opt(self.throughput_gib_s, " GiB/s", 2)
        ));
        out.push_str(&format!(
            "  downtime    {} (SWITCHOVER_START -> last device loaded)\n",
            opt(self.downtime_ms, " ms", 1)
        ));
        out.push_str(&format!(
            "  CPU         source {}, destination {}, total {}\n",
            opt(self.cpu_s_per_gib.source, " s/GiB", 2),
            opt(self.cpu_s_per_gib.destination, " s/GiB", 2),
            opt(self.cpu_s_per_gib.total, " s/GiB", 2)
        ));
        let l = &self.latency_us;
        if l.count > 0 {
            out.push_str(&format!(
                "  latency     p50 {:.0} us, p99 {:.0} us, p99.9 {:.0} us, max {:.0} us ({} packets, read issued -> written)\n",
                l.p50, l.p99, l.p999, l.max, l.count
            ));
        } else {
            out.push_str("  latency     n/a (no data packets)\n");
        }
        out.push_str(&format!(
            "  verified    {}\n",
            if self.verified { "yes" } else { "NO" }
        ));
        out
    }
}

/// Folds notes that differ only in their `channel N: ` prefix into one
/// `channels 0, 2, 5: ...` note, keeping first-seen order.
pub fn collapse_channel_notes(notes: &[String]) -> Vec<String> {
    let mut out: Vec<(Option<Vec<String>>, String)> = Vec::new();
    for note in notes {
        let split = note.strip_prefix("channel ").and_then(|rest| {
            let (id, text) = rest.split_once(": ")?;
            id.bytes()
                .all(|b| b.is_ascii_digit())
                .then(|| (id.to_string(), text.to_string()))
        });
        match split {
            Some((id, text)) => match out.iter_mut().find(|(ids, t)| ids.is_some() && *t == text) {
                Some((Some(ids), _)) => ids.push(id),
                _ => out.push((Some(vec![id]), text)),
            },
            None => out.push((None, note.clone())),
        }
    }
    out.into_iter()
        .map(|(ids, text)| match ids {
            Some(ids) if ids.len() == 1 => format!("channel {}: {text}", ids[0]),
            Some(ids) => format!("channels {}: {text}", ids.join(", ")),
            None => text,
        })
        .collect()
}

/// `1.5 GiB`, `100 MiB`, `4 KiB`, `7 B`.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else if value.fract() == 0.0 {
        format!("{value:.0} {}", UNITS[unit])
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_side_whose_rings_differ_says_so() {
        let ring = |fixed_buffers| uring::RingPath {
            setup: "coop-taskrun",
            fixed_buffers,
            linked_chains: true,
            send_zc: false,
        };
        let same = PathReport::taken("uring", &[ring(false), ring(false)]).unwrap();
        assert_eq!(
            (
                same.setup.as_deref(),
                &*same.buffers,
                &*same.chains,
                &*same.send
            ),
            (Some("coop-taskrun"), "plain", "linked", "send")
        );
        assert!(same.rings_disagree.is_empty());
        let split = PathReport::taken("uring", &[ring(false), ring(true)]).unwrap();
        assert_eq!(
            split.rings_disagree,
            [
                "coop-taskrun plain linked send",
                "coop-taskrun fixed linked send"
            ]
        );
        let threads = PathReport::taken("threads", &[]).unwrap();
        assert_eq!((threads.setup, &*threads.buffers), (None, "plain"));
        assert_eq!(PathReport::taken("uring", &[]), None);
    }

    use super::*;

    fn device(ts: Vec<u64>) -> DeviceTimes {
        DeviceTimes {
            idstr: "d".into(),
            instance_id: 0,
            bytes: 10,
            data_packets: ts.len() as u32,
            timestamps_ns: ts,
            ..DeviceTimes::default()
        }
    }

    #[test]
    fn latencies_pair_by_device_and_idx() {
        let src = vec![device(vec![1_000, 2_000, 3_000])];
        let dst = vec![device(vec![11_000, 52_000, 3_500])];
        let summary = summarize(&pair_latencies(&src, &dst));
        assert_eq!(summary.count, 3);
        assert!((summary.p50 - 10.0).abs() < 0.1, "{summary:?}");
        assert!((summary.max - 50.0).abs() < 0.1, "{summary:?}");
        let other = vec![DeviceTimes {
            idstr: "other".into(),
            ..device(vec![5])
        }];
        assert_eq!(pair_latencies(&src, &other).len(), 0);
    }

    fn report(side: Side, cpu_s: f64, switchover_ns: u64, end_ns: u64) -> SideReport {
        SideReport {
            side,
            ok: true,
            error: None,
            engine: "threads".into(),
            notes: vec![],
            channels: 6,
            chunk: 1 << 20,
            bytes: 2 << 30,
            devices: vec![],
            switchover_ns: Some(switchover_ns),
            end_ns: Some(end_ns),
            cpu_s,
            verified: side == Side::Destination,
            workers: None,
            path: None,
        }
    }

    #[test]
    fn demo_summary_combines_both_sides() {
        let src = report(Side::Source, 1.0, 1_000_000_000, 3_000_000_000);
        let dst = report(Side::Destination, 3.0, 1_100_000_000, 2_000_000_000);
        let s = DemoSummary::from_reports(&src, &dst, 2, 1 << 30);
        assert!(s.verified);
        assert_eq!(s.downtime_ms, Some(1000.0));
        assert_eq!(s.throughput_gib_s, Some(2.0));
        assert_eq!(s.cpu_s_per_gib.source, Some(0.5));
        assert_eq!(s.cpu_s_per_gib.destination, Some(1.5));
        assert_eq!(s.cpu_s_per_gib.total, Some(2.0));
        let text = s.human();
        assert!(text.trim_end().ends_with("verified    yes"), "{text}");
        let json = serde_json::to_value(&s).unwrap();
        for key in [
            "verified",
            "bytes",
            "devices",
            "channels",
            "engine",
            "throughput_gib_s",
            "downtime_ms",
        ] {
            assert!(json.get(key).is_some(), "{key}");
        }
        assert!(json["cpu_s_per_gib"]["source"].is_number());
        assert!(json["latency_us"]["p999"].is_number());

        let mut short = dst.clone();
        short.bytes -= 1;
        assert!(!DemoSummary::from_reports(&src, &short, 2, 1 << 30).verified);
    }

    #[test]
    fn channel_notes_fold_into_one() {
        let notes: Vec<String> = [
            "channel 0: copied",
            "pinning failed",
            "channel 3: copied",
            "channel 1: other",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        assert_eq!(
            collapse_channel_notes(&notes),
            vec![
                "channels 0, 3: copied",
                "pinning failed",
                "channel 1: other"
            ]
        );
    }

    #[test]
    fn zero_bytes_gives_no_rates() {
        assert_eq!(cpu_s_per_gib(1.0, 0), None);
        assert_eq!(throughput_gib_s(0, 0.0), None);
        assert_eq!(human_bytes(100 << 20), "100 MiB");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(1), "1 B");
    }

    #[test]
    fn process_cpu_time_moves() {
        let before = process_cpu_seconds();
        let mut x = 0u64;
        for i in 0..20_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        std::hint::black_box(x);
        assert!(process_cpu_seconds() >= before);
    }
}
