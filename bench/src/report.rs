//! The results: the human table, the JSON object, and the files `--out DIR` writes.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;
use std::time::SystemTime;

use serde::Serialize;

use crate::cli::RowKind;
use crate::hist;
use crate::machine::Machine;
use crate::runs::{QemuStats, Run};
use crate::scenario::{human_bytes, FloorParts, Scenario};
use crate::stats::{self, Goal, Ratio, RowSummary, Spread, RATIO_METRICS, REFERENCES};
use crate::svg;

/// Everything one bench invocation measured.
pub struct Report {
    pub scenario: Scenario,
    pub machine: Machine,
    pub started: SystemTime,
    pub rows: Vec<RowSummary>,
    pub ratios: Vec<Ratio>,
    pub goals: Vec<Goal>,
}

#[derive(Serialize)]
struct JsonLatency {
    count: u64,
    mean: f64,
    p50: f64,
    p90: f64,
    p99: f64,
    p999: f64,
    max: f64,
}

#[derive(Serialize)]
struct JsonRun<'a> {
    round: u32,
    warmup: bool,
    ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'a str>,
    wall_s: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    bytes: Option<u64>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    metrics: BTreeMap<&'static str, f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    qemu: Option<&'a QemuStats>,
}

#[derive(Serialize)]
struct JsonRow<'a> {
    name: &'a str,
    what: &'static str,
    /// The workers asked of each helper; what ran is in the metrics `workers_src`/`workers_dst`.
    #[serde(skip_serializing_if = "Option::is_none")]
    workers: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    skipped: Option<&'a str>,
    engines: &'a str,
    counted_runs: usize,
    counted_ok: usize,
    /// Median, min, max and n of each metric over the counted runs.
    metrics: &'a BTreeMap<&'static str, Spread>,
    /// Every counted run's packets merged into one histogram, microseconds (not the median of
    /// each run's percentile, which `metrics.latency_p99_us` is).
    #[serde(skip_serializing_if = "Option::is_none")]
    latency_us: Option<JsonLatency>,
    runs: Vec<JsonRun<'a>>,
    notes: &'a [String],
    errors: &'a [String],
}

#[derive(Serialize)]
struct JsonReport<'a> {
    tool: &'static str,
    version: &'static str,
    date: String,
    scenario: &'a Scenario,
    total_bytes: u64,
    warmup_rounds: u32,
    order: &'static str,
    machine: &'a Machine,
    #[serde(skip_serializing_if = "Option::is_none")]
    physical_floor: Option<FloorParts>,
    /// What downtime means per row.
    definitions: BTreeMap<&'static str, &'static str>,
    rows: Vec<JsonRow<'a>>,
    ratios: &'a [Ratio],
    goals: &'a [Goal],
}

const DEFINITIONS: [(&str, &str); 10] = [
    (
        "downtime_ms",
        "helpers: SWITCHOVER_START sent by the source -> every device loaded on the destination; ceiling: the source's devices go to STOP_COPY -> every device has its last byte on the destination (its last chunk written, or a paced sink's drain consumed it from its pipe, whichever is later); qemu-ram: QEMU's query-migrate total-time (migrate command -> completed on the paused source)",
    ),
    ("throughput_gib_s", "device (or RAM) bytes / downtime"),
    (
        "cpu_src_s_per_gib",
        "user+system CPU seconds of the source process from the switchover to its engine's end (getrusage(RUSAGE_SELF) deltas, every thread incl. io-wq and the simulated device's pacing thread; qemu-ram: each QEMU process's CPU-time clock (clock_getcpuclockid, whole thread group) from just before migrate to the destination's completed), per GiB moved",
    ),
    ("cpu_dst_s_per_gib", "the same for the destination process"),
    (
        "proc_cpu_src_s",
        "the kernel's total for the whole source process (getrusage(RUSAGE_CHILDREN) in its wrapper): setup, simulated device generation and verification included",
    ),
    (
        "peak_rss_src_mib",
        "peak resident set of the whole process (ru_maxrss), memfd device contents not included",
    ),
    (
        "latency_p99_us",
        "per data packet: the source issued the data_fd read -> the destination finished writing it to its data_fd (CLOCK_MONOTONIC, both processes on one host). latency_p50_us ... latency_max_us are per run (that run's packets); a row's metrics give their median/min/max over the counted runs, and the human table and the p99 goal use that median (median of per-run p99s)",
    ),
    (
        "latency_us",
        "a row's latency_us (and <row>.hgrm, <row>.hlog, the latency plots): every counted run's packets merged into one histogram; its p99 is of all packets together, not the median of the runs' p99s (metrics.latency_p99_us), and can differ from it",
    ),
    (
        "csw_src_voluntary",
        "context switches of the whole process (ru_nvcsw / ru_nivcsw)",
    ),
    (
        "other_load_cores",
        "noise: CPU the whole machine spent outside the two measured processes during the run (other tenants, the bench, kernel threads), in cores (/proc/stat busy delta - the processes' rusage, / wall time)",
    ),
];

