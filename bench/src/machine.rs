//! What machine the numbers come from.

use serde::Serialize;

#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    /// Cores this process may run on.
    pub cores: usize,
    pub kernel: String,
    pub cpu: String,
    pub memory_gib: f64,
    /// `qemu-system-x86_64 --version`'s first line, when installed.
    pub qemu: Option<String>,
    /// 1-minute load average when the bench started.
    pub loadavg_at_start: f64,
}

/// CPU seconds the whole machine has been busy (every CPU; /proc/stat's first line: all but
/// idle and iowait), in USER_HZ ticks of 1/100 s.
pub fn busy_cpu_s() -> Option<f64> {
    let text = std::fs::read_to_string("/proc/stat").ok()?;
    let line = text.lines().next()?.strip_prefix("cpu ")?;
    let v: Vec<f64> = line
        .split_whitespace()
        .filter_map(|f| f.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal ...
    let busy: f64 = v.iter().take(8).sum::<f64>() - v.get(3)? - v.get(4)?;
    Some(busy / 100.0)
}

impl Machine {
    pub fn probe(qemu: Option<String>) -> Machine {
        let read = |path: &str| std::fs::read_to_string(path).unwrap_or_default();
        let cpu = read("/proc/cpuinfo")
            .lines()
            .find_map(|l| {
                l.strip_prefix("model name")
                    .and_then(|rest| rest.split_once(':'))
                    .map(|(_, v)| v.trim().to_string())
            })
            .unwrap_or_else(|| "unknown".into());
        let memory_gib = read("/proc/meminfo")
            .lines()
            .find_map(|l| {
                l.strip_prefix("MemTotal:")
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            })
            .map_or(0.0, |kib| kib / (1024.0 * 1024.0));
        Machine {
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            kernel: read("/proc/sys/kernel/osrelease").trim().to_string(),
            cpu,
            memory_gib,
            qemu,
            loadavg_at_start: read("/proc/loadavg")
                .split_whitespace()
                .next()
                .and_then(|l| l.parse().ok())
                .unwrap_or(0.0),
        }
    }

    /// `2 cores, kernel 6.18.44`.
    pub fn short(&self) -> String {
        format!("{} cores, kernel {}", self.cores, self.kernel)
    }

    pub fn describe(&self) -> String {
        format!(
            "{} cores ({}), {:.0} GiB, kernel {}, load average {:.2} at start{}",
            self.cores,
            self.cpu,
            self.memory_gib,
            self.kernel,
            self.loadavg_at_start,
            self.qemu
                .as_deref()
                .map(|q| format!(", {q}"))
                .unwrap_or_default()
        )
    }
}
