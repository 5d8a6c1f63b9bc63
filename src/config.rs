//! Validated configuration: every bound is checked here, once, with an error naming the flag.
//! `main.rs` turns the parsed [`crate::cli::Cli`] into a [`Config`] with `TryFrom` and hands it
//! to the library; nothing after this point re-checks a user-supplied value.

use std::net::{SocketAddr, ToSocketAddrs};
use std::time::Duration;

use uring::{Feature, FeatureMask};

use crate::cli::{ChannelOrderArg, Command, DemoArgs, MigrationArgs, RecvArgs, SendArgs};
use crate::engine::{EngineConfig, EngineKind, QUEUE_CAP_TOTAL_BYTES};
use crate::error::ConfigError;
use crate::wire::{parse_uuid, VFIO_HEADER_LEN};

/// Environment variable naming io_uring features the helper must not use (same names as
/// `--forbid`); `io-uring` forbids io_uring altogether, which selects the threads engine.
pub const FORBID_ENV: &str = "VFIO_MULTIFD_FORBID";

/// Most simulated devices per migration (the result record lists each one).
pub const MAX_DEVICES: u32 = 256;
/// Largest chunk: QEMU reads 1 MiB; 64 MiB keeps a packet buffer sane.
pub const MAX_CHUNK: u64 = 64 << 20;
/// Bytes of QEMU markers around a simulated config blob (DEV_CONFIG_STATE, END_OF_STATE).
pub const CONFIG_MARKERS: usize = 16;
/// Smallest chunk: the config packet (markers at least) must fit one.
pub const MIN_CHUNK: u64 = CONFIG_MARKERS as u64;
/// Largest device state per simulated device.
pub const MAX_DEVICE_SIZE: u64 = 1 << 40;
/// Largest packet-buffer pool per helper (buffers x (headers + chunk)).
pub const MAX_POOL_BYTES: u64 = 4 << 30;
/// Most packet buffers per helper: the uring pool names a slot by a u16 and refuses 65536 or
/// more, so a larger count would pass here and fail only once the migration starts.
pub const MAX_POOL_BUFFERS: u64 = 65535;
/// `--pool-buffers auto`: this many buffers, fewer where chunks are large (see
/// [`auto_pool_buffers`]).
pub const AUTO_POOL_BUFFERS: usize = 32;
/// `--pool-buffers auto` keeps the pool within this many bytes once chunks are large.
pub const AUTO_POOL_BYTES: usize = 96 << 20;

/// Packet buffers for `--pool-buffers auto`: 32, or as many as fit in 96 MiB when chunks are
/// larger than 3 MiB (at least 8). Each pool is faulted in before switchover, and past about
/// 1.5 buffers per channel more of them only add memory: on the 2-vCPU machine of the README,
/// 1 x 1 GiB over 8 channels with 8 MiB chunks moved 0.98-1.09 GiB/s with 12 buffers and
/// 0.73-0.97 with 24 or 32 (0.26-0.44 in another sitting), where fresh pages cost the most.
pub fn auto_pool_buffers(slot_bytes: usize) -> usize {
    AUTO_POOL_BYTES
        .div_ceil(slot_bytes.max(1))
        .clamp(8, AUTO_POOL_BUFFERS)
}

/// Default config payload length (QEMU's VFIO config blobs are a few KiB at most).
pub const DEFAULT_CONFIG_LEN: usize = 1024;

/// A validated command.
#[derive(Debug)]
pub enum Config {
    Inspect(crate::inspect::InspectArgs),
    Send(Box<SendConfig>),
    Recv(Box<RecvConfig>),
    Demo(Box<DemoConfig>),
    Probe(crate::probe::ProbeArgs),
    Bench(crate::cli::BenchArgs),
    Serve(Box<crate::control::ServeConfig>),
}

/// `send`: connect to a `recv` helper and migrate simulated devices to it.
#[derive(Debug, Clone)]
pub struct SendConfig {
    pub connect: SocketAddr,
    pub migration: MigrationConfig,
    pub channel_order: ChannelOrder,
    /// Real VFIO devices (sysfs names) instead of simulated ones.
    pub vfio: Vec<String>,
}

/// `recv`: listen for one migration from a `send` helper.
#[derive(Debug, Clone)]
pub struct RecvConfig {
    pub listen: SocketAddr,
    pub migration: MigrationConfig,
    /// Real VFIO devices (sysfs names) instead of simulated ones.
    pub vfio: Vec<String>,
}

