//! Per-device reassembly on the destination: packets arrive by idx from any channel in any
//! order; they leave in idx order, one write in flight, and the config packet (highest idx)
//! last. Pure bookkeeping over buffers of any type `B`, shared by both engines.
//!
//! Memory: out-of-order data is bounded by `max_queued_bytes` (QEMU 10.1
//! `x-migration-max-queued-buffers-size` accounting: VFIO data bytes without the 12-byte header,
//! the config blob included). Unlike QEMU, which fails the migration when the limit would be
//! exceeded, [`Reassembly::admit`] answers [`Admission::Wait`] so the engine can stop reading that
//! channel until the device catches up; the packet that is deliverable right now is always
//! admitted, so waiting can always end.

use std::collections::BTreeMap;

/// A packet that can never be placed: the stream is wrong, not just early.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReassemblyError {
    #[error("state buffer {idx} already filled")]
    Duplicate { idx: u32 },
    #[error("second config packet at idx {idx} (the first was idx {first})")]
    SecondConfig { idx: u32, first: u32 },
    #[error("data packet idx {idx} is above the config packet idx {config_idx}")]
    AboveConfig { idx: u32, config_idx: u32 },
    #[error("config packet idx {idx} is below data packet idx {highest_data}, already received")]
    ConfigBelowData { idx: u32, highest_data: u32 },
    #[error("idx {idx} arrived after it was already written (next to write is {next_idx})")]
    AlreadyWritten { idx: u32, next_idx: u32 },
    #[error("device is already loaded; idx {idx} is extra")]
    AfterLoaded { idx: u32 },
}

/// Whether a packet may take a buffer now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    Accept,
    /// Over the queued-bytes limit and not deliverable now: stop reading this channel until the
    /// device writes something.
    Wait,
}

/// A buffer that is next in order, handed out for writing (data) or handing over (config).
#[derive(Debug)]
pub struct Ready<B> {
    pub idx: u32,
    pub config: bool,
    pub len: u32,
    pub buf: B,
}

#[derive(Debug)]
struct Queued<B> {
    config: bool,
    len: u32,
    /// None while the payload is still being received (reserved by [`Reassembly::reserve`]).
    buf: Option<B>,
}

/// One device's reassembly state.
#[derive(Debug)]
pub struct Reassembly<B> {
    next_idx: u32,
    config_idx: Option<u32>,
    highest_data: Option<u32>,
    pending: BTreeMap<u32, Queued<B>>,
    queued_bytes: u64,
    /// The most `queued_bytes` reached: what a VMM sizing the limit wants to know.
    peak_queued_bytes: u64,
    max_queued_bytes: u64,
    /// Packets queued (received or reserved, not yet written) beyond which only the next idx
    /// is admitted: bounds what packets without data cost, which `max_queued_bytes` does not.
    max_queued_packets: usize,
    in_flight: bool,
    loaded: bool,
}

impl<B> Reassembly<B> {
    pub fn new(max_queued_bytes: u64) -> Self {
        Self {
            next_idx: 0,
            config_idx: None,
            highest_data: None,
            pending: BTreeMap::new(),
            queued_bytes: 0,
            peak_queued_bytes: 0,
            max_queued_bytes,
            max_queued_packets: usize::MAX,
            in_flight: false,
            loaded: false,
        }
    }

    /// At most `packets` queued at once; beyond it only the next idx is admitted.
    pub fn with_packet_limit(mut self, packets: usize) -> Self {
        self.max_queued_packets = packets;
        self
    }

    /// Checks a packet before its payload is read: errors are final, `Wait` is backpressure.
    /// `len` is the VFIO data length (next_packet_size - 12).
    pub fn admit(&self, idx: u32, config: bool, len: u32) -> Result<Admission, ReassemblyError> {
        if self.loaded {
            return Err(ReassemblyError::AfterLoaded { idx });
        }
        if idx < self.next_idx || (idx == self.next_idx && self.in_flight) {
            return Err(ReassemblyError::AlreadyWritten {
                idx,
                next_idx: self.next_idx,
            });
        }
        if self.pending.contains_key(&idx) {
            return Err(ReassemblyError::Duplicate { idx });
        }
        match (config, self.config_idx) {
            (true, Some(first)) => return Err(ReassemblyError::SecondConfig { idx, first }),
            (true, None) => {
                if let Some(highest_data) = self.highest_data.filter(|&h| h >= idx) {
                    return Err(ReassemblyError::ConfigBelowData { idx, highest_data });
                }
            }
            (false, Some(config_idx)) if idx > config_idx => {
                return Err(ReassemblyError::AboveConfig { idx, config_idx });
            }
            (false, _) => {}
        }
        let deliverable_now = idx == self.next_idx;
        let room = self.queued_bytes + u64::from(len) <= self.max_queued_bytes
            && self.pending.len() < self.max_queued_packets;
        if deliverable_now || room {
            Ok(Admission::Accept)
        } else {
            Ok(Admission::Wait)
        }
    }

