//! The op table: every submitted operation has a slot here until its last completion, holding
//! the buffer it reads or writes so the buffer cannot be reused or freed meanwhile.
//!
//! `user_data` = slot index (bits 0..32) | generation (bits 32..48) | part (bits 48..56). The
//! generation makes a late completion for a freed slot harmless: a cancelled SEND_ZC may still
//! post a notification after its failed send completion (kernel 6.18), and it is dropped here.

use std::io;

use crate::pool::Buffer;

/// What kind of operation a completion reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpKind {
    /// A read into a buffer (`Read`/`ReadFixed`).
    Read,
    /// A write from a buffer (`Write`/`WriteFixed`).
    Write,
    /// A socket send (`Send`/`SendZc`), `MSG_WAITALL`.
    Send,
    /// A socket receive, `MSG_WAITALL`.
    Recv,
    /// The read half of a read->send chain; the buffer stays in flight with the send.
    ChainRead,
    /// The send half of a read->send chain; it carries the buffer back. A short read cancels it
    /// (`ECANCELED`).
    ChainSend,
    /// Another thread called [`crate::Waker::wake`].
    Wake,
}

/// One finished operation.
#[derive(Debug)]
pub struct Completion {
    /// The caller's tag given at submission.
    pub tag: u64,
    /// Which operation finished.
    pub kind: OpKind,
    /// Bytes transferred, or the error.
    pub result: io::Result<usize>,
    /// The buffer, back with the caller (none for `ChainRead` and `Wake`).
    pub buf: Option<Buffer>,
    /// A zero-copy send whose notification said the kernel copied anyway.
    pub zc_copied: bool,
}

pub(crate) const PART_MAIN: u8 = 0;
pub(crate) const PART_CHAIN_SEND: u8 = 1;
pub(crate) const WAKE_USER_DATA: u64 = u64::MAX;
pub(crate) const CANCEL_USER_DATA: u64 = u64::MAX - 1;

#[derive(Debug)]
pub(crate) struct Op {
    pub kind: OpKind,
    pub tag: u64,
    pub buf: Option<Buffer>,
    /// CQEs still to come before the slot frees.
    pub pending: u8,
    /// The send half has reported its result and waits for its SEND_ZC notification.
    pub send_result: Option<i32>,
    pub zc_copied: bool,
}

#[derive(Debug, Default)]
struct Slot {
    generation: u16,
    op: Option<Op>,
}

#[derive(Debug, Default)]
pub(crate) struct OpTable {
    slots: Vec<Slot>,
    free: Vec<u32>,
    live: usize,
}

pub(crate) fn user_data(index: u32, generation: u16, part: u8) -> u64 {
    u64::from(index) | u64::from(generation) << 32 | u64::from(part) << 48
}

pub(crate) fn split_user_data(user_data: u64) -> (u32, u16, u8) {
    (
        user_data as u32,
        (user_data >> 32) as u16,
        (user_data >> 48) as u8,
    )
}

impl OpTable {
    /// Stores an op; returns its index and generation for `user_data`.
    pub fn insert(&mut self, op: Op) -> (u32, u16) {
        let index = self.free.pop().unwrap_or_else(|| {
            self.slots.push(Slot::default());
            (self.slots.len() - 1) as u32
        });
        let slot = &mut self.slots[index as usize];
        slot.op = Some(op);
        self.live += 1;
        (index, slot.generation)
    }

    /// The live op for a completion, or None for a stale one.
    pub fn get_mut(&mut self, index: u32, generation: u16) -> Option<&mut Op> {
        let slot = self.slots.get_mut(index as usize)?;
        if slot.generation != generation {
            return None;
        }
        slot.op.as_mut()
    }

    /// Frees a slot after its last completion (or when its submission failed).
    pub fn remove(&mut self, index: u32) -> Option<Op> {
        let slot = self.slots.get_mut(index as usize)?;
        let op = slot.op.take()?;
        slot.generation = slot.generation.wrapping_add(1);
        self.free.push(index);
        self.live -= 1;
        Some(op)
    }

    /// Ops still waiting for a completion.
    pub fn live(&self) -> usize {
        self.live
    }

    /// The user_data of every live op (for cancelling them all).
    pub fn live_user_data(&self) -> Vec<u64> {
        self.slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.op.is_some())
            .map(|(i, s)| user_data(i as u32, s.generation, PART_MAIN))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op() -> Op {
        Op {
            kind: OpKind::Read,
            tag: 7,
            buf: None,
            pending: 1,
            send_result: None,
            zc_copied: false,
        }
    }

    #[test]
    fn a_stale_completion_does_not_reach_the_slot_reuser() {
        let mut table = OpTable::default();
        let (index, generation) = table.insert(op());
        assert!(table.remove(index).is_some());
        let (index2, generation2) = table.insert(op());
        assert_eq!(index, index2, "slot is reused");
        assert!(
            table.get_mut(index, generation).is_none(),
            "old generation is stale"
        );
        assert!(table.get_mut(index2, generation2).is_some());
        assert_eq!(table.live(), 1);
    }

    #[test]
    fn user_data_round_trips() {
        let ud = user_data(123_456, 65_535, PART_CHAIN_SEND);
        assert_eq!(split_user_data(ud), (123_456, 65_535, PART_CHAIN_SEND));
        assert_ne!(ud, WAKE_USER_DATA);
    }
}