/// `demo`: both helpers on loopback.
#[derive(Debug, Clone)]
pub struct DemoConfig {
    pub migration: MigrationConfig,
    /// The arguments as given, passed on to the two helpers (already validated here).
    pub args: MigrationArgs,
    pub dest_engine: EngineKind,
    pub progress: bool,
}

/// In which order a source connects its multifd channels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChannelOrder {
    /// Main channel first, then channel 0, 1, ... (QEMU's order).
    Ascending,
    /// Main channel first, then N-1 down to 0.
    Reverse,
    /// Multifd channels in a seeded random order, then the main channel last.
    Shuffle(u64),
}

/// Everything one side of a migration needs.
#[derive(Debug, Clone)]
pub struct MigrationConfig {
    pub devices: u32,
    /// Device state bytes per simulated device.
    pub size: u64,
    pub channels: u8,
    /// The engine asked for; [`Self::engine_kind`] is the one to use.
    pub engine: EngineKind,
    /// Chunk, pool, queued-bytes limit and forbidden features for the engine.
    pub engine_config: EngineConfig,
    /// Simulated device read speed in bytes per second.
    pub device_speed: Option<u64>,
    pub uuid: [u8; 16],
    pub seed: u64,
    /// Config-space payload bytes of each simulated device's config blob (the blob adds
    /// [`CONFIG_MARKERS`]).
    pub config_len: usize,
    /// Longest wait without progress, for every step.
    pub timeout: Duration,
    pub json: bool,
    pub events: bool,
    /// Where `forbid` came from, for the log line.
    pub forbid_source: Option<&'static str>,
}

impl MigrationConfig {
    /// The engine to use: `uring` unless io_uring is forbidden (then `threads`, with the
    /// reason). `engine::select` may still fall back when io_uring cannot be set up.
    pub fn engine_kind(&self) -> (EngineKind, Option<String>) {
        if self.engine == EngineKind::Uring && self.engine_config.forbid.contains(Feature::IoUring)
        {
            let by = self.forbid_source.unwrap_or("--forbid");
            return (
                EngineKind::Threads,
                Some(format!(
                    "io_uring is forbidden by {by}; using the threads engine"
                )),
            );
        }
        (self.engine, None)
    }

    /// Total device bytes.
    pub fn total_bytes(&self) -> u64 {
        self.size * u64::from(self.devices)
    }

    /// The chunk size.
    pub fn chunk(&self) -> usize {
        self.engine_config.chunk_size
    }
}

impl TryFrom<Command> for Config {
    type Error = ConfigError;

    fn try_from(command: Command) -> Result<Self, ConfigError> {
        Ok(match command {
            Command::Inspect(args) => Config::Inspect(args),
            Command::Send(args) => Config::Send(Box::new(SendConfig::try_from(&args)?)),
            Command::Recv(args) => Config::Recv(Box::new(RecvConfig::try_from(&args)?)),
            Command::Demo(args) => Config::Demo(Box::new(DemoConfig::try_from(&args)?)),
            Command::Probe(args) => Config::Probe(args),
            Command::Bench(args) => Config::Bench(args),
            Command::Serve(args) => {
                Config::Serve(Box::new(crate::control::ServeConfig::try_from(&args)?))
            }
        })
    }
}

impl TryFrom<&SendArgs> for SendConfig {
    type Error = ConfigError;

    fn try_from(args: &SendArgs) -> Result<Self, ConfigError> {
        let migration =
            MigrationConfig::from_args(&args.migration, std::env::var(FORBID_ENV).ok())?;
        let channel_order = match args.channel_order {
            ChannelOrderArg::Ascending => ChannelOrder::Ascending,
            ChannelOrderArg::Reverse => ChannelOrder::Reverse,
            ChannelOrderArg::Shuffle => ChannelOrder::Shuffle(migration.seed),
        };
        if args.vfio.is_empty() {
            check_sim_memory(&migration, 1, mem_available())?;
        }
        Ok(Self {
            connect: resolve("connect", &args.connect)?,
            migration,
            channel_order,
            vfio: args.vfio.clone(),
        })
    }
}

impl TryFrom<&RecvArgs> for RecvConfig {
    type Error = ConfigError;

