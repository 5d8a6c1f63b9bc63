//! A fixed pool of packet buffers: one page-aligned arena per ring, allocated once, sliced into
//! equal slots and registered with the ring as fixed buffers (one iovec per slot) where the
//! memlock limit allows; plain (unregistered) buffers otherwise, said once in a note.
//!
//! Ownership: a slot is named by a [`BufId`], a move-only token. Whoever holds the token may
//! touch the slot's bytes ([`BufferPool::slot_mut`]); submitting an operation moves the token into
//! the ring's op table until the operation's last completion, so no slot is touched by the
//! program while the kernel may touch it.

use std::alloc::{self, Layout};
use std::ptr::NonNull;

/// A slot of the pool, owned by whoever holds this token.
#[derive(Debug, PartialEq, Eq)]
pub struct BufId(u16);

impl BufId {
    /// The slot index, which is also its fixed-buffer index when the pool is registered.
    pub fn index(&self) -> u16 {
        self.0
    }
}

/// A buffer an operation reads from or writes into.
#[derive(Debug)]
pub enum Buffer {
    /// A slot of the ring's pool.
    Pool(BufId),
    /// Heap memory, for the rare packet that does not fit a slot (a large config blob) and for
    /// small per-channel headers.
    Heap(Box<[u8]>),
}

/// The arena and its free slots.
pub struct BufferPool {
    arena: NonNull<u8>,
    layout: Layout,
    slot_size: usize,
    slots: u16,
    free: Vec<BufId>,
    registered: bool,
}

// SAFETY: the arena is plain memory owned by the pool; access goes through `&mut self` plus a
// slot token, so moving the pool to another thread moves sole access with it.
unsafe impl Send for BufferPool {}

impl std::fmt::Debug for BufferPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BufferPool")
            .field("slot_size", &self.slot_size)
            .field("slots", &self.slots)
            .field("free", &self.free.len())
            .field("registered", &self.registered)
            .finish()
    }
}

const PAGE: usize = 4096;

impl BufferPool {
    /// Allocates `slots` slots of `slot_size` bytes (rounded up to a page), zeroed.
    pub fn new(slots: usize, slot_size: usize) -> std::io::Result<Self> {
        let invalid =
            |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidInput, what.to_string());
        if slots == 0 || slots > usize::from(u16::MAX) {
            return Err(invalid("buffer pool needs 1..=65535 slots"));
        }
        let slot_size = slot_size
            .checked_next_multiple_of(PAGE)
            .filter(|&s| s > 0 && s <= 1 << 30)
            .ok_or_else(|| invalid("buffer slot size must be 1 byte..1 GiB"))?;
        let total = slot_size
            .checked_mul(slots)
            .ok_or_else(|| invalid("buffer pool size overflows"))?;
        let layout =
            Layout::from_size_align(total, PAGE).map_err(|_| invalid("buffer pool layout"))?;
        // SAFETY: the layout has a non-zero size (slots >= 1, slot_size >= one page).
        let arena = NonNull::new(unsafe { alloc::alloc_zeroed(layout) })
            .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::OutOfMemory))?;
        let slots = slots as u16;
        Ok(Self {
            arena,
            layout,
            slot_size,
            slots,
            free: (0..slots).rev().map(BufId).collect(),
            registered: false,
        })
    }

    /// One iovec per slot, for `register_buffers`.
    pub(crate) fn iovecs(&self) -> Vec<libc::iovec> {
        (0..self.slots)
            .map(|i| libc::iovec {
                iov_base: self.slot_ptr(i).cast(),
                iov_len: self.slot_size,
            })
            .collect()
    }

    pub(crate) fn set_registered(&mut self, registered: bool) {
        self.registered = registered;
    }

    /// Whether the slots are registered with the ring (fixed-buffer ops can be used).
    pub fn is_registered(&self) -> bool {
        self.registered
    }

    /// Bytes per slot.
    pub fn slot_size(&self) -> usize {
        self.slot_size
    }

    /// Number of slots.
    pub fn slots(&self) -> usize {
        usize::from(self.slots)
    }

    /// Slots not held by anyone.
    pub fn free_slots(&self) -> usize {
        self.free.len()
    }

    /// Takes a free slot.
    pub fn take(&mut self) -> Option<BufId> {
        self.free.pop()
    }

    /// Gives a slot back.
    pub fn put(&mut self, id: BufId) {
        debug_assert!(id.0 < self.slots && !self.free.contains(&id));
        self.free.push(id);
    }

    /// The bytes of a slot the caller holds.
    pub fn slot_mut(&mut self, id: &BufId) -> &mut [u8] {
        // SAFETY: `id` is a token of this pool (index < slots) held by the caller, so no
        // operation is in flight on this slot; `&mut self` excludes any other borrow of the pool,
        // and slots do not overlap.
        unsafe { std::slice::from_raw_parts_mut(self.slot_ptr(id.0), self.slot_size) }
    }

    pub(crate) fn slot_ptr(&self, index: u16) -> *mut u8 {
        assert!(index < self.slots, "slot index out of range");
        // SAFETY: index < slots, so the offset stays inside the arena allocation.
        unsafe { self.arena.as_ptr().add(usize::from(index) * self.slot_size) }
    }
}

impl Drop for BufferPool {
    fn drop(&mut self) {
        // SAFETY: the arena was allocated with this layout in `new`. The ring that may use it is
        // dropped first (it is declared before the pool in `Ring` and drains its ops before).
        unsafe { alloc::dealloc(self.arena.as_ptr(), self.layout) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_page_aligned_disjoint_and_recycled() {
        let mut pool = BufferPool::new(3, 5000).unwrap();
        assert_eq!(pool.slot_size(), 8192);
        let a = pool.take().unwrap();
        let b = pool.take().unwrap();
        pool.slot_mut(&a).fill(1);
        pool.slot_mut(&b).fill(2);
        assert!(pool.slot_mut(&a).iter().all(|&x| x == 1));
        assert_eq!(pool.slot_ptr(a.index()) as usize % PAGE, 0);
        let c = pool.take().unwrap();
        assert!(pool.take().is_none());
        pool.put(c);
        assert_eq!(pool.free_slots(), 1);
        pool.put(a);
        pool.put(b);
        assert_eq!(pool.free_slots(), 3);
    }

    #[test]
    fn rejects_empty_and_oversized_pools() {
        assert!(BufferPool::new(0, 4096).is_err());
        assert!(BufferPool::new(1, 0).is_err());
        assert!(BufferPool::new(1, (1 << 30) + 1).is_err());
    }
}