impl Report {
    pub fn new(
        scenario: Scenario,
        machine: Machine,
        started: SystemTime,
        rows: Vec<RowSummary>,
    ) -> Report {
        let references: Vec<String> = match scenario.scaling.first() {
            None => REFERENCES.iter().map(|r| r.name().to_string()).collect(),
            Some(&fewest) => vec![
                stats::scaling_label(fewest),
                RowKind::Loopback.name().into(),
            ],
        };
        let ratios = stats::ratios(&rows, &references);
        let goals = stats::goals(&scenario, &rows);
        Report {
            scenario,
            machine,
            started,
            rows,
            ratios,
            goals,
        }
    }

    /// True when every row that ran had every counted run succeed.
    pub fn all_ok(&self) -> bool {
        self.rows
            .iter()
            .filter(|r| r.skipped.is_none())
            .all(|r| r.counted() > 0 && r.counted_ok() == r.counted())
    }

    fn date(&self) -> String {
        let secs = self
            .started
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        format!(
            "{} {:02}:{:02} UTC",
            hist::iso_date(self.started),
            secs % 86_400 / 3600,
            secs % 3600 / 60
        )
    }

    pub fn json(&self) -> serde_json::Value {
        let rows = self
            .rows
            .iter()
            .map(|r| JsonRow {
                name: &r.label,
                what: r.row.what(),
                workers: r.workers,
                skipped: r.skipped.as_deref(),
                engines: &r.engines,
                counted_runs: r.counted(),
                counted_ok: r.counted_ok(),
                metrics: &r.metrics,
                latency_us: r.latency.as_ref().map(|h| JsonLatency {
                    count: h.len(),
                    mean: h.mean() / hist::US,
                    p50: h.value_at_quantile(0.5) as f64 / hist::US,
                    p90: h.value_at_quantile(0.9) as f64 / hist::US,
                    p99: h.value_at_quantile(0.99) as f64 / hist::US,
                    p999: h.value_at_quantile(0.999) as f64 / hist::US,
                    max: h.max() as f64 / hist::US,
                }),
                runs: r
                    .runs
                    .iter()
                    .map(|run| JsonRun {
                        round: run.round,
                        warmup: run.warmup,
                        ok: run.result.is_ok(),
                        error: run.result.as_ref().err().map(String::as_str),
                        wall_s: run.wall.as_secs_f64(),
                        bytes: run.result.as_ref().ok().map(|m| m.bytes),
                        metrics: match &run.result {
                            Ok(m) => stats::METRICS
                                .iter()
                                .filter_map(|(name, get)| get(m).map(|v| (*name, v)))
                                .collect(),
                            Err(_) => BTreeMap::new(),
                        },
                        qemu: run.result.as_ref().ok().and_then(|m| m.qemu.as_ref()),
                    })
                    .collect(),
                notes: &r.notes,
                errors: &r.errors,
            })
            .collect();
        let report = JsonReport {
            tool: "vfio-multifd-bench",
            version: env!("CARGO_PKG_VERSION"),
            date: self.date(),
            scenario: &self.scenario,
            total_bytes: self.scenario.shape.total_bytes(),
            warmup_rounds: 1,
            order: "alternating across rounds: the warm-up forward, then the counted repeats reversed, forward, reversed, ...",
            machine: &self.machine,
            physical_floor: self.scenario.shape.physical_floor_ms(),
            definitions: DEFINITIONS.iter().copied().collect(),
            rows,
            ratios: &self.ratios,
            goals: &self.goals,
        };
        serde_json::to_value(report)
            .unwrap_or_else(|e| serde_json::json!({ "error": e.to_string() }))
    }

