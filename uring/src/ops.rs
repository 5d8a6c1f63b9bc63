//! The op table: every submitted operation has a slot here until its last completion, holding
//! the buffer it reads or writes so the buffer cannot be reused or freed meanwhile.
//!
//! `user_data` = slot index (bits 0..32) | part (bits 32..40) | generation (bits 40..64). The
//! generation makes a late completion for a freed slot harmless: a cancelled SEND_ZC may still
//! post a notification after its failed send completion (kernel 6.18), and it is dropped here.
//! It has 24 bits (it had 16, and 8 bits were unused): a late completion is mistaken for a live
//! op only if its slot was reused a multiple of 2^24 times meanwhile, not of 65,536.

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
    /// Only the low [`GENERATION_BITS`] are used.
    generation: u32,
    op: Option<Op>,
}

#[derive(Debug, Default)]
pub(crate) struct OpTable {
    slots: Vec<Slot>,
    free: Vec<u32>,
    live: usize,
}

/// Bits of `user_data` the generation has (the top ones).
const GENERATION_BITS: u32 = 24;
const GENERATION_MASK: u32 = (1 << GENERATION_BITS) - 1;
const PART_SHIFT: u32 = 32;
const GENERATION_SHIFT: u32 = 40;

pub(crate) fn user_data(index: u32, generation: u32, part: u8) -> u64 {
    u64::from(index)
        | u64::from(part) << PART_SHIFT
        | u64::from(generation & GENERATION_MASK) << GENERATION_SHIFT
}

pub(crate) fn split_user_data(user_data: u64) -> (u32, u32, u8) {
    (
        user_data as u32,
        (user_data >> GENERATION_SHIFT) as u32 & GENERATION_MASK,
        (user_data >> PART_SHIFT) as u8,
    )
}

/// `user_data` of the same op with another part (a linked send's, to cancel it).
pub(crate) fn with_part(user_data: u64, part: u8) -> u64 {
    user_data & !(0xff << PART_SHIFT) | u64::from(part) << PART_SHIFT
}

impl OpTable {
    /// Stores an op; returns its index and generation for `user_data`.
    pub fn insert(&mut self, op: Op) -> (u32, u32) {
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
    pub fn get_mut(&mut self, index: u32, generation: u32) -> Option<&mut Op> {
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
        slot.generation = slot.generation.wrapping_add(1) & GENERATION_MASK;
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
        let ud = user_data(123_456, GENERATION_MASK, PART_CHAIN_SEND);
        assert_eq!(
            split_user_data(ud),
            (123_456, GENERATION_MASK, PART_CHAIN_SEND)
        );
        assert_ne!(ud, WAKE_USER_DATA);
        assert_ne!(ud, CANCEL_USER_DATA);
        assert_eq!(
            split_user_data(with_part(ud, PART_MAIN)),
            (123_456, GENERATION_MASK, PART_MAIN)
        );
        assert_eq!(with_part(with_part(ud, PART_MAIN), PART_CHAIN_SEND), ud);
    }

    #[test]
    fn a_completion_65536_reuses_old_is_still_stale() {
        let mut table = OpTable::default();
        let (index, generation) = table.insert(op());
        for _ in 0..=u16::MAX {
            table.remove(index);
            let (again, _) = table.insert(op());
            assert_eq!(again, index);
        }
        // 65,536 reuses later a late completion of the first op still names no live op (a
        // 16-bit generation had wrapped back to the first op's).
        let (i, g, _) = split_user_data(user_data(index, generation, PART_MAIN));
        assert!(table.get_mut(i, g).is_none());
    }

    #[test]
    fn the_generation_wraps_within_its_bits() {
        let mut table = OpTable::default();
        let (index, _) = table.insert(op());
        table.slots[0].generation = GENERATION_MASK;
        table.remove(index);
        let (_, generation) = table.insert(op());
        assert_eq!(generation, 0);
        let ud = user_data(index, generation, PART_MAIN);
        assert_eq!(split_user_data(ud), (index, 0, PART_MAIN));
    }
}
