//! Packet buffers: an [`Arena`] of anonymous memory, faulted in when it is made, sliced into [`BufferPool`]s of equal slots, one pool per
//! ring, each registered with its ring as fixed buffers (one iovec per slot) where the memlock
//! limit allows; plain (unregistered) buffers otherwise, said once in a note.
//!
//! The arena is made before a migration starts: touching hundreds of MiB of fresh pages (or
//! pinning them, which faults them in) costs more CPU than moving them, and must not land in
//! the downtime.
//!
//! Ownership: a slot is named by a [`BufId`], a move-only token that also names its pool (a
//! pool refuses, by panicking, a token of another pool: that is a bug in the caller, and it
//! must not alias a slot the kernel may be using). Whoever holds the token may touch the
//! slot's bytes ([`BufferPool::slot_mut`]); submitting an operation moves the token into the
//! ring's op table until the operation's last completion, so no slot is touched by the program
//! while the kernel may touch it. Pools are cut from an arena only while nothing else holds
//! it ([`BufferPool::cut`]), so pools of one arena never overlap; the arena lives as long as
//! its last pool, lent slot or ring (a ring whose ops never finished leaks its hold).

use std::io;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// A slot of one pool, owned by whoever holds this token.
#[derive(Debug, PartialEq, Eq)]
pub struct BufId {
    index: u16,
    pool: PoolId,
}

impl BufId {
    /// The slot index, which is also its fixed-buffer index when the pool is registered.
    pub fn index(&self) -> u16 {
        self.index
    }
}

/// Which pool a token belongs to: unique for the life of the process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct PoolId(u64);

impl PoolId {
    fn fresh() -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        PoolId(NEXT.fetch_add(1, Ordering::Relaxed))
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
    /// A slot of another ring's pool, lent for one operation ([`BufferPool::lend`]); always
    /// used unregistered, since this ring did not register the lender's slots.
    Lent(LentSlot),
}

/// A slot lent by its pool to another thread's ring, until it goes back with
/// [`BufferPool::take_back`]. Holding it is holding the slot's token, and the arena stays
/// mapped while it lives, whatever happens to the lending pool.
pub struct LentSlot {
    /// Keeps the slot's memory mapped while it lives.
    _arena: Arc<Arena>,
    ptr: NonNull<u8>,
    len: usize,
    id: BufId,
}

// SAFETY: a lent slot is the only handle to its bytes (the lending pool gave up the token), so
// moving it to another thread moves sole access with it.
unsafe impl Send for LentSlot {}

impl std::fmt::Debug for LentSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LentSlot")
            .field("index", &self.id.index)
            .field("len", &self.len)
            .finish()
    }
}

impl LentSlot {
    pub(crate) fn ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// The slot's size in bytes (a whole number of pages).
    pub fn size(&self) -> usize {
        self.len
    }

    /// The slot's bytes.
    pub fn bytes(&self) -> &[u8] {
        // SAFETY: the slot is `len` bytes of the arena this token keeps mapped, and holding the
        // token means no operation is in flight on it and no pool hands it out.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

const PAGE: usize = 4096;

/// Page-aligned anonymous memory, present from the start, freed when the last pool cut from it
/// is dropped.
///
/// Small pages on purpose: with the arena on transparent huge pages, loopback SEND_ZC from it
/// made the receiver prune its queue (`TcpExtPruneCalled`) and retransmit after a 200 ms RTO
/// (4 x 8 MiB of 64 KiB packets took 438 ms instead of 32), and 1 in 4 to 5 runs of 1 GiB
/// with 8 MiB packets fell to 0.25 GiB/s even without SEND_ZC (0.83-1.13 on small pages).
pub struct Arena {
    base: NonNull<u8>,
    len: usize,
}

// SAFETY: the arena is plain memory; its slices go only to the pools cut from it, and
// `BufferPool::cut` cuts only while it holds the arena alone, so those pools are disjoint; each
// is accessed through `&mut` plus slot tokens of its own.
unsafe impl Send for Arena {}
// SAFETY: `&Arena` exposes only its length.
unsafe impl Sync for Arena {}

impl std::fmt::Debug for Arena {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Arena").field("len", &self.len).finish()
    }
}

impl Arena {
    /// Maps `len` bytes (rounded up to a page) and faults every page in.
    pub fn new(len: usize) -> io::Result<Arc<Arena>> {
        let len = len
            .max(1)
            .checked_next_multiple_of(PAGE)
            .ok_or_else(|| io::Error::from(io::ErrorKind::OutOfMemory))?;
        // SAFETY: a fresh private anonymous mapping; no existing memory is named.
        let map = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if map == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let base = NonNull::new(map.cast::<u8>()).expect("mmap never returns null on success");
        let mut arena = Arena { base, len };
        arena.fault_in();
        Ok(Arc::new(arena))
    }

