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
//!     Note over S: devices -> STOP_COPY, engine sends
//!     S->>D: multifd: device-state packets (idx 0..n-1, then the config packet), EOF
//!     S->>D: main: SECTION_END per device (END_OF_STATE, footer), EOF (00)
//!     Note over D: every device loaded, every channel at EOF, main EOF read
//!     Note over D: devices RESUMING -> STOP (stream checked) -> RUNNING, config checked
//!     D-->>S: return path: VFIO_MULTIFD_RESULT {ok, devices} + SHUT 0
//!     Note over S: devices STOP_COPY -> STOP
//! ```
//!
//! On failure the destination sends `VFIO_MULTIFD_RESULT {ok: false, error}` + `SHUT 1` when
//! its main channel is up, resets the devices it owns and exits non-zero; the source, on that
//! message, on any local error, or when the destination vanishes, cancels its engine, returns
//! every device to RUNNING (STOP_COPY -> STOP -> RUNNING) and exits non-zero with the
//! destination's text, which names the device.
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
