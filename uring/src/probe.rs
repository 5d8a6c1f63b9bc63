//! What the kernel's io_uring offers, and masks that forbid features to force older paths.

/// An io_uring feature the engine can use or be forbidden to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Feature {
    /// IORING_OP_SEND_ZC (Linux 6.0).
    SendZc,
    /// Registered (fixed) buffers and ReadFixed/WriteFixed (Linux 5.1).
    FixedBuffers,
    /// IOSQE_IO_LINK chains of a read and a send (Linux 5.3).
    LinkedChains,
    /// IORING_SETUP_SINGLE_ISSUER + DEFER_TASKRUN (Linux 6.1).
    DeferTaskrun,
    /// IORING_SETUP_COOP_TASKRUN (Linux 5.19).
    CoopTaskrun,
    /// IORING_SETUP_SQPOLL (Linux 5.11 unprivileged).
    Sqpoll,
    /// Provided-buffer rings for receives (Linux 5.19).
    BufferRing,
    /// io_uring as a whole: forbidding it selects the threads engine.
    IoUring,
}

impl Feature {
    /// Every feature, in a stable order.
    pub const ALL: [Feature; 8] = [
        Feature::SendZc,
        Feature::FixedBuffers,
        Feature::LinkedChains,
        Feature::DeferTaskrun,
        Feature::CoopTaskrun,
        Feature::Sqpoll,
        Feature::BufferRing,
        Feature::IoUring,
    ];

    /// The name used on the command line and in `VFIO_MULTIFD_FORBID`.
    pub fn name(self) -> &'static str {
        match self {
            Feature::SendZc => "send-zc",
            Feature::FixedBuffers => "fixed-buffers",
            Feature::LinkedChains => "linked-chains",
            Feature::DeferTaskrun => "defer-taskrun",
            Feature::CoopTaskrun => "coop-taskrun",
            Feature::Sqpoll => "sqpoll",
            Feature::BufferRing => "buffer-ring",
            Feature::IoUring => "io-uring",
        }
    }

    fn bit(self) -> u32 {
        1 << self as u32
    }
}

/// A set of forbidden features.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FeatureMask(u32);

impl FeatureMask {
    /// Nothing forbidden.
    pub const fn empty() -> Self {
        Self(0)
    }

    /// Whether `feature` is in the set.
    pub fn contains(self, feature: Feature) -> bool {
        self.0 & feature.bit() != 0
    }

    /// The set plus `feature`.
    pub fn with(self, feature: Feature) -> Self {
        Self(self.0 | feature.bit())
    }

    /// Parses a comma-separated list of feature names (`send-zc,fixed-buffers`, or `all`).
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut mask = Self::empty();
        for name in text.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            if name == "all" {
                mask = Feature::ALL
                    .iter()
                    .filter(|&&f| f != Feature::IoUring)
                    .fold(mask, |m, &f| m.with(f));
                continue;
            }
            let feature = Feature::ALL
                .iter()
                .find(|f| f.name() == name)
                .ok_or_else(|| {
                    let known: Vec<_> = Feature::ALL.iter().map(|f| f.name()).collect();
                    format!(
                        "unknown io_uring feature {name:?}; known: {}, all",
                        known.join(", ")
                    )
                })?;
            mask = mask.with(*feature);
        }
        Ok(mask)
    }

    /// The forbidden features' names.
    pub fn names(self) -> Vec<&'static str> {
        Feature::ALL
            .iter()
            .filter(|&&f| self.contains(f))
            .map(|f| f.name())
            .collect()
    }
}

/// What this kernel's io_uring offers, found by trying it.
#[derive(Debug, Clone)]
pub struct Probe {
    /// `uname -r`.
    pub kernel: String,
    /// `/proc/sys/kernel/io_uring_disabled` (0 = enabled, 1 = root/group only, 2 = off).
    pub io_uring_disabled: Option<u8>,
    /// Why io_uring cannot be used here, in plain words; None when it can.
    pub unusable: Option<String>,
    /// Per feature: available on this kernel, or why not.
    pub features: Vec<(Feature, Result<(), String>)>,
    /// RLIMIT_MEMLOCK soft limit in bytes (None = unlimited).
    pub memlock_limit: Option<u64>,
}

fn read_trimmed(path: &str) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_string())
}