    pub fn human(&self) -> String {
        let s = &self.scenario;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "vfio-multifd bench: scenario {}{}{} ({}), {} moved per run",
            s.name.name(),
            if s.quick { " --quick" } else { "" },
            scaling_flag(s),
            s.shape.describe(),
            human_bytes(s.shape.total_bytes())
        );
        if !s.overridden.is_empty() {
            let _ = writeln!(
                out,
                "  shape changed by --{}: goals below are for reference only",
                s.overridden.join(", --")
            );
        }
        let _ = writeln!(
            out,
            "  {} counted repeats per row after 1 uncounted warm-up round, alternating row order; median [min-max]",
            s.repeats
        );
        let _ = writeln!(out, "  machine: {}", self.machine.describe());
        let _ = writeln!(
            out,
            "  copies alone at start: {}",
            self.machine.copies_at_start.describe()
        );
        if let Some(&most) = s.scaling.last() {
            let _ = writeln!(
                out,
                "  scaling: uring-wN = the uring engine with N workers per helper; loopback = {most} connections"
            );
            if most as usize > self.machine.cores {
                let _ = writeln!(
                    out,
                    "  {most} workers per helper on {} cores: the counts above the cores share them (the scaling goals are for 16 cores)",
                    self.machine.cores
                );
            }
        }
        let _ = writeln!(out, "  date: {}", self.date());
        if let Some(f) = s.shape.physical_floor_ms() {
            let _ = writeln!(
                out,
                "  physical floor: {:.1} ms (one device's own save time {:.1} ms + the load of its last chunk {:.2} ms)",
                f.floor_ms, f.save_ms, f.last_chunk_load_ms
            );
        }
        out.push('\n');
        let cell = |r: &RowSummary, m: &str, digits: usize| match r.metrics.get(m) {
            Some(v) => format!("{:.d$} [{:.d$}-{:.d$}]", v.median, v.min, v.max, d = digits),
            None => "-".into(),
        };
        let med = |r: &RowSummary, m: &str, digits: usize| match r.median(m) {
            Some(v) => format!("{v:.digits$}"),
            None => "-".into(),
        };
        let _ = writeln!(
            out,
            "{:<9} {:<8} {:>26} {:>22} {:>9} {:>9} {:>9} {:>5} {:>6}",
            "row", "engine", "downtime ms", "GiB/s", "p50 us", "p99 us", "max us", "ok", "other"
        );
        for r in &self.rows {
            if let Some(why) = &r.skipped {
                let _ = writeln!(out, "{:<9} skipped: {why}", r.label);
                continue;
            }
            let _ = writeln!(
                out,
                "{:<9} {:<8} {:>26} {:>22} {:>9} {:>9} {:>9} {:>5} {:>6}",
                r.label,
                short(&r.engines, 8),
                cell(r, "downtime_ms", 1),
                cell(r, "throughput_gib_s", 2),
                med(r, "latency_p50_us", 0),
                med(r, "latency_p99_us", 0),
                med(r, "latency_max_us", 0),
                format!("{}/{}", r.counted_ok(), r.counted()),
                med(r, "other_load_cores", 2)
            );
        }
        out.push('\n');
        let _ = writeln!(
            out,
            "{:<9} {:>22} {:>22} {:>7} {:>15} {:>15} {:>19}",
            "row",
            "CPU s/GiB source",
            "CPU s/GiB dest",
            "total",
            "proc CPU s s/d",
            "peak RSS MiB s/d",
            "ctx sw vol/invol s|d"
        );
        for r in self.rows.iter().filter(|r| r.skipped.is_none()) {
            let pair = |a: &str, b: &str, d: usize| format!("{}/{}", med(r, a, d), med(r, b, d));
            let _ = writeln!(
                out,
                "{:<9} {:>22} {:>22} {:>7} {:>15} {:>15} {:>19}",
                r.label,
                cell(r, "cpu_src_s_per_gib", 2),
                cell(r, "cpu_dst_s_per_gib", 2),
                med(r, "cpu_total_s_per_gib", 2),
                pair("proc_cpu_src_s", "proc_cpu_dst_s", 2),
                pair("peak_rss_src_mib", "peak_rss_dst_mib", 0),
                format!(
                    "{}|{}",
                    pair("csw_src_voluntary", "csw_src_involuntary", 0),
                    pair("csw_dst_voluntary", "csw_dst_involuntary", 0)
                )
            );
        }
        out.push('\n');
        let _ = writeln!(
            out,
            "ratios (medians; < 1 is better for downtime, CPU and p99, > 1 for throughput):"
        );
        let _ = writeln!(
            out,
            "  {:<22} {:>9} {:>11} {:>10} {:>8}",
            "row / reference", "downtime", "throughput", "CPU s/GiB", "p99"
        );
        for r in self
            .rows
            .iter()
            .filter(|r| r.skipped.is_none())
            .filter(|r| matches!(r.row, RowKind::Uring | RowKind::Threads | RowKind::Single))
        {
            let mut references: Vec<&str> = Vec::new();
            for x in self.ratios.iter().filter(|x| x.row == r.label) {
                if !references.contains(&x.reference.as_str()) {
                    references.push(&x.reference);
                }
            }
            for reference in references {
                let cells: Vec<String> = RATIO_METRICS
                    .iter()
                    .map(|(metric, _)| {
                        self.ratios
                            .iter()
                            .find(|x| {
                                x.row == r.label && x.reference == reference && x.metric == *metric
                            })
                            .map_or("-".into(), |x| format!("{:.2}x", x.ratio))
                    })
                    .collect();
                let _ = writeln!(
                    out,
                    "  {:<22} {:>9} {:>11} {:>10} {:>8}",
                    format!("{} / {reference}", r.label),
                    cells[0],
                    cells[1],
                    cells[2],
                    cells[3]
                );
            }
        }
        out.push('\n');
        let _ = writeln!(
            out,
            "goals (issue 6, scenario {}{}{}):",
            s.name.name(),
            scaling_flag(s),
            if s.quick {
                "; --quick sizes, indicative only"
            } else {
                ""
            }
        );
        for g in &self.goals {
            let _ = writeln!(out, "  {:<60} {}", g.text, g.verdict);
        }
        let mut notes = Vec::new();
        for r in &self.rows {
            for n in &r.notes {
                notes.push(format!("{}: {n}", r.label));
            }
            for e in &r.errors {
                notes.push(format!("{} FAILED {e}", r.label));
            }
        }
        if !notes.is_empty() {
            out.push('\n');
            let _ = writeln!(out, "notes:");
            for n in notes {
                let _ = writeln!(out, "  {n}");
            }
        }
        out.push('\n');
        let _ = writeln!(
            out,
            "rows: uring/threads = vfio-multifd send+recv helpers with that engine; single = 1 channel, uring engine; ceiling = blocking threads data_fd -> TCP -> data_fd, no framing (downtime = STOP_COPY -> last chunk written); qemu-ram = real QEMU, RAM of the same size (downtime = QEMU's total-time, CPU from each QEMU process's CPU-time clock over the migration); loopback = blocking threads, a buffer over N TCP connections, no devices. p50/p99/max = the median over counted runs of each run's own percentile (the p99 goal uses the same); .hgrm/.hlog/plots and the JSON's latency_us merge every counted packet into one histogram, whose p99 can differ. other = cores busy outside the measured processes during the run (noise)."
        );
        out
    }

    /// Writes summary.txt, results.json, per row `<row>.hgrm` and `<row>.hlog`, latency SVGs and
    /// the throughput bar chart into `dir`.
    pub fn write_dir(&self, dir: &Path) -> Result<Vec<String>, String> {
        std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        let mut written = Vec::new();
        let mut put = |name: &str, text: &str| -> Result<(), String> {
            let path = dir.join(name);
            std::fs::write(&path, text).map_err(|e| format!("writing {}: {e}", path.display()))?;
            written.push(name.to_string());
            Ok(())
        };
        put("summary.txt", &self.human())?;
        let json = serde_json::to_string_pretty(&self.json())
            .map_err(|e| format!("encoding the JSON: {e}"))?;
        put("results.json", &(json + "\n"))?;
        let subtitle = format!(
            "scenario {}{}: {}\n{}; median of {} counted repeats; {}",
            self.scenario.name.name(),
            if self.scenario.quick { " --quick" } else { "" },
            self.scenario.shape.describe(),
            self.machine.short(),
            self.scenario.repeats,
            self.date()
        );
        let mut series = Vec::new();
        for r in &self.rows {
            let Some(h) = &r.latency else { continue };
            let name = r.label.as_str();
            put(
                &format!("{name}.hgrm"),
                &hist::percentile_distribution(h, hist::US),
            )?;
            let intervals = hlog_intervals(&r.runs);
            let log = hist::interval_log(
                &format!(
                    "[vfio-multifd-bench {}: scenario {}, row {name}; per-packet latency in ns, read issued -> written; one interval per counted repeat, from the source's switchover, as long as its downtime]",
                    env!("CARGO_PKG_VERSION"),
                    self.scenario.name.name()
                ),
                self.started,
                &intervals,
            )?;
            put(&format!("{name}.hlog"), &log)?;
            put(
                &format!("latency-{name}.svg"),
                &svg::latency_plot(
                    &format!("{name}: per-packet latency by percentile"),
                    &subtitle,
                    &[(name, h)],
                ),
            )?;
            series.push((name, h));
        }
        if !series.is_empty() {
            put(
                "latency.svg",
                &svg::latency_plot("Per-packet latency by percentile", &subtitle, &series),
            )?;
        }
        let bars: Vec<svg::Bar<'_>> = self
            .rows
            .iter()
            .filter_map(|r| {
                let s = r.metrics.get("throughput_gib_s")?;
                Some(svg::Bar {
                    name: &r.label,
                    median: s.median,
                    min: s.min,
                    max: s.max,
                })
            })
            .collect();
        if !bars.is_empty() {
            put(
                "throughput.svg",
                &svg::bar_chart("Throughput (bytes / downtime)", &subtitle, "GiB/s", &bars),
            )?;
        }
        Ok(written)
    }
}