    fn fault_in(&mut self) {
        // SAFETY: our own mapping's range; populating writes zero pages, which it holds anyway.
        let populated = unsafe {
            libc::madvise(
                self.base.as_ptr().cast(),
                self.len,
                libc::MADV_POPULATE_WRITE,
            )
        } == 0;
        if !populated {
            // Before Linux 5.14: touch one byte a page.
            for page in (0..self.len).step_by(PAGE) {
                // SAFETY: page < len; the mapping is ours and writable, no reference to it exists.
                unsafe { self.base.as_ptr().add(page).write_volatile(0) };
            }
        }
    }

    /// Bytes usable.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the arena has no bytes (never: at least one page).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for Arena {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`; no pool refers to it any more (they hold the Arc).
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.len) };
    }
}

/// A ring's slots: a slice of an arena, and its free slots.
pub struct BufferPool {
    arena: Arc<Arena>,
    id: PoolId,
    base: NonNull<u8>,
    slot_size: usize,
    slots: u16,
    free: Vec<BufId>,
    registered: bool,
}

// SAFETY: the pool's slice of the arena is touched by no one else; access goes through `&mut
// self` plus a slot token, so moving the pool to another thread moves sole access with it.
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

impl BufferPool {
    /// A pool of `slots` slots of `slot_size` bytes (rounded up to a page) on an arena of its own.
    pub fn new(slots: usize, slot_size: usize) -> io::Result<Self> {
        let slot_size = Self::slot_bytes(slot_size)?;
        let mut arena = Arena::new(Self::check_slots(slots)?.saturating_mul(slot_size))?;
        let mut pools = Self::cut(&mut arena, &[slots], slot_size)?;
        Ok(pools.pop().expect("one pool asked for"))
    }

    /// The bytes one slot of `slot_size` takes (a whole number of pages).
    pub fn slot_bytes(slot_size: usize) -> io::Result<usize> {
        slot_size
            .checked_next_multiple_of(PAGE)
            .filter(|&s| s > 0 && s <= 1 << 30)
            .ok_or_else(|| invalid("buffer slot size must be 1 byte..1 GiB"))
    }

    fn check_slots(slots: usize) -> io::Result<usize> {
        if slots == 0 || slots > usize::from(u16::MAX) {
            return Err(invalid("buffer pool needs 1..=65535 slots"));
        }
        Ok(slots)
    }