/// Probes io_uring: setup, setup flags, the opcodes the engine uses, and whether `pin_bytes`
/// of registered buffers can be pinned.
pub fn probe(pin_bytes: usize) -> Probe {
    use io_uring::{opcode, IoUring};
    let kernel = read_trimmed("/proc/sys/kernel/osrelease").unwrap_or_else(|| "unknown".into());
    let io_uring_disabled: Option<u8> =
        read_trimmed("/proc/sys/kernel/io_uring_disabled").and_then(|s| s.parse().ok());
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `limit` is a live rlimit for getrlimit to fill.
    let memlock_limit = if unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut limit) } == 0
        && limit.rlim_cur != libc::RLIM_INFINITY
    {
        Some(limit.rlim_cur)
    } else {
        None
    };
    let ring = match IoUring::new(8) {
        Ok(ring) => ring,
        Err(err) => {
            let why = match err.raw_os_error() {
                Some(libc::ENOSYS) => "io_uring_setup is not implemented (ENOSYS): the kernel lacks io_uring, or a seccomp filter hides it".to_string(),
                Some(libc::EPERM) => format!(
                    "io_uring_setup is not permitted (EPERM): kernel.io_uring_disabled = {}, or a seccomp filter refuses it",
                    io_uring_disabled.map_or("?".into(), |v| v.to_string())
                ),
                _ => format!("io_uring_setup failed: {err}"),
            };
            let features = Feature::ALL
                .iter()
                .map(|&f| (f, Err(why.clone())))
                .collect();
            return Probe {
                kernel,
                io_uring_disabled,
                unusable: Some(why),
                features,
                memlock_limit,
            };
        }
    };
    let mut ops = io_uring::Probe::new();
    let probed = ring.submitter().register_probe(&mut ops).is_ok();
    let op = |code: u8, name: &str, since: &str| -> Result<(), String> {
        if probed && ops.is_supported(code) {
            Ok(())
        } else {
            Err(format!(
                "the kernel does not support {name} (added in Linux {since})"
            ))
        }
    };
    let setup = |builder: &mut io_uring::Builder, name: &str, since: &str| -> Result<(), String> {
        builder
            .build(8)
            .map(drop)
            .map_err(|e| format!("setup with {name} fails ({e}); it needs Linux {since}"))
    };
    let fixed = op(opcode::ReadFixed::CODE, "READ_FIXED", "5.1").and_then(|()| {
        let pool = crate::pool::BufferPool::new(1, pin_bytes.max(1))
            .map_err(|e| format!("cannot allocate {pin_bytes} bytes to pin: {e}"))?;
        let iovecs = pool.iovecs();
        // SAFETY: the iovec points into `pool`, which outlives the registration: it is
        // unregistered below, before `pool` is dropped.
        let registered = unsafe { ring.submitter().register_buffers(&iovecs) };
        match registered {
            Ok(()) => {
                let _ = ring.submitter().unregister_buffers();
                Ok(())
            }
            Err(e) => Err(format!(
                "pinning {pin_bytes} bytes of registered buffers fails ({e}): the memlock limit is {} and the process lacks CAP_IPC_LOCK; plain buffers will be used",
                memlock_limit.map_or("unlimited".into(), |l| format!("{} KiB", l / 1024))
            )),
        }
    });
    let features = Feature::ALL
        .iter()
        .map(|&f| {
            let available = match f {
                Feature::SendZc => op(opcode::SendZc::CODE, "SEND_ZC", "6.0"),
                Feature::FixedBuffers => fixed.clone(),
                Feature::LinkedChains => Ok(()),
                Feature::DeferTaskrun => setup(
                    IoUring::builder()
                        .setup_single_issuer()
                        .setup_defer_taskrun(),
                    "SINGLE_ISSUER|DEFER_TASKRUN",
                    "6.1",
                ),
                Feature::CoopTaskrun => setup(
                    IoUring::builder().setup_coop_taskrun(),
                    "COOP_TASKRUN",
                    "5.19",
                ),
                Feature::Sqpoll => setup(
                    IoUring::builder().setup_sqpoll(1000),
                    "SQPOLL",
                    "5.11 (unprivileged)",
                ),
                Feature::BufferRing => op(opcode::ProvideBuffers::CODE, "PROVIDE_BUFFERS", "5.7"),
                Feature::IoUring => Ok(()),
            };
            (f, available)
        })
        .collect();
    Probe {
        kernel,
        io_uring_disabled,
        unusable: None,
        features,
        memlock_limit,
    }
}
