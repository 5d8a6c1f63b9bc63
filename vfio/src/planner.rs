//! Transition planning: the kernel's next-hop table (`vfio_mig_get_next_state` in
//! `drivers/vfio/vfio_main.c`) plus the helper's own rules (`../shared/docs/vfio-uapi.md`
//! §1.3).
//!
//! [`plan`] returns the single arcs to take, one SET each, so a failure names the exact arc and
//! a data_fd can only appear on the arc that must open it:
//!
//! The single arcs (uAPI comment in `vfio.h`); states a device lacks are skipped over:
//!
//! ```text
//! STOP -> RUNNING_P2P | STOP_COPY* | RESUMING*      RUNNING -> RUNNING_P2P | PRE_COPY*
//! RUNNING_P2P -> STOP | RUNNING | PRE_COPY_P2P*     PRE_COPY -> RUNNING | PRE_COPY_P2P
//! PRE_COPY_P2P -> PRE_COPY | RUNNING_P2P | STOP_COPY
//! STOP_COPY -> STOP                                 RESUMING -> STOP
//! (* opens a data_fd; PRE_COPY, PRE_COPY_P2P and STOP_COPY share one saving data_fd)
//! ```
//!
//! Helper rules on top of the kernel's table:
//! - ERROR is never requested; from ERROR only RESET helps ([`PlanError::FromError`]).
//! - PRE_COPY(_P2P) -> STOP or RESUMING would pass through RUNNING and end the saving session:
//!   refused ([`PlanError::EndsSavingSession`]); ask for STOP_COPY (or RUNNING to cancel).
//! - STOP_COPY -> PRE_COPY(_P2P) is refused ([`PlanError::BackToPrecopy`]).
//! - States whose flag the device lacks are refused; optional states on the way are skipped as
//!   the kernel skips them.

use crate::{MigState, MigrationFlags};

/// Why no plan exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    /// ERROR can never be requested.
    #[error("ERROR cannot be requested")]
    ErrorRequested,
    /// The device is in ERROR.
    #[error("the device is in ERROR; only VFIO_DEVICE_RESET leaves it")]
    FromError,
    /// The device has no STOP_COPY flag, so no migration at all.
    #[error("the device does not support migration (flags {flags})")]
    NoMigration {
        /// Its flags.
        flags: MigrationFlags,
    },
    /// A state the device lacks.
    #[error("the device has no {state} state (flags {flags})")]
    Unsupported {
        /// The missing state.
        state: MigState,
        /// The device's flags.
        flags: MigrationFlags,
    },
    /// Leaving precopy for STOP or RESUMING would end the saving session through RUNNING.
    #[error("{from} -> {to} would end the saving session through RUNNING; ask for STOP_COPY to finish saving, or RUNNING to cancel")]
    EndsSavingSession {
        /// The precopy state.
        from: MigState,
        /// The refused target.
        to: MigState,
    },
    /// Precopy cannot restart once stop-copy began.
    #[error("STOP_COPY -> {to} is forbidden: precopy cannot follow stop-copy")]
    BackToPrecopy {
        /// The refused target.
        to: MigState,
    },
}

/// One row lookup of the kernel's `vfio_from_fsm_table` (every feature supported).
fn fsm_table(cur: MigState, new: MigState) -> MigState {
    use MigState::*;
    if cur == new {
        return cur;
    }
    if new == Error || cur == Error {
        return Error;
    }
    match cur {
        Stop => match new {
            StopCopy | Resuming | RunningP2p => new,
            _ => RunningP2p,
        },
        Running => match new {
            PreCopy => PreCopy,
            _ => RunningP2p,
        },
        PreCopy => match new {
            PreCopyP2p | StopCopy => PreCopyP2p,
            _ => Running,
        },
        PreCopyP2p => match new {
            StopCopy | PreCopy => new,
            _ => RunningP2p,
        },
        StopCopy | Resuming => Stop,
        RunningP2p => match new {
            Stop | Running | PreCopyP2p => new,
            PreCopy => Running,
            _ => Stop,
        },
        Error => Error,
    }
}

