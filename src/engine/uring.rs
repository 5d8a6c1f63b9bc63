//! The io_uring engine: per-core workers over the `uring` crate, each with its own ring and
//! buffer pool. This file splits a migration's devices and channels between the workers, runs
//! them, and stops them all on the first failure; `source` and `dest` are the workers' loops,
//! `handoff` lends filled slots from reading to sending workers.
//!
//! Workers are not pinned to cores: the scheduler places them within the process's affinity
//! mask (set it with taskset or a cpuset to give the helper its cores). Pinning worker i to
//! the i-th core put both helpers of a same-host migration on the same first cores: gpu (one
//! device, so one source worker) on 2 cores left CPU 1 idle 65 % of the switchover while the
//! destination's worker 0 waited 350 ms for CPU 0; unpinned, gpu went from 1.45-1.87 to
//! 1.61-2.59 GiB/s, with seed, small and many unchanged within noise.

use std::os::fd::{AsFd, BorrowedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ::uring::{Arena, BufferPool, Ring, RingConfig};

use super::*;
use crate::wire::PACKET_HEADER_ROOM;
use dest::DestShared;
use handoff::Handoff;
use source::Role;

mod dest;
mod handoff;
mod source;

const POLL: Duration = Duration::from_millis(100);

pub struct UringEngine {
    config: EngineConfig,
    /// Every worker's buffers, made (and faulted in) with the engine, before any migration:
    /// a run cuts one pool per worker out of it and puts it back when every ring let go.
    arena: Mutex<Option<Arc<Arena>>>,
}

impl UringEngine {
    /// Checks that a ring can be set up here with the configured mask (io_uring may be
    /// disabled by sysctl, refused by seccomp, or forbidden by the mask), and makes the
    /// buffer arena.
    pub fn new(config: EngineConfig) -> io::Result<Self> {
        let probe_pool = BufferPool::new(1, 4096)?;
        Ring::new(
            &RingConfig {
                entries: 8,
                forbid: config.forbid,
            },
            probe_pool,
        )
        .map_err(|err| io::Error::other(error_chain(&err)))?;
        let slot = BufferPool::slot_bytes(PACKET_HEADER_ROOM + config.chunk_size)?;
        let arena = Arena::new(config.pool_buffers.max(2).saturating_mul(slot))?;
        Ok(Self {
            config,
            arena: Mutex::new(Some(arena)),
        })
    }

    fn ring_config(&self) -> RingConfig {
        RingConfig {
            entries: 256,
            forbid: self.config.forbid,
        }
    }

    /// One pool per worker, `pool_buffers` slots split evenly (at least 2 each), every slot
    /// room for a whole packet (both sides use the same slot size, so one arena serves either).
    fn worker_pools(
        &self,
        workers: usize,
    ) -> Result<(Arc<Arena>, Vec<BufferPool>), DataPlaneError> {
        let setup = |source| DataPlaneError::Setup {
            engine: "uring",
            source,
        };
        let slots = vec![(self.config.pool_buffers / workers).max(2); workers];
        let slot = PACKET_HEADER_ROOM + self.config.chunk_size;
        let need = slots.iter().sum::<usize>() * BufferPool::slot_bytes(slot).map_err(setup)?;
        let kept = self.arena.lock().unwrap_or_else(|p| p.into_inner()).take();
        let mut arena = match kept {
            Some(arena) if arena.len() >= need => arena,
            // Another run holds it, or this split needs more: a fresh one, faulted in now.
            _ => Arena::new(need).map_err(setup)?,
        };
        let pools = BufferPool::cut(&mut arena, &slots, slot).map_err(setup)?;
        Ok((arena, pools))
    }

    /// Keeps the arena for the next run unless a ring leaked a pool of it (its ops never
    /// finished, so the kernel may still write there).
    fn keep_arena(&self, arena: Arc<Arena>) {
        if Arc::strong_count(&arena) == 1 {
            *self.arena.lock().unwrap_or_else(|p| p.into_inner()) = Some(arena);
        }
    }
}

/// `statfs` magic of anonymous-inode files (VFIO's `data_fd`), from linux/magic.h.
const ANON_INODE_FS_MAGIC: nix::sys::statfs::FsType = nix::sys::statfs::FsType(0x0904_1934);

fn on_filesystem(fd: BorrowedFd<'_>, magics: &[nix::sys::statfs::FsType]) -> bool {
    nix::sys::statfs::fstatfs(fd).is_ok_and(|fs| magics.contains(&fs.filesystem_type()))
}

/// Shmem files: io_uring hands every buffered write of theirs to an io-wq worker (no
/// FMODE_BUF_WASYNC, and O_NONBLOCK does not change that for regular files), so the worker
/// that holds the bytes writes them itself: the copy costs the same, the handoff (a wakeup and
/// two context switches per packet) goes: `bench --scenario small --quick` switched context
/// 540 times a run instead of 3470 and moved 1.14-1.16 GiB/s instead of 0.95-1.05.
fn writes_only_in_io_wq(fd: BorrowedFd<'_>) -> bool {
    on_filesystem(fd, &[nix::sys::statfs::TMPFS_MAGIC])
}

/// Saving `data_fd`s that io_uring can only read from a worker thread (files without
/// FMODE_NOWAIT: shmem and anonymous-inode device files such as VFIO's) are switched to
/// O_NONBLOCK for the run: the read then runs inline in the submitting thread. A device with
/// nothing saved yet says EAGAIN (mlx5 does under O_NONBLOCK), which io_uring itself turns
/// into a wait for readiness on any file with a poll method. Pipes, sockets and disk files
/// already read inline or wait inside the kernel, so they are left alone. The open file
/// description is shared with whoever passed the fd, so the flag is cleared again when the run
/// ends.
struct NonBlockingReads(Vec<OwnedFd>);

impl NonBlockingReads {
    fn set(devices: &[SourceDevice]) -> Self {
        use nix::fcntl::{fcntl, FcntlArg, OFlag};
        let mut switched = Vec::new();
        for device in devices {
            let fd = &device.data_fd;
            let punted = on_filesystem(
                fd.as_fd(),
                &[nix::sys::statfs::TMPFS_MAGIC, ANON_INODE_FS_MAGIC],
            );
            let Ok(flags) = fcntl(fd, FcntlArg::F_GETFL).map(OFlag::from_bits_truncate) else {
                continue;
            };
            if !punted || flags.contains(OFlag::O_NONBLOCK) {
                continue;
            }
            match fd.try_clone() {
                Ok(dup) if fcntl(&dup, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK)).is_ok() => {
                    switched.push(dup)
                }
                _ => log::debug!("device {}: reads stay blocking", device.id),
            }
        }
        NonBlockingReads(switched)
    }
}

