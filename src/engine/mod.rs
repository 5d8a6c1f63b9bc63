//! The data plane behind one small interface with two implementations:
//! - `uring` (default): per-core io_uring workers, registered buffers, a `data_fd` read linked
//!   to the channel send of the same buffer, payload received straight into the buffer it is
//!   written to the destination `data_fd` from;
//! - `threads`: the seed's design (QEMU 10.0), a save thread per device, a sender thread per
//!   channel, a receiver thread per channel and a load thread per device, with its copies. It is
//!   the fallback where io_uring is unavailable and the honest baseline in benchmarks.
//!
//! Engines speak in devices, packets and channels. The session hands an engine channels whose
//! init packets were already exchanged, and devices already in STOP_COPY (source) or RESUMING
//! (destination); the engine moves bytes and returns what it measured.

#[cfg(test)]
mod conformance;
pub mod threads;
pub mod uring;

use std::io;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::session::reassembly::ReassemblyError;
use crate::wire::{DeviceId, WireError};

/// Which engine moves the bytes.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum EngineKind {
    Uring,
    Threads,
}

impl EngineKind {
    pub fn name(self) -> &'static str {
        match self {
            Self::Uring => "uring",
            Self::Threads => "threads",
        }
    }
}

/// Settings both engines understand.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// io_uring workers (one ring each) per side; the threads engine ignores it.
    pub workers: usize,
    /// Bytes of device data per packet (per `data_fd` read), QEMU's 1 MiB by default.
    pub chunk_size: usize,
    /// Packet buffers per side, fixed at start: bounds memory together with `chunk_size`.
    pub pool_buffers: usize,
    /// Largest `next_packet_size` a destination accepts before reading the payload.
    pub max_packet_size: u32,
    /// Per device, bytes of out-of-order VFIO data (excluding the 12-byte header, including
    /// the config blob) a destination may hold; QEMU 10.1 `x-migration-max-queued-buffers-size`.
    /// Beyond it the destination stops reading the channel instead of failing. A device's own
    /// [`DestDevice::max_queued_bytes`] replaces it.
    pub max_queued_bytes: u64,
    /// Bytes of VFIO data (counted as for `max_queued_bytes`) all devices of a destination run
    /// may queue together in the threads engine, [`QUEUE_CAP_TOTAL_BYTES`] by default. Beyond it
    /// the threads engine stops reading the channel, as for a device's own limit. The uring
    /// engine does not apply it: its pool bounds it, except packets bigger than a slot (a
    /// `max_packet_size` above `chunk_size`), which it holds on the heap, bounded per device.
    pub max_total_queued_bytes: u64,
    /// io_uring features the engine must not use (forced fallbacks).
    pub forbid: ::uring::FeatureMask,
    /// Save devices one after another instead of all at once: how QEMU before 10.0 (and 10.x
    /// with `x-migration-multifd-transfer=off`) streamed device state on its main channel.
    /// The benchmark's `single` row models that baseline with one channel and this set.
    pub sequential_devices: bool,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            workers: std::thread::available_parallelism().map_or(1, |n| n.get()),
            chunk_size: 1 << 20,
            pool_buffers: 32,
            max_packet_size: (64 << 20) + crate::wire::VFIO_HEADER_LEN as u32,
            max_queued_bytes: u64::MAX,
            max_total_queued_bytes: QUEUE_CAP_TOTAL_BYTES,
            forbid: ::uring::FeatureMask::empty(),
            sequential_devices: false,
        }
    }
}

/// Out-of-order bytes one destination device may queue at most in either engine, whatever the
/// queued-bytes limit (QEMU's default is none) and whatever the peer sends: memory stays
/// bounded, and a well-behaved source (channels a few packets apart) never comes near it.
pub const QUEUE_CAP_BYTES: u64 = 256 << 20;
/// Out-of-order packets one destination device may queue at most in either engine: what
/// bounds packets without data.
pub const QUEUE_CAP_PACKETS: usize = 4096;
/// Bytes all devices of one destination run may queue together in the threads engine, by
/// default ([`EngineConfig::max_total_queued_bytes`]): [`QUEUE_CAP_BYTES`] alone lets a peer make
/// a destination of 256 devices hold 64 GiB. 1 GiB (4 x [`QUEUE_CAP_BYTES`]) still lets four
/// devices fill their own cap at once, while a well-behaved source, whose channels run a few
/// packets apart, queues about channels x packet size (64 channels of QEMU's 1 MiB packets:
/// 64 MiB). As for a device's cap, a device's next packet in order is admitted regardless
/// (it is written at once), so each device may add one packet to it.
pub const QUEUE_CAP_TOTAL_BYTES: u64 = 4 * QUEUE_CAP_BYTES;

