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

pub const METRICS: [(&str, Getter); 21] = [
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
    ("workers_src", |m| m.workers_src.map(f64::from)),
    ("workers_dst", |m| m.workers_dst.map(f64::from)),
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
    /// The row's name in every output: the kind's, or `uring-wN` in a scaling run.
    pub label: String,
    /// The workers asked of each helper (`--workers` or a `--scaling` count).
    pub workers: Option<u32>,
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
    pub fn new(
        row: RowKind,
        label: String,
        workers: Option<u32>,
        skipped: Option<String>,
        runs: Vec<Run>,
    ) -> RowSummary {
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
            label,
            workers,
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

/// Metrics compared between rows, with their column names (lower is better for all but
/// throughput; the goals carry their own comparison).
pub const RATIO_METRICS: [(&str, &str); 4] = [
    ("downtime_ms", "downtime"),
    ("throughput_gib_s", "throughput"),
    ("cpu_total_s_per_gib", "CPU s/GiB"),
    ("latency_p99_us", "p99 latency"),
];

/// References every row is compared with.
pub const REFERENCES: [RowKind; 5] = [
    RowKind::Threads,
    RowKind::Single,
    RowKind::Ceiling,
    RowKind::QemuRam,
    RowKind::Loopback,
];

/// `row metric / reference metric`, medians.
#[derive(Debug, Clone, Serialize)]
pub struct Ratio {
    pub row: String,
    pub reference: String,
    pub metric: &'static str,
    pub ratio: f64,
}

/// Every row against each reference row (by label) present in `rows`.
pub fn ratios(rows: &[RowSummary], references: &[String]) -> Vec<Ratio> {
    let mut out = Vec::new();
    for row in rows {
        for reference in references {
            if *reference == row.label {
                continue;
            }
            let Some(r) = rows.iter().find(|r| r.label == *reference) else {
                continue;
            };
            for (metric, _) in RATIO_METRICS {
                if let (Some(a), Some(b)) = (row.median(metric), r.median(metric)) {
                    if b > 0.0 {
                        out.push(Ratio {
                            row: row.label.clone(),
                            reference: reference.clone(),
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
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Against {
    /// The row of this label.
    Row(String),
    PhysicalFloor,
}

/// One of issue 6's goals and where this run stands.
#[derive(Debug, Clone, Serialize)]
pub struct Goal {
    pub scenario: &'static str,
    pub text: String,
    pub metric: &'static str,
    /// The row measured (its label).
    pub row: String,
    pub against: Against,
    /// `<=` or `>=`.
    pub comparison: &'static str,
    pub target: f64,
    pub measured: Option<f64>,
    pub met: Option<bool>,
    /// How far from the target, in words.
    pub verdict: String,
}

/// A goal before it is measured: `row`'s `metric` over `against`'s, `comparison` `target`.
struct GoalSpec {
    text: String,
    metric: &'static str,
    row: String,
    against: Against,
    comparison: &'static str,
    target: f64,
}

impl GoalSpec {
    fn new(
        text: &str,
        metric: &'static str,
        against: Against,
        comparison: &'static str,
        target: f64,
    ) -> GoalSpec {
        GoalSpec {
            text: text.to_string(),
            metric,
            row: RowKind::Uring.name().into(),
            against,
            comparison,
            target,
        }
    }
}

/// The label of the `uring` row that ran with `workers` workers in a scaling run.
pub fn scaling_label(workers: u32) -> String {
    format!("uring-w{workers}")
}

/// Issue 6's goals for each scenario's rows (the `uring` row against a reference).
fn row_goals(name: ScenarioName) -> Vec<GoalSpec> {
    use Against::*;
    let row = |kind: RowKind| Row(kind.name().into());
    match name {
        ScenarioName::Seed => vec![
            GoalSpec::new(
                "uring downtime <= 1.10 x the physical floor",
                "downtime_ms",
                PhysicalFloor,
                "<=",
                1.10,
            ),
            GoalSpec::new(
                "uring downtime <= 0.30 x single",
                "downtime_ms",
                row(RowKind::Single),
                "<=",
                0.30,
            ),
        ],
        ScenarioName::Gpu => vec![
            GoalSpec::new(
                "uring throughput >= 0.90 x ceiling",
                "throughput_gib_s",
                row(RowKind::Ceiling),
                ">=",
                0.90,
            ),
            GoalSpec::new(
                "uring throughput >= 0.90 x qemu-ram",
                "throughput_gib_s",
                row(RowKind::QemuRam),
                ">=",
                0.90,
            ),
            GoalSpec::new(
                "uring CPU s/GiB (source + destination) <= 0.70 x threads",
                "cpu_total_s_per_gib",
                row(RowKind::Threads),
                "<=",
                0.70,
            ),
        ],
        ScenarioName::Many => vec![
            GoalSpec::new(
                "uring p99 latency <= 0.5 x threads",
                "latency_p99_us",
                row(RowKind::Threads),
                "<=",
                0.5,
            ),
            GoalSpec::new(
                "uring CPU s/GiB (source + destination) <= 0.70 x threads",
                "cpu_total_s_per_gib",
                row(RowKind::Threads),
                "<=",
                0.70,
            ),
        ],
        ScenarioName::Small => vec![GoalSpec::new(
            "uring throughput >= 1.5 x threads",
            "throughput_gib_s",
            row(RowKind::Threads),
            ">=",
            1.5,
        )],
    }
}

/// Issue 6's 16-core goals (`gpu` and `many`): 8 workers against 1, and against the loopback
/// transport over `connections` connections (the reference has 8).
fn scaling_goals(connections: u32) -> Vec<GoalSpec> {
    let (eight, one) = (scaling_label(8), scaling_label(1));
    vec![
        GoalSpec {
            text: format!("{eight} throughput >= 5 x {one}"),
            metric: "throughput_gib_s",
            row: eight.clone(),
            against: Against::Row(one),
            comparison: ">=",
            target: 5.0,
        },
        GoalSpec {
            text: format!("{eight} throughput >= 0.70 x loopback ({connections} connections)"),
            metric: "throughput_gib_s",
            row: eight,
            against: Against::Row(RowKind::Loopback.name().into()),
            comparison: ">=",
            target: 0.70,
        },
    ]
}

/// The goals of `scenario` (its rows', or with `--scaling` the worker-scaling ones),
/// evaluated on `rows`' medians.
pub fn goals(scenario: &Scenario, rows: &[RowSummary]) -> Vec<Goal> {
    let specs = match scenario.scaling.last() {
        None => row_goals(scenario.name),
        Some(&most) => scaling_goals(most),
    };
    let median = |label: &str, metric: &str| {
        rows.iter()
            .find(|r| r.label == label)
            .and_then(|r| r.median(metric))
    };
    specs
        .into_iter()
        .map(|spec| {
            let mine = median(&spec.row, spec.metric);
            let theirs = match &spec.against {
                Against::Row(label) => median(label, spec.metric),
                Against::PhysicalFloor => scenario.shape.physical_floor_ms().map(|f| f.floor_ms),
            };
            let measured = match (mine, theirs) {
                (Some(a), Some(b)) if b > 0.0 => Some(a / b),
                _ => None,
            };
            let (comparison, target) = (spec.comparison, spec.target);
            let met = measured.map(|m| {
                if comparison == "<=" {
                    m <= target
                } else {
                    m >= target
                }
            });
            let verdict = match (measured, met) {
                (Some(m), Some(true)) => format!(
                    "met: {} (target {comparison} {target:.2}x; {} to spare)",
                    ratio_text(m, target),
                    percent_text(margin(m, target, comparison))
                ),
                (Some(m), Some(false)) => format!(
                    "NOT met: {} (target {comparison} {target:.2}x; off by {})",
                    ratio_text(m, target),
                    percent_text(margin(m, target, comparison).abs())
                ),
                _ => "not measured (a row is missing or failed)".into(),
            };
            Goal {
                scenario: scenario.name.name(),
                text: spec.text,
                metric: spec.metric,
                row: spec.row,
                against: spec.against,
                comparison,
                target,
                measured,
                met,
                verdict,
            }
        })
        .collect()
}

/// Two decimals, or three where two would print the target itself: 1.498 against 1.5 is a
/// miss, and "1.50x" would not say so.
fn ratio_text(ratio: f64, target: f64) -> String {
    if format!("{ratio:.2}") == format!("{target:.2}") {
        format!("{ratio:.3}x")
    } else {
        format!("{ratio:.2}x")
    }
}

/// Whole percent, or one decimal under 1 % (where "0%" would hide a miss).
fn percent_text(percent: f64) -> String {
    if percent < 1.0 {
        format!("{percent:.1}%")
    } else {
        format!("{percent:.0}%")
    }
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
    fn a_near_miss_prints_enough_digits_to_show_it() {
        assert_eq!(ratio_text(1.498_458, 1.5), "1.498x");
        assert_eq!(percent_text(margin(1.498_458, 1.5, ">=").abs()), "0.1%");
        assert_eq!(ratio_text(1.65, 1.5), "1.65x");
        assert_eq!(percent_text(margin(1.65, 1.5, ">=")), "10%");
    }

    #[test]
    fn margins_have_the_right_sign() {
        assert!(margin(1.0, 1.10, "<=") > 0.0);
        assert!(margin(1.2, 1.10, "<=") < 0.0);
        assert!(margin(1.6, 1.5, ">=") > 0.0);
        assert!(margin(0.8, 0.9, ">=") < 0.0);
    }
}
