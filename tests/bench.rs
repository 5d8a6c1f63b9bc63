//! The bench's outputs. Its HdrHistogram files are checked by an independent decoder: runs
//! `vfio-multifd-bench --scenario seed --quick --out DIR` (built here with cargo if needed),
//! decodes every `.hlog` with the `hdrhistogram` package from PyPI (`import hdrh`, installed by
//! tools/install-test-deps.sh), and checks its count, max, p50, p90 and p99 against the bench's
//! own percentile-distribution text (`.hgrm`) within the histogram's precision. It also checks
//! that the JSON output is one object with every row, ratio and goal, and that `--scaling` runs
//! each worker count (the helpers report the workers that ran) beside the loopback transport.
//!
//! Correctness only: no speed is asserted. The hlog test skips (and passes) only when python3
//! or its `hdrh` module is missing.

#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

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
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A child killed and reaped on drop (only this child, by its handle).
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Runs `cmd` to its end within `limit`; returns (success, stdout, stderr).
fn run(mut cmd: Command, limit: Duration, what: &str) -> (bool, String, String) {
    let out_path = std::env::temp_dir().join(format!(
        "bench-hlog-{}-{}.out",
        std::process::id(),
        what.replace(' ', "-")
    ));
    let err_path = out_path.with_extension("err");
    cmd.stdin(Stdio::null())
        .stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(std::fs::File::create(&err_path).unwrap());
    let mut guard = Guard(
        cmd.spawn()
            .unwrap_or_else(|e| panic!("starting {what}: {e}")),
    );
    let end = Instant::now() + limit;
    let status = loop {
        if let Some(status) = guard.0.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < end, "{what} ran longer than {limit:?}");
        std::thread::sleep(Duration::from_millis(50));
    };
    let out = std::fs::read_to_string(&out_path).unwrap_or_default();
    let err = std::fs::read_to_string(&err_path).unwrap_or_default();
    let _ = std::fs::remove_file(&out_path);
    let _ = std::fs::remove_file(&err_path);
    (status.success(), out, err)
}

fn python_hdrh_missing() -> Option<String> {
    let mut cmd = Command::new("python3");
    cmd.args(["-c", "import hdrh"]);
    match cmd.stdout(Stdio::null()).stderr(Stdio::null()).status() {
        Ok(s) if s.success() => None,
        Ok(_) => Some("python3 has no `hdrh` module (pip install hdrhistogram)".into()),
        Err(e) => Some(format!("python3 not found ({e})")),
    }
}

/// The bench binary next to the helper this test was built with, (re)built by cargo with the
/// same profile (a no-op when it is up to date).
fn bench_binary() -> PathBuf {
    let helper = PathBuf::from(env!("CARGO_BIN_EXE_vfio-multifd"));
    let profile_dir = helper.parent().unwrap().to_path_buf();
    let profile = profile_dir
        .file_name()
        .unwrap()
        .to_string_lossy()
        .to_string();
    let mut cmd = Command::new(option_env!("CARGO").unwrap_or("cargo"));
    cmd.current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["build", "-p", "vfio-multifd-bench"]);
    match profile.as_str() {
        "debug" => {}
        "release" => {
            cmd.arg("--release");
        }
        other => {
            cmd.args(["--profile", other]);
        }
    }
    if let Some(target) = profile_dir.parent() {
        cmd.env("CARGO_TARGET_DIR", target);
    }
    let (ok, _, err) = run(cmd, Duration::from_secs(900), "cargo build bench");
    assert!(ok, "building vfio-multifd-bench failed:\n{err}");
    let bench = profile_dir.join("vfio-multifd-bench");
    assert!(
        bench.is_file(),
        "{} missing after the build",
        bench.display()
    );
    bench
}

/// What the independent decoder says about one `.hlog`.
const DECODE: &str = r#"
import json, sys
from hdrh.histogram import HdrHistogram
from hdrh.log import HistogramLogReader
total = HdrHistogram(1, 3600 * 10**9, 3)
reader = HistogramLogReader(sys.argv[1], HdrHistogram(1, 3600 * 10**9, 3))
intervals = 0
while reader.add_next_interval_histogram(total) is not None:
    intervals += 1
out = {"intervals": intervals, "count": total.get_total_count(), "max": total.get_max_value(), "p": {}}
for q in (50.0, 90.0, 99.0):
    out["p"][str(q)] = {
        "target": total.get_target_count_at_percentile(q),
        "value": total.get_value_at_percentile(q),
    }
