//! A source with fewer devices than workers: reading workers lend each filled buffer to the
//! sending workers, which own every channel.
//!
//! A `data_fd` is a stream read one chunk at a time, so one worker reads each device. Without
//! a handoff that worker also makes every send, and a single device (`gpu`) runs on one worker
//! whatever `--workers` says: its read copy and its send copy (on loopback, the whole TCP path
//! too) share one core. Here reader `d` reads device `d` into its own pool and lends each filled
//! slot to the sender with the fewest packets outstanding, which sends it from the lent memory
//! and gives the slot back. Readers and senders each sleep in their own ring; an inbox or a
//! return box that goes from empty to non-empty wakes its owner through the ring's waker, and a
//! busy owner drains it before its next wait, so a wake costs one eventfd write per batch.
//!
//! Order: each sender sends its inbox in arrival order, and the one reader of a device hands
//! its packets over in idx order, so every channel still carries each device's idx rising.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};

use ::uring::{LentSlot, Waker};

use super::source::ReadyPacket;
use crate::wire::DeviceId;

/// What readers and senders share for one run.
pub(super) struct Handoff {
    /// Per sender: packets to send, each packet's `device` the run's global device index.
    inboxes: Vec<Mailbox<ReadyPacket>>,
    /// Per sender: packets handed to it and not yet sent (the load it is chosen by).
    outstanding: Vec<AtomicUsize>,
    /// All senders' `outstanding` together, against `room`.
    total_outstanding: AtomicUsize,
    /// Where the next search for the least loaded sender starts, so that ties (every sender
    /// idle, as when packets come slower than they are sent) go round robin rather than all to
    /// sender 0, whose channels would then carry everything.
    next_sender: AtomicUsize,
    /// Per reader (= per device): slots its senders are done with.
    returns: Vec<Mailbox<LentSlot>>,
    readers_left: AtomicUsize,
    /// Packets handed over and not yet sent, all senders, beyond which readers wait.
    room: usize,
    /// By global device index, for senders' errors.
    device_ids: Vec<DeviceId>,
}

struct Mailbox<T> {
    items: Mutex<Vec<T>>,
    waker: OnceLock<Waker>,
}

