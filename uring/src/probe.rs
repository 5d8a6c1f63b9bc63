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

    /// The Linux release that added the feature (for SQPOLL: unprivileged use).
    pub fn since(self) -> &'static str {
        match self {
            Feature::SendZc => "6.0",
            Feature::FixedBuffers => "5.1",
            Feature::LinkedChains => "5.3",
            Feature::DeferTaskrun => "6.1",
            Feature::CoopTaskrun => "5.19",
            Feature::Sqpoll => "5.11",
            Feature::BufferRing => "5.19",
            Feature::IoUring => "5.1",
        }
    }

    /// What the feature is, in a few words.
    pub fn describe(self) -> &'static str {
        match self {
            Feature::SendZc => "zero-copy send (IORING_OP_SEND_ZC)",
            Feature::FixedBuffers => "registered buffers, READ_FIXED/WRITE_FIXED",
            Feature::LinkedChains => "linked read->send chains (IOSQE_IO_LINK)",
            Feature::DeferTaskrun => "SINGLE_ISSUER + DEFER_TASKRUN ring setup",
            Feature::CoopTaskrun => "COOP_TASKRUN + TASKRUN_FLAG ring setup",
            Feature::Sqpoll => "SQPOLL ring setup (kernel submission thread)",
            Feature::BufferRing => "provided-buffer ring receive (IORING_REGISTER_PBUF_RING)",
            Feature::IoUring => "io_uring itself (io_uring_setup)",
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

/// One behaviour an engine path relies on beyond the feature list, found by trying it.
#[derive(Debug, Clone)]
pub struct Check {
    /// Short name (`SINGLE_ISSUER`, `SEND_ZC_REPORT_USAGE`, ...).
    pub name: &'static str,
    /// The Linux release that added it.
    pub since: &'static str,
    /// Available, or why not in plain words.
    pub result: Result<(), String>,
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
    /// Whether the process holds CAP_IPC_LOCK (pinned pages are then not charged to the
    /// memlock limit); None where `/proc/self/status` cannot be read.
    pub cap_ipc_lock: Option<bool>,
    /// Registered-buffer slots the pinning check tried.
    pub pin_slots: usize,
    /// Bytes per slot the pinning check tried (rounded up to a page, as the pool does).
    pub pin_slot_size: usize,
    /// Whether `pin_slots` x `pin_slot_size` bytes could be registered (pinned), or why not.
    pub pinning: Result<(), String>,
    /// Behaviours the engine's paths rely on beyond the feature list.
    pub checks: Vec<Check>,
}

impl Probe {
    /// Whether `feature` is available, or why not.
    pub fn feature(&self, feature: Feature) -> Result<(), String> {
        self.features
            .iter()
            .find(|(f, _)| *f == feature)
            .map_or_else(|| Err("not probed".into()), |(_, r)| r.clone())
    }

    /// The check named `name`, if it was made.
    pub fn check(&self, name: &str) -> Option<&Check> {
        self.checks.iter().find(|c| c.name == name)
    }

    /// Total bytes the pinning check tried.
    pub fn pin_bytes(&self) -> u64 {
        self.pin_slots as u64 * self.pin_slot_size as u64
    }
}

fn read_trimmed(path: &str) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_string())
}

/// The soft RLIMIT_MEMLOCK in bytes; None where unlimited or unknown.
pub(crate) fn memlock_limit() -> Option<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `limit` is a live rlimit for getrlimit to fill.
    if unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut limit) } == 0
        && limit.rlim_cur != libc::RLIM_INFINITY
    {
        Some(limit.rlim_cur)
    } else {
        None
    }
}

/// CAP_IPC_LOCK (capability 14) in the effective set of this process.
pub(crate) fn has_cap_ipc_lock() -> Option<bool> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let hex = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))?
        .trim();
    let caps = u64::from_str_radix(hex, 16).ok()?;
    Some(caps & (1 << 14) != 0)
}