print(json.dumps(out))
"#;

/// One `.hgrm` row: value in ns, percentile level, cumulative count.
struct Row {
    value_ns: u64,
    level: f64,
    count: u64,
}

/// Parses the percentile-distribution text: rows, and the footer's max (ns) and total count.
fn parse_hgrm(text: &str) -> (Vec<Row>, u64, u64) {
    let mut rows = Vec::new();
    let (mut max, mut total) = (None, None);
    for line in text.lines().skip(2) {
        if let Some(rest) = line.strip_prefix("#[Max     =") {
            let (m, t) = rest.split_once(", Total count    =").unwrap();
            max = Some(us_to_ns(m.trim()));
            total = Some(t.trim().trim_end_matches(']').trim().parse().unwrap());
            continue;
        }
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let f: Vec<&str> = line.split_whitespace().collect();
        assert!(f.len() >= 3, "bad .hgrm row {line:?}");
        rows.push(Row {
            value_ns: us_to_ns(f[0]),
            level: f[1].parse().unwrap(),
            count: f[2].parse().unwrap(),
        });
    }
    (rows, max.unwrap(), total.unwrap())
}

/// `12345.678` (us, 3 decimals) -> 12345678 ns, exactly.
fn us_to_ns(text: &str) -> u64 {
    let (int, frac) = text.split_once('.').unwrap();
    assert_eq!(frac.len(), 3, "{text}");
    int.parse::<u64>().unwrap() * 1000 + frac.parse::<u64>().unwrap()
}

/// Equal within the histogram's precision (3 significant digits: one bucket is at most
/// 1/1024 of the value wide).
fn equivalent(a: u64, b: u64) -> bool {
    a.abs_diff(b) <= a.max(b) / 1000 + 1
}

fn check_row(name: &str, hgrm: &str, decoded: &Value, counted_runs: u64) {
    let (rows, max_ns, total) = parse_hgrm(hgrm);
    assert!(!rows.is_empty(), "{name}: no rows in the .hgrm");
    let count = decoded["count"].as_u64().unwrap();
    assert_eq!(
        decoded["intervals"].as_u64().unwrap(),
        counted_runs,
        "{name}: one interval per counted repeat"
    );
    assert_eq!(count, total, "{name}: total count, decoder vs text");
    assert_eq!(rows.last().unwrap().count, total, "{name}: last row count");
    assert_eq!(rows.last().unwrap().level, 1.0, "{name}: last row is 100%");
    let py_max = decoded["max"].as_u64().unwrap();
    assert!(
        equivalent(py_max, max_ns),
        "{name}: max {py_max} ns (decoder) vs {max_ns} ns (text)"
    );
    for q in [0.5f64, 0.9, 0.99] {
        let p = &decoded["p"][format!("{:.1}", q * 100.0)];
        let target = p["target"].as_u64().unwrap();
        let value = p["value"].as_u64().unwrap();
        // The text brackets the value at any count: above every row that has fewer, at most
        // the first row that has at least as many.
        let lo = rows
            .iter()
            .filter(|r| r.count < target)
            .map(|r| r.value_ns)
            .max()
            .unwrap_or(0);
        let hi = rows
            .iter()
            .filter(|r| r.count >= target)
            .map(|r| r.value_ns)
            .min()
            .unwrap();
        assert!(
            value > lo && (value <= hi || equivalent(value, hi)),
            "{name}: p{} = {value} ns (decoder, count {target}) is outside ({lo}, {hi}] from the text",
            q * 100.0
        );
        // Where the text has a row at exactly this percentile and both count the same way,
        // the values must agree.
        let ceil_target = ((q * total as f64) - 1e-9).ceil().max(1.0) as u64;
        if let Some(row) = rows.iter().find(|r| (r.level - q).abs() < 1e-12) {
            if ceil_target == target {
                assert!(
                    equivalent(row.value_ns, value),
                    "{name}: p{} row says {} ns, the decoder {value} ns",
                    q * 100.0,
                    row.value_ns
                );
            }
        }
    }
}