impl EngineConfig {
    /// The queued-bytes limit a destination engine applies to `device`: its own limit, else
    /// `max_queued_bytes`, never more than [`QUEUE_CAP_BYTES`].
    pub fn queued_bytes_limit(&self, device: &DestDevice) -> u64 {
        device
            .max_queued_bytes
            .unwrap_or(self.max_queued_bytes)
            .min(QUEUE_CAP_BYTES)
    }

    /// A destination device's reassembly, bounded the same way by every engine: at most
    /// [`Self::queued_bytes_limit`] bytes in [`QUEUE_CAP_PACKETS`] packets queued.
    fn dest_reassembly<B>(&self, device: &DestDevice) -> crate::session::reassembly::Reassembly<B> {
        crate::session::reassembly::Reassembly::new(self.queued_bytes_limit(device))
            .with_packet_limit(QUEUE_CAP_PACKETS)
    }
}

/// A source device as the engine sees it: a stream to read to its end and a name.
#[derive(Debug)]
pub struct SourceDevice {
    pub id: DeviceId,
    /// The saving `data_fd` (the device is in STOP_COPY): read until it returns 0.
    pub data_fd: OwnedFd,
    /// Bytes per read, at most `EngineConfig::chunk_size` (QEMU: min(1 MiB, stop-copy size)).
    pub read_size: usize,
    /// The config blob, sent last in the packet with the CONFIG flag.
    pub config: Vec<u8>,
}

/// A destination device: a resuming `data_fd` written in idx order.
#[derive(Debug)]
pub struct DestDevice {
    pub id: DeviceId,
    pub data_fd: OwnedFd,
    /// This device's queued-bytes limit (QEMU 10.1's per-device
    /// `x-migration-max-queued-buffers-size`); `None` takes [`EngineConfig::max_queued_bytes`].
    pub max_queued_bytes: Option<u64>,
}

/// Counters the control thread and the progress bar read while an engine runs.
#[derive(Debug, Default)]
pub struct Progress {
    /// Device data bytes read (source) or written (destination).
    pub bytes: AtomicU64,
    pub packets: AtomicU64,
    /// Set by the session to stop the engine; engines notice within one operation.
    pub cancel: AtomicBool,
    /// Milliseconds a stopping engine may wait for its cancelled I/O before it gives up on it
    /// (0: [`DEFAULT_CANCEL_DRAIN`]); see [`Progress::cancel_drain`].
    cancel_drain_ms: AtomicU64,
    /// What a cancelled engine still had in flight ("channel 2: send of idx 188 of device X
    /// outstanding 3.0 s"), for the session's stall error: the stall names no channel or
    /// device otherwise.
    outstanding: Mutex<Vec<String>>,
}

/// How long a stopping engine waits for its cancelled I/O where no session set a bound.
pub const DEFAULT_CANCEL_DRAIN: std::time::Duration = std::time::Duration::from_secs(5);

impl Progress {
    pub fn add(&self, bytes: usize) {
        self.bytes.fetch_add(bytes as u64, Ordering::Relaxed);
        self.packets.fetch_add(1, Ordering::Relaxed);
    }