    fn try_from(args: &RecvArgs) -> Result<Self, ConfigError> {
        let migration =
            MigrationConfig::from_args(&args.migration, std::env::var(FORBID_ENV).ok())?;
        if args.vfio.is_empty() {
            check_sim_memory(&migration, 1, mem_available())?;
        }
        Ok(Self {
            listen: resolve("listen", &args.listen)?,
            migration,
            vfio: args.vfio.clone(),
        })
    }
}

impl TryFrom<&DemoArgs> for DemoConfig {
    type Error = ConfigError;

    fn try_from(args: &DemoArgs) -> Result<Self, ConfigError> {
        let migration =
            MigrationConfig::from_args(&args.migration, std::env::var(FORBID_ENV).ok())?;
        if args.migration.events {
            return Err(ConfigError::Invalid {
                flag: "events",
                value: "true".into(),
                why: "only the send and recv helpers emit events".into(),
            });
        }
        // Both helpers run here: the source's images and the destination's, side by side.
        check_sim_memory(&migration, 2, mem_available())?;
        Ok(Self {
            dest_engine: args.dest_engine.unwrap_or(migration.engine),
            args: args.migration.clone(),
            migration,
            progress: !args.no_progress,
        })
    }
}

impl MigrationConfig {
    /// Checks every value of `args`; `forbid_env` is the value of [`FORBID_ENV`], if set.
    pub fn from_args(
        args: &MigrationArgs,
        forbid_env: Option<String>,
    ) -> Result<Self, ConfigError> {
        let devices = parse_count("devices", &args.devices, 1, u64::from(MAX_DEVICES))? as u32;
        let size = parse_size("size", &args.size)?;
        if size > MAX_DEVICE_SIZE {
            return Err(ConfigError::OutOfRange {
                flag: "size",
                value: size,
                why: format!("at most {MAX_DEVICE_SIZE} bytes (1 TiB) per device"),
            });
        }
        let channels = parse_count("channels", &args.channels, 1, 255)? as u8;
        let chunk = parse_size("chunk", &args.chunk)?;
        if !(MIN_CHUNK..=MAX_CHUNK).contains(&chunk) {
            return Err(ConfigError::OutOfRange {
                flag: "chunk",
                value: chunk,
                why: format!("must be {MIN_CHUNK} bytes to {MAX_CHUNK} bytes (64 MiB); the config packet must fit one chunk"),
            });
        }
        let chunk = chunk as usize;
        // idx is a u32 and u32::MAX is invalid on the wire: data packets plus the config one
        // must stay below it.
        let packets = size.div_ceil(chunk as u64) + 1;
        if packets >= u64::from(u32::MAX) {
            return Err(ConfigError::OutOfRange {
                flag: "chunk",
                value: chunk as u64,
                why: format!("--size {size} would need {packets} packets per device; the idx field allows fewer than 2^32 - 1"),
            });
        }
        let workers = match &args.workers {
            Some(text) => parse_count("workers", text, 1, 1024)? as usize,
            None => std::thread::available_parallelism().map_or(1, |n| n.get()),
        };
        let slot_bytes = chunk + crate::wire::PACKET_HEADER_ROOM;
        let pool_buffers = match args.pool_buffers.trim() {
            "auto" => auto_pool_buffers(slot_bytes),
            n => parse_count("pool-buffers", n, 2, MAX_POOL_BUFFERS)? as usize,
        };
        let pool_bytes = pool_buffers as u64 * slot_bytes as u64;
        if pool_bytes > MAX_POOL_BYTES {
            return Err(ConfigError::OutOfRange {
                flag: "pool-buffers",
                value: pool_buffers as u64,
                why: format!("{pool_buffers} buffers of --chunk {chunk} take {pool_bytes} bytes; at most {MAX_POOL_BYTES} (4 GiB)"),
            });
        }
        let max_queued_bytes = match &args.queued_bytes_limit {
            Some(text) if text == "unlimited" => u64::MAX,
            Some(text) => parse_size("queued-bytes-limit", text)?,
            None => u64::MAX,
        };
        let device_speed = match &args.device_speed {
            Some(text) => {
                let bytes = text.strip_suffix("/s").unwrap_or(text);
                let speed = parse_size("device-speed", bytes)?;
                if speed == 0 {
                    return Err(ConfigError::OutOfRange {
                        flag: "device-speed",
                        value: 0,
                        why: "must be at least 1 byte per second".into(),
                    });
                }
                Some(speed)
            }
            None => None,
        };
        let uuid = match &args.uuid {
            Some(text) => parse_uuid(text).ok_or_else(|| ConfigError::Invalid {
                flag: "uuid",
                value: text.clone(),
                why: "expected 8-4-4-4-12 hex digits".into(),
            })?,
            None => [0; 16],
        };
        let seed = args
            .seed
            .trim()
            .parse::<u64>()
            .map_err(|e| ConfigError::Invalid {
                flag: "seed",
                value: args.seed.clone(),
                why: e.to_string(),
            })?;
        let config_len = match &args.config_len {
            Some(text) => parse_size("config-len", text)?,
            None => DEFAULT_CONFIG_LEN.min(chunk - CONFIG_MARKERS) as u64,
        };
        if config_len + CONFIG_MARKERS as u64 > chunk as u64 {
            return Err(ConfigError::OutOfRange {
                flag: "config-len",
                value: config_len,
                why: format!(
                    "the config blob ({CONFIG_MARKERS} bytes of QEMU markers + --config-len) must fit one --chunk ({chunk})"
                ),
            });
        }
        let timeout = parse_count("timeout", &args.timeout, 1, 3600)?;
        let mut forbid = FeatureMask::empty();
        let mut forbid_source = None;
        if let Some(text) = forbid_env.as_deref() {
            forbid = FeatureMask::parse(text).map_err(|why| ConfigError::ForbidEnv {
                value: text.to_string(),
                why,
            })?;
            if forbid.contains(Feature::IoUring) {
                forbid_source = Some(FORBID_ENV);
            }
        }
        if let Some(text) = &args.forbid {
            let more = FeatureMask::parse(text).map_err(|why| ConfigError::Invalid {
                flag: "forbid",
                value: text.clone(),
                why,
            })?;
            if more.contains(Feature::IoUring) && forbid_source.is_none() {
                forbid_source = Some("--forbid");
            }
            for feature in Feature::ALL {
                if more.contains(feature) {
                    forbid = forbid.with(feature);
                }
            }
        }
        let engine_config = EngineConfig {
            workers,
            chunk_size: chunk,
            pool_buffers,
            max_packet_size: (chunk + VFIO_HEADER_LEN) as u32,
            max_queued_bytes,
            max_total_queued_bytes: QUEUE_CAP_TOTAL_BYTES,
            forbid,
            sequential_devices: args.sequential_devices,
        };
        Ok(Self {
            devices,
            size,
            channels,
            engine: args.engine,
            engine_config,
            device_speed,
            uuid,
            seed,
            config_len: config_len as usize,
            timeout: Duration::from_secs(timeout),
            json: args.json,
            events: args.events,
            forbid_source,
        })
    }
}