/// The kernel's next hop from `cur` towards `new` for a device with `flags`, skipping states
/// the device lacks (`vfio_mig_get_next_state`). `None` where the kernel answers EINVAL.
pub fn next_hop(cur: MigState, new: MigState, flags: MigrationFlags) -> Option<MigState> {
    if cur == MigState::Error || new == MigState::Error {
        return None;
    }
    if !flags.has_state(cur) || !flags.has_state(new) {
        return None;
    }
    let mut next = fsm_table(cur, new);
    // The table always reaches `new` within the 8 states; bound the walk anyway.
    for _ in 0..MigState::ALL.len() {
        if flags.has_state(next) {
            return (next != MigState::Error).then_some(next);
        }
        next = fsm_table(next, new);
    }
    None
}

/// Whether the single arc `from -> to` opens a new data_fd (saving or resuming session).
pub fn arc_opens_data_fd(from: MigState, to: MigState) -> bool {
    use MigState::*;
    matches!(
        (from, to),
        (Running, PreCopy) | (RunningP2p, PreCopyP2p) | (Stop, StopCopy) | (Stop, Resuming)
    )
}

/// Whether the single arc `from -> to` ends the session whose data_fd was open (after it the
/// driver disables the fd; RESUMING -> STOP makes the driver load what was written).
pub fn arc_ends_session(from: MigState, to: MigState) -> bool {
    (from.is_saving() && !to.is_saving()) || (from == MigState::Resuming && to != from)
}

/// The single arcs from `from` to `to`, in order, excluding `from` (empty when equal).
pub fn plan(
    from: MigState,
    to: MigState,
    flags: MigrationFlags,
) -> Result<Vec<MigState>, PlanError> {
    if to == MigState::Error {
        return Err(PlanError::ErrorRequested);
    }
    if from == MigState::Error {
        return Err(PlanError::FromError);
    }
    if !flags.contains(MigrationFlags::STOP_COPY) {
        return Err(PlanError::NoMigration { flags });
    }
    for state in [from, to] {
        if !flags.has_state(state) {
            return Err(PlanError::Unsupported { state, flags });
        }
    }
    if from == MigState::StopCopy && to.is_precopy() {
        return Err(PlanError::BackToPrecopy { to });
    }
    if from.is_precopy() && matches!(to, MigState::Stop | MigState::Resuming) {
        return Err(PlanError::EndsSavingSession { from, to });
    }
    let mut path = Vec::new();
    let mut cur = from;
    while cur != to {
        // Every pair of existing non-ERROR states has a next hop and no path is longer than
        // four arcs; the bound keeps a table mistake from looping.
        match next_hop(cur, to, flags) {
            Some(next) if path.len() < MigState::ALL.len() => {
                path.push(next);
                cur = next;
            }
            _ => return Err(PlanError::Unsupported { state: to, flags }),
        }
    }
    Ok(path)
}

/// What one `read()` of a saving data_fd means, by the state the device is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadOutcome {
    /// `n` bytes arrived.
    Data(usize),
    /// PRE_COPY: nothing to read for now (read 0 or ENOMSG); ask PRECOPY_INFO or switch to
    /// STOP_COPY, never treat it as the end.
    Drained,
    /// STOP_COPY (or a session already ended): read 0, the stream is complete.
    Eof,
    /// EINTR, or EAGAIN on an O_NONBLOCK fd (mlx5): retry the same read.
    Retry,
    /// A real error (ENODEV: the session was ended; ENOMSG in STOP_COPY is a driver bug).
    Error(i32),
}