/// Plain words for an io_uring_setup failure.
fn setup_refused(err: &std::io::Error, io_uring_disabled: Option<u8>) -> String {
    match err.raw_os_error() {
        Some(libc::ENOSYS) => "io_uring_setup is not implemented (ENOSYS): the kernel was built \
            without io_uring, or a seccomp filter (a container profile) hides it"
            .to_string(),
        Some(libc::EPERM) => match io_uring_disabled {
            Some(2) => "io_uring_setup is not permitted (EPERM): kernel.io_uring_disabled = 2 \
                turns io_uring off for every process"
                .to_string(),
            Some(1) => "io_uring_setup is not permitted (EPERM): kernel.io_uring_disabled = 1 \
                allows only CAP_SYS_ADMIN or the kernel.io_uring_group group, or a seccomp \
                filter refuses it"
                .to_string(),
            Some(v) => format!(
                "io_uring_setup is not permitted (EPERM) although kernel.io_uring_disabled = \
                 {v}: a seccomp filter (a container profile, e.g. Docker's default) refuses it"
            ),
            None => "io_uring_setup is not permitted (EPERM): a seccomp filter (a container \
                profile, e.g. Docker's default) refuses it (this kernel has no \
                kernel.io_uring_disabled sysctl, added in Linux 6.6)"
                .to_string(),
        },
        Some(libc::ENOMEM) => format!(
            "io_uring_setup fails with ENOMEM ({err}): the ring's memory could not be \
             allocated or charged to the memlock limit (kernels before 5.12 charge it)"
        ),
        _ => format!("io_uring_setup fails: {err}"),
    }
}

/// One completion: user_data, result, flags.
type Cqe = (u64, i32, u32);