impl Drop for NonBlockingReads {
    fn drop(&mut self) {
        use nix::fcntl::{fcntl, FcntlArg, OFlag};
        for fd in &self.0 {
            let restored = fcntl(fd, FcntlArg::F_GETFL)
                .map(OFlag::from_bits_truncate)
                .and_then(|flags| fcntl(fd, FcntlArg::F_SETFL(flags - OFlag::O_NONBLOCK)));
            if let Err(err) = restored {
                log::warn!("clearing O_NONBLOCK on a data_fd again: {err}");
            }
        }
    }
}

/// "channels 0, 2; devices a, b" (or "no channels"...): what a worker serves, for its errors.
fn serves<'a>(
    channels: impl Iterator<Item = usize>,
    devices: impl Iterator<Item = &'a DeviceId>,
) -> String {
    let list = |items: Vec<String>, what: &str| match items.len() {
        0 => format!("no {what}s"),
        1 => format!("{what} {}", items[0]),
        _ => format!("{what}s {}", items.join(", ")),
    };
    let channels = list(channels.map(|c| c.to_string()).collect(), "channel");
    let devices = list(devices.map(|d| d.to_string()).collect(), "device");
    format!("{channels}; {devices}")
}

fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Workers and what each owns: item i goes to worker i % n.
fn split_round_robin<T>(items: Vec<T>, n: usize) -> Vec<Vec<(usize, T)>> {
    let mut out: Vec<Vec<(usize, T)>> = (0..n).map(|_| Vec::new()).collect();
    for (i, item) in items.into_iter().enumerate() {
        out[i % n].push((i, item));
    }
    out
}

/// First error wins; everybody else stops.
#[derive(Default)]
struct Failure {
    failed: AtomicBool,
    first: Mutex<Option<DataPlaneError>>,
}

impl Failure {
    fn set(&self, err: DataPlaneError) {
        let mut first = self.first.lock().unwrap_or_else(|p| p.into_inner());
        if first.is_none() {
            *first = Some(err);
        }
        self.failed.store(true, Ordering::SeqCst);
    }

    fn is_set(&self) -> bool {
        self.failed.load(Ordering::SeqCst)
    }