    /// Queues an admitted packet. Call only after [`Self::admit`] said `Accept`.
    pub fn insert(&mut self, idx: u32, config: bool, len: u32, buf: B) {
        self.reserve(idx, config, len);
        self.fill(idx, buf);
    }

    /// Takes an admitted packet's place before its payload arrives, so a second packet with the
    /// same idx is a duplicate from this moment on. Call only after `admit` said `Accept`.
    pub fn reserve(&mut self, idx: u32, config: bool, len: u32) {
        if config {
            self.config_idx = Some(idx);
        } else {
            self.highest_data = Some(self.highest_data.map_or(idx, |h| h.max(idx)));
        }
        self.queued_bytes += u64::from(len);
        self.peak_queued_bytes = self.peak_queued_bytes.max(self.queued_bytes);
        self.pending.insert(
            idx,
            Queued {
                config,
                len,
                buf: None,
            },
        );
    }

    /// Gives a reserved packet its received payload.
    pub fn fill(&mut self, idx: u32, buf: B) {
        if let Some(queued) = self.pending.get_mut(&idx) {
            queued.buf = Some(buf);
        }
    }

    /// Whether `idx` is the next to deliver (it may take the last free buffer).
    pub fn is_next(&self, idx: u32) -> bool {
        idx == self.next_idx && !self.in_flight
    }

    /// The buffer [`Self::pop_ready`] would hand out, without taking it.
    pub fn peek_ready(&self) -> Option<&B> {
        if self.in_flight {
            return None;
        }
        let (&idx, queued) = self.pending.first_key_value()?;
        (idx == self.next_idx)
            .then_some(queued.buf.as_ref())
            .flatten()
    }

    /// Whether this device can still move without another packet arriving: its next buffer is
    /// here, or a write is in flight (whose completion may make the next one deliverable).
    pub fn can_move(&self) -> bool {
        self.in_flight || self.peek_ready().is_some()
    }

    /// The next buffer in order, if it is here and no write is in flight.
    pub fn pop_ready(&mut self) -> Option<Ready<B>> {
        if self.in_flight {
            return None;
        }
        let entry = self.pending.first_entry()?;
        if *entry.key() != self.next_idx || entry.get().buf.is_none() {
            return None;
        }
        let idx = *entry.key();
        let Queued { config, len, buf } = entry.remove();
        let buf = buf?;
        self.in_flight = true;
        Some(Ready {
            idx,
            config,
            len,
            buf,
        })
    }

    /// The buffer handed out by [`Self::pop_ready`] is fully written (or, for the config
    /// packet, handed over). Returns true when the device is now loaded.
    pub fn complete(&mut self, len: u32) -> bool {
        debug_assert!(self.in_flight, "complete() without pop_ready()");
        self.in_flight = false;
        self.queued_bytes -= u64::from(len);
        if self.config_idx == Some(self.next_idx) {
            self.loaded = true;
        }
        self.next_idx += 1;
        self.loaded
    }

    pub fn is_loaded(&self) -> bool {
        self.loaded
    }

    pub fn next_idx(&self) -> u32 {
        self.next_idx
    }

    pub fn config_idx(&self) -> Option<u32> {
        self.config_idx
    }

    pub fn queued_bytes(&self) -> u64 {
        self.queued_bytes
    }

    /// The most bytes queued at once so far; the next in-order packet is admitted whatever
    /// the limit, so this may exceed [`Self::max_queued_bytes`] by one packet.
    pub fn peak_queued_bytes(&self) -> u64 {
        self.peak_queued_bytes
    }

    pub fn max_queued_bytes(&self) -> u64 {
        self.max_queued_bytes
    }