/// Classifies a read result (`Ok(bytes)` or `Err(errno)`) by the device state it happened in.
pub fn classify_read(state: MigState, result: Result<usize, i32>) -> ReadOutcome {
    match result {
        Ok(0) if state.is_precopy() => ReadOutcome::Drained,
        Ok(0) => ReadOutcome::Eof,
        Ok(n) => ReadOutcome::Data(n),
        Err(libc::ENOMSG) if state.is_precopy() => ReadOutcome::Drained,
        Err(libc::EINTR) | Err(libc::EAGAIN) => ReadOutcome::Retry,
        Err(errno) => ReadOutcome::Error(errno),
    }
}

/// [`classify_read`] for an io_uring completion's `res` (bytes, or a negative errno).
pub fn classify_cqe(state: MigState, res: i32) -> ReadOutcome {
    match usize::try_from(res) {
        Ok(n) => classify_read(state, Ok(n)),
        Err(_) => classify_read(state, Err(res.saturating_neg())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::fake::{is_single_arc, shortest_path};
    use MigState::*;

    const ALL: MigrationFlags = MigrationFlags::ALL;
    const BASIC: MigrationFlags = MigrationFlags::STOP_COPY;

    fn flag_sets() -> [MigrationFlags; 4] {
        [
            BASIC,
            BASIC | MigrationFlags::P2P,
            BASIC | MigrationFlags::PRE_COPY,
            ALL,
        ]
    }

    fn helper_refuses(from: MigState, to: MigState) -> bool {
        (from == StopCopy && to.is_precopy())
            || (from.is_precopy() && matches!(to, Stop | Resuming))
    }

    #[test]
    fn documented_paths_with_every_feature() {
        let cases: &[(MigState, MigState, &[MigState])] = &[
            (Running, StopCopy, &[RunningP2p, Stop, StopCopy]),
            (Running, PreCopy, &[PreCopy]),
            (Running, Stop, &[RunningP2p, Stop]),
            (Running, Resuming, &[RunningP2p, Stop, Resuming]),
            (Running, PreCopyP2p, &[RunningP2p, PreCopyP2p]),
            (PreCopy, StopCopy, &[PreCopyP2p, StopCopy]),
            (PreCopy, Running, &[Running]),
            (PreCopy, RunningP2p, &[Running, RunningP2p]),
            (PreCopy, PreCopyP2p, &[PreCopyP2p]),
            (PreCopyP2p, StopCopy, &[StopCopy]),
            (PreCopyP2p, PreCopy, &[PreCopy]),
            (PreCopyP2p, Running, &[RunningP2p, Running]),
            (StopCopy, Stop, &[Stop]),
            (StopCopy, Running, &[Stop, RunningP2p, Running]),
            (StopCopy, Resuming, &[Stop, Resuming]),
            (Resuming, Stop, &[Stop]),
            (Resuming, Running, &[Stop, RunningP2p, Running]),
            (Stop, PreCopy, &[RunningP2p, Running, PreCopy]),
            (Stop, PreCopyP2p, &[RunningP2p, PreCopyP2p]),
            (Stop, Running, &[RunningP2p, Running]),
            (RunningP2p, PreCopy, &[Running, PreCopy]),
            (RunningP2p, StopCopy, &[Stop, StopCopy]),
            (Running, Running, &[]),
        ];
        for &(from, to, want) in cases {
            assert_eq!(plan(from, to, ALL).as_deref(), Ok(want), "{from} -> {to}");
        }
    }

    #[test]
    fn optional_states_are_skipped_like_the_kernel() {
        assert_eq!(plan(Running, StopCopy, BASIC), Ok(vec![Stop, StopCopy]));
        assert_eq!(plan(StopCopy, Running, BASIC), Ok(vec![Stop, Running]));
        assert_eq!(plan(Resuming, Running, BASIC), Ok(vec![Stop, Running]));
        let pre = BASIC | MigrationFlags::PRE_COPY;
        assert_eq!(plan(PreCopy, StopCopy, pre), Ok(vec![StopCopy]));
        assert_eq!(plan(Stop, PreCopy, pre), Ok(vec![Running, PreCopy]));
        let p2p = BASIC | MigrationFlags::P2P;
        assert_eq!(plan(Running, Stop, p2p), Ok(vec![RunningP2p, Stop]));
    }

    /// Every pair, every flag set: the plan matches an independent shortest-path search over
    /// the uAPI's single arcs (no saving state inside a path), or a documented refusal.
    #[test]
    fn every_arc_against_an_independent_search() {
        for flags in flag_sets() {
            for from in MigState::ALL {
                for to in MigState::ALL {
                    let got = plan(from, to, flags);
                    if to == Error {
                        assert_eq!(got, Err(PlanError::ErrorRequested));
                        continue;
                    }
                    if from == Error {
                        assert_eq!(got, Err(PlanError::FromError));
                        continue;
                    }
                    if !flags.has_state(from) || !flags.has_state(to) {
                        assert!(
                            matches!(got, Err(PlanError::Unsupported { .. })),
                            "{from}->{to} {flags}: {got:?}"
                        );
                        continue;
                    }
                    if helper_refuses(from, to) {
                        assert!(got.is_err(), "{from} -> {to} must be refused");
                        continue;
                    }
                    let path = got.unwrap_or_else(|e| panic!("{from} -> {to} ({flags}): {e}"));
                    let reference = shortest_path(from, to, flags.bits())
                        .unwrap_or_else(|| panic!("no reference path {from} -> {to}"));
                    let reference = if from == to { Vec::new() } else { reference };
                    assert_eq!(
                        path.len(),
                        reference.len(),
                        "{from} -> {to} ({flags}): {path:?} vs {reference:?}"
                    );
                    let mut cur = from;
                    for (i, &next) in path.iter().enumerate() {
                        assert!(
                            is_single_arc(cur, next, flags.bits()),
                            "{cur} -> {next} is not one arc"
                        );
                        assert!(flags.has_state(next));
                        if i + 1 < path.len() {
                            let inside = from.is_saving() && to.is_saving();
                            assert!(
                                inside || !next.is_saving(),
                                "{from} -> {to} passes through {next}"
                            );
                            assert!(!arc_opens_data_fd(cur, next), "fd opened mid-path");
                        }
                        cur = next;
                    }
                    assert_eq!(cur, to);
                }
            }
        }
    }

    #[test]
    fn refusals_name_the_rule() {
        assert_eq!(plan(Running, Error, ALL), Err(PlanError::ErrorRequested));
        assert_eq!(plan(Error, Running, ALL), Err(PlanError::FromError));
        assert_eq!(
            plan(Running, PreCopy, BASIC),
            Err(PlanError::Unsupported {
                state: PreCopy,
                flags: BASIC
            })
        );
        assert_eq!(
            plan(Running, RunningP2p, BASIC),
            Err(PlanError::Unsupported {
                state: RunningP2p,
                flags: BASIC
            })
        );
        assert_eq!(
            plan(Running, Stop, MigrationFlags(0)),
            Err(PlanError::NoMigration {
                flags: MigrationFlags(0)
            })
        );
        assert_eq!(
            plan(StopCopy, PreCopy, ALL),
            Err(PlanError::BackToPrecopy { to: PreCopy })
        );
        assert_eq!(
            plan(StopCopy, PreCopyP2p, ALL),
            Err(PlanError::BackToPrecopy { to: PreCopyP2p })
        );
        for from in [PreCopy, PreCopyP2p] {
            for to in [Stop, Resuming] {
                assert_eq!(
                    plan(from, to, ALL),
                    Err(PlanError::EndsSavingSession { from, to })
                );
            }
        }
        let msg = PlanError::EndsSavingSession {
            from: PreCopy,
            to: Stop,
        }
        .to_string();
        assert!(msg.contains("ask for STOP_COPY"), "{msg}");
    }

    #[test]
    fn data_fd_arcs_and_session_ends() {
        assert!(arc_opens_data_fd(Running, PreCopy));
        assert!(arc_opens_data_fd(RunningP2p, PreCopyP2p));
        assert!(arc_opens_data_fd(Stop, StopCopy));
        assert!(arc_opens_data_fd(Stop, Resuming));
        assert!(!arc_opens_data_fd(PreCopyP2p, StopCopy));
        assert!(!arc_opens_data_fd(PreCopy, StopCopy));
        assert!(!arc_opens_data_fd(PreCopy, PreCopyP2p));
        assert!(arc_ends_session(StopCopy, Stop));
        assert!(arc_ends_session(PreCopy, Running));
        assert!(arc_ends_session(PreCopyP2p, RunningP2p));
        assert!(arc_ends_session(Resuming, Stop));
        assert!(!arc_ends_session(PreCopyP2p, StopCopy));
        assert!(!arc_ends_session(PreCopy, PreCopyP2p));
        // The saving group keeps its fd: no arc of PRE_COPY -> STOP_COPY opens one.
        for flags in [ALL, BASIC | MigrationFlags::PRE_COPY] {
            let path = plan(PreCopy, StopCopy, flags).unwrap_or_default();
            let mut cur = PreCopy;
            for next in path {
                assert!(!arc_opens_data_fd(cur, next) && !arc_ends_session(cur, next));
                cur = next;
            }
        }
    }

    #[test]
    fn next_hop_matches_the_kernel_table() {
        assert_eq!(next_hop(PreCopy, Stop, ALL), Some(Running));
        assert_eq!(next_hop(PreCopy, StopCopy, ALL), Some(PreCopyP2p));
        assert_eq!(
            next_hop(PreCopy, StopCopy, BASIC | MigrationFlags::PRE_COPY),
            Some(StopCopy)
        );
        assert_eq!(next_hop(Stop, PreCopy, ALL), Some(RunningP2p));
        assert_eq!(next_hop(Running, Stop, BASIC), Some(Stop));
        assert_eq!(next_hop(RunningP2p, PreCopy, ALL), Some(Running));
        assert_eq!(next_hop(Error, Running, ALL), None);
        assert_eq!(next_hop(Running, Error, ALL), None);
        assert_eq!(next_hop(Running, PreCopy, BASIC), None);
    }

    #[test]
    fn precopy_drain_rule() {
        for s in [PreCopy, PreCopyP2p] {
            assert_eq!(classify_read(s, Ok(0)), ReadOutcome::Drained);
            assert_eq!(classify_read(s, Err(libc::ENOMSG)), ReadOutcome::Drained);
            assert_eq!(classify_read(s, Ok(7)), ReadOutcome::Data(7));
        }
        assert_eq!(classify_read(StopCopy, Ok(0)), ReadOutcome::Eof);
        assert_eq!(
            classify_read(StopCopy, Err(libc::ENOMSG)),
            ReadOutcome::Error(libc::ENOMSG)
        );
        assert_eq!(classify_read(StopCopy, Ok(4096)), ReadOutcome::Data(4096));
        assert_eq!(
            classify_read(StopCopy, Err(libc::EINTR)),
            ReadOutcome::Retry
        );
        assert_eq!(
            classify_read(PreCopy, Err(libc::EAGAIN)),
            ReadOutcome::Retry
        );
        assert_eq!(
            classify_read(StopCopy, Err(libc::ENODEV)),
            ReadOutcome::Error(libc::ENODEV)
        );
        assert_eq!(classify_read(Stop, Ok(0)), ReadOutcome::Eof);
        assert_eq!(classify_cqe(PreCopy, -libc::ENOMSG), ReadOutcome::Drained);
        assert_eq!(classify_cqe(StopCopy, 0), ReadOutcome::Eof);
        assert_eq!(classify_cqe(StopCopy, 100), ReadOutcome::Data(100));
        assert_eq!(
            classify_cqe(StopCopy, -libc::EIO),
            ReadOutcome::Error(libc::EIO)
        );
    }
}
