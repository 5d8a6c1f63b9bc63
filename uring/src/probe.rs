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
                    format!("unknown io_uring feature {name:?}; known: {}, all", known.join(", "))
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
