//! Fault devices: [`SimSource::with_fault`](super::SimSource::with_fault) and
//! [`SimSink::with_fault`](super::SimSink::with_fault) build devices whose real `read()` /
//! `write()` misbehave:
//!
//! | fault | fd | source (read) | sink (write) |
//! |---|---|---|---|
//! | [`Fault::Errno`] | FUSE file | bytes up to `at`, then `errno` on every read | accepted up to `at` (a short write), then `errno` |
//! | [`Fault::NotReady`] | FUSE file | bytes up to `at`, then EAGAIN `reads` times (nothing saved yet, as an O_NONBLOCK mlx5 data_fd says), then the rest | — |
//! | [`Fault::ShortReads`] | pipe | each read returns at most `max` bytes | — |
//! | [`Fault::Stall`] | pipe | nothing past `at` for `duration`, then the rest | the device stops taking bytes at `at` for `duration` |
//! | [`Fault::EndEarly`] | pipe | read 0 (EOF) at `at`, before `size` | — |
//!
//! The FUSE file is served in-process (hand-rolled `/dev/fuse` protocol, no libfuse) on a
//! file mountpoint in the temp dir, opened `FOPEN_DIRECT_IO | FOPEN_STREAM` like a real
//! data_fd (no page cache, no offsets). A FUSE source in PRE_COPY returns ENOMSG once the
//! precopy part is drained (mlx5's behaviour). Mounting needs CAP_SYS_ADMIN and `/dev/fuse`:
//! [`fuse_available`] says whether this machine has them.

use std::sync::OnceLock;
use std::time::Duration;

use super::fuse::probe_fuse;
use super::SimSpec;
use crate::VfioError;

/// How a fault device misbehaves (see the module table).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// read()/write() fail with `errno` once the stream reaches byte `at` (FUSE).
    Errno {
        /// Stream offset of the first byte that fails.
        at: u64,
        /// The errno (e.g. `libc::EIO`, `libc::ENODEV`).
        errno: i32,
    },
    /// Once the stream reaches byte `at`, the next `reads` reads fail with EAGAIN, then the
    /// stream goes on (FUSE; the file has no poll, so it always looks readable).
    NotReady {
        /// Stream offset where the device has nothing ready.
        at: u64,
        /// How many reads say EAGAIN.
        reads: u32,
    },
    /// Every read returns at most `max` bytes (pipe).
    ShortReads {
        /// Most bytes per read.
        max: usize,
    },
    /// The stream stops at byte `at` for `duration`, then continues (pipe).
    Stall {
        /// Stream offset where it stalls.
        at: u64,
        /// How long.
        duration: Duration,
    },
    /// The stream ends (read 0) at byte `at`, short of `size` (pipe).
    EndEarly {
        /// Stream offset of the early end.
        at: u64,
    },
}

impl Fault {
    pub(crate) fn validate_source(&self, device: &str, spec: &SimSpec) -> Result<(), VfioError> {
        let bad = |reason| {
            Err(VfioError::InvalidSpec {
                device: device.to_owned(),
                reason,
            })
        };
        match *self {
            Fault::Errno { at, errno } => {
                if errno <= 0 {
                    return bad("Fault::Errno needs a positive errno");
                }
                if at >= spec.size {
                    return bad("Fault::Errno offset must be inside the stream");
                }
                if spec.speed.is_some() {
                    return bad("a FUSE errno device does not model speed");
                }
            }
            Fault::NotReady { at, reads } => {
                if reads == 0 || at >= spec.size {
                    return bad("Fault::NotReady needs reads > 0 at an offset inside the stream");
                }
                if spec.speed.is_some() {
                    return bad("a FUSE not-ready device does not model speed");
                }
            }
            Fault::ShortReads { max } => {
                if max == 0 {
                    return bad("Fault::ShortReads needs max > 0");
                }
            }
            Fault::Stall { at, .. } => {
                if at > spec.size {
                    return bad("Fault::Stall offset must be inside the stream");
                }
            }
            Fault::EndEarly { at } => {
                if at >= spec.size {
                    return bad("Fault::EndEarly offset must be before the end");
                }
            }
        }
        Ok(())
    }

    pub(crate) fn validate_sink(&self, device: &str, spec: &SimSpec) -> Result<(), VfioError> {
        let bad = |reason| {
            Err(VfioError::InvalidSpec {
                device: device.to_owned(),
                reason,
            })
        };
        match *self {
            Fault::Errno { at, errno } => {
                if errno <= 0 {
                    return bad("Fault::Errno needs a positive errno");
                }
                if at > spec.size {
                    return bad("Fault::Errno offset must be inside the stream");
                }
                if spec.speed.is_some() {
                    return bad("a FUSE errno device does not model speed");
                }
                Ok(())
            }
            Fault::Stall { at, .. } => {
                if at > spec.size {
                    return bad("Fault::Stall offset must be inside the stream");
                }
                Ok(())
            }
            Fault::ShortReads { .. } | Fault::EndEarly { .. } | Fault::NotReady { .. } => {
                bad("a sink fault must be Errno or Stall")
            }
        }
    }
}

/// Whether FUSE fault devices work here (`/dev/fuse` opens and a mount succeeds); checked
/// once per process. The error names what failed.
pub fn fuse_available() -> Result<(), VfioError> {
    static PROBE: OnceLock<Result<(), (&'static str, i32)>> = OnceLock::new();
    match PROBE.get_or_init(|| {
        probe_fuse().map_err(|(step, e)| (step, e.raw_os_error().unwrap_or(libc::EIO)))
    }) {
        Ok(()) => Ok(()),
        Err((step, errno)) => Err(VfioError::Io {
            device: "fault device".to_owned(),
            step,
            source: std::io::Error::from_raw_os_error(*errno),
        }),
    }
}
