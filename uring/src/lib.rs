//! Per-core io_uring engine for `vfio-multifd`.
//!
//! Ownership model, and why the safe API is sound:
//! - A [`Ring`] owns its io_uring, a [`BufferPool`] (one arena, registered as fixed buffers where
//!   memlock allows) and an op table. Every submitted operation moves its buffer ([`Buffer`]:
//!   a pool slot token [`BufId`] or a heap box) into the op table, and the buffer comes back
//!   only with the operation's last completion ([`Completion::buf`]), after a SEND_ZC
//!   notification where there is one. So program code never touches memory the kernel may use.
//!   A pool can lend a slot token to another thread's ring ([`LentSlot`], used unregistered
//!   there); the lender cannot hand the slot out until the token comes back.
//! - A token names its pool, and a pool (so a ring) panics on another pool's token rather than
//!   open a slot that token does not own. Pools are cut from an [`Arena`] only while nothing
//!   else holds it, so they never overlap. A ring owns its pool and gives out no `&mut` to it
//!   (only forwarding methods: [`Ring::take`], [`Ring::put`], [`Ring::slot_mut`],
//!   [`Ring::lend`], ...), so the pool its ops use cannot be swapped out or freed; it is
//!   freed only after the io_uring has closed.
//! - A `data_fd` read and the send of the same slot are linked ([`Ring::read_then_send`]); both
//!   SQEs are pushed together or not at all. A short read cancels the send (ECANCELED), and the
//!   caller sends what was read. Where the kernel does not break a chain on a short read (the
//!   probe's linked-chain check), a ring does not link.
//! - Dropping a ring cancels and drains its ops first; if they do not finish, their buffers are
//!   leaked rather than freed.
//! - Ops name files by [`FileId`]: the ring holds the fd itself ([`Ring::adopt_fd`],
//!   [`Ring::dup_fd`]) until after its io_uring has closed, so the fd number an SQE carries,
//!   which the kernel resolves only at the next submit, still names the same file then.
#![deny(missing_docs)]

mod ops;
mod pool;
mod probe;
mod ring;
mod seccomp;
mod waker;

pub use ops::{Completion, OpKind};
pub use pool::{Arena, BufId, Buffer, BufferPool, LentSlot};
pub use probe::{
    data_path, probe, probe_pool, sqpoll_opt_in, Check, DataPath, Feature, FeatureMask, Probe,
    SQPOLL_ENV,
};
pub use ring::{raise_open_file_limit, FileId, Ring, RingConfig, RingError, RingPath};
pub use seccomp::deny_io_uring_setup;
pub use waker::Waker;
