//! What machine the numbers come from, and how fast its copies ran when the bench started.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::time::Instant;

use serde::Serialize;

#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    /// Cores this process may run on.
    pub cores: usize,
    pub kernel: String,
    /// `model name`, which a VM may mask (`AMD EPYC`).
    pub cpu: String,
    /// `family 25 model 1 stepping 1`: tells CPU generations apart where the name does not.
    pub cpu_id: String,
    /// Whether the simulated sinks check with AVX-512 here (about 3x faster than without).
    pub avx512: bool,
    pub memory_gib: f64,
    /// `qemu-system-x86_64 --version`'s first line, when installed.
    pub qemu: Option<String>,
    /// 1-minute load average when the bench started.
    pub loadavg_at_start: f64,
    pub copies_at_start: CopyProbe,
}

/// The two kinds of copy the rows are made of, timed alone for a fraction of a second on fresh
/// pages. VMs of this machine kind, all named `AMD EPYC`, differ: on one (family 25 model 1, no
/// AVX-512; 2026-12-07) the kernel's copy out of fresh tmpfs pages ran at a quarter of a
/// user-space copy of the same pages (`pread` of a memfd 1.2-2.1 GB/s, a memcpy from its mmap
/// 6-12 GB/s), and every row was slower than on the VM before it, most of all the ceiling,
/// whose pumps make exactly that copy (gpu 1.94 -> 1.03-1.09 GiB/s). Printed so that a run
/// can be read against the machine it ran on.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct CopyProbe {
    /// `pread` of a 64 MiB tmpfs file (`/dev/shm`) into one 1 MiB buffer, GB/s (10^9 B/s);
    /// `None` where that file cannot be made (no tmpfs mounted there).
    pub page_cache_read_gb_s: Option<f64>,
    /// `copy_from_slice` of 64 MiB into another 64 MiB in 1 MiB chunks, GB/s.
    pub memcpy_gb_s: f64,
}

const PROBE_BYTES: usize = 64 << 20;
const PROBE_CHUNK: usize = 1 << 20;
const PROBE_PASSES: usize = 4;

impl CopyProbe {
    pub fn measure() -> CopyProbe {
        CopyProbe {
            page_cache_read_gb_s: page_cache_read_gb_s().ok(),
            memcpy_gb_s: memcpy_gb_s(),
        }
    }

    /// `page-cache read 6.9 GB/s, memcpy 6.5 GB/s`.
    pub fn describe(&self) -> String {
        let read = self.page_cache_read_gb_s.map_or_else(
            || "not measured (no file in /dev/shm)".into(),
            |r| format!("{r:.1} GB/s"),
        );
        format!(
            "page-cache read {read}, memcpy {:.1} GB/s",
            self.memcpy_gb_s
        )
    }
}

fn gb_s(bytes: usize, since: Instant) -> f64 {
    bytes as f64 / since.elapsed().as_secs_f64().max(1e-9) / 1e9
}

fn page_cache_read_gb_s() -> std::io::Result<f64> {
    let path = format!("/dev/shm/vfio-multifd-bench-probe-{}", std::process::id());
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)?;
    // Unlinked at once: the open file keeps its pages until it is dropped.
    std::fs::remove_file(&path)?;
    let chunk = vec![0x5au8; PROBE_CHUNK];
    let mut writer = &file;
    for _ in 0..PROBE_BYTES / PROBE_CHUNK {
        writer.write_all(&chunk)?;
    }
    let mut buf = vec![0u8; PROBE_CHUNK];
    // One untimed pass: a page's second access moves it to the active LRU.
    read_passes(&file, &mut buf, 1)?;
    let start = Instant::now();
    read_passes(&file, &mut buf, PROBE_PASSES)?;
    Ok(gb_s(PROBE_BYTES * PROBE_PASSES, start))
}

fn read_passes(file: &File, buf: &mut [u8], passes: usize) -> std::io::Result<()> {
    for _ in 0..passes {
        for i in 0..PROBE_BYTES / PROBE_CHUNK {
            file.read_exact_at(buf, (i * PROBE_CHUNK) as u64)?;
        }
    }
    Ok(())
}

fn memcpy_gb_s() -> f64 {
    let src = vec![0x5au8; PROBE_BYTES];
    let mut dst = vec![0u8; PROBE_BYTES];
    dst.copy_from_slice(&src);
    let start = Instant::now();
    for _ in 0..PROBE_PASSES {
        for (d, s) in dst
            .chunks_exact_mut(PROBE_CHUNK)
            .zip(src.chunks_exact(PROBE_CHUNK))
        {
            d.copy_from_slice(s);
        }
        std::hint::black_box(&mut dst);
    }
    gb_s(PROBE_BYTES * PROBE_PASSES, start)
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
        let cpuinfo = read("/proc/cpuinfo");
        let field = |name: &str| {
            cpuinfo.lines().find_map(|l| {
                let (key, value) = l.split_once(':')?;
                (key.trim() == name).then(|| value.trim().to_string())
            })
        };
        let cpu = field("model name").unwrap_or_else(|| "unknown".into());
        let cpu_id = ["cpu family", "model", "stepping"]
            .iter()
            .map(|name| {
                let short = name.trim_start_matches("cpu ");
                format!("{short} {}", field(name).as_deref().unwrap_or("?"))
            })
            .collect::<Vec<_>>()
            .join(" ");
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
            cpu_id,
            avx512: vfio::sim::check_uses_avx512(),
            memory_gib,
            qemu,
            loadavg_at_start: read("/proc/loadavg")
                .split_whitespace()
                .next()
                .and_then(|l| l.parse().ok())
                .unwrap_or(0.0),
            copies_at_start: CopyProbe::measure(),
        }
    }

    /// `2 cores, kernel 6.18.44`.
    pub fn short(&self) -> String {
        format!("{} cores, kernel {}", self.cores, self.kernel)
    }

    pub fn describe(&self) -> String {
        format!(
            "{} cores ({}, {}, {}), {:.0} GiB, kernel {}, load average {:.2} at start{}",
            self.cores,
            self.cpu,
            self.cpu_id,
            if self.avx512 { "AVX-512" } else { "no AVX-512" },
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_copy_probe_times_both_copies_and_leaves_no_file() {
        let probe = CopyProbe::measure();
        assert!(
            probe.memcpy_gb_s.is_finite() && probe.memcpy_gb_s > 0.0,
            "{probe:?}"
        );
        if std::path::Path::new("/dev/shm").is_dir() {
            let read = probe.page_cache_read_gb_s.expect("/dev/shm is mounted");
            assert!(read.is_finite() && read > 0.0, "{probe:?}");
        }
        let left = std::fs::read_dir("/dev/shm")
            .into_iter()
            .flatten()
            .flatten()
            .any(|e| {
                e.file_name().to_string_lossy()
                    == format!("vfio-multifd-bench-probe-{}", std::process::id())
            });
        assert!(!left, "the probe's tmpfs file was left behind");
        assert!(probe.describe().starts_with("page-cache read "));
    }
}