/// Refuses simulated devices that cannot fit in memory. A source generates each device's whole
/// state into a memfd before it starts, and a destination's image fills as it loads; that is
/// page cache, which `ulimit -v` does not bound, so an accepted `--size 1TiB` would run the
/// machine out of memory (the OOM killer, not an error) instead of being refused. `copies` is
/// how many helpers on this machine hold the images (2 for `demo`); `available` is
/// MemAvailable in bytes, None where unknown (then nothing is refused).
pub fn check_sim_memory(
    m: &MigrationConfig,
    copies: u64,
    available: Option<u64>,
) -> Result<(), ConfigError> {
    let Some(available) = available else {
        return Ok(());
    };
    let need = m.total_bytes().saturating_mul(copies);
    if need > available {
        let who = if copies > 1 {
            "the source's and the destination's images"
        } else {
            "their images"
        };
        return Err(ConfigError::OutOfRange {
            flag: "size",
            value: m.size,
            why: format!(
                "--devices {} of this size need {need} bytes of memory for {who}, more than the {available} bytes available here (MemAvailable)",
                m.devices
            ),
        });
    }
    Ok(())
}

/// MemAvailable from /proc/meminfo, in bytes; None where it cannot be read.
fn mem_available() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib = line.split_whitespace().nth(1)?.parse::<u64>().ok()?;
    kib.checked_mul(1024)
}

fn resolve(flag: &'static str, text: &str) -> Result<SocketAddr, ConfigError> {
    if let Ok(addr) = text.parse::<SocketAddr>() {
        return Ok(addr);
    }
    let mut addrs = text
        .to_socket_addrs()
        .map_err(|source| ConfigError::Resolve {
            flag,
            value: text.to_string(),
            source,
        })?;
    addrs.next().ok_or_else(|| ConfigError::Invalid {
        flag,
        value: text.to_string(),
        why: "resolves to no address".into(),
    })
}

