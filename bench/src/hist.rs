//! HdrHistogram outputs in the formats its own tools write and read:
//! - the percentile distribution text of Java's `Histogram.outputPercentileDistribution`
//!   (`.hgrm`, 5 ticks per half distance, values scaled from ns to us);
//! - an interval log (`.hlog`) as Java's `HistogramLogWriter` writes it: format version,
//!   `#[StartTime: ...]`, `#[BaseTime: ...]`, the legend line, then one
//!   `start,length,max,<base64 of the compressed V2 encoding>` line per interval.

use std::fmt::Write as _;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use hdrhistogram::serialization::{Serializer as _, V2DeflateSerializer};
use hdrhistogram::Histogram;

/// Latency histograms record nanoseconds: 1 ns to 1 hour, 3 significant digits.
pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000_000, 3).expect("static histogram bounds are valid")
}

/// Nanoseconds per output unit (microseconds) in the `.hgrm` text.
pub const US: f64 = 1e3;

/// Java's `outputPercentileDistribution(out, 5, scale)`.
pub fn percentile_distribution(h: &Histogram<u64>, scale: f64) -> String {
    let digits = usize::from(h.sigfig());
    let mut out = String::new();
    let _ = write!(
        out,
        "{:>12} {:>14} {:>10} {:>14}\n\n",
        "Value", "Percentile", "TotalCount", "1/(1-Percentile)"
    );
    if !h.is_empty() {
        let mut total = 0u64;
        for v in h.iter_quantiles(5) {
            total += v.count_since_last_iteration();
            let value = v.value_iterated_to() as f64 / scale;
            let q = v.quantile_iterated_to();
            if q < 1.0 {
                let _ = writeln!(
                    out,
                    "{value:12.digits$} {q:2.12} {total:10} {:14.2}",
                    1.0 / (1.0 - q)
                );
            } else {
                let _ = writeln!(out, "{value:12.digits$} {q:2.12} {total:10}");
            }
        }
    }
    let (mean, stdev) = if h.is_empty() {
        (0.0, 0.0)
    } else {
        (h.mean() / scale, h.stdev() / scale)
    };
    let _ = writeln!(
        out,
        "#[Mean    = {mean:12.digits$}, StdDeviation   = {stdev:12.digits$}]"
    );
    let _ = writeln!(
        out,
        "#[Max     = {:12.digits$}, Total count    = {:12}]",
        h.max() as f64 / scale,
        h.len()
    );
    let _ = writeln!(
        out,
        "#[Buckets = {:12}, SubBuckets     = {:12}]",
        h.buckets(),
        sub_bucket_count(h.sigfig())
    );
    out
}

/// HdrHistogram's sub-bucket count for `sigfig` significant digits.
fn sub_bucket_count(sigfig: u8) -> u64 {
    let largest = 2 * 10u64.pow(u32::from(sigfig));
    largest.next_power_of_two()
}

/// One interval of an interval log.
pub struct Interval<'a> {
    pub start: SystemTime,
    pub length: Duration,
    pub histogram: &'a Histogram<u64>,
}

