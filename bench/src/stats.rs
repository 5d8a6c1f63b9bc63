//! Median and spread over repeats, per row and metric; ratios; the goals.

use std::collections::BTreeMap;

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::cli::RowKind;
use crate::hist;
use crate::runs::{Run, RunMetrics};
use crate::scenario::{Scenario, ScenarioName};

/// Median and range of one metric over the counted repeats.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub n: usize,
}

pub fn spread(values: &[f64]) -> Option<Spread> {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    let median = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    Some(Spread {
        median,
        min: v[0],
        max: v[n - 1],
        n,
    })
}

/// The metrics reported per row, by name (JSON keys), with how to read each from a run.
/// Reads one metric from a run.
pub type Getter = fn(&RunMetrics) -> Option<f64>;

pub const METRICS: [(&str, Getter); 19] = [
    ("downtime_ms", |m| Some(m.downtime_ms)),
    ("throughput_gib_s", |m| Some(m.throughput_gib_s)),
    ("cpu_src_s_per_gib", |m| m.cpu_src_s_per_gib),
    ("cpu_dst_s_per_gib", |m| m.cpu_dst_s_per_gib),
    ("cpu_total_s_per_gib", |m| m.cpu_total_s_per_gib()),
    ("proc_cpu_src_s", |m| m.proc_src.as_ref().map(|u| u.cpu_s())),
    ("proc_cpu_dst_s", |m| m.proc_dst.as_ref().map(|u| u.cpu_s())),
    ("peak_rss_src_mib", |m| {
        m.proc_src.as_ref().map(|u| u.maxrss_kib as f64 / 1024.0)
    }),
    ("peak_rss_dst_mib", |m| {
        m.proc_dst.as_ref().map(|u| u.maxrss_kib as f64 / 1024.0)
    }),
    ("csw_src_voluntary", |m| {
        m.proc_src.as_ref().map(|u| u.voluntary_switches as f64)
    }),
    ("csw_src_involuntary", |m| {
        m.proc_src.as_ref().map(|u| u.involuntary_switches as f64)
    }),
    ("csw_dst_voluntary", |m| {
        m.proc_dst.as_ref().map(|u| u.voluntary_switches as f64)
    }),
    ("csw_dst_involuntary", |m| {
        m.proc_dst.as_ref().map(|u| u.involuntary_switches as f64)
    }),
    ("latency_p50_us", |m| quantile_us(m, 0.5)),
    ("latency_p90_us", |m| quantile_us(m, 0.9)),
    ("latency_p99_us", |m| quantile_us(m, 0.99)),
    ("latency_p999_us", |m| quantile_us(m, 0.999)),
    ("latency_max_us", |m| {
        m.latency.as_ref().map(|h| h.max() as f64 / hist::US)
    }),
    ("other_load_cores", |m| m.other_load_cores),
];

fn quantile_us(m: &RunMetrics, q: f64) -> Option<f64> {
    m.latency
        .as_ref()
        .map(|h| h.value_at_quantile(q) as f64 / hist::US)
}

/// One row over all its runs.
#[derive(Debug)]
pub struct RowSummary {
    pub row: RowKind,
    /// Why the row did not run at all (e.g. no QEMU 10.x).
    pub skipped: Option<String>,
    pub runs: Vec<Run>,
    pub metrics: BTreeMap<&'static str, Spread>,
    /// Every counted run's latencies together.
    pub latency: Option<Histogram<u64>>,
    pub engines: String,
    pub notes: Vec<String>,
    pub errors: Vec<String>,
}