/// ` --scaling 1,2,4,8`, or nothing.
/// One `.hlog` interval per counted run with packets: from the source's switchover (where its
/// packets are timed from, not the run's start, before its processes were spawned), as long as
/// its downtime.
fn hlog_intervals(runs: &[Run]) -> Vec<hist::Interval<'_>> {
    runs.iter()
        .filter(|run| !run.warmup)
        .filter_map(|run| {
            let m = run.result.as_ref().ok()?;
            Some(hist::Interval {
                start: m.switchover_at.unwrap_or(run.started),
                length: std::time::Duration::from_secs_f64(m.downtime_ms.max(0.0) / 1e3),
                histogram: m.latency.as_ref()?,
            })
        })
        .collect()
}

fn scaling_flag(s: &Scenario) -> String {
    if s.scaling.is_empty() {
        return String::new();
    }
    let counts: Vec<String> = s.scaling.iter().map(u32::to_string).collect();
    format!(" --scaling {}", counts.join(","))
}

fn short(text: &str, width: usize) -> String {
    if text.chars().count() <= width {
        text.to_string()
    } else {
        text.chars().take(width).collect()
    }
}

/// Rows in the order asked, each once.
pub fn dedup_rows(rows: &[RowKind]) -> Vec<RowKind> {
    let mut out = Vec::new();
    for r in rows {
        if !out.contains(r) {
            out.push(*r);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::runs::RunMetrics;

    #[test]
    fn hlog_intervals_start_at_the_switchover_and_last_the_downtime() {
        let started = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let mut latency = hist::new_histogram();
        latency.saturating_record(5_000);
        let run = |warmup: bool, switchover: Option<Duration>| Run {
            round: u32::from(!warmup),
            warmup,
            started,
            wall: Duration::from_secs(3),
            result: Ok(RunMetrics {
                downtime_ms: 250.0,
                latency: Some(latency.clone()),
                switchover_at: switchover.map(|d| started + d),
                ..RunMetrics::default()
            }),
        };
        let runs = [
            run(true, Some(Duration::from_millis(700))),
            run(false, Some(Duration::from_millis(1_900))),
        ];
        let intervals = hlog_intervals(&runs);
        assert_eq!(intervals.len(), 1, "the warm-up is not counted");
        assert_eq!(intervals[0].start, started + Duration::from_millis(1_900));
        assert_eq!(intervals[0].length, Duration::from_millis(250));
        assert_eq!(intervals[0].histogram.len(), 1);
    }
}