/// The interval log text; interval start times are relative to `base` (written as BaseTime).
/// The max column is in milliseconds (Java's default max-value unit ratio of 10^6 for ns).
pub fn interval_log(
    comment: &str,
    base: SystemTime,
    intervals: &[Interval<'_>],
) -> Result<String, String> {
    let mut out = String::new();
    for line in comment.lines() {
        let _ = writeln!(out, "#{line}");
    }
    let base_s = secs_since_epoch(base);
    let _ = writeln!(out, "#[Histogram log format version 1.3]");
    let _ = writeln!(
        out,
        "#[StartTime: {base_s:.3} (seconds since epoch), {}]",
        java_date(base)
    );
    let _ = writeln!(out, "#[BaseTime: {base_s:.3} (seconds since epoch)]");
    out.push_str("\"StartTimestamp\",\"Interval_Length\",\"Interval_Max\",\"Interval_Compressed_Histogram\"\n");
    let mut serializer = V2DeflateSerializer::new();
    for interval in intervals {
        let mut bytes = Vec::new();
        serializer
            .serialize(interval.histogram, &mut bytes)
            .map_err(|e| format!("encoding a histogram: {e}"))?;
        let start = secs_since_epoch(interval.start) - base_s;
        let _ = writeln!(
            out,
            "{:.3},{:.3},{:.3},{}",
            start.max(0.0),
            interval.length.as_secs_f64(),
            interval.histogram.max() as f64 / 1e6,
            base64::engine::general_purpose::STANDARD.encode(&bytes)
        );
    }
    Ok(out)
}

fn secs_since_epoch(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// Java's `Date.toString()` in UTC: `Thu Nov 26 10:49:34 UTC 2026`.
pub fn java_date(t: SystemTime) -> String {
    let secs = t
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let (y, m, d) = civil_from_days(days);
    const DAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    format!(
        "{} {} {:02} {:02}:{:02}:{:02} UTC {}",
        DAYS[(days.rem_euclid(7)) as usize],
        MONTHS[(m - 1) as usize],
        d,
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        y
    )
}

/// `YYYY-MM-DD` of a UTC time.
pub fn iso_date(t: SystemTime) -> String {
    let secs = t
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (y, m, d) = civil_from_days((secs / 86_400) as i64);
    format!("{y:04}-{m:02}-{d:02}")
}

/// Howard Hinnant's days-from-civil inverse: (year, month 1-12, day 1-31).
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use hdrhistogram::serialization::interval_log::{IntervalLogIterator, LogEntry};
    use hdrhistogram::serialization::Deserializer;

    #[test]
    fn dates_format_like_java() {
        let t = UNIX_EPOCH + Duration::from_secs(1_795_690_304);
        assert_eq!(java_date(t), "Thu Nov 26 10:51:44 UTC 2026");
        assert_eq!(java_date(UNIX_EPOCH), "Thu Jan 01 00:00:00 UTC 1970");
        assert_eq!(iso_date(t), "2026-11-26");
    }

    #[test]
    fn distribution_ends_at_the_max_and_counts_everything() {
        let mut h = new_histogram();
        for v in 1..=1000u64 {
            h.record(v * 1000).expect("in range");
        }
        let text = percentile_distribution(&h, US);
        let rows: Vec<Vec<&str>> = text
            .lines()
            .skip(2)
            .take_while(|l| !l.starts_with('#'))
            .map(|l| l.split_whitespace().collect())
            .collect();
        let last = rows.last().expect("rows");
        assert_eq!(last[1], "1.000000000000");
        assert_eq!(last[2], "1000");
        let p50 = rows
            .iter()
            .find(|r| r[1] == "0.500000000000")
            .expect("p50 row");
        assert_eq!(p50[0], "500.223");
        assert!(text.contains("#[Max     =     1000.447, Total count    =         1000]"));
        assert!(text.contains("SubBuckets     =         2048]"));
    }

    #[test]
    fn interval_log_round_trips_through_the_crate_reader() {
        let mut h = new_histogram();
        for v in [1_000u64, 2_000, 3_000_000] {
            h.record(v).expect("in range");
        }
        let base = UNIX_EPOCH + Duration::from_secs(1_795_690_304);
        let log = interval_log(
            "[vfio-multifd-bench test]",
            base,
            &[Interval {
                start: base + Duration::from_millis(1500),
                length: Duration::from_millis(250),
                histogram: &h,
            }],
        )
        .expect("encodes");
        assert!(log.contains("#[StartTime: 1795690304.000 (seconds since epoch), Thu Nov 26"));
        assert!(log.contains(
            "\"StartTimestamp\",\"Interval_Length\",\"Interval_Max\",\"Interval_Compressed_Histogram\"\n"
        ));
        let mut found = 0;
        for entry in IntervalLogIterator::new(log.as_bytes()) {
            if let Ok(LogEntry::Interval(i)) = entry {
                found += 1;
                assert_eq!(i.start_timestamp(), Duration::from_millis(1500));
                let bytes = base64::engine::general_purpose::STANDARD
                    .decode(i.encoded_histogram())
                    .expect("base64");
                let back: Histogram<u64> = Deserializer::new()
                    .deserialize(&mut bytes.as_slice())
                    .expect("V2 deflate");
                assert_eq!(back, h);
            }
        }
        assert_eq!(found, 1);
    }
}