impl RowSummary {
    pub fn new(row: RowKind, skipped: Option<String>, runs: Vec<Run>) -> RowSummary {
        let counted: Vec<&RunMetrics> = runs
            .iter()
            .filter(|r| !r.warmup)
            .filter_map(|r| r.result.as_ref().ok())
            .collect();
        let mut metrics = BTreeMap::new();
        for (name, get) in METRICS {
            let values: Vec<f64> = counted.iter().filter_map(|m| get(m)).collect();
            if let Some(s) = spread(&values) {
                metrics.insert(name, s);
            }
        }
        let mut latency: Option<Histogram<u64>> = None;
        for h in counted.iter().filter_map(|m| m.latency.as_ref()) {
            match latency.as_mut() {
                Some(all) => {
                    let _ = all.add(h);
                }
                None => latency = Some(h.clone()),
            }
        }
        let mut notes = Vec::new();
        let mut engines = String::new();
        for m in &counted {
            if engines.is_empty() {
                engines = m.engines.clone();
            }
            for n in &m.notes {
                if !notes.contains(n) {
                    notes.push(n.clone());
                }
            }
        }
        let errors = runs
            .iter()
            .filter_map(|r| {
                r.result.as_ref().err().map(|e| {
                    format!(
                        "{} {}: {e}",
                        if r.warmup { "warm-up" } else { "round" },
                        r.round
                    )
                })
            })
            .collect();
        RowSummary {
            row,
            skipped,
            runs,
            metrics,
            latency,
            engines,
            notes,
            errors,
        }
    }

    pub fn median(&self, metric: &str) -> Option<f64> {
        self.metrics.get(metric).map(|s| s.median)
    }

    pub fn counted_ok(&self) -> usize {
        self.runs
            .iter()
            .filter(|r| !r.warmup && r.result.is_ok())
            .count()
    }

    pub fn counted(&self) -> usize {
        self.runs.iter().filter(|r| !r.warmup).count()
    }
}

/// Metrics compared between rows, and whether lower is better.
pub const RATIO_METRICS: [(&str, &str); 4] = [
    ("downtime_ms", "downtime"),
    ("throughput_gib_s", "throughput"),
    ("cpu_total_s_per_gib", "CPU s/GiB"),
    ("latency_p99_us", "p99 latency"),
];

/// References every row is compared with.
pub const REFERENCES: [RowKind; 4] = [
    RowKind::Threads,
    RowKind::Single,
    RowKind::Ceiling,
    RowKind::QemuRam,
];

/// `row metric / reference metric`, medians.
#[derive(Debug, Clone, Serialize)]
pub struct Ratio {
    pub row: &'static str,
    pub reference: &'static str,
    pub metric: &'static str,
    pub ratio: f64,
}

pub fn ratios(rows: &[RowSummary]) -> Vec<Ratio> {
    let mut out = Vec::new();
    for row in rows {
        for reference in REFERENCES {
            if reference == row.row {
                continue;
            }
            let Some(r) = rows.iter().find(|r| r.row == reference) else {
                continue;
            };
            for (metric, _) in RATIO_METRICS {
                if let (Some(a), Some(b)) = (row.median(metric), r.median(metric)) {
                    if b > 0.0 {
                        out.push(Ratio {
                            row: row.row.name(),
                            reference: reference.name(),
                            metric,
                            ratio: a / b,
                        });
                    }
                }
            }
        }
    }
    out
}

/// What a goal is measured against.
#[derive(Debug, Clone, Copy, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Against {
    Row(#[serde(serialize_with = "row_name")] RowKind),
    PhysicalFloor,
}

fn row_name<S: serde::Serializer>(row: &RowKind, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(row.name())
}

/// One of issue 6's goals and where this run stands.
#[derive(Debug, Clone, Serialize)]
pub struct Goal {
    pub scenario: &'static str,
    pub text: String,
    pub metric: &'static str,
    pub against: Against,
    /// `<=` or `>=`.
    pub comparison: &'static str,
    pub target: f64,
    pub measured: Option<f64>,
    pub met: Option<bool>,
    /// How far from the target, in words.
    pub verdict: String,
}

