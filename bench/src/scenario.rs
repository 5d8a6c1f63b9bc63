//! Scenarios (issue 6): device/channel shapes, `--quick` sizes, free flags, the physical floor.

use clap::ValueEnum;
use serde::Serialize;

use crate::cli::BenchArgs;

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ScenarioName {
    /// 4 devices x 100 MiB, 6 channels, devices saving and loading at 512 MiB/s.
    Seed,
    /// 1 device x 4 GiB, 8 channels, 8 MiB reads, unlimited device speed.
    Gpu,
    /// 16 devices x 32 MiB, 16 channels, unlimited speed.
    Many,
    /// 4 devices x 64 MiB, 64 KiB reads, unlimited speed (6 channels).
    Small,
}

impl ScenarioName {
    pub fn name(self) -> &'static str {
        match self {
            ScenarioName::Seed => "seed",
            ScenarioName::Gpu => "gpu",
            ScenarioName::Many => "many",
            ScenarioName::Small => "small",
        }
    }

    /// The full shape, or the `--quick` one (sizes shrunk, everything else kept).
    pub fn shape(self, quick: bool) -> Shape {
        let (devices, size, quick_size, channels, chunk, device_speed) = match self {
            ScenarioName::Seed => (4, 100 * MIB, 16 * MIB, 6, MIB, Some(512 * MIB)),
            ScenarioName::Gpu => (1, 4 * GIB, 256 * MIB, 8, 8 * MIB, None),
            ScenarioName::Many => (16, 32 * MIB, 4 * MIB, 16, MIB, None),
            ScenarioName::Small => (4, 64 * MIB, 8 * MIB, 6, 64 << 10, None),
        };
        Shape {
            devices,
            size: if quick { quick_size } else { size },
            channels,
            chunk,
            device_speed,
        }
    }
}

/// What one migration moves and how.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Shape {
    pub devices: u32,
    /// Bytes per device.
    pub size: u64,
    pub channels: u8,
    /// Bytes per data_fd read / packet.
    pub chunk: u64,
    /// Save and load speed of each simulated device, bytes/s; None = unlimited.
    pub device_speed: Option<u64>,
}

impl Shape {
    pub fn total_bytes(&self) -> u64 {
        self.size * u64::from(self.devices)
    }

    /// Data packets per device.
    pub fn chunks_per_device(&self) -> u64 {
        self.size.div_ceil(self.chunk)
    }

    /// One device's own save time plus the load of its last chunk, in ms (paced devices only):
    /// no transport can finish before the slowest device has produced its last byte and
    /// consumed its last chunk.
    pub fn physical_floor_ms(&self) -> Option<FloorParts> {
        let speed = self.device_speed? as f64;
        let save_ms = self.size as f64 / speed * 1e3;
        let last = if self.size == 0 {
            0
        } else {
            self.size - (self.chunks_per_device() - 1) * self.chunk
        };
        let load_ms = last as f64 / speed * 1e3;
        Some(FloorParts {
            save_ms,
            last_chunk_load_ms: load_ms,
            floor_ms: save_ms + load_ms,
        })
    }

