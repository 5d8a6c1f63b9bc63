//! Hand-written SVG plots: latency by percentile (HdrHistogram's plotter layout: the x axis is
//! 1/(1-percentile) on a log scale, so 90%, 99%, 99.9% are evenly spaced) and a throughput bar
//! chart with the min-max range of the repeats.

use std::fmt::Write as _;

use hdrhistogram::Histogram;

const W: f64 = 860.0;
const H: f64 = 440.0;
const LEFT: f64 = 80.0;
const RIGHT: f64 = 230.0;
const TOP: f64 = 70.0;
const BOTTOM: f64 = 60.0;
const COLORS: [&str; 6] = [
    "#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b",
];

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

fn header(out: &mut String, title: &str, subtitle: &str) {
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(out, r#"<rect width="{W}" height="{H}" fill="white"/>"#);
    let _ = writeln!(
        out,
        r#"<text x="{LEFT}" y="22" font-size="15">{}</text>"#,
        escape(title)
    );
    for (i, line) in subtitle.lines().take(2).enumerate() {
        let _ = writeln!(
            out,
            r##"<text x="{LEFT}" y="{}" font-size="11" fill="#444">{}</text>"##,
            38 + 13 * i,
            escape(line)
        );
    }
}

/// A "nice" axis maximum and step for values up to `max`.
fn nice_axis(max: f64) -> (f64, f64) {
    let max = if max > 0.0 { max } else { 1.0 };
    let raw = max / 5.0;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 2.5, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * mag);
    ((max / step).ceil() * step, step)
}