    pub fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::Relaxed)
    }

    /// How long a failed or cancelled engine waits for its cancelled I/O to finish before it
    /// leaks the buffers instead (the kernel may still write them). The session waits only its
    /// timeout for the engine after a cancel and then rolls the devices back, which must not
    /// happen under a running engine, so the session sets this below that timeout.
    pub fn cancel_drain(&self) -> std::time::Duration {
        match self.cancel_drain_ms.load(Ordering::Relaxed) {
            0 => DEFAULT_CANCEL_DRAIN,
            ms => std::time::Duration::from_millis(ms),
        }
    }

    /// An engine cancelled by the session says what it still had in flight.
    pub fn report_outstanding(&self, lines: impl IntoIterator<Item = String>) {
        self.outstanding
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(lines);
    }

    /// What the engine reported outstanding at its cancel (once the engine has stopped).
    pub fn take_outstanding(&self) -> Vec<String> {
        std::mem::take(&mut *self.outstanding.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Sets [`Self::cancel_drain`] (at least 1 ms).
    pub fn set_cancel_drain(&self, drain: std::time::Duration) {
        let ms = u64::try_from(drain.as_millis()).unwrap_or(u64::MAX).max(1);
        self.cancel_drain_ms.store(ms, Ordering::Relaxed);
    }
}

/// What the source side is asked to move.
#[derive(Debug)]
pub struct SourcePlan {
    pub devices: Vec<SourceDevice>,
    /// Connected stream sockets, init packets already sent; index = channel id.
    pub channels: Vec<OwnedFd>,
    pub progress: Arc<Progress>,
}

/// What the destination side is asked to receive.
#[derive(Debug)]
pub struct DestPlan {
    pub devices: Vec<DestDevice>,
    /// Accepted stream sockets, init packets already validated; index = channel id.
    pub channels: Vec<OwnedFd>,
    pub progress: Arc<Progress>,
}

/// Per device, what the source did. `read_issued_ns[idx]` is CLOCK_MONOTONIC when the read of
/// data packet idx was issued (the config packet has no read), for the first
/// [`MAX_PACKET_TIMESTAMPS`] packets.
#[derive(Debug, Clone, Default)]
pub struct SourceDeviceReport {
    pub bytes: u64,
    pub data_packets: u32,
    pub read_issued_ns: Vec<u64>,
}

#[derive(Debug, Clone, Default)]
pub struct ChannelReport {
    pub bytes: u64,
    pub packets: u64,
}

#[derive(Debug, Clone, Default)]
pub struct SourceReport {
    pub devices: Vec<SourceDeviceReport>,
    pub channels: Vec<ChannelReport>,
    /// One line per fallback the engine took (no pinning, SEND_ZC copied, ...).
    pub notes: Vec<String>,
    /// io_uring workers (one ring and thread each) that ran; None for the threads engine.
    pub workers: Option<usize>,
    /// The path each worker's ring took (empty for the threads engine).
    pub rings: Vec<::uring::RingPath>,
}

/// Per device, what the destination did. `written_ns[idx]` is CLOCK_MONOTONIC when data packet
/// idx was completely written to the device, for the first [`MAX_PACKET_TIMESTAMPS`] packets.
#[derive(Debug, Clone, Default)]
pub struct DestDeviceReport {
    pub bytes: u64,
    pub data_packets: u32,
    pub written_ns: Vec<u64>,
    /// The config blob (config space belongs to the VMM).
    pub config: Vec<u8>,
    /// CLOCK_MONOTONIC when the device was loaded (config packet and every lower idx done).
    pub loaded_ns: u64,
    /// The most VFIO data bytes this device held at once, received or being received and not
    /// yet written: at most its queued-bytes limit plus the packet next in order.
    pub peak_queued_bytes: u64,
}

#[derive(Debug, Clone, Default)]
pub struct DestReport {
    pub devices: Vec<DestDeviceReport>,
    pub channels: Vec<ChannelReport>,
    pub notes: Vec<String>,
    /// io_uring workers that ran; None for the threads engine.
    pub workers: Option<usize>,
    /// The path each worker's ring took (empty for the threads engine).
    pub rings: Vec<::uring::RingPath>,
}

/// A data-plane failure: always names the channel, the device and the idx it knows.
#[derive(Debug, thiserror::Error)]
pub enum DataPlaneError {
    #[error("reading data_fd of device {device} for idx {idx}")]
    ReadDevice {
        device: DeviceId,
        idx: u32,
        #[source]
        source: io::Error,
    },
    #[error("writing idx {idx} to data_fd of device {device} (received on channel {channel})")]
    WriteDevice {
        device: DeviceId,
        idx: u32,
        channel: usize,
        #[source]
        source: io::Error,
    },
    #[error("sending idx {idx} of device {device} on channel {channel}")]
    Send {
        channel: usize,
        device: DeviceId,
        idx: u32,
        #[source]
        source: io::Error,
    },
    #[error("receiving on channel {channel} at stream offset {offset}")]
    Recv {
        channel: usize,
        offset: u64,
        #[source]
        source: io::Error,
    },
    #[error("channel {channel}: malformed packet at stream offset {offset}")]
    Wire {
        channel: usize,
        offset: u64,
        #[source]
        source: WireError,
    },
    #[error("channel {channel}: unexpected EOF after packet header at stream offset {offset}")]
    TruncatedPacket { channel: usize, offset: u64 },
    /// The packet's header named its device (and, where its VFIO header was read, its idx).
    #[error("channel {channel}: unexpected EOF in the payload of device {device}{} (packet at stream offset {offset})", idx_text(.idx))]
    TruncatedPayload {
        channel: usize,
        device: DeviceId,
        idx: Option<u32>,
        offset: u64,
    },
    #[error("receiving the payload of device {device}{} on channel {channel} (packet at stream offset {offset})", idx_text(.idx))]
    RecvPayload {
        channel: usize,
        device: DeviceId,
        idx: Option<u32>,
        offset: u64,
        #[source]
        source: io::Error,
    },
    #[error("channel {channel}: Unknown idstr {idstr} or instance id {instance_id} for load state buffer (stream offset {offset})")]
    UnknownDevice {
        channel: usize,
        idstr: String,
        instance_id: u32,
        offset: u64,
    },
    #[error("channel {channel}: device {device} idx {idx}")]
    Reassembly {
        channel: usize,
        device: DeviceId,
        idx: u32,
        #[source]
        source: ReassemblyError,
    },
    #[error("every channel closed but device {device} is not loaded: next idx {next_idx}, config idx {config_idx:?}")]
    Incomplete {
        device: DeviceId,
        next_idx: u32,
        config_idx: Option<u32>,
    },
    #[error("no progress possible: {detail}")]
    Stalled { detail: String },
    #[error("cancelled")]
    Cancelled,
    /// A worker's ring failed to submit or wait (not one op: every op of the worker stops).
    #[error("io_uring worker {worker} ({serves}): submitting and waiting for completions")]
    Ring {
        worker: usize,
        /// What the worker served: its channels and devices.
        serves: String,
        #[source]
        source: io::Error,
    },
    #[error("setting up the {engine} engine")]
    Setup {
        engine: &'static str,
        #[source]
        source: io::Error,
    },
}

/// What both engines refuse before they start: no channels, a read size outside 1..=chunk, a
/// config blob that does not fit a packet.
fn check_source_plan(
    engine: &'static str,
    config: &EngineConfig,
    plan: &SourcePlan,
) -> Result<(), DataPlaneError> {
    let invalid = |why| invalid_plan(engine, why);
    if plan.channels.is_empty() {
        return Err(invalid("no channels".into()));
    }
    let max_data = u32::MAX as usize - crate::wire::VFIO_HEADER_LEN;
    let max_read = config.chunk_size.min(max_data);
    for device in &plan.devices {
        if device.read_size == 0 || device.read_size > max_read {
            return Err(invalid(format!(
                "device {}: read size {} is not in 1..={max_read}",
                device.id, device.read_size
            )));
        }
        if device.config.len() > max_data {
            return Err(invalid(format!(
                "device {}: config blob of {} bytes does not fit a packet",
                device.id,
                device.config.len()
            )));
        }
    }
    Ok(())
}

/// What both engines refuse before they start: no channels, a device listed twice.
fn check_dest_plan(engine: &'static str, plan: &DestPlan) -> Result<(), DataPlaneError> {
    let invalid = |why| invalid_plan(engine, why);
    if plan.channels.is_empty() {
        return Err(invalid("no channels".into()));
    }
    for (i, device) in plan.devices.iter().enumerate() {
        if plan.devices[..i].iter().any(|d| d.id == device.id) {
            return Err(invalid(format!("device {} is listed twice", device.id)));
        }
    }
    Ok(())
}

/// Data packet `idx` of `device` may be sent: idx u32::MAX is invalid on the wire, and the
/// config packet needs the idx after the last data packet.
fn check_data_idx(device: &DeviceId, idx: u32) -> Result<(), DataPlaneError> {
    if idx >= u32::MAX - 1 {
        return Err(DataPlaneError::ReadDevice {
            device: device.clone(),
            idx,
            source: io::Error::other("more data packets than a u32 idx can number"),
        });
    }
    Ok(())
}

fn invalid_plan(engine: &'static str, why: String) -> DataPlaneError {
    DataPlaneError::Setup {
        engine,
        source: io::Error::new(io::ErrorKind::InvalidInput, why),
    }
}

fn idx_text(idx: &Option<u32>) -> String {
    idx.map(|idx| format!(" idx {idx}")).unwrap_or_default()
}

/// One op set, two implementations.
pub trait Engine: Send + Sync {
    fn kind(&self) -> EngineKind;
    /// Streams every device to its end, then its config packet, spread over all channels;
    /// returns once every packet was handed to the kernel and the channels were shut down for
    /// writing.
    fn run_source(&self, plan: SourcePlan) -> Result<SourceReport, DataPlaneError>;
    /// Receives until every device is loaded and every channel reached a clean EOF.
    fn run_dest(&self, plan: DestPlan) -> Result<DestReport, DataPlaneError>;
}

/// The engine for `kind`; `Uring` falls back to `Threads` (with one log line saying why) where
/// io_uring cannot be set up.
pub fn select(kind: EngineKind, config: &EngineConfig) -> Box<dyn Engine> {
    match kind {
        EngineKind::Threads => Box::new(threads::ThreadsEngine::new(config.clone())),
        EngineKind::Uring => match uring::UringEngine::new(config.clone()) {
            Ok(engine) => Box::new(engine),
            Err(why) => {
                log::warn!("io_uring unavailable ({why}); using the threads engine");
                Box::new(threads::ThreadsEngine::new(config.clone()))
            }
        },
    }
}

/// Per device, how many per-packet timestamps a report keeps (`read_issued_ns`, `written_ns`):
/// those of idx 0 up to this. They are 8 bytes a packet, and a peer may send millions of tiny
/// packets, so without a bound memory, the REPORT event and `query`'s `timestamps-ns` grow with
/// the stream. At QEMU's 1 MiB packets this covers 64 GiB per device, so every packet of a real
/// device; past it, latencies describe the first packets. Both sides keep the same idx, so
/// pairing by position (`metrics::pair_latencies`) stays right.
pub const MAX_PACKET_TIMESTAMPS: usize = 1 << 16;

/// Records `ns` as data packet `idx`'s timestamp in `samples` (indexed by idx), unless idx is
/// past [`MAX_PACKET_TIMESTAMPS`]. Indexed rather than pushed so a caller need not rely on
/// packets completing in idx order to keep positions and idx together.
pub(crate) fn record_packet_ns(samples: &mut Vec<u64>, idx: u32, ns: u64) {
    let idx = idx as usize;
    if idx >= MAX_PACKET_TIMESTAMPS {
        return;
    }
    if samples.len() <= idx {
        samples.resize(idx + 1, 0);
    }
    samples[idx] = ns;
}

/// CLOCK_MONOTONIC in nanoseconds: comparable across processes on one machine, so a source
/// and a destination helper can pair their per-packet timestamps.
/// Only timestamps depend on it: where the clock cannot be read (never on Linux, whose vDSO
/// serves it), 0 rather than a panic on the data path.
pub fn monotonic_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).map_or(0, |ts| {
        ts.tv_sec() as u64 * 1_000_000_000 + ts.tv_nsec() as u64
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_data_idx_leaves_one_for_the_config_packet_and_never_uses_u32_max() {
        let device = DeviceId::new("0000:3b:00.1/vfio", 7).expect("valid id");
        assert!(check_data_idx(&device, 0).is_ok());
        assert!(check_data_idx(&device, u32::MAX - 2).is_ok());
        for idx in [u32::MAX - 1, u32::MAX] {
            let err = check_data_idx(&device, idx).expect_err("no idx left");
            let text = err.to_string();
            assert!(
                text.contains("0000:3b:00.1/vfio") && text.contains(&idx.to_string()),
                "{text}"
            );
        }
    }
}