    pub fn describe(&self) -> String {
        format!(
            "{} device{} x {}, {} channel{}, chunk {}, device speed {}",
            self.devices,
            if self.devices == 1 { "" } else { "s" },
            human_bytes(self.size),
            self.channels,
            if self.channels == 1 { "" } else { "s" },
            human_bytes(self.chunk),
            match self.device_speed {
                Some(s) => format!("{}/s", human_bytes(s)),
                None => "unlimited".into(),
            }
        )
    }
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct FloorParts {
    pub save_ms: f64,
    pub last_chunk_load_ms: f64,
    pub floor_ms: f64,
}

/// The scenario to run, after flags.
#[derive(Debug, Clone, Serialize)]
pub struct Scenario {
    pub name: ScenarioName,
    pub shape: Shape,
    pub quick: bool,
    /// Flags that changed the named shape (goals are then shown for reference only).
    pub overridden: Vec<&'static str>,
    pub repeats: u32,
    pub workers: Option<u32>,
    /// `--scaling`: the worker counts `uring` runs with, ascending, each once (empty: the rows).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub scaling: Vec<u32>,
}

impl Scenario {
    pub fn from_args(args: &BenchArgs) -> Result<Scenario, String> {
        let mut shape = args.scenario.shape(args.quick);
        let mut overridden = Vec::new();
        if let Some(devices) = args.devices {
            if !(1..=256).contains(&devices) {
                return Err(format!("--devices {devices}: must be 1 to 256"));
            }
            shape.devices = devices;
            overridden.push("devices");
        }
        if let Some(text) = &args.size {
            let size = parse_size("size", text)?;
            if size > 1 << 40 {
                return Err(format!("--size {text}: at most 1 TiB per device"));
            }
            shape.size = size;
            overridden.push("size");
        }
        if let Some(channels) = args.channels {
            if channels == 0 {
                return Err("--channels 0: must be 1 to 255".into());
            }
            shape.channels = channels;
            overridden.push("channels");
        }
        if let Some(text) = &args.chunk {
            let chunk = parse_size("chunk", text)?;
            if !(16..=64 * MIB).contains(&chunk) {
                return Err(format!("--chunk {text}: must be 16 B to 64 MiB"));
            }
            shape.chunk = chunk;
            overridden.push("chunk");
        }
        if let Some(text) = &args.device_speed {
            shape.device_speed = parse_speed(text)?;
            overridden.push("device-speed");
        }
        let repeats = args.repeats.unwrap_or(if args.quick { 3 } else { 5 });
        if repeats == 0 {
            return Err("--repeats 0: at least one counted repeat".into());
        }
        if args.workers == Some(0) {
            return Err("--workers 0: at least one worker".into());
        }
        let mut scaling = args.scaling.clone();
        scaling.sort_unstable();
        scaling.dedup();
        if let Some(bad) = scaling.iter().find(|&&n| !(1..=255).contains(&n)) {
            return Err(format!("--scaling {bad}: worker counts are 1 to 255"));
        }
        Ok(Scenario {
            name: args.scenario,
            shape,
            quick: args.quick,
            overridden,
            repeats,
            workers: args.workers,
            scaling,
        })
    }
}

/// `BYTES/s`, `BYTES` or `unlimited`.
pub fn parse_speed(text: &str) -> Result<Option<u64>, String> {
    let t = text.trim();
    if t.eq_ignore_ascii_case("unlimited") {
        return Ok(None);
    }
    let speed = parse_size("device-speed", t.strip_suffix("/s").unwrap_or(t))?;
    if speed == 0 {
        return Err(format!(
            "--device-speed {text}: at least 1 byte/s (or `unlimited`)"
        ));
    }
    Ok(Some(speed))
}

/// `BYTES` with an optional binary suffix (K/KiB, M/MiB, G/GiB, T/TiB, case-insensitive).
pub fn parse_size(flag: &str, text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, suffix) = t.split_at(split);
    let number: u64 = digits
        .parse()
        .map_err(|_| format!("--{flag} {text}: expected a number of bytes, e.g. 64KiB"))?;
    let shift = match suffix.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kib" => 10,
        "m" | "mib" => 20,
        "g" | "gib" => 30,
        "t" | "tib" => 40,
        other => return Err(format!("--{flag} {text}: unknown suffix {other:?}")),
    };
    number
        .checked_mul(1 << shift)
        .ok_or_else(|| format!("--{flag} {text}: does not fit in 64 bits"))
}

/// The helpers' own size syntax (`16MiB`, `64KiB`, `7`), exact.
pub fn size_arg(bytes: u64) -> String {
    for (shift, unit) in [(40, "TiB"), (30, "GiB"), (20, "MiB"), (10, "KiB")] {
        if bytes >= 1 << shift && bytes % (1 << shift) == 0 {
            return format!("{}{unit}", bytes >> shift);
        }
    }
    bytes.to_string()
}

/// `1.5 GiB`, `100 MiB`, `64 KiB`, `7 B`.
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
    use super::*;

    #[test]
    fn seed_floor_is_save_time_plus_last_chunk_load() {
        let shape = ScenarioName::Seed.shape(false);
        let floor = shape.physical_floor_ms().expect("seed devices are paced");
        // 100 MiB at 512 MiB/s = 195.3125 ms; 1 MiB at 512 MiB/s = 1.953125 ms.
        assert!((floor.save_ms - 195.3125).abs() < 1e-9);
        assert!((floor.last_chunk_load_ms - 1.953125).abs() < 1e-9);
        assert!(ScenarioName::Gpu.shape(false).physical_floor_ms().is_none());
    }

    #[test]
    fn sizes_round_trip_through_the_helper_syntax() {
        for bytes in [7, 64 << 10, 100 << 20, 4 << 30, (1 << 20) + 1] {
            assert_eq!(parse_size("size", &size_arg(bytes)), Ok(bytes));
        }
        assert_eq!(parse_speed("512MiB/s"), Ok(Some(512 << 20)));
        assert_eq!(parse_speed("unlimited"), Ok(None));
        assert!(parse_speed("0/s").is_err());
        assert!(parse_size("size", "1.5GiB").is_err());
    }

    #[test]
    fn quick_shrinks_sizes_only() {
        for name in [
            ScenarioName::Seed,
            ScenarioName::Gpu,
            ScenarioName::Many,
            ScenarioName::Small,
        ] {
            let (full, quick) = (name.shape(false), name.shape(true));
            assert!(quick.size < full.size);
            assert_eq!(
                (
                    quick.devices,
                    quick.channels,
                    quick.chunk,
                    quick.device_speed
                ),
                (full.devices, full.channels, full.chunk, full.device_speed)
            );
        }
    }
}