/// An axis label with as many decimals as the step needs.
fn axis_label(v: f64, step: f64) -> String {
    if step >= 1.0 {
        format!("{v:.0}")
    } else if step >= 0.1 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn tick_label(v: f64) -> String {
    if v == 0.0 || v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 1.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// Latency by percentile, one line per series (values in ns).
pub fn latency_plot(title: &str, subtitle: &str, series: &[(&str, &Histogram<u64>)]) -> String {
    let mut out = String::new();
    header(&mut out, title, subtitle);
    let max_ns = series.iter().map(|(_, h)| h.max()).max().unwrap_or(0) as f64;
    let (unit, div) = if max_ns >= 10e6 {
        ("ms", 1e6)
    } else {
        ("us", 1e3)
    };
    let (y_max, y_step) = nice_axis(max_ns / div * 1.05);
    // x = log10(1/(1-q)), up to the decade that holds every finite point (at least 99.9%).
    let points: Vec<Vec<(f64, f64)>> = series
        .iter()
        .map(|(_, h)| {
            h.iter_quantiles(5)
                .filter(|v| v.quantile_iterated_to() < 1.0)
                .map(|v| {
                    (
                        (1.0 / (1.0 - v.quantile_iterated_to())).log10(),
                        v.value_iterated_to() as f64 / div,
                    )
                })
                .collect()
        })
        .collect();
    let x_max = points
        .iter()
        .flatten()
        .map(|p| p.0)
        .fold(3.0f64, f64::max)
        .ceil();
    let pw = W - LEFT - RIGHT;
    let ph = H - TOP - BOTTOM;
    let sx = |x: f64| LEFT + x / x_max * pw;
    let sy = |y: f64| TOP + ph - y / y_max * ph;
    // Grid and axes.
    let mut y = 0.0;
    while y <= y_max + y_step / 2.0 {
        let _ = writeln!(
            out,
            r##"<line x1="{LEFT}" y1="{0:.1}" x2="{1:.1}" y2="{0:.1}" stroke="#ddd"/><text x="{2:.1}" y="{3:.1}" text-anchor="end">{4}</text>"##,
            sy(y),
            LEFT + pw,
            LEFT - 6.0,
            sy(y) + 4.0,
            axis_label(y, y_step)
        );
        y += y_step;
    }
    for decade in 0..=(x_max as u32) {
        let label = match decade {
            0 => "0%".to_string(),
            d => {
                let nines = 100.0 - 100.0 / 10f64.powi(d as i32);
                let text = format!("{nines:.5}");
                format!("{}%", text.trim_end_matches('0').trim_end_matches('.'))
            }
        };
        let x = sx(f64::from(decade));
        let _ = writeln!(
            out,
            r##"<line x1="{x:.1}" y1="{TOP}" x2="{x:.1}" y2="{0:.1}" stroke="#ddd"/><text x="{x:.1}" y="{1:.1}" text-anchor="middle">{label}</text>"##,
            TOP + ph,
            TOP + ph + 18.0
        );
    }
    let _ = writeln!(
        out,
        r#"<rect x="{LEFT}" y="{TOP}" width="{pw}" height="{ph}" fill="none" stroke="black"/>"#
    );
    let _ = writeln!(
        out,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">Percentile (read issued on the source -> written on the destination, per packet)</text>"#,
        LEFT + pw / 2.0,
        H - 14.0
    );
    let _ = writeln!(
        out,
        r#"<text x="18" y="{:.1}" text-anchor="middle" transform="rotate(-90 18 {:.1})">Latency ({unit})</text>"#,
        TOP + ph / 2.0,
        TOP + ph / 2.0
    );
    for (i, ((name, h), pts)) in series.iter().zip(&points).enumerate() {
        let color = COLORS[i % COLORS.len()];
        let mut path = String::new();
        for (j, (x, y)) in pts.iter().enumerate() {
            let _ = write!(
                path,
                "{}{:.1},{:.1}",
                if j == 0 { "M" } else { " L" },
                sx(*x),
                sy(*y)
            );
        }
        if !path.is_empty() {
            let _ = writeln!(
                out,
                r#"<path d="{path}" fill="none" stroke="{color}" stroke-width="2"/>"#
            );
        }
        let ly = TOP + 10.0 + i as f64 * 34.0;
        let _ = writeln!(
            out,
            r##"<line x1="{0:.1}" y1="{ly:.1}" x2="{1:.1}" y2="{ly:.1}" stroke="{color}" stroke-width="3"/><text x="{2:.1}" y="{3:.1}">{4}</text><text x="{2:.1}" y="{5:.1}" fill="#555" font-size="10">p50 {6} p99 {7} max {8} {unit}</text>"##,
            W - RIGHT + 12.0,
            W - RIGHT + 32.0,
            W - RIGHT + 38.0,
            ly + 4.0,
            escape(name),
            ly + 17.0,
            tick_label(h.value_at_quantile(0.5) as f64 / div),
            tick_label(h.value_at_quantile(0.99) as f64 / div),
            tick_label(h.max() as f64 / div),
        );
    }
    out.push_str("</svg>\n");
    out
}

/// One bar per row: the median, with a whisker from the smallest to the largest repeat.
pub struct Bar<'a> {
    pub name: &'a str,
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

pub fn bar_chart(title: &str, subtitle: &str, unit: &str, bars: &[Bar<'_>]) -> String {
    let mut out = String::new();
    header(&mut out, title, subtitle);
    let (y_max, y_step) = nice_axis(bars.iter().map(|b| b.max).fold(0.0, f64::max) * 1.1);
    let pw = W - LEFT - 40.0;
    let ph = H - TOP - BOTTOM;
    let sy = |y: f64| TOP + ph - y / y_max * ph;
    let mut y = 0.0;
    while y <= y_max + y_step / 2.0 {
        let _ = writeln!(
            out,
            r##"<line x1="{LEFT}" y1="{0:.1}" x2="{1:.1}" y2="{0:.1}" stroke="#ddd"/><text x="{2:.1}" y="{3:.1}" text-anchor="end">{4}</text>"##,
            sy(y),
            LEFT + pw,
            LEFT - 6.0,
            sy(y) + 4.0,
            axis_label(y, y_step)
        );
        y += y_step;
    }
    let slot = pw / bars.len().max(1) as f64;
    for (i, b) in bars.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let x = LEFT + slot * i as f64 + slot * 0.2;
        let bw = slot * 0.6;
        let cx = x + bw / 2.0;
        let _ = writeln!(
            out,
            r#"<rect x="{x:.1}" y="{0:.1}" width="{bw:.1}" height="{1:.1}" fill="{color}"/>"#,
            sy(b.median),
            (TOP + ph - sy(b.median)).max(0.0)
        );
        let _ = writeln!(
            out,
            r#"<line x1="{cx:.1}" y1="{0:.1}" x2="{cx:.1}" y2="{1:.1}" stroke="black"/><line x1="{2:.1}" y1="{0:.1}" x2="{3:.1}" y2="{0:.1}" stroke="black"/><line x1="{2:.1}" y1="{1:.1}" x2="{3:.1}" y2="{1:.1}" stroke="black"/>"#,
            sy(b.max),
            sy(b.min),
            cx - 6.0,
            cx + 6.0
        );
        let _ = writeln!(
            out,
            r#"<text x="{cx:.1}" y="{0:.1}" text-anchor="middle">{1}</text><text x="{cx:.1}" y="{2:.1}" text-anchor="middle" font-weight="bold">{3}</text>"#,
            sy(b.max) - 6.0,
            tick_label(b.median),
            TOP + ph + 18.0,
            escape(b.name)
        );
    }
    let _ = writeln!(
        out,
        r#"<rect x="{LEFT}" y="{TOP}" width="{pw}" height="{ph}" fill="none" stroke="black"/>"#
    );
    let _ = writeln!(
        out,
        r#"<text x="18" y="{0:.1}" text-anchor="middle" transform="rotate(-90 18 {0:.1})">{1}</text>"#,
        TOP + ph / 2.0,
        escape(unit)
    );
    let _ = writeln!(
        out,
        r##"<text x="{:.1}" y="{:.1}" text-anchor="middle" fill="#555">bar: median of the repeats; whisker: min to max</text>"##,
        LEFT + pw / 2.0,
        H - 14.0
    );
    out.push_str("</svg>\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plots_are_well_formed_enough() {
        let mut h = crate::hist::new_histogram();
        for v in 1..=10_000u64 {
            h.record(v * 1_000).expect("in range");
        }
        let svg = latency_plot("t", "s", &[("uring", &h), ("threads <x>", &h)]);
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("99.99%"));
        assert!(svg.contains("threads &lt;x&gt;"));
        let bars = bar_chart(
            "b",
            "s",
            "GiB/s",
            &[Bar {
                name: "uring",
                median: 1.5,
                min: 1.2,
                max: 1.7,
            }],
        );
        assert!(bars.contains("uring") && bars.ends_with("</svg>\n"));
        assert_eq!(nice_axis(7.3), (8.0, 2.0));
    }
}