fn parse_count(flag: &'static str, text: &str, min: u64, max: u64) -> Result<u64, ConfigError> {
    let value = text
        .trim()
        .parse::<u64>()
        .map_err(|e| ConfigError::Invalid {
            flag,
            value: text.to_string(),
            why: e.to_string(),
        })?;
    if value < min || value > max {
        return Err(ConfigError::OutOfRange {
            flag,
            value,
            why: format!("must be {min} to {max}"),
        });
    }
    Ok(value)
}

/// Parses `BYTES` with an optional binary suffix: `K`/`KiB`, `M`/`MiB`, `G`/`GiB`, `T`/`TiB`
/// (case-insensitive, an optional `B` alone means bytes). `0` is allowed.
pub fn parse_size(flag: &'static str, text: &str) -> Result<u64, ConfigError> {
    let invalid = |why: String| ConfigError::Invalid {
        flag,
        value: text.to_string(),
        why,
    };
    let trimmed = text.trim();
    let split = trimmed
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(trimmed.len());
    let (digits, suffix) = trimmed.split_at(split);
    if digits.is_empty() {
        return Err(invalid(
            "expected a number of bytes, e.g. 4096, 64KiB, 100MiB, 1GiB".into(),
        ));
    }
    let number = digits.parse::<u64>().map_err(|e| invalid(e.to_string()))?;
    let shift = match suffix.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kib" => 10,
        "m" | "mib" => 20,
        "g" | "gib" => 30,
        "t" | "tib" => 40,
        other => {
            return Err(invalid(format!(
                "unknown suffix {other:?}; use K/KiB, M/MiB, G/GiB or T/TiB (binary)"
            )))
        }
    };
    number
        .checked_mul(1u64 << shift)
        .ok_or_else(|| invalid("does not fit in 64 bits".into()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn args(extra: &[&str]) -> MigrationArgs {
        let mut argv = vec!["vfio-multifd", "demo"];
        argv.extend_from_slice(extra);
        match crate::cli::Cli::try_parse_from(argv).unwrap().command {
            Command::Demo(demo) => demo.migration,
            _ => unreachable!(),
        }
    }

    fn check(extra: &[&str]) -> Result<MigrationConfig, ConfigError> {
        MigrationConfig::from_args(&args(extra), None)
    }

    #[test]
    fn sizes_accept_suffixes_and_zero() {
        assert_eq!(parse_size("size", "0").unwrap(), 0);
        assert_eq!(parse_size("size", "4096").unwrap(), 4096);
        assert_eq!(parse_size("size", "4KiB").unwrap(), 4096);
        assert_eq!(parse_size("size", "100MiB").unwrap(), 100 << 20);
        assert_eq!(parse_size("size", "2g").unwrap(), 2 << 30);
        assert_eq!(parse_size("size", "7B").unwrap(), 7);
        assert!(parse_size("size", "1.5GiB").is_err());
        assert!(parse_size("size", "MiB").is_err());
        assert!(parse_size("size", "10 parsecs").is_err());
        assert!(parse_size("size", "99999999999TiB").is_err());
    }

    #[test]
    fn defaults_are_the_documented_ones() {
        let config = check(&[]).unwrap();
        assert_eq!(config.devices, 4);
        assert_eq!(config.size, 100 << 20);
        assert_eq!(config.channels, 6);
        assert_eq!(config.chunk(), 1 << 20);
        assert_eq!(config.config_len, DEFAULT_CONFIG_LEN);
        assert_eq!(config.engine_config.max_queued_bytes, u64::MAX);
        assert_eq!(config.engine_kind().0, EngineKind::Uring);
        assert_eq!(config.engine_config.pool_buffers, AUTO_POOL_BUFFERS);
    }

    #[test]
    fn auto_pool_keeps_large_chunks_near_96_mib() {
        let buffers = |chunk: &str| {
            check(&["--chunk", chunk, "--pool-buffers", "auto"])
                .unwrap()
                .engine_config
                .pool_buffers
        };
        assert_eq!(buffers("64KiB"), 32);
        assert_eq!(buffers("3MiB"), 32);
        assert_eq!(buffers("4MiB"), 24);
        assert_eq!(buffers("8MiB"), 12);
        assert_eq!(buffers("64MiB"), 8);
        let explicit = check(&["--chunk", "8MiB", "--pool-buffers", "32"]).unwrap();
        assert_eq!(explicit.engine_config.pool_buffers, 32);
    }

    #[test]
    fn bounds_are_checked_with_the_flag_named() {
        for (extra, flag) in [
            (&["--channels", "0"][..], "--channels 0"),
            (&["--channels", "256"][..], "--channels 256"),
            (&["--chunk", "0"][..], "--chunk 0"),
            (&["--chunk", "15"][..], "--chunk 15"),
            (&["--chunk", "65MiB"][..], "--chunk 68157440"),
            (&["--devices", "0"][..], "--devices 0"),
            (&["--devices", "257"][..], "--devices 257"),
            (&["--timeout", "0"][..], "--timeout 0"),
            (&["--device-speed", "0/s"][..], "--device-speed 0"),
            (&["--pool-buffers", "1"][..], "--pool-buffers 1"),
            (
                &["--chunk", "4KiB", "--pool-buffers", "65536"][..],
                "--pool-buffers 65536: must be 2 to 65535",
            ),
            (
                &["--chunk", "64MiB", "--pool-buffers", "100"][..],
                "--pool-buffers 100",
            ),
            (
                &["--chunk", "100", "--config-len", "85"][..],
                "--config-len 85",
            ),
            (&["--uuid", "nope"][..], "--uuid \"nope\""),
            (&["--forbid", "warp-drive"][..], "--forbid \"warp-drive\""),
            (&["--size", "2TiB"][..], "--size 2199023255552"),
            (&["--size", "1TiB", "--chunk", "1"][..], "--chunk 1"),
        ] {
            let err = check(extra).unwrap_err().to_string();
            assert!(err.starts_with(flag), "{extra:?}: {err}");
        }
    }

    #[test]
    fn simulated_devices_must_fit_in_memory() {
        let config = check(&["--devices", "4", "--size", "1GiB"]).unwrap();
        assert!(check_sim_memory(&config, 1, Some(4 << 30)).is_ok());
        let err = check_sim_memory(&config, 2, Some(4 << 30))
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("--size 1073741824: --devices 4"), "{err}");
        assert!(check_sim_memory(&config, 2, None).is_ok());
        let huge = check(&["--devices", "256", "--size", "1TiB"]).unwrap();
        assert!(check_sim_memory(&huge, 2, Some(u64::MAX / 2)).is_ok());
        assert!(check_sim_memory(&huge, 2, Some(23 << 30)).is_err());
        assert!(mem_available().is_some_and(|bytes| bytes > 0));
    }

    #[test]
    fn small_chunk_shrinks_the_default_config_blob() {
        let config = check(&["--chunk", "100"]).unwrap();
        assert_eq!(config.config_len, 84);
        assert_eq!(check(&["--chunk", "16"]).unwrap().config_len, 0);
        assert_eq!(config.engine_config.max_packet_size, 112);
    }

    #[test]
    fn forbidding_io_uring_selects_threads_and_says_why() {
        let config = MigrationConfig::from_args(&args(&[]), Some("io-uring".into())).unwrap();
        let (kind, why) = config.engine_kind();
        assert_eq!(kind, EngineKind::Threads);
        assert!(why.unwrap().contains(FORBID_ENV));
        let config = check(&["--forbid", "send-zc,io-uring"]).unwrap();
        assert_eq!(config.engine_kind().0, EngineKind::Threads);
        assert!(config.engine_config.forbid.contains(Feature::SendZc));
        let err = MigrationConfig::from_args(&args(&[]), Some("bogus".into())).unwrap_err();
        assert!(err.to_string().starts_with(FORBID_ENV), "{err}");
        let config = MigrationConfig::from_args(&args(&[]), Some("send-zc".into())).unwrap();
        assert_eq!(config.engine_kind().0, EngineKind::Uring);
    }

    #[test]
    fn uuid_and_speed_parse() {
        let config = check(&[
            "--uuid",
            "12345678-9abc-def0-1122-334455667788",
            "--device-speed",
            "2GiB/s",
            "--queued-bytes-limit",
            "8MiB",
        ])
        .unwrap();
        assert_eq!(config.uuid[0], 0x12);
        assert_eq!(config.device_speed, Some(2 << 30));
        assert_eq!(config.engine_config.max_queued_bytes, 8 << 20);
    }
}