/// Pushes `entries`, submits, and collects completions until `done` says so or `timeout`
/// passes. Polls with short sleeps (task work runs on the way back from each syscall), so it
/// needs no EXT_ARG and never blocks past `timeout`.
///
/// # Safety
/// Every buffer and fd the entries point at must stay valid until their completions arrive;
/// callers leak their buffers when this returns without them.
unsafe fn run_entries(
    ring: &mut io_uring::IoUring,
    entries: &[io_uring::squeue::Entry],
    done: impl Fn(&[Cqe]) -> bool,
    timeout: std::time::Duration,
) -> std::io::Result<Vec<Cqe>> {
    // SAFETY: the caller keeps every buffer and fd the entries use valid until completion.
    unsafe { ring.submission().push_multiple(entries) }
        .map_err(|_| std::io::Error::other("the submission queue is full"))?;
    let start = std::time::Instant::now();
    let mut cqes = Vec::new();
    ring.submit()?;
    loop {
        cqes.extend(
            ring.completion()
                .map(|c| (c.user_data(), c.result(), c.flags())),
        );
        if done(&cqes) || start.elapsed() > timeout {
            return Ok(cqes);
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
        ring.submit()?;
    }
}

const OP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// [`check_linked_short_read`] on a small ring of its own, once per process (the kernel's
/// behaviour does not change while it runs): [`crate::Ring::new`] links read->send chains only
/// when this passes, as [`data_path`] predicts from the probe's result.
pub(crate) fn linked_chains_work() -> Result<(), String> {
    static RESULT: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    RESULT
        .get_or_init(|| {
            let mut ring = io_uring::IoUring::new(4)
                .map_err(|e| format!("cannot test linked chains: io_uring_setup fails ({e})"))?;
            check_linked_short_read(&mut ring)
        })
        .clone()
}

/// Whether a short read breaks an IOSQE_IO_LINK chain (the linked op fails with ECANCELED):
/// the engine's read->send chains rely on it.
fn check_linked_short_read(ring: &mut io_uring::IoUring) -> Result<(), String> {
    use io_uring::{opcode, squeue, types};
    use std::io::Write;
    use std::os::fd::AsRawFd;
    let (mut tx, rx) = std::os::unix::net::UnixStream::pair()
        .map_err(|e| format!("cannot test linked chains: socketpair fails ({e})"))?;
    tx.write_all(&[7; 10])
        .map_err(|e| format!("cannot test linked chains: write fails ({e})"))?;
    let mut buf = Box::new([0u8; 64]);
    let read = opcode::Read::new(types::Fd(rx.as_raw_fd()), buf.as_mut_ptr(), 64)
        .offset(u64::MAX)
        .build()
        .flags(squeue::Flags::IO_LINK)
        .user_data(1);
    let nop = opcode::Nop::new().build().user_data(2);
    // SAFETY: `buf` is leaked below unless both completions arrived; the socket is held by the
    // kernel's file reference from submission on.
    let cqes = unsafe { run_entries(ring, &[read, nop], |c| c.len() >= 2, OP_TIMEOUT) };
    let cqes = match cqes {
        Ok(cqes) => cqes,
        Err(e) => {
            Box::leak(buf);
            return Err(format!("cannot test linked chains: submission fails ({e})"));
        }
    };
    if cqes.len() < 2 {
        Box::leak(buf);
        return Err("a linked read and NOP did not complete within 2 s".into());
    }
    let res = |ud: u64| cqes.iter().find(|c| c.0 == ud).map(|c| c.1);
    match (res(1), res(2)) {
        (Some(10), Some(r)) if r == -libc::ECANCELED => Ok(()),
        (Some(10), Some(0)) => Err(
            "a short read does not break an IOSQE_IO_LINK chain on this kernel, so a linked \
             send would send stale bytes: chains cannot be used"
                .into(),
        ),
        (read, next) => Err(format!(
            "a linked short read behaves unexpectedly (read {read:?}, linked op {next:?})"
        )),
    }
}

/// Whether SEND_ZC accepts IORING_SEND_ZC_REPORT_USAGE (Linux 6.2), which the engine sets to
/// learn that the kernel copied (then it switches the socket to plain send).
fn check_send_zc_report_usage(ring: &mut io_uring::IoUring) -> Result<(), String> {
    use io_uring::{cqueue, opcode, types};
    use std::os::fd::AsRawFd;
    let pair = std::net::UdpSocket::bind("127.0.0.1:0").and_then(|rx| {
        let tx = std::net::UdpSocket::bind("127.0.0.1:0")?;
        tx.connect(rx.local_addr()?)?;
        Ok((tx, rx))
    });
    let (tx, _rx) = pair.map_err(|e| {
        format!("cannot test: no UDP socket on 127.0.0.1 ({e}; is the loopback interface up?)")
    })?;
    let buf = Box::new([0u8; 16]);
    let send = opcode::SendZc::new(types::Fd(tx.as_raw_fd()), buf.as_ptr(), 16)
        .zc_flags(SEND_ZC_REPORT_USAGE)
        .build()
        .user_data(3);
    // The send's result, then its notification if the result said one follows.
    let finished = |c: &[Cqe]| match c.first() {
        Some(&(_, _, flags)) if cqueue::more(flags) => c.len() >= 2,
        Some(_) => true,
        None => false,
    };
    // SAFETY: `buf` is leaked below unless every completion (and notification) arrived.
    let cqes = match unsafe { run_entries(ring, &[send], finished, OP_TIMEOUT) } {
        Ok(cqes) if finished(&cqes) => cqes,
        Ok(_) | Err(_) => {
            Box::leak(buf);
            return Err(
                "cannot test: a SEND_ZC on UDP loopback did not complete within 2 s".into(),
            );
        }
    };
    match cqes[0].1 {
        r if r >= 0 => Ok(()),
        r if r == -libc::EINVAL => Err(
            "SEND_ZC rejects the IORING_SEND_ZC_REPORT_USAGE flag (EINVAL): it needs Linux 6.2"
                .into(),
        ),
        r => Err(format!(
            "a SEND_ZC with REPORT_USAGE on UDP loopback fails: {}",
            std::io::Error::from_raw_os_error(-r)
        )),
    }
}

/// `IORING_SEND_ZC_REPORT_USAGE`.
const SEND_ZC_REPORT_USAGE: u16 = 8;

/// Whether a provided-buffer ring can be registered (IORING_REGISTER_PBUF_RING, Linux 5.19).
fn check_buffer_ring(ring: &io_uring::IoUring) -> Result<(), String> {
    let pool = crate::pool::BufferPool::new(1, 4096)
        .map_err(|e| format!("cannot allocate a page for the buffer ring: {e}"))?;
    let addr = pool.iovecs()[0].iov_base as u64;
    // SAFETY: the page-aligned slot lives in `pool`, which is unregistered below before it is
    // dropped (or leaked if unregistering fails).
    let registered = unsafe {
        ring.submitter()
            .register_buf_ring_with_flags(addr, 8, 0x7f17, 0)
    };
    match registered {
        Ok(()) => {
            if ring.submitter().unregister_buf_ring(0x7f17).is_err() {
                std::mem::forget(pool);
            }
            Ok(())
        }
        Err(e) => Err(format!(
            "registering a provided-buffer ring fails ({e}): it needs Linux 5.19"
        )),
    }
}

/// Probes io_uring: setup, setup flags, the opcodes the engine uses, and whether `pin_bytes`
/// of registered buffers can be pinned (as one buffer).
pub fn probe(pin_bytes: usize) -> Probe {
    probe_pool(1, pin_bytes)
}

/// Probes io_uring as [`probe`] does, checking that a pool of `slots` registered buffers of
/// `slot_size` bytes each (rounded up to a page, as the engine's pool is) can be pinned.
pub fn probe_pool(slots: usize, slot_size: usize) -> Probe {
    use io_uring::{opcode, IoUring};
    let kernel = read_trimmed("/proc/sys/kernel/osrelease").unwrap_or_else(|| "unknown".into());
    let io_uring_disabled: Option<u8> =
        read_trimmed("/proc/sys/kernel/io_uring_disabled").and_then(|s| s.parse().ok());
    let memlock_limit = memlock_limit();
    let cap_ipc_lock = has_cap_ipc_lock();
    let pin_slot_size = slot_size.max(1).next_multiple_of(4096);
    let mut ring = match IoUring::new(8) {
        Ok(ring) => ring,
        Err(err) => {
            let why = setup_refused(&err, io_uring_disabled);
            let features = Feature::ALL
                .iter()
                .map(|&f| (f, Err(why.clone())))
                .collect();
            return Probe {
                kernel,
                io_uring_disabled,
                unusable: Some(why.clone()),
                features,
                memlock_limit,
                cap_ipc_lock,
                pin_slots: slots,
                pin_slot_size,
                pinning: Err(why),
                checks: Vec::new(),
            };
        }
    };
    let mut ops = io_uring::Probe::new();
    let probed = ring.submitter().register_probe(&mut ops).is_ok();
    let op = |code: u8, name: &str, since: &str| -> Result<(), String> {
        if !probed {
            Err(format!(
                "the kernel cannot list its io_uring opcodes (IORING_REGISTER_PROBE, Linux 5.6), \
                 so {name} (Linux {since}) is assumed missing"
            ))
        } else if ops.is_supported(code) {
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
            .map_err(|e| format!("setup with {name} fails ({e}): it needs Linux {since}"))
    };
    let read_fixed = op(opcode::ReadFixed::CODE, "READ_FIXED", "5.1");
    let pinning = {
        let pool = crate::pool::BufferPool::new(slots, pin_slot_size)
            .map_err(|e| format!("cannot allocate {slots} x {pin_slot_size} bytes to pin: {e}"));
        pool.and_then(|pool| {
            let iovecs = pool.iovecs();
            // SAFETY: the iovecs point into `pool`, which outlives the registration: it is
            // unregistered below, before `pool` is dropped (or leaked if that fails).
            let registered = unsafe { ring.submitter().register_buffers(&iovecs) };
            match registered {
                Ok(()) => {
                    if ring.submitter().unregister_buffers().is_err() {
                        std::mem::forget(pool);
                    }
                    Ok(())
                }
                Err(e) => Err(pin_failure(
                    &e,
                    slots,
                    pin_slot_size,
                    memlock_limit,
                    cap_ipc_lock,
                )),
            }
        })
    };
    let fixed = read_fixed.clone().and_then(|()| pinning.clone());
    let single_issuer = setup(
        IoUring::builder().setup_single_issuer(),
        "SINGLE_ISSUER",
        "6.0",
    );
    let defer = single_issuer.clone().and_then(|()| {
        setup(
            IoUring::builder()
                .setup_single_issuer()
                .setup_defer_taskrun(),
            "SINGLE_ISSUER|DEFER_TASKRUN",
            "6.1",
        )
    });
    let linked = check_linked_short_read(&mut ring);
    let send_zc = op(opcode::SendZc::CODE, "SEND_ZC", "6.0");
    let report_usage = send_zc
        .clone()
        .and_then(|()| check_send_zc_report_usage(&mut ring));
    let features = Feature::ALL
        .iter()
        .map(|&f| {
            let available = match f {
                Feature::SendZc => send_zc.clone(),
                Feature::FixedBuffers => fixed.clone(),
                Feature::LinkedChains => linked.clone(),
                Feature::DeferTaskrun => defer.clone(),
                Feature::CoopTaskrun => setup(
                    IoUring::builder().setup_coop_taskrun().setup_taskrun_flag(),
                    "COOP_TASKRUN|TASKRUN_FLAG",
                    "5.19",
                ),
                Feature::Sqpoll => setup(
                    IoUring::builder().setup_sqpoll(1000),
                    "SQPOLL",
                    "5.11 (unprivileged; 5.13 for non-fixed files)",
                ),
                Feature::BufferRing => check_buffer_ring(&ring),
                Feature::IoUring => Ok(()),
            };
            (f, available)
        })
        .collect();
    let ext_arg = if ring.params().is_feature_ext_arg() {
        Ok(())
    } else {
        Err("io_uring_enter cannot wait with a timeout (IORING_FEAT_EXT_ARG, Linux 5.11)".into())
    };
    let checks = vec![
        Check {
            name: "READ_FIXED",
            since: "5.1",
            result: read_fixed,
        },
        Check {
            name: "SINGLE_ISSUER",
            since: "6.0",
            result: single_issuer,
        },
        Check {
            name: "SEND_ZC_REPORT_USAGE",
            since: "6.2",
            result: report_usage,
        },
        Check {
            name: "EXT_ARG",
            since: "5.11",
            result: ext_arg,
        },
        Check {
            name: "PROVIDE_BUFFERS",
            since: "5.7",
            result: op(opcode::ProvideBuffers::CODE, "PROVIDE_BUFFERS", "5.7"),
        },
    ];
    Probe {
        kernel,
        io_uring_disabled,
        unusable: None,
        features,
        memlock_limit,
        cap_ipc_lock,
        pin_slots: slots,
        pin_slot_size,
        pinning,
        checks,
    }
}

fn pin_failure(
    err: &std::io::Error,
    slots: usize,
    slot_size: usize,
    memlock_limit: Option<u64>,
    cap_ipc_lock: Option<bool>,
) -> String {
    let total = slots as u64 * slot_size as u64;
    let what = format!(
        "pinning {slots} x {slot_size} bytes ({:.1} MiB) of registered buffers fails ({err})",
        total as f64 / f64::from(1 << 20)
    );
    let why = pin_reason(err.raw_os_error(), memlock_limit, cap_ipc_lock)
        .map(|why| format!(": {why}"))
        .unwrap_or_default();
    format!("{what}{why}; plain buffers will be used")
}

/// Why registering buffers failed with `errno`, where the errno tells; shared with
/// [`crate::Ring::new`]'s note so that a helper and `probe` give the same reason.
pub(crate) fn pin_reason(
    errno: Option<i32>,
    memlock_limit: Option<u64>,
    cap_ipc_lock: Option<bool>,
) -> Option<String> {
    Some(match (errno?, memlock_limit, cap_ipc_lock) {
        (libc::ENOMEM, Some(limit), Some(false) | None) => format!(
            "the memlock limit is {} KiB and the process lacks CAP_IPC_LOCK (raise `ulimit -l` \
             or grant CAP_IPC_LOCK)",
            limit / 1024
        ),
        (libc::ENOMEM, _, _) => "the kernel could not pin that much memory".into(),
        (libc::EINVAL, _, _) => {
            "more than 16384 buffers, or a buffer over 1 GiB, is refused".into()
        }
        (libc::EFAULT, _, _) => "a buffer over 1 GiB is refused".into(),
        _ => return None,
    })
}

/// The data-plane path a helper takes on this kernel with a mask. Mirrors what `Ring::new`
/// and the engine selection decide (a test checks it against a real ring).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataPath {
    /// `uring` or `threads`.
    pub engine: &'static str,
    /// Why the threads engine runs, when it does.
    pub why_threads: Option<String>,
    /// Ring setup flags (`single-issuer+defer-taskrun`, `coop-taskrun`, `sqpoll`, `plain`);
    /// None for the threads engine.
    pub setup: Option<&'static str>,
    /// Registered buffers with READ_FIXED/WRITE_FIXED (else plain buffers).
    pub fixed_buffers: bool,
    /// A data_fd read linked to the send of the same buffer (else read, then send).
    pub linked_chains: bool,
    /// SEND_ZC first (else plain send).
    pub send_zc: bool,
    /// One line per feature or behaviour not used, or used with a caveat, and why.
    pub notes: Vec<String>,
}

/// Environment variable that opts the engine in to SQPOLL rings.
pub const SQPOLL_ENV: &str = "VFIO_MULTIFD_SQPOLL";

/// Whether [`SQPOLL_ENV`] opts in: set to anything but empty, `0`, `false`, `no` or `off`
/// (any case). Mere presence used to count, so `VFIO_MULTIFD_SQPOLL=0`, written to keep
/// SQPOLL off, turned it on.
pub fn sqpoll_opt_in() -> bool {
    sqpoll_opt_in_value(std::env::var_os(SQPOLL_ENV).as_deref())
}

/// [`sqpoll_opt_in`] for a given value of [`SQPOLL_ENV`].
pub fn sqpoll_opt_in_value(value: Option<&std::ffi::OsStr>) -> bool {
    let Some(value) = value else {
        return false;
    };
    let value = value.to_string_lossy();
    let value = value.trim();
    !(value.is_empty()
        || ["0", "false", "no", "off"]
            .iter()
            .any(|off| value.eq_ignore_ascii_case(off)))
}

/// Decides the path as the helper would: `forbid` from `--forbid` and `VFIO_MULTIFD_FORBID`,
/// `sqpoll_opt_in` when `VFIO_MULTIFD_SQPOLL` is set (the engine tries SQPOLL only then).
pub fn data_path(probe: &Probe, forbid: FeatureMask, sqpoll_opt_in: bool) -> DataPath {
    let mut notes = Vec::new();
    let threads = |why: String, notes: Vec<String>| DataPath {
        engine: "threads",
        why_threads: Some(why),
        setup: None,
        fixed_buffers: false,
        linked_chains: false,
        send_zc: false,
        notes,
    };
    if forbid.contains(Feature::IoUring) {
        return threads("io_uring is forbidden by the mask".into(), notes);
    }
    if let Some(why) = &probe.unusable {
        return threads(why.clone(), notes);
    }
    let usable = |f: Feature, notes: &mut Vec<String>| -> bool {
        if forbid.contains(f) {
            notes.push(format!("{}: forbidden by the mask", f.name()));
            return false;
        }
        match probe.feature(f) {
            Ok(()) => true,
            Err(why) => {
                notes.push(format!("{}: {why}", f.name()));
                false
            }
        }
    };
    let setup = if usable(Feature::DeferTaskrun, &mut notes) {
        "single-issuer+defer-taskrun"
    } else if usable(Feature::CoopTaskrun, &mut notes) {
        "coop-taskrun"
    } else if sqpoll_opt_in && usable(Feature::Sqpoll, &mut notes) {
        "sqpoll"
    } else {
        "plain"
    };
    if setup != "sqpoll" && !forbid.contains(Feature::Sqpoll) {
        notes.push(
            "sqpoll: the engine tries SQPOLL only with VFIO_MULTIFD_SQPOLL=1 and \
             DEFER_TASKRUN and COOP_TASKRUN unavailable or forbidden"
                .into(),
        );
    }
    // The engine registers buffers when READ_FIXED exists and pinning works; `fixed` already
    // combines both.
    let fixed_buffers = usable(Feature::FixedBuffers, &mut notes);
    // The engine links only where a short read breaks the chain (the same check, run once
    // by `Ring::new`): otherwise a linked send would send stale bytes.
    let linked_chains = usable(Feature::LinkedChains, &mut notes);
    if !linked_chains {
        notes.push("linked-chains: read, then send".into());
    }
    let send_zc = usable(Feature::SendZc, &mut notes);
    if send_zc {
        match probe.check("SEND_ZC_REPORT_USAGE").map(|c| &c.result) {
            Some(Err(why)) => notes.push(format!(
                "send-zc: the engine asks for IORING_SEND_ZC_REPORT_USAGE; {why}"
            )),
            _ => notes.push(
                "send-zc: a channel switches to plain send once the kernel reports it \
                 copied (loopback always does)"
                    .into(),
            ),
        }
    }
    if !forbid.contains(Feature::BufferRing) {
        notes.push(
            "buffer-ring: not used by the engine (payloads are received straight into \
             pool buffers)"
                .into(),
        );
    }
    DataPath {
        engine: "uring",
        why_threads: None,
        setup: Some(setup),
        fixed_buffers,
        linked_chains,
        send_zc,
        notes,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::ring::{Ring, RingConfig};

    #[test]
    fn masks_parse_and_name_round_trip() {
        let mask = FeatureMask::parse("send-zc, linked-chains").unwrap();
        assert_eq!(mask.names(), ["send-zc", "linked-chains"]);
        let all = FeatureMask::parse("all").unwrap();
        assert!(!all.contains(Feature::IoUring));
        assert_eq!(all.names().len(), Feature::ALL.len() - 1);
        assert!(FeatureMask::parse("warp").unwrap_err().contains("known"));
    }

    #[test]
    fn probe_reports_every_feature_and_check() {
        let probe = probe_pool(2, 5000);
        assert_eq!(probe.features.len(), Feature::ALL.len());
        assert_eq!(probe.pin_slot_size, 8192);
        if probe.unusable.is_none() {
            assert!(probe.check("SEND_ZC_REPORT_USAGE").is_some());
            assert_eq!(probe.feature(Feature::IoUring), Ok(()));
        }
    }

    #[test]
    fn pin_reason_blames_memlock_only_without_cap_ipc_lock() {
        let lacking = pin_reason(Some(libc::ENOMEM), Some(8 << 20), Some(false)).unwrap();
        assert!(lacking.contains("lacks CAP_IPC_LOCK"), "{lacking}");
        for (errno, cap) in [(libc::EINVAL, Some(true)), (libc::EINVAL, Some(false))] {
            let why = pin_reason(Some(errno), Some(8 << 20), cap).unwrap();
            assert!(why.contains("16384 buffers"), "{why}");
        }
        let held = pin_reason(Some(libc::ENOMEM), Some(8 << 20), Some(true)).unwrap();
        assert!(!held.contains("CAP_IPC_LOCK"), "{held}");
        assert_eq!(pin_reason(None, None, None), None);
    }

    #[test]
    fn sqpoll_opt_in_needs_a_true_value() {
        use std::ffi::OsStr;
        for on in ["1", "yes", "true", "on", "ON"] {
            assert!(sqpoll_opt_in_value(Some(OsStr::new(on))), "{on}");
        }
        for off in ["0", "", " ", "no", "false", "off", "Off"] {
            assert!(!sqpoll_opt_in_value(Some(OsStr::new(off))), "{off:?}");
        }
        assert!(!sqpoll_opt_in_value(None));
    }

    /// The predicted path is what a real ring chooses, for every single-feature mask.
    #[test]
    fn data_path_matches_a_real_ring() {
        let probe = probe_pool(2, 4096);
        if probe.unusable.is_some() {
            return;
        }
        let sqpoll = sqpoll_opt_in();
        let mut masks = vec![FeatureMask::empty(), FeatureMask::parse("all").unwrap()];
        masks.extend(Feature::ALL.iter().map(|&f| FeatureMask::empty().with(f)));
        for mask in masks {
            let path = data_path(&probe, mask, sqpoll);
            let ring = Ring::new(
                &RingConfig {
                    entries: 8,
                    forbid: mask,
                },
                crate::pool::BufferPool::new(2, 4096).unwrap(),
            );
            let Ok(ring) = ring else {
                assert_eq!(path.engine, "threads", "{mask:?}");
                continue;
            };
            assert_eq!(path.engine, "uring", "{mask:?}");
            assert_eq!(path.setup, Some(ring.setup()), "{mask:?}");
            assert_eq!(path.fixed_buffers, ring.fixed_buffers(), "{mask:?}");
            assert_eq!(path.linked_chains, ring.linked_chains(), "{mask:?}");
            assert_eq!(path.send_zc, ring.send_zc(), "{mask:?}");
        }
    }

    /// A kernel whose short read does not break a chain would make a linked send send stale
    /// bytes: the path (like `Ring::new`) does not link there, and says why.
    #[test]
    fn a_kernel_that_does_not_break_chains_gets_no_linked_chains() {
        let mut probe = probe_pool(1, 4096);
        if probe.unusable.is_some() {
            return;
        }
        let broken = "a short read does not break an IOSQE_IO_LINK chain on this kernel";
        for (f, available) in &mut probe.features {
            if *f == Feature::LinkedChains {
                *available = Err(broken.into());
            }
        }
        let path = data_path(&probe, FeatureMask::empty(), false);
        assert_eq!(path.engine, "uring");
        assert!(!path.linked_chains, "stale bytes would be sent");
        assert!(
            path.notes.iter().any(|n| n.contains(broken)),
            "{:?}",
            path.notes
        );
        // A ring decides by the same check as the probe.
        assert_eq!(
            linked_chains_work(),
            probe_pool(1, 4096).feature(Feature::LinkedChains)
        );
    }

    #[test]
    fn unusable_io_uring_selects_threads_with_the_reason() {
        let mut probe = probe_pool(1, 4096);
        probe.unusable = Some("io_uring_setup is not permitted (EPERM)".into());
        let path = data_path(&probe, FeatureMask::empty(), false);
        assert_eq!(path.engine, "threads");
        assert!(path.why_threads.unwrap().contains("EPERM"));
        let path = data_path(&probe, FeatureMask::empty().with(Feature::IoUring), false);
        assert!(path.why_threads.unwrap().contains("forbidden"));
    }
}