    /// Buffers still queued (for returning them to a pool on failure).
    pub fn drain(&mut self) -> impl Iterator<Item = B> + '_ {
        std::mem::take(&mut self.pending)
            .into_values()
            .filter_map(|q| q.buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deliver_all(r: &mut Reassembly<u32>) -> Vec<u32> {
        let mut out = Vec::new();
        while let Some(ready) = r.pop_ready() {
            out.push(ready.buf);
            r.complete(ready.len);
        }
        out
    }

    /// A destination worker leaves with buffers queued only when no device can move: a write
    /// in flight still can (its completion makes the next buffer deliverable), a gap cannot.
    #[test]
    fn a_write_in_flight_can_move_a_gap_cannot() {
        let mut r = Reassembly::new(u64::MAX);
        for idx in [0, 1] {
            r.insert(idx, false, 10, idx);
        }
        assert!(r.can_move(), "idx 0 is ready");
        let first = r.pop_ready().expect("idx 0 is ready");
        assert!(
            r.peek_ready().is_none(),
            "nothing is ready while idx 0 is written"
        );
        assert!(r.can_move(), "the write of idx 0 is in flight");
        r.complete(first.len);
        assert!(r.can_move(), "idx 1 is ready");
        let second = r.pop_ready().expect("idx 1 is ready");
        r.complete(second.len);
        r.insert(3, true, 10, 3);
        assert!(!r.can_move(), "idx 2 is missing and nothing is in flight");
    }

    #[test]
    fn delivers_in_idx_order_and_config_last() {
        let mut r = Reassembly::new(u64::MAX);
        for (idx, config) in [(2, true), (1, false), (0, false)] {
            assert_eq!(r.admit(idx, config, 10), Ok(Admission::Accept));
            r.insert(idx, config, 10, idx);
            if idx != 0 {
                assert!(r.pop_ready().is_none(), "idx 0 has not arrived");
            }
        }
        assert_eq!(deliver_all(&mut r), vec![0, 1, 2]);
        assert!(r.is_loaded());
        assert_eq!(r.queued_bytes(), 0);
        assert_eq!(
            r.admit(3, false, 1),
            Err(ReassemblyError::AfterLoaded { idx: 3 })
        );
    }

    #[test]
    fn one_write_in_flight() {
        let mut r = Reassembly::new(u64::MAX);
        r.insert(0, false, 4, 0);
        r.insert(1, false, 4, 1);
        let first = r.pop_ready().unwrap();
        assert!(r.pop_ready().is_none(), "idx 1 must wait for idx 0's write");
        assert!(!r.complete(first.len));
        assert_eq!(r.pop_ready().unwrap().idx, 1);
    }

    #[test]
    fn rejects_duplicates_second_config_and_data_above_config() {
        let mut r = Reassembly::new(u64::MAX);
        r.insert(3, true, 1, 0);
        r.insert(1, false, 1, 0);
        assert_eq!(
            r.admit(1, false, 1),
            Err(ReassemblyError::Duplicate { idx: 1 })
        );
        assert_eq!(
            r.admit(5, true, 1),
            Err(ReassemblyError::SecondConfig { idx: 5, first: 3 })
        );
        assert_eq!(
            r.admit(4, false, 1),
            Err(ReassemblyError::AboveConfig {
                idx: 4,
                config_idx: 3
            })
        );
        let mut r = Reassembly::new(u64::MAX);
        r.insert(7, false, 1, 0);
        assert_eq!(
            r.admit(6, true, 1),
            Err(ReassemblyError::ConfigBelowData {
                idx: 6,
                highest_data: 7
            })
        );
    }

    #[test]
    fn queued_bytes_limit_is_backpressure_but_the_next_idx_always_fits() {
        let mut r = Reassembly::new(100);
        assert_eq!(r.admit(1, false, 60), Ok(Admission::Accept));
        r.insert(1, false, 60, 1);
        assert_eq!(r.admit(2, false, 60), Ok(Admission::Wait));
        assert_eq!(
            r.admit(0, false, 60),
            Ok(Admission::Accept),
            "idx 0 is deliverable"
        );
        r.insert(0, false, 60, 0);
        assert_eq!(deliver_all(&mut r), vec![0, 1]);
        assert_eq!(r.admit(2, false, 60), Ok(Admission::Accept));
        assert_eq!(
            r.admit(0, false, 1),
            Err(ReassemblyError::AlreadyWritten {
                idx: 0,
                next_idx: 2
            })
        );
    }

    /// Packets without data cost no bytes, so the packet limit is what bounds them.
    #[test]
    fn the_packet_limit_holds_back_empty_packets_but_not_the_next_idx() {
        let mut r = Reassembly::new(u64::MAX).with_packet_limit(2);
        for idx in [1, 2] {
            assert_eq!(r.admit(idx, false, 0), Ok(Admission::Accept));
            r.insert(idx, false, 0, idx);
        }
        assert_eq!(r.admit(3, false, 0), Ok(Admission::Wait));
        assert_eq!(r.admit(0, false, 0), Ok(Admission::Accept), "idx 0 is next");
        r.insert(0, false, 0, 0);
        assert_eq!(deliver_all(&mut r), vec![0, 1, 2]);
        assert_eq!(r.admit(3, false, 0), Ok(Admission::Accept));
    }

    #[test]
    fn a_reserved_idx_is_a_duplicate_before_its_payload_arrives() {
        let mut r = Reassembly::new(u64::MAX);
        r.reserve(0, false, 5);
        assert_eq!(
            r.admit(0, false, 5),
            Err(ReassemblyError::Duplicate { idx: 0 })
        );
        assert!(r.pop_ready().is_none(), "payload not here yet");
        assert!(r.peek_ready().is_none());
        r.fill(0, 42);
        assert_eq!(r.peek_ready(), Some(&42));
        assert_eq!(r.pop_ready().unwrap().buf, 42);
    }

    #[test]
    fn zero_data_device_is_loaded_by_its_config_packet_alone() {
        let mut r = Reassembly::new(0);
        assert_eq!(r.admit(0, true, 8), Ok(Admission::Accept));
        r.insert(0, true, 8, 9);
        let ready = r.pop_ready().unwrap();
        assert!(ready.config);
        assert!(r.complete(ready.len));
    }
}