    fn take(&self) -> Option<DataPlaneError> {
        self.first.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

/// Records a worker's error unless it only stopped because another worker failed first.
fn record_failure<T>(
    result: Result<T, DataPlaneError>,
    failure: &Failure,
    progress: &Progress,
) -> Result<T, DataPlaneError> {
    match result {
        Err(DataPlaneError::Cancelled) if !progress.cancelled() && failure.is_set() => {
            Err(DataPlaneError::Cancelled)
        }
        Err(err) => {
            failure.set(err);
            Err(DataPlaneError::Cancelled)
        }
        ok => ok,
    }
}

/// Joins the workers: every worker's value, or the first real error (else Cancelled).
fn join_workers<T>(
    handles: Vec<io::Result<std::thread::ScopedJoinHandle<'_, Result<T, DataPlaneError>>>>,
    failure: &Failure,
    progress: &Progress,
) -> Result<Vec<T>, DataPlaneError> {
    let mut results = Vec::new();
    let mut all_ok = true;
    for handle in handles {
        match handle {
            Ok(handle) => match handle.join() {
                Ok(Ok(value)) => results.push(value),
                Ok(Err(_)) => all_ok = false,
                Err(_) => failure.set(DataPlaneError::Stalled {
                    detail: "an io_uring worker panicked".into(),
                }),
            },
            Err(source) => failure.set(DataPlaneError::Setup {
                engine: "uring",
                source,
            }),
        }
    }
    if let Some(err) = failure.take() {
        return Err(err);
    }
    if !all_ok || progress.cancelled() {
        return Err(DataPlaneError::Cancelled);
    }
    Ok(results)
}

/// The error for a worker thread that could not be started (its `io::Error` stays with the
/// join handle, which reports it too; the first report wins).
fn spawn_failed(err: &io::Error) -> DataPlaneError {
    DataPlaneError::Setup {
        engine: "uring",
        source: io::Error::new(err.kind(), format!("starting an io_uring worker: {err}")),
    }
}

fn shutdown(channels: &[OwnedFd], how: nix::sys::socket::Shutdown) {
    for fd in channels {
        let _ = nix::sys::socket::shutdown(std::os::fd::AsRawFd::as_raw_fd(fd), how);
    }
}

impl Engine for UringEngine {
    fn kind(&self) -> EngineKind {
        EngineKind::Uring
    }

    fn run_source(&self, plan: SourcePlan) -> Result<SourceReport, DataPlaneError> {
        check_source_plan("uring", &self.config, &plan)?;
        let SourcePlan {
            devices,
            channels,
            progress,
        } = plan;
        let n_devices = devices.len();
        let n_channels = channels.len();
        // Devices one after another is one stream of work: one worker, as QEMU's single
        // migration thread was.
        let workers = if self.config.sequential_devices {
            1
        } else {
            self.config.workers.clamp(1, n_channels)
        };
        // Channel fds stay here (dup'd for the workers) so they can be shut down at the end.
        let dup = |fd: &OwnedFd| {
            fd.try_clone().map_err(|source| DataPlaneError::Setup {
                engine: "uring",
                source,
            })
        };
        let worker_channels: Vec<OwnedFd> = channels.iter().map(dup).collect::<Result<_, _>>()?;
        let _non_blocking = NonBlockingReads::set(&devices);
        let handoff = (n_devices > 0 && n_devices < workers).then(|| {
            Handoff::new(
                devices.iter().map(|d| d.id.clone()).collect(),
                workers - n_devices,
                n_channels,
            )
        });
        let (arena, shares) = match &handoff {
            None => {
                let workers = workers.min(n_devices.max(1));
                let (arena, pools) = self.worker_pools(workers)?;
                let shares: Vec<_> = split_round_robin(devices, workers)
                    .into_iter()
                    .zip(split_round_robin(worker_channels, workers))
                    .zip(pools)
                    .map(|(share, pool)| (Role::Alone, share, pool))
                    .collect();
                (arena, shares)
            }
            Some(handoff) => {
                let (arena, pools) = self.worker_pools(n_devices)?;
                let mut shares: Vec<_> = devices
                    .into_iter()
                    .enumerate()
                    .zip(pools)
                    .map(|((d, device), pool)| {
                        let role = Role::Reader { handoff, device: d };
                        (role, (vec![(d, device)], Vec::new()), pool)
                    })
                    .collect();
                let senders = split_round_robin(worker_channels, workers - n_devices);
                for (me, chans) in senders.into_iter().enumerate() {
                    // Senders send from lent slots: their own pool is a page the ring needs.
                    let pool =
                        BufferPool::new(1, 4096).map_err(|source| DataPlaneError::Setup {
                            engine: "uring",
                            source,
                        })?;
                    shares.push((Role::Sender { handoff, me }, (Vec::new(), chans), pool));
                }
                (arena, shares)
            }
        };
        let failure = Failure::default();
        let results = std::thread::scope(|scope| {
            let handles: Vec<_> = shares
                .into_iter()
                .enumerate()
                .map(|(w, (role, share, pool))| {
                    let (progress, failure) = (&*progress, &failure);
                    let spawned = std::thread::Builder::new()
                        .name(format!("uring-{w}"))
                        .spawn_scoped(scope, move || {
                            let result =
                                self.source_worker(w, role, share, pool, progress, failure);
                            record_failure(result, failure, progress)
                        });
                    // Readers and senders wait on each other: the others stop now, not at join.
                    if let Err(err) = &spawned {
                        failure.set(spawn_failed(err));
                    }
                    spawned
                })
                .collect();
            join_workers(handles, &failure, &progress)
        });
        let handed_off = handoff.is_some();
        let ran = if handed_off {
            workers
        } else {
            workers.min(n_devices.max(1))
        };
        // Slots still in mailboxes hold the arena.
        drop(handoff);
        self.keep_arena(arena);
        let results = match results {
            Ok(results) => results,
            Err(err) => {
                shutdown(&channels, nix::sys::socket::Shutdown::Both);
                return Err(err);
            }
        };
        shutdown(&channels, nix::sys::socket::Shutdown::Write);
        let mut report = SourceReport {
            devices: vec![SourceDeviceReport::default(); n_devices],
            channels: vec![ChannelReport::default(); n_channels],
            notes: Vec::new(),
            workers: Some(ran),
            rings: Vec::new(),
        };
        if handed_off {
            report.notes.push(format!(
                "handoff: {n_devices} reading and {} sending workers (fewer devices than workers)",
                workers - n_devices
            ));
        }
        for (devs, chans, notes, path) in results {
            report.rings.push(path);
            for (i, d) in devs {
                report.devices[i] = d;
            }
            for (i, c) in chans {
                report.channels[i] = c;
            }
            report.notes.extend(notes);
        }
        Ok(report)
    }

    fn run_dest(&self, plan: DestPlan) -> Result<DestReport, DataPlaneError> {
        check_dest_plan("uring", &plan)?;
        let DestPlan {
            devices,
            channels,
            progress,
        } = plan;
        let n_channels = channels.len();
        let workers = self.config.workers.clamp(1, n_channels);
        let shared = DestShared::new(devices, &self.config, workers, n_channels);
        let worker_channels: Vec<OwnedFd> = channels
            .iter()
            .map(|fd| {
                fd.try_clone().map_err(|source| DataPlaneError::Setup {
                    engine: "uring",
                    source,
                })
            })
            .collect::<Result<_, _>>()?;
        let per_worker = split_round_robin(worker_channels, workers);
        let (arena, pools) = self.worker_pools(workers)?;
        let notes = std::thread::scope(|scope| {
            let handles: Vec<_> = per_worker
                .into_iter()
                .zip(pools)
                .enumerate()
                .map(|(w, (chans, pool))| {
                    let (shared, progress) = (&shared, &*progress);
                    let spawned = std::thread::Builder::new()
                        .name(format!("uring-{w}"))
                        .spawn_scoped(scope, move || {
                            let result = self.dest_worker(w, chans, pool, shared, progress);
                            let result = record_failure(result, &shared.failure, progress);
                            if result.is_err() {
                                shared.wake_all();
                            }
                            result
                        });
                    // The other workers stop now: a device can complete only with every channel.
                    if let Err(err) = &spawned {
                        shared.failure.set(spawn_failed(err));
                        shared.wake_all();
                    }
                    spawned
                })
                .collect();
            join_workers(handles, &shared.failure, &progress)
        });
        self.keep_arena(arena);
        let workers = match notes {
            Ok(workers) => workers,
            Err(err) => {
                shutdown(&channels, nix::sys::socket::Shutdown::Both);
                return Err(err);
            }
        };
        let (notes, rings): (Vec<_>, Vec<_>) = workers.into_iter().unzip();
        shared.into_report(notes.into_iter().flatten().collect(), rings)
    }
}

#[cfg(test)]
mod tests;