impl<T> Mailbox<T> {
    fn new() -> Self {
        Self {
            items: Mutex::new(Vec::new()),
            waker: OnceLock::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<T>> {
        self.items.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn post(&self, item: T) {
        let was_empty = {
            let mut items = self.lock();
            items.push(item);
            items.len() == 1
        };
        // Not empty before: a wake is pending or the owner has not drained yet.
        if was_empty {
            self.wake();
        }
    }

    fn wake(&self) {
        if let Some(waker) = self.waker.get() {
            waker.wake();
        }
    }

    fn take_all(&self) -> Vec<T> {
        std::mem::take(&mut *self.lock())
    }
}

impl Handoff {
    /// One reader per device (reader `d` reads device `d`), `senders` senders, which own
    /// `channels` channels between them.
    pub(super) fn new(device_ids: Vec<DeviceId>, senders: usize, channels: usize) -> Self {
        Self {
            room: channels + senders,
            inboxes: (0..senders).map(|_| Mailbox::new()).collect(),
            outstanding: (0..senders).map(|_| AtomicUsize::new(0)).collect(),
            total_outstanding: AtomicUsize::new(0),
            next_sender: AtomicUsize::new(0),
            returns: (0..device_ids.len()).map(|_| Mailbox::new()).collect(),
            readers_left: AtomicUsize::new(device_ids.len()),
            device_ids,
        }
    }

    pub(super) fn device_id(&self, device: usize) -> &DeviceId {
        &self.device_ids[device]
    }

    /// Reader `reader` sleeps in a ring woken by `waker`. Posts made before this call are
    /// found by the reader's first drain.
    pub(super) fn register_reader(&self, reader: usize, waker: Waker) {
        let _ = self.returns[reader].waker.set(waker);
    }

    pub(super) fn register_sender(&self, sender: usize, waker: Waker) {
        let _ = self.inboxes[sender].waker.set(waker);
    }

    /// Hands a packet (its `device` the global index) to the least loaded sender; ties round
    /// robin.
    pub(super) fn hand_over(&self, packet: ReadyPacket) {
        let senders = self.outstanding.len();
        let start = self.next_sender.fetch_add(1, Ordering::Relaxed);
        let sender = (0..senders)
            .map(|i| (start + i) % senders)
            .min_by_key(|&s| self.outstanding[s].load(Ordering::Relaxed))
            .expect("a handoff has senders");
        self.outstanding[sender].fetch_add(1, Ordering::Relaxed);
        self.total_outstanding.fetch_add(1, Ordering::SeqCst);
        self.inboxes[sender].post(packet);
    }

    /// Whether a reader may read another packet: one per channel in flight and one queued per
    /// sender keep every channel busy. `source_only_speed` (1 GiB, 8 channels, 8 MiB packets,
    /// 1 reader and 1 or 3 senders) moved 3.1-3.4 GiB/s with room for 2 packets, 3.7-4.2 with
    /// 4, 3.8-4.7 with 8 and 3.8-4.4 with 16. Reading further ahead only queues packets in
    /// socket buffers: same-host gpu's p50 latency is 37-57 ms at this room, 14-19 ms at 3.
    pub(super) fn has_room(&self) -> bool {
        self.total_outstanding.load(Ordering::SeqCst) < self.room
    }

    /// In arrival order: the inbox is drained whole.
    pub(super) fn take_inbox(&self, sender: usize) -> Vec<ReadyPacket> {
        self.inboxes[sender].take_all()
    }

    /// A sender finished a packet of `device`; a lent slot goes back to that device's reader.
    /// When that makes room, every reader is woken: any of them may be waiting for it, not
    /// only the one whose slot comes back (a config packet returns no slot at all).
    pub(super) fn sent(&self, sender: usize, device: usize, slot: Option<LentSlot>) {
        self.outstanding[sender].fetch_sub(1, Ordering::Relaxed);
        let was_full = self.total_outstanding.fetch_sub(1, Ordering::SeqCst) == self.room;
        if let Some(slot) = slot {
            self.returns[device].post(slot);
        }
        if was_full {
            for returns in &self.returns {
                returns.wake();
            }
        }
    }

    pub(super) fn take_returns(&self, reader: usize) -> Vec<LentSlot> {
        self.returns[reader].take_all()
    }

    /// A reader handed over its device's last packet: once every reader has, senders finish
    /// when their inboxes are empty.
    pub(super) fn reader_done(&self) {
        if self.readers_left.fetch_sub(1, Ordering::SeqCst) == 1 {
            for inbox in &self.inboxes {
                inbox.wake();
            }
        }
    }

    /// Whether no packet can arrive for `sender` any more.
    pub(super) fn inbox_closed(&self, sender: usize) -> bool {
        // Readers post before they count themselves done, so once the count reads 0 every
        // post is visible to this lock.
        self.readers_left.load(Ordering::SeqCst) == 0 && self.inboxes[sender].lock().is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ::uring::Buffer;

    fn packet(device: usize, idx: u32) -> ReadyPacket {
        ReadyPacket {
            device,
            idx,
            buf: Buffer::Heap(vec![0u8; 8].into_boxed_slice()),
            len: 8,
        }
    }

    fn ids(n: usize) -> Vec<DeviceId> {
        (0..n)
            .map(|i| DeviceId::new(format!("0000:00:0{i}.0/vfio"), 0).unwrap())
            .collect()
    }

    #[test]
    fn packets_go_to_the_least_loaded_sender_in_order_and_room_bounds_the_readers() {
        let handoff = Handoff::new(ids(1), 2, 4);
        for idx in 0..6 {
            assert!(handoff.has_room(), "room for channels + senders = 6");
            handoff.hand_over(packet(0, idx));
        }
        assert!(!handoff.has_room());
        let first: Vec<u32> = handoff.take_inbox(0).iter().map(|p| p.idx).collect();
        let second: Vec<u32> = handoff.take_inbox(1).iter().map(|p| p.idx).collect();
        assert_eq!(first, [0, 2, 4]);
        assert_eq!(second, [1, 3, 5]);
        handoff.sent(1, 0, None);
        assert!(handoff.has_room());
        handoff.hand_over(packet(0, 6));
        let second: Vec<u32> = handoff.take_inbox(1).iter().map(|p| p.idx).collect();
        assert_eq!(second, [6], "sender 1 had fewer packets outstanding");
    }

    #[test]
    fn packets_sent_one_at_a_time_still_reach_every_sender() {
        let handoff = Handoff::new(ids(1), 3, 5);
        let mut got = [0; 3];
        for idx in 0..9 {
            handoff.hand_over(packet(0, idx));
            let sender = (0..3).find(|&s| !handoff.take_inbox(s).is_empty()).unwrap();
            got[sender] += 1;
            // Sent before the next read: every sender is idle at each handover.
            handoff.sent(sender, 0, None);
        }
        assert_eq!(got, [3, 3, 3]);
    }

    /// Reader 1 waits for room that reader 0's packets took; a sent packet of reader 0's (a
    /// config packet: no slot goes back) makes room, and reader 1's ring is woken.
    #[test]
    fn making_room_wakes_every_reader() {
        let config = ::uring::RingConfig {
            entries: 8,
            forbid: ::uring::FeatureMask::empty(),
        };
        let pool = ::uring::BufferPool::new(1, 4096).unwrap();
        let Ok(mut ring) = ::uring::Ring::new(&config, pool) else {
            println!("skipping: no io_uring here");
            return;
        };
        let handoff = Handoff::new(ids(2), 1, 1);
        handoff.register_reader(1, ring.waker());
        handoff.hand_over(packet(0, 0));
        handoff.hand_over(packet(0, 1));
        assert!(!handoff.has_room(), "room for 1 channel + 1 sender = 2");
        handoff.sent(0, 0, None);
        assert!(handoff.has_room());
        ring.wait(1, Some(std::time::Duration::from_secs(2)))
            .unwrap();
        let woken =
            std::iter::from_fn(|| ring.next_completion()).any(|c| c.kind == ::uring::OpKind::Wake);
        assert!(woken, "reader 1 was not woken when room was made");
    }

    #[test]
    fn an_inbox_closes_only_when_every_reader_is_done_and_it_is_empty() {
        let handoff = Handoff::new(ids(2), 1, 2);
        assert!(!handoff.inbox_closed(0));
        handoff.hand_over(packet(1, 0));
        handoff.reader_done();
        handoff.reader_done();
        assert!(!handoff.inbox_closed(0), "a packet is still queued");
        assert_eq!(handoff.take_inbox(0).len(), 1);
        assert!(handoff.inbox_closed(0));
        assert_eq!(handoff.device_id(1), &ids(2)[1]);
    }
}
