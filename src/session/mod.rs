//! Sessions: a migration as devices, packets and channels (never syscalls).
//!
//! - [`channels`]: connect / accept the main and multifd channels, init packets;
//! - [`main_channel`]: the standalone main channel (QEMU main-stream framing);
//! - [`source`] and [`dest`]: the two state machines, each with one step function;
//! - [`driver`]: engine and reader threads, the event queue, stall detection and cancel;
//! - [`link`]: what a VMM-driven session tells the control thread and hears from it;
//! - [`precopy`]: the source's precopy thread (under a VMM);
//! - [`stream`]: a connected TCP or unix stream socket;
//! - [`reassembly`]: per-device ordering by idx on the destination (used by the engines).
//!
//! # Two helpers without a VMM (`send`, `recv`, `demo`)
//!
//! The source helper plays QEMU's migration thread on its own main channel, in QEMU's framing
//! where QEMU has an equivalent (record table in [`main_channel`]):
//!
//! ```mermaid
//! sequenceDiagram
//!     participant S as source helper
//!     participant D as destination helper
//!     S->>D: main: QEVM 00000003, CONFIGURATION (uuid)
//!     S->>D: main: SECTION_START per device (idstr, instance id), DEV_SETUP_STATE, END_OF_STATE, footer
//!     S->>D: main: VMDESCRIPTION {"vfio-multifd": {version, channels, chunk}}
//!     Note over D: setup checked at once: uuid, channel count, chunk, device list
//!     S->>D: multifd 0..N-1: MultiFDInit_t (any order)
//!     Note over D: devices RUNNING -> RESUMING, engine receives
//!     D-->>S: return path: SWITCHOVER_ACK (00 07 00 00)
//!     Note over S: VM stopped: downtime starts
//!     S->>D: main: SWITCHOVER_START (08 00 0b 00 00)
//!     Note over S: devices -> RUNNING_P2P (all, where they have it), then STOP_COPY; engine sends
//!     S->>D: multifd: device-state packets (idx 0..n-1, then the config packet), EOF
//!     S->>D: main: SECTION_END per device (END_OF_STATE, footer), EOF (00)
//!     Note over D: every device loaded, every channel at EOF, main EOF read
//!     Note over D: devices RESUMING -> STOP (stream checked), config checked, then all RUNNING_P2P, then RUNNING
//!     D-->>S: return path: VFIO_MULTIFD_RESULT {ok, devices} + SHUT 0
//!     Note over S: devices STOP_COPY -> STOP
//! ```
//!
//! On failure the destination sends `VFIO_MULTIFD_RESULT {ok: false, error}` + `SHUT 1` when
//! its main channel is up, resets the devices it owns and exits non-zero; the source, on that
//! message, on any local error, or when the destination vanishes, cancels its engine, returns
//! every device to RUNNING (STOP_COPY -> STOP -> RUNNING_P2P for all, then RUNNING) and exits
//! non-zero with the destination's text, which names the device.
//!
//! # Under a VMM (`serve`)
//!
//! The same two state machines, driven through a [`link::ControlLink`] by
//! [`crate::control`]: channels may be passed in (unix socketpairs or TCP), precopy devices
//! stream their precopy data on the main channel as QEMU's VFIO `SECTION_PART`s and hold back
//! SWITCHOVER_ACK until their `DEV_INIT_DATA_SENT` is loaded, the source waits for the VMM's
//! `switchover-start` after the ack, devices in `data-fd` mode are only read or written (the
//! VMM drives their states and recovers them on failure), and the destination reports each
//! loaded device with its config and leaves helper-driven devices in STOP. The protocol
//! reference is `docs/control-protocol.md`.
//!
//! # Timing
//!
//! All timestamps are CLOCK_MONOTONIC ([`crate::engine::monotonic_ns`]), comparable across
//! processes on one machine. Downtime is SWITCHOVER_START sent (source) -> last device loaded
//! (destination) when both sides run on one host (`demo`); the source alone can only bound it
//! by SWITCHOVER_START -> result received, the destination alone by SWITCHOVER_START
//! received -> last device loaded.

pub mod channels;
pub mod dest;
pub mod driver;
pub mod link;
pub mod main_channel;
pub mod precopy;
pub mod reassembly;
pub mod source;
pub mod stream;

/// Moves `device` to its P2P waypoint on the way to `target` ([`p2p_waypoint`]), if it has one;
/// callers move every device this way before any moves on.
pub(crate) fn to_p2p_waypoint(
    device: &mut dyn vfio::MigrationDevice,
    id: &crate::wire::DeviceId,
    target: vfio::MigState,
) -> Result<(), crate::error::SessionError> {
    use crate::error::SessionError;
    let waypoint = p2p_waypoint(device, target).map_err(|source| SessionError::DeviceGetState {
        device: id.clone(),
        source,
    })?;
    if let Some(to) = waypoint {
        device
            .set_state(to)
            .map_err(|source| SessionError::DeviceState {
                device: id.clone(),
                to,
                source,
            })?;
    }
    Ok(())
}

/// The P2P state `device` must reach, with every other device of the VM, before any of them
/// moves on to `target`: the uAPI's P2P states start no new peer DMA but still answer it, so a
/// device is stopped (or started) only once no peer can still start DMA into it (QEMU's
/// `vfio_vmstate_change_prepare` does the same). `None` when the device has no P2P states or
/// no P2P state lies between where it is and `target`.
fn p2p_waypoint(
    device: &dyn vfio::MigrationDevice,
    target: vfio::MigState,
) -> Result<Option<vfio::MigState>, vfio::VfioError> {
    use vfio::MigState::{Error, PreCopy, PreCopyP2p, Running, RunningP2p};
    if !device
        .migration_flags()?
        .contains(vfio::MigrationFlags::P2P)
    {
        return Ok(None);
    }
    let current = device.state()?;
    let running = |s| matches!(s, Running | PreCopy);
    Ok(match (current, target) {
        // Stopping: PRE_COPY keeps its data_fd through PRE_COPY_P2P.
        (PreCopy, t) if !running(t) => Some(PreCopyP2p),
        (Running, t) if !running(t) && t != RunningP2p => Some(RunningP2p),
        // Starting from a stopped state.
        (c, Running) if !running(c) && !matches!(c, PreCopyP2p | Error) => Some(RunningP2p),
        _ => None,
    })
}