    /// Cuts consecutive, disjoint pools out of `arena`: `slots[i]` slots of `slot_size` bytes
    /// (rounded up to a page) for pool i. Refused while anything else holds the arena (a pool,
    /// a lent slot or a ring from an earlier cut, or another clone of the `Arc`): the new pools
    /// would overlap slots that may still be in use.
    pub fn cut(arena: &mut Arc<Arena>, slots: &[usize], slot_size: usize) -> io::Result<Vec<Self>> {
        if Arc::get_mut(arena).is_none() {
            return Err(invalid(
                "the arena is still held by pools, lent slots or rings cut from it earlier",
            ));
        }
        let slot_size = Self::slot_bytes(slot_size)?;
        let mut offset = 0usize;
        let mut pools = Vec::with_capacity(slots.len());
        for &n in slots {
            let n = Self::check_slots(n)?;
            let bytes = n
                .checked_mul(slot_size)
                .ok_or_else(|| invalid("buffer pool size overflows"))?;
            let end = offset
                .checked_add(bytes)
                .filter(|&end| end <= arena.len())
                .ok_or_else(|| invalid("buffer pools do not fit the arena"))?;
            // SAFETY: offset < end <= arena.len(), so the pointer stays inside the arena.
            let base = unsafe { NonNull::new_unchecked(arena.base.as_ptr().add(offset)) };
            let count = n as u16;
            let id = PoolId::fresh();
            pools.push(Self {
                arena: Arc::clone(arena),
                id,
                base,
                slot_size,
                slots: count,
                free: (0..count)
                    .rev()
                    .map(|index| BufId { index, pool: id })
                    .collect(),
                registered: false,
            });
            offset = end;
        }
        Ok(pools)
    }

    /// The arena this pool is cut from.
    pub fn arena(&self) -> &Arc<Arena> {
        &self.arena
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

    /// Gives a slot back. (A token is unique and moved in, so a slot cannot come back twice.)
    ///
    /// # Panics
    /// If the token is another pool's: a bug in the caller, not bad input.
    pub fn put(&mut self, id: BufId) {
        self.check(&id);
        self.free.push(id);
    }

    fn check(&self, id: &BufId) {
        assert!(
            id.pool == self.id,
            "slot token of another pool used on this one"
        );
    }

    /// Lends a slot the caller holds to another ring: its operations use the slot's memory
    /// unregistered, and the slot is not handed out here until [`Self::take_back`].
    ///
    /// # Panics
    /// If the token is another pool's.
    pub fn lend(&mut self, id: BufId) -> LentSlot {
        let ptr = self.token_ptr(&id);
        LentSlot {
            _arena: Arc::clone(&self.arena),
            // SAFETY: `slot_ptr` points inside the arena, never at null.
            ptr: unsafe { NonNull::new_unchecked(ptr) },
            len: self.slot_size,
            id,
        }
    }

    /// Whether `slot` was lent by this pool.
    pub fn lent_here(&self, slot: &LentSlot) -> bool {
        slot.id.pool == self.id
    }

    /// A lent slot comes back and can be handed out again.
    ///
    /// # Panics
    /// If another pool lent it: that is a bug in the caller, not bad input.
    pub fn take_back(&mut self, slot: LentSlot) {
        assert!(
            self.lent_here(&slot),
            "a slot went back to a pool that did not lend it"
        );
        self.put(slot.id);
    }

    /// The bytes of a slot the caller holds.
    ///
    /// # Panics
    /// If the token is another pool's.
    pub fn slot_mut(&mut self, id: &BufId) -> &mut [u8] {
        let ptr = self.token_ptr(id);
        // SAFETY: `token_ptr` checked that `id` is a token of this pool, and the caller holds
        // it, so no operation is in flight on this slot; `&mut self` excludes any other borrow
        // of the pool, and slots do not overlap.
        unsafe { std::slice::from_raw_parts_mut(ptr, self.slot_size) }
    }

    /// Where the slot of a token of this pool starts.
    ///
    /// # Panics
    /// If the token is another pool's.
    pub(crate) fn token_ptr(&self, id: &BufId) -> *mut u8 {
        self.check(id);
        self.slot_ptr(id.index)
    }

    fn slot_ptr(&self, index: u16) -> *mut u8 {
        assert!(index < self.slots, "slot index out of range");
        // SAFETY: index < slots, so the offset stays inside this pool's slice of the arena.
        unsafe { self.base.as_ptr().add(usize::from(index) * self.slot_size) }
    }
}

fn invalid(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, what.to_string())
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
    fn a_lent_slot_is_out_of_the_pool_until_it_comes_back() {
        let mut pool = BufferPool::new(2, 4096).unwrap();
        let a = pool.take().unwrap();
        pool.slot_mut(&a)[..3].copy_from_slice(b"abc");
        let lent = pool.lend(a);
        assert_eq!(&lent.bytes()[..3], b"abc");
        assert_eq!(lent.size(), 4096);
        let lent = std::thread::spawn(move || lent).join().unwrap();
        let b = pool.take().unwrap();
        assert!(pool.take().is_none(), "the lent slot was handed out again");
        assert!(pool.lent_here(&lent));
        pool.take_back(lent);
        pool.put(b);
        assert_eq!(pool.free_slots(), 2);
    }