/// The goals of `scenario`, evaluated on `rows` (uring's medians against the reference's).
pub fn goals(scenario: &Scenario, rows: &[RowSummary]) -> Vec<Goal> {
    use Against::*;
    let spec: Vec<(&str, &'static str, Against, &'static str, f64)> = match scenario.name {
        ScenarioName::Seed => vec![
            (
                "uring downtime <= 1.10 x the physical floor",
                "downtime_ms",
                PhysicalFloor,
                "<=",
                1.10,
            ),
            (
                "uring downtime <= 0.30 x single",
                "downtime_ms",
                Row(RowKind::Single),
                "<=",
                0.30,
            ),
        ],
        ScenarioName::Gpu => vec![
            (
                "uring throughput >= 0.90 x ceiling",
                "throughput_gib_s",
                Row(RowKind::Ceiling),
                ">=",
                0.90,
            ),
            (
                "uring throughput >= 0.90 x qemu-ram",
                "throughput_gib_s",
                Row(RowKind::QemuRam),
                ">=",
                0.90,
            ),
            (
                "uring CPU s/GiB (source + destination) <= 0.70 x threads",
                "cpu_total_s_per_gib",
                Row(RowKind::Threads),
                "<=",
                0.70,
            ),
        ],
        ScenarioName::Many => vec![
            (
                "uring p99 latency <= 0.5 x threads",
                "latency_p99_us",
                Row(RowKind::Threads),
                "<=",
                0.5,
            ),
            (
                "uring CPU s/GiB (source + destination) <= 0.70 x threads",
                "cpu_total_s_per_gib",
                Row(RowKind::Threads),
                "<=",
                0.70,
            ),
        ],
        ScenarioName::Small => vec![(
            "uring throughput >= 1.5 x threads",
            "throughput_gib_s",
            Row(RowKind::Threads),
            ">=",
            1.5,
        )],
    };
    let uring = rows.iter().find(|r| r.row == RowKind::Uring);
    spec.into_iter()
        .map(|(text, metric, against, comparison, target)| {
            let mine = uring.and_then(|r| r.median(metric));
            let theirs = match against {
                Row(kind) => rows
                    .iter()
                    .find(|r| r.row == kind)
                    .and_then(|r| r.median(metric)),
                PhysicalFloor => scenario.shape.physical_floor_ms().map(|f| f.floor_ms),
            };
            let measured = match (mine, theirs) {
                (Some(a), Some(b)) if b > 0.0 => Some(a / b),
                _ => None,
            };
            let met = measured.map(|m| {
                if comparison == "<=" {
                    m <= target
                } else {
                    m >= target
                }
            });
            let verdict = match (measured, met) {
                (Some(m), Some(true)) => format!(
                    "met: {m:.2}x (target {comparison} {target:.2}x; {:.0}% to spare)",
                    margin(m, target, comparison)
                ),
                (Some(m), Some(false)) => format!(
                    "NOT met: {m:.2}x (target {comparison} {target:.2}x; off by {:.0}%)",
                    margin(m, target, comparison).abs()
                ),
                _ => "not measured (a row is missing or failed)".into(),
            };
            Goal {
                scenario: scenario.name.name(),
                text: text.to_string(),
                metric,
                against,
                comparison,
                target,
                measured,
                met,
                verdict,
            }
        })
        .collect()
}

/// Percent by which `m` beats (positive) or misses (negative) `target`.
fn margin(m: f64, target: f64, comparison: &str) -> f64 {
    if comparison == "<=" {
        (target - m) / target * 100.0
    } else {
        (m - target) / target * 100.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_and_range() {
        let s = spread(&[3.0, 1.0, 2.0]).expect("values");
        assert_eq!((s.median, s.min, s.max, s.n), (2.0, 1.0, 3.0, 3));
        assert_eq!(spread(&[1.0, 4.0]).map(|s| s.median), Some(2.5));
        assert!(spread(&[]).is_none());
    }

    #[test]
    fn margins_have_the_right_sign() {
        assert!(margin(1.0, 1.10, "<=") > 0.0);
        assert!(margin(1.2, 1.10, "<=") < 0.0);
        assert!(margin(1.6, 1.5, ">=") > 0.0);
        assert!(margin(0.8, 0.9, ">=") < 0.0);
    }
}