#[test]
fn bench_hlog_decodes_with_python_hdrh_and_matches_the_text() {
    if let Some(why) = python_hdrh_missing() {
        eprintln!("SKIP: {why}; tools/install-test-deps.sh installs it");
        return;
    }
    let bench = bench_binary();
    let dir = TempDir::new("bench-hlog");
    let out = dir.0.join("out");
    let mut cmd = Command::new(&bench);
    cmd.args([
        "--scenario",
        "seed",
        "--quick",
        "--repeats",
        "2",
        "--rows",
        "uring,threads,ceiling",
        "--json",
        "--out",
    ])
    .arg(&out)
    .arg("--helper")
    .arg(env!("CARGO_BIN_EXE_vfio-multifd"));
    let (ok, stdout, stderr) = run(cmd, Duration::from_secs(300), "vfio-multifd-bench");
    assert!(ok, "the bench failed:\n{stdout}\n{stderr}");
    let json: Value = serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("--json printed more or less than one object ({e}):\n{stdout}"));
    assert_eq!(json["scenario"]["name"], "seed");
    assert!(json["machine"]["cores"].as_u64().unwrap() >= 1);
    assert!(!json["machine"]["kernel"].as_str().unwrap().is_empty());
    assert!(
        json["machine"]["avx512"].is_boolean(),
        "{}",
        json["machine"]
    );
    let memcpy = json["machine"]["copies_at_start"]["memcpy_gb_s"].as_f64();
    assert!(memcpy.is_some_and(|g| g > 0.0), "{}", json["machine"]);
    let rows = json["rows"].as_array().unwrap();
    let names: Vec<&str> = rows.iter().map(|r| r["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["uring", "threads", "ceiling"]);
    for row in rows {
        assert_eq!(row["counted_runs"], 2, "{row}");
        assert_eq!(row["counted_ok"], 2, "{}: {}", row["name"], row["errors"]);
        assert_eq!(row["runs"].as_array().unwrap().len(), 3, "warm-up + 2");
        assert!(row["metrics"]["downtime_ms"]["median"].as_f64().unwrap() > 0.0);
        let m = &row["metrics"]["throughput_gib_s"];
        assert!(m["min"].as_f64().unwrap() <= m["median"].as_f64().unwrap());
        assert!(m["median"].as_f64().unwrap() <= m["max"].as_f64().unwrap());
    }
    let ratios = json["ratios"].as_array().unwrap();
    assert!(ratios
        .iter()
        .any(|r| r["row"] == "uring" && r["reference"] == "threads"));
    assert!(ratios
        .iter()
        .any(|r| r["row"] == "uring" && r["reference"] == "ceiling"));
    let goals = json["goals"].as_array().unwrap();
    assert_eq!(goals.len(), 2, "seed has two goals");
    assert!(goals[0]["measured"].as_f64().is_some(), "{}", goals[0]);

    for name in ["uring", "threads", "ceiling"] {
        for file in [
            format!("{name}.hgrm"),
            format!("{name}.hlog"),
            format!("latency-{name}.svg"),
        ] {
            assert!(out.join(&file).is_file(), "{file} not written");
        }
        let (ok, decoded, err) = {
            let mut cmd = Command::new("python3");
            cmd.args(["-c", DECODE])
                .arg(out.join(format!("{name}.hlog")));
            run(cmd, Duration::from_secs(60), "python decode")
        };
        assert!(ok, "the Python decoder rejected {name}.hlog:\n{err}");
        let decoded: Value = serde_json::from_str(decoded.trim()).unwrap();
        let hgrm = std::fs::read_to_string(out.join(format!("{name}.hgrm"))).unwrap();
        check_row(name, &hgrm, &decoded, 2);
        let row = rows.iter().find(|r| r["name"] == name).unwrap();
        assert_eq!(
            row["latency_us"]["count"].as_u64(),
            decoded["count"].as_u64(),
            "{name}: JSON packet count vs decoder"
        );
    }
    for file in [
        "latency.svg",
        "throughput.svg",
        "summary.txt",
        "results.json",
    ] {
        assert!(out.join(file).is_file(), "{file} not written");
    }
    let svg = std::fs::read_to_string(out.join("throughput.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
}

/// `--scaling`: one `uring` row per worker count (sorted, each once) whose helpers ran with that
/// many workers, the loopback transport over as many connections as the most workers, ratios
/// against the fewest workers and the loopback, and the 16-core goals computed from them.
#[test]
fn scaling_runs_each_worker_count_beside_the_loopback_transport() {
    let bench = bench_binary();
    let mut cmd = Command::new(&bench);
    cmd.args([
        "--scenario",
        "gpu",
        "--quick",
        "--size",
        "32MiB",
        "--repeats",
        "1",
        "--scaling",
        "8,1,2,1",
        "--json",
        "--helper",
    ])
    .arg(env!("CARGO_BIN_EXE_vfio-multifd"));
    let (ok, stdout, stderr) = run(cmd, Duration::from_secs(300), "vfio-multifd-bench scaling");
    assert!(ok, "the bench failed:\n{stdout}\n{stderr}");
    let json: Value = serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("--json printed more or less than one object ({e}):\n{stdout}"));
    assert_eq!(json["scenario"]["scaling"], serde_json::json!([1, 2, 8]));
    let rows = json["rows"].as_array().unwrap();
    let names: Vec<&str> = rows.iter().map(|r| r["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["uring-w1", "uring-w2", "uring-w8", "loopback"]);
    for row in rows {
        assert_eq!(row["counted_ok"], 1, "{}: {}", row["name"], row["errors"]);
        assert!(
            row["metrics"]["throughput_gib_s"]["median"]
                .as_f64()
                .unwrap()
                > 0.0
        );
    }
    // One device over 8 channels: the source reads on one worker and lends to the others; the
    // destination runs one worker per asked worker (up to the channels).
    for (row, workers) in rows.iter().zip([1, 2, 8]) {
        assert_eq!(row["workers"], workers, "{}", row["name"]);
        assert_eq!(row["engines"], "uring", "{}", row["name"]);
        for side in ["workers_src", "workers_dst"] {
            let ran = row["metrics"][side]["median"].as_f64();
            assert_eq!(ran, Some(f64::from(workers)), "{} {side}", row["name"]);
        }
    }
    let loopback = &rows[3];
    assert_eq!(loopback["engines"], "loopback");
    assert!(loopback["latency_us"].is_null(), "no devices, no packets");
    assert!(loopback["metrics"]["workers_src"].is_null());
    let ratio = |row: &str, reference: &str| {
        json["ratios"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| {
                r["row"] == row && r["reference"] == reference && r["metric"] == "throughput_gib_s"
            })
            .and_then(|r| r["ratio"].as_f64())
            .unwrap_or_else(|| panic!("no {row} / {reference} throughput ratio"))
    };
    let goals = json["goals"].as_array().unwrap();
    assert_eq!(goals.len(), 2, "{goals:?}");
    for (goal, reference) in goals.iter().zip(["uring-w1", "loopback"]) {
        assert_eq!(goal["row"], "uring-w8");
        assert_eq!(goal["against"]["row"], reference);
        let measured = goal["measured"].as_f64().unwrap();
        assert!(
            (measured - ratio("uring-w8", reference)).abs() < 1e-9,
            "{goal}"
        );
    }
    assert!(goals[1]["text"].as_str().unwrap().contains("8 connections"));
}

/// The bracket check itself must catch a decoder that disagrees.
#[test]
fn the_check_fails_when_the_decoder_disagrees() {
    let hgrm = "       Value     Percentile TotalCount 1/(1-Percentile)\n\n\
       1.000 0.000000000000          1           1.00\n\
       5.000 0.500000000000          5           2.00\n\
       9.000 0.900000000000          9          10.00\n\
      10.000 1.000000000000         10\n\
#[Mean    =        5.500, StdDeviation   =        2.872]\n\
#[Max     =       10.000, Total count    =           10]\n\
#[Buckets =           32, SubBuckets     =         2048]\n";
    let good: Value = serde_json::json!({"intervals": 1, "count": 10, "max": 10000,
        "p": {"50.0": {"target": 5, "value": 5000}, "90.0": {"target": 9, "value": 9000},
              "99.0": {"target": 10, "value": 10000}}});
    check_row("good", hgrm, &good, 1);
    for bad in [
        serde_json::json!({"intervals": 1, "count": 10, "max": 10000,
            "p": {"50.0": {"target": 5, "value": 7000}, "90.0": {"target": 9, "value": 9000},
                  "99.0": {"target": 10, "value": 10000}}}),
        serde_json::json!({"intervals": 1, "count": 10, "max": 12000,
            "p": {"50.0": {"target": 5, "value": 5000}, "90.0": {"target": 9, "value": 9000},
                  "99.0": {"target": 10, "value": 10000}}}),
        serde_json::json!({"intervals": 1, "count": 11, "max": 10000,
            "p": {"50.0": {"target": 5, "value": 5000}, "90.0": {"target": 9, "value": 9000},
                  "99.0": {"target": 10, "value": 10000}}}),
    ] {
        let caught = std::panic::catch_unwind(|| check_row("bad", hgrm, &bad, 1)).is_err();
        assert!(caught, "a disagreeing decoder passed: {bad}");
    }
}