    #[test]
    #[should_panic(expected = "did not lend it")]
    fn a_slot_cannot_go_back_to_a_pool_that_did_not_lend_it() {
        let mut arena = Arena::new(2 * 4096).unwrap();
        let mut pools = BufferPool::cut(&mut arena, &[1, 1], 4096).unwrap();
        let id = pools[0].take().unwrap();
        let lent = pools[0].lend(id);
        assert!(!pools[1].lent_here(&lent));
        pools[1].take_back(lent);
    }

    #[test]
    fn rejects_empty_and_oversized_pools() {
        assert!(BufferPool::new(0, 4096).is_err());
        assert!(BufferPool::new(1, 0).is_err());
        assert!(BufferPool::new(1, (1 << 30) + 1).is_err());
    }

    #[test]
    fn pools_cut_from_one_arena_are_disjoint_and_bounded() {
        let mut arena = Arena::new(5 * 8192).unwrap();
        let mut pools = BufferPool::cut(&mut arena, &[2, 3], 5000).unwrap();
        let ids: Vec<Vec<BufId>> = pools
            .iter_mut()
            .map(|p| (0..p.slots()).map(|_| p.take().unwrap()).collect())
            .collect();
        for (p, (pool, ids)) in pools.iter_mut().zip(&ids).enumerate() {
            for id in ids {
                pool.slot_mut(id).fill(p as u8 + 1);
            }
        }
        for (p, (pool, ids)) in pools.iter_mut().zip(&ids).enumerate() {
            for id in ids {
                assert!(pool.slot_mut(id).iter().all(|&x| x == p as u8 + 1));
            }
        }
        drop(pools);
        assert_eq!(Arc::strong_count(&arena), 1, "pools let go of the arena");
        assert!(
            BufferPool::cut(&mut arena, &[3, 3], 5000).is_err(),
            "6 slots in 5"
        );
    }

    /// Pools of one arena are disjoint only if nothing from an earlier cut is still alive.
    #[test]
    fn an_arena_is_cut_again_only_once_nothing_holds_it() {
        let mut arena = Arena::new(2 * 4096).unwrap();
        let mut pools = BufferPool::cut(&mut arena, &[2], 4096).unwrap();
        assert!(
            BufferPool::cut(&mut arena, &[2], 4096).is_err(),
            "a pool is alive"
        );
        let id = pools[0].take().unwrap();
        let lent = pools[0].lend(id);
        drop(pools);
        assert!(
            BufferPool::cut(&mut arena, &[2], 4096).is_err(),
            "a lent slot is alive"
        );
        drop(lent);
        assert_eq!(BufferPool::cut(&mut arena, &[2], 4096).unwrap().len(), 1);
    }

    #[test]
    #[should_panic(expected = "another pool")]
    fn a_token_of_another_pool_does_not_open_a_slot() {
        let mut mine = BufferPool::new(1, 4096).unwrap();
        let mut theirs = BufferPool::new(1, 4096).unwrap();
        let id = theirs.take().unwrap();
        mine.slot_mut(&id);
    }

    #[test]
    #[should_panic(expected = "another pool")]
    fn a_token_of_another_pool_does_not_go_back_into_this_one() {
        let mut mine = BufferPool::new(1, 4096).unwrap();
        let mut theirs = BufferPool::new(1, 4096).unwrap();
        mine.put(theirs.take().unwrap());
    }
}
