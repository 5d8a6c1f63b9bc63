//! The destination's workers. Each owns some channels, one ring and one pool. Per channel, the 288
//! header bytes are received into a small buffer, then the payload straight into a pool slot, which
//! is written to the device's `data_fd` from that slot when it is next in idx order. The devices'
//! reassembly is shared by all workers (a mutex per device); only the worker owning a slot writes
//! from it, and a worker whose write makes another worker's slot deliverable wakes that worker. A
//! channel whose next packet cannot be placed (queued-bytes limit, no free slot) is parked, not
//! read, until something is written.

use std::collections::HashMap;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use ::uring::{Buffer, BufferPool, Completion, FileId, OpKind, Ring, Waker};

use super::*;
use crate::session::reassembly::{Admission, Reassembly};
use crate::wire::{
    DeviceStatePacketHeader, VfioDeviceStatePacketHeader, DEVICE_STATE_HEADER_LEN,
    PACKET_HEADER_ROOM, VFIO_HEADER_LEN,
};

/// With every open channel parked and nothing being written, how long before "no progress
/// possible". Only a wake-up still on its way can end that (a parked channel is retried at
/// least every `POLL`), so this need not cover a slow peer: a channel still reading, however
/// idle, keeps the run waiting, and the session's `--timeout` ends a peer that sends nothing.
const STALL_GRACE: Duration = Duration::from_secs(1);

/// A received payload waiting in a device's reassembly: which worker's pool it belongs to.
#[derive(Debug)]
struct Held {
    worker: usize,
    channel: usize,
    buf: Buffer,
}

struct DevState {
    reassembly: Reassembly<Held>,
    report: DestDeviceReport,
}

pub(super) struct DestShared {
    devices: Vec<DestDevice>,
    /// Per device: written from the worker thread itself (see `writes_only_in_io_wq`).
    write_now: Vec<bool>,
    by_id: HashMap<(Vec<u8>, u32), usize>,
    states: Vec<Mutex<DevState>>,
    wakers: Mutex<Vec<Option<Waker>>>,
    parked: Vec<AtomicUsize>,
    /// recvs + writes in flight, all workers.
    active_ops: AtomicUsize,
    /// Device writes in flight, all workers.
    writes_in_flight: AtomicUsize,
    progress_events: AtomicU64,
    loaded: AtomicUsize,
    done_channels: AtomicUsize,
    n_channels: usize,
    /// Channels parked anywhere, with what they hold, for the stall message.
    parked_detail: Mutex<HashMap<usize, String>>,
    pub(super) failure: Failure,
    channel_reports: Mutex<Vec<(usize, ChannelReport)>>,
}

impl DestShared {
    pub(super) fn new(
        devices: Vec<DestDevice>,
        config: &EngineConfig,
        workers: usize,
        n_channels: usize,
    ) -> Self {
        let by_id = devices
            .iter()
            .enumerate()
            .map(|(i, d)| ((d.id.idstr.as_bytes().to_vec(), d.id.instance_id), i))
            .collect();
        let states = devices
            .iter()
            .map(|d| {
                Mutex::new(DevState {
                    reassembly: config.dest_reassembly(d),
                    report: DestDeviceReport::default(),
                })
            })
            .collect();
        let write_now = devices
            .iter()
            .map(|d| writes_only_in_io_wq(d.data_fd.as_fd()))
            .collect();
        Self {
            devices,
            write_now,
            by_id,
            states,
            wakers: Mutex::new(vec![None; workers]),
            parked: (0..workers).map(|_| AtomicUsize::new(0)).collect(),
            active_ops: AtomicUsize::new(0),
            writes_in_flight: AtomicUsize::new(0),
            progress_events: AtomicU64::new(0),
            loaded: AtomicUsize::new(0),
            done_channels: AtomicUsize::new(0),
            n_channels,
            parked_detail: Mutex::new(HashMap::new()),
            failure: Failure::default(),
            channel_reports: Mutex::new(Vec::new()),
        }
    }

    fn state(&self, d: usize) -> MutexGuard<'_, DevState> {
        self.states[d].lock().unwrap_or_else(|p| p.into_inner())
    }

    fn waker(&self, w: usize) -> Option<Waker> {
        self.wakers.lock().unwrap_or_else(|p| p.into_inner())[w].clone()
    }

    /// The run's report, once every worker has stopped: fails unless every device is loaded.
    pub(super) fn into_report(
        self,
        notes: Vec<String>,
        rings: Vec<::uring::RingPath>,
    ) -> Result<DestReport, DataPlaneError> {
        let mut report = DestReport {
            devices: Vec::new(),
            channels: vec![ChannelReport::default(); self.n_channels],
            notes,
            workers: Some(self.parked.len()),
            rings,
        };
        for (i, c) in self
            .channel_reports
            .into_inner()
            .unwrap_or_else(|p| p.into_inner())
        {
            report.channels[i] = c;
        }
        for (device, state) in self.devices.iter().zip(self.states) {
            let state = state.into_inner().unwrap_or_else(|p| p.into_inner());
            if !state.reassembly.is_loaded() {
                return Err(DataPlaneError::Incomplete {
                    device: device.id.clone(),
                    next_idx: state.reassembly.next_idx(),
                    config_idx: state.reassembly.config_idx(),
                });
            }
            report.devices.push(state.report);
        }
        Ok(report)
    }

    /// Counts a receive about to be submitted.
    fn recv_started(&self) {
        self.active_ops.fetch_add(1, Ordering::SeqCst);
    }

    /// Whether every channel that has not reached EOF, in every worker, is parked: then no
    /// channel reads, and only a write (or a buffer ready to be written) can unpark one.
    fn all_open_parked(&self) -> bool {
        let parked: usize = self.parked.iter().map(|p| p.load(Ordering::SeqCst)).sum();
        parked > 0 && parked + self.done_channels.load(Ordering::SeqCst) >= self.n_channels
    }

    fn any_device_can_move(&self) -> bool {
        (0..self.devices.len()).any(|d| self.state(d).reassembly.can_move())
    }

    pub(super) fn wake_all(&self) {
        for waker in self
            .wakers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .flatten()
        {
            waker.wake();
        }
    }
}

/// Where a destination channel is.
enum ChanState {
    /// Receiving the 288 header bytes; `got` of them are in `hdr`.
    Header {
        got: usize,
    },
    /// The header is decoded; the packet waits for a place (parked) or its payload is coming.
    Packet(PacketInfo),
    Done,
}

#[derive(Clone, Copy)]
struct PacketInfo {
    device: usize,
    idx: u32,
    config: bool,
    len: u32,
    /// The payload is being received; `got` bytes so far.
    got: usize,
    parked: bool,
}

struct DstChannel {
    index: usize,
    /// The socket, held by the ring.
    file: FileId,
    state: ChanState,
    hdr: Option<Box<[u8]>>,
    payload: Option<Buffer>,
    /// Bytes of the stream consumed before the current packet.
    offset: u64,
    report: ChannelReport,
}

/// A write in flight: to device `device`, idx `idx`, `done` of `len` bytes written.
struct WriteOp {
    device: usize,
    idx: u32,
    channel: usize,
    len: usize,
    done: usize,
}

const TAG_WRITE: u64 = 1 << 40;

/// Whether a write completion finished its logical write or continued it.
enum WriteProgress {
    Partial,
    Done,
}

struct DestWorker<'a> {
    w: usize,
    /// What this worker serves, for errors that are the ring's rather than one op's.
    serves: String,
    ring: Ring,
    /// Every device's `data_fd` (a duplicate held by this worker's ring), by device index.
    device_files: Vec<FileId>,
    channels: Vec<DstChannel>,
    writes: HashMap<u64, WriteOp>,
    next_write_tag: u64,
    heap_held: usize,
    shared: &'a DestShared,
    progress: &'a Progress,
    max_packet_size: u32,
    last_progress: (u64, Instant),
}

impl UringEngine {
    pub(super) fn dest_worker(
        &self,
        w: usize,
        channels: Vec<(usize, OwnedFd)>,
        pool: BufferPool,
        shared: &DestShared,
        progress: &Progress,
    ) -> Result<(Vec<String>, ::uring::RingPath), DataPlaneError> {
        let mut ring =
            Ring::new(&self.ring_config(), pool).map_err(|err| DataPlaneError::Setup {
                engine: "uring",
                source: io::Error::other(error_chain(&err)),
            })?;
        let device_files = shared
            .devices
            .iter()
            .map(|d| ring.dup_fd(d.data_fd.as_fd()))
            .collect::<io::Result<Vec<_>>>()
            .map_err(|source| DataPlaneError::Setup {
                engine: "uring",
                source,
            })?;
        let serves = serves(channels.iter().map(|(index, _)| *index), std::iter::empty());
        // Registered before this worker's first receive: only a worker that owns a slot or a
        // parked channel is ever woken, and it owns neither before it has received, so no wake
        // is lost and workers need not wait for each other to start.
        shared.wakers.lock().unwrap_or_else(|p| p.into_inner())[w] = Some(ring.waker());
        let notes = ring.notes().to_vec();
        let channels = channels
            .into_iter()
            .map(|(index, fd)| DstChannel {
                index,
                file: ring.adopt_fd(fd),
                state: ChanState::Header { got: 0 },
                hdr: Some(vec![0u8; PACKET_HEADER_ROOM].into_boxed_slice()),
                payload: None,
                offset: crate::wire::INIT_PACKET_LEN as u64,
                report: ChannelReport::default(),
            })
            .collect();
        let mut worker = DestWorker {
            w,
            serves,
            ring,
            device_files,
            channels,
            writes: HashMap::new(),
            next_write_tag: 0,
            heap_held: 0,
            shared,
            progress,
            max_packet_size: self.config.max_packet_size,
            last_progress: (0, Instant::now()),
        };
        let result = worker.run();
        if result.is_err() {
            worker.abort_channels();
            worker.ring.cancel_all(progress.cancel_drain());
        }
        // Hand back buffers still queued in reassembly that belong to this worker: none are
        // left on success; on failure the pool is dropped with the ring.
        let reports = worker.channels.iter().map(|c| (c.index, c.report.clone()));
        shared
            .channel_reports
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(reports);
        let path = worker.ring.path();
        result.map(|()| (notes, path))
    }
}

impl DestWorker<'_> {
    /// The run failed: every channel's connection is aborted before the ring drains its ops,
    /// as the source does. Nothing here waits on a socket's queue (receives cancel at once),
    /// but the source's sends fail now, on the reset, and whatever zero-copy sends it has in
    /// flight to this side get their notifications, instead of waiting for these fds to close.
    fn abort_channels(&self) {
        for channel in &self.channels {
            if let Err(err) = self.ring.abort_socket(channel.file) {
                // A Unix stream channel cannot be aborted; `run_dest` shuts it down.
                log::debug!("channel {}: aborting the connection: {err}", channel.index);
            }
        }
    }

    fn run(&mut self) -> Result<(), DataPlaneError> {
        for c in 0..self.channels.len() {
            self.recv_header(c)?;
        }
        loop {
            if self.progress.cancelled() {
                return Err(DataPlaneError::Cancelled);
            }
            if self.shared.failure.is_set() {
                return Err(DataPlaneError::Cancelled);
            }
            if self.finished()? {
                return Ok(());
            }
            self.ring
                .wait(1, Some(POLL))
                .map_err(|source| DataPlaneError::Ring {
                    worker: self.w,
                    serves: self.serves.clone(),
                    source,
                })?;
            let mut woken = false;
            while let Some(done) = self.ring.next_completion() {
                match done.kind {
                    OpKind::Wake => woken = true,
                    OpKind::Recv => self.recv_done(done)?,
                    OpKind::Write => self.write_done(done)?,
                    _ => {}
                }
            }
            if woken || self.has_parked() {
                self.deliver_mine()?;
                self.retry_parked()?;
            }
            self.check_stall()?;
        }
    }

    /// This worker is done when its channels reached EOF, nothing of its is in flight, and no
    /// buffer of its pool waits in a reassembly (another worker's write may still make it
    /// deliverable, and only this worker may write from it).
    fn finished(&mut self) -> Result<bool, DataPlaneError> {
        let idle = self
            .channels
            .iter()
            .all(|c| matches!(c.state, ChanState::Done))
            && self.writes.is_empty()
            && self.ring.in_flight() == 0;
        if !idle {
            return Ok(false);
        }
        if self.heap_held == 0 && self.ring.free_slots() == self.ring.buffers().slots() {
            return Ok(true);
        }
        // Buffers of this worker wait in a reassembly. Once every channel everywhere has ended
        // and no receive is in flight, only deliveries can still happen: stay while any device
        // can move (deliver its next buffer if it is ours; otherwise its owner, or the writer
        // in flight, wakes us), leave when none can (a gap: the run is incomplete). A write in
        // flight keeps us too: `active_ops` was read before the devices, so another worker may
        // have started that write, from a buffer ready at the read, in between.
        let all_ended = self.shared.done_channels.load(Ordering::SeqCst) == self.shared.n_channels
            && self.shared.active_ops.load(Ordering::SeqCst) == 0;
        if !all_ended {
            return Ok(false);
        }
        if self.shared.any_device_can_move() {
            self.deliver_mine()?;
            return Ok(false);
        }
        Ok(true)
    }

    fn has_parked(&self) -> bool {
        self.shared.parked[self.w].load(Ordering::SeqCst) > 0
    }

    fn recv_header(&mut self, c: usize) -> Result<(), DataPlaneError> {
        let channel = &mut self.channels[c];
        let ChanState::Header { got } = channel.state else {
            return Ok(());
        };
        let hdr = channel
            .hdr
            .take()
            .expect("header buffer is home between packets");
        // Without MSG_WAITALL: one recv when the header is there (the common case), and a bad
        // device-state header is reported even if its VFIO header never follows.
        self.shared.recv_started();
        self.ring
            .recv_some(
                c as u64,
                channel.file,
                Buffer::Heap(hdr),
                got..PACKET_HEADER_ROOM,
            )
            .map_err(|source| DataPlaneError::Recv {
                channel: channel.index,
                offset: channel.offset + got as u64,
                source,
            })
    }

    /// `active_ops` drops only after the completion's effects (a filled reassembly slot, the
    /// next receive, a write handed out) are in place: a worker that sees nothing in flight and
    /// nothing deliverable may leave, so there must be no gap between the two.
    fn recv_done(&mut self, done: Completion) -> Result<(), DataPlaneError> {
        let result = self.recv_finished(done);
        self.shared.active_ops.fetch_sub(1, Ordering::SeqCst);
        result
    }

    fn recv_finished(&mut self, done: Completion) -> Result<(), DataPlaneError> {
        let c = done.tag as usize;
        let channel = &mut self.channels[c];
        let index = channel.index;
        let n = match done.result {
            Ok(n) => n,
            Err(source) => {
                let offset = channel.offset;
                return Err(match channel.state {
                    ChanState::Packet(info) => DataPlaneError::RecvPayload {
                        channel: index,
                        device: self.shared.devices[info.device].id.clone(),
                        idx: Some(info.idx),
                        offset,
                        source,
                    },
                    _ => DataPlaneError::Recv {
                        channel: index,
                        offset,
                        source,
                    },
                });
            }
        };
        match &mut channel.state {
            ChanState::Header { got } => {
                channel.hdr = match done.buf {
                    Some(Buffer::Heap(hdr)) => Some(hdr),
                    _ => None,
                };
                if n == 0 && *got == 0 {
                    channel.state = ChanState::Done;
                    self.shared.done_channels.fetch_add(1, Ordering::SeqCst);
                    return Ok(());
                }
                if n == 0 {
                    return Err(DataPlaneError::TruncatedPacket {
                        channel: index,
                        offset: channel.offset,
                    });
                }
                *got += n;
                let (before, got) = (*got - n, *got);
                if before < DEVICE_STATE_HEADER_LEN && got >= DEVICE_STATE_HEADER_LEN {
                    self.check_device_state_header(c)?;
                }
                if got < PACKET_HEADER_ROOM {
                    return self.recv_header(c);
                }
                let info = self.decode_header(c)?;
                self.channels[c].state = ChanState::Packet(info);
                self.place(c)
            }
            ChanState::Packet(info) => {
                if n == 0 {
                    return Err(DataPlaneError::TruncatedPayload {
                        channel: index,
                        device: self.shared.devices[info.device].id.clone(),
                        idx: Some(info.idx),
                        offset: channel.offset,
                    });
                }
                info.got += n;
                channel.payload = done.buf;
                if info.got < info.len as usize {
                    return self.recv_payload(c);
                }
                self.payload_done(c)
            }
            ChanState::Done => Ok(()),
        }
    }

    fn check_device_state_header(&self, c: usize) -> Result<(), DataPlaneError> {
        let channel = &self.channels[c];
        let hdr = channel
            .hdr
            .as_deref()
            .expect("header buffer is home after its recv");
        let ds: &[u8; DEVICE_STATE_HEADER_LEN] = hdr[..DEVICE_STATE_HEADER_LEN]
            .try_into()
            .expect("288-byte header buffer");
        DeviceStatePacketHeader::decode(ds, self.max_packet_size)
            .map(drop)
            .map_err(|source| DataPlaneError::Wire {
                channel: channel.index,
                offset: channel.offset,
                source,
            })
    }

    fn decode_header(&mut self, c: usize) -> Result<PacketInfo, DataPlaneError> {
        let channel = &self.channels[c];
        let (index, offset) = (channel.index, channel.offset);
        let hdr = channel
            .hdr
            .as_deref()
            .expect("header buffer is home after its recv");
        let wire = |source| DataPlaneError::Wire {
            channel: index,
            offset,
            source,
        };
        let (ds, vfio) = hdr.split_at(DEVICE_STATE_HEADER_LEN);
        let ds: &[u8; DEVICE_STATE_HEADER_LEN] = ds.try_into().expect("288-byte header buffer");
        let view = DeviceStatePacketHeader::decode(ds, self.max_packet_size).map_err(wire)?;
        let vfio: &[u8; VFIO_HEADER_LEN] = vfio.try_into().expect("288-byte header buffer");
        let vfio =
            VfioDeviceStatePacketHeader::decode(vfio, DEVICE_STATE_HEADER_LEN).map_err(wire)?;
        let key = (view.idstr.to_vec(), view.instance_id);
        let Some(&device) = self.shared.by_id.get(&key) else {
            return Err(DataPlaneError::UnknownDevice {
                channel: index,
                idstr: String::from_utf8_lossy(view.idstr).into_owned(),
                instance_id: view.instance_id,
                offset,
            });
        };
        Ok(PacketInfo {
            device,
            idx: vfio.idx,
            config: vfio.config,
            len: view.next_packet_size - VFIO_HEADER_LEN as u32,
            got: 0,
            parked: false,
        })
    }

    /// Finds the packet a place: admission by the device's reassembly, then a buffer. Parks the
    /// channel when either says "not now".
    fn place(&mut self, c: usize) -> Result<(), DataPlaneError> {
        let ChanState::Packet(mut info) = self.channels[c].state else {
            return Ok(());
        };
        let index = self.channels[c].index;
        let mut state = self.shared.state(info.device);
        let admission = state
            .reassembly
            .admit(info.idx, info.config, info.len)
            .map_err(|source| DataPlaneError::Reassembly {
                channel: index,
                device: self.shared.devices[info.device].id.clone(),
                idx: info.idx,
                source,
            })?;
        let is_next = state.reassembly.is_next(info.idx);
        let fits_slot = info.len as usize <= self.ring.buffers().slot_size();
        // The last free slot is kept for the packet that is next in order, so out-of-order
        // packets cannot take every slot and leave nothing for the one that unblocks them.
        let free = self.ring.free_slots();
        let buffer_ok = !fits_slot || free > 1 || (free == 1 && is_next);
        if admission == Admission::Wait || !buffer_ok {
            let why = if admission == Admission::Wait {
                format!(
                    "over the queued-bytes limit with {} bytes queued",
                    state.reassembly.queued_bytes()
                )
            } else {
                "no free buffer".to_string()
            };
            let detail = format!(
                "channel {index} holds device {} idx {} ({} bytes) while the device waits for idx {} ({why})",
                self.shared.devices[info.device].id,
                info.idx,
                info.len,
                state.reassembly.next_idx(),
            );
            drop(state);
            self.shared
                .parked_detail
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(index, detail);
            if !info.parked {
                info.parked = true;
                self.shared.parked[self.w].fetch_add(1, Ordering::SeqCst);
                self.channels[c].state = ChanState::Packet(info);
            }
            return Ok(());
        }
        state.reassembly.reserve(info.idx, info.config, info.len);
        drop(state);
        if info.parked {
            info.parked = false;
            self.shared.parked[self.w].fetch_sub(1, Ordering::SeqCst);
            self.shared
                .parked_detail
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&index);
        }
        let buf = if fits_slot {
            Buffer::Pool(self.ring.take().expect("checked a free slot"))
        } else {
            self.heap_held += 1;
            Buffer::Heap(vec![0u8; info.len as usize].into_boxed_slice())
        };
        self.channels[c].payload = Some(buf);
        self.channels[c].state = ChanState::Packet(info);
        if info.len == 0 {
            return self.payload_done(c);
        }
        self.recv_payload(c)
    }

    fn recv_payload(&mut self, c: usize) -> Result<(), DataPlaneError> {
        let channel = &mut self.channels[c];
        let ChanState::Packet(info) = channel.state else {
            return Ok(());
        };
        let buf = channel
            .payload
            .take()
            .expect("payload buffer set when placed");
        self.shared.recv_started();
        self.ring
            .recv(c as u64, channel.file, buf, info.got..info.len as usize)
            .map_err(|source| DataPlaneError::Recv {
                channel: channel.index,
                offset: channel.offset + (PACKET_HEADER_ROOM + info.got) as u64,
                source,
            })
    }

    fn payload_done(&mut self, c: usize) -> Result<(), DataPlaneError> {
        let channel = &mut self.channels[c];
        let ChanState::Packet(info) = channel.state else {
            return Ok(());
        };
        let buf = channel
            .payload
            .take()
            .expect("payload received into its buffer");
        channel.offset += (PACKET_HEADER_ROOM + info.len as usize) as u64;
        channel.report.bytes += (PACKET_HEADER_ROOM + info.len as usize) as u64;
        channel.report.packets += 1;
        channel.state = ChanState::Header { got: 0 };
        let index = channel.index;
        self.shared.progress_events.fetch_add(1, Ordering::SeqCst);
        self.shared.state(info.device).reassembly.fill(
            info.idx,
            Held {
                worker: self.w,
                channel: index,
                buf,
            },
        );
        self.deliver(info.device)?;
        self.recv_header(c)
    }

    /// Starts the device's next in-order write if its buffer is this worker's; wakes the owner
    /// otherwise.
    fn deliver(&mut self, d: usize) -> Result<(), DataPlaneError> {
        let mut state = self.shared.state(d);
        let owner = match state.reassembly.peek_ready() {
            Some(held) => held.worker,
            None => return Ok(()),
        };
        if owner != self.w {
            drop(state);
            if let Some(waker) = self.shared.waker(owner) {
                waker.wake();
            }
            return Ok(());
        }
        let ready = state.reassembly.pop_ready().expect("peeked a ready buffer");
        if ready.config {
            let blob = self.buffer_bytes(&ready.buf.buf, ready.len as usize);
            state.report.config = blob;
            let loaded = state.reassembly.complete(ready.len);
            state.report.loaded_ns = monotonic_ns();
            state.report.peak_queued_bytes = state.reassembly.peak_queued_bytes();
            drop(state);
            self.release(ready.buf.buf);
            if loaded {
                self.shared.loaded.fetch_add(1, Ordering::SeqCst);
                self.shared.wake_all();
            }
            return Ok(());
        }
        // Counted while the device is still locked: its next buffer is out of the reassembly
        // now, so "in flight" must already say so.
        self.shared.active_ops.fetch_add(1, Ordering::SeqCst);
        self.shared.writes_in_flight.fetch_add(1, Ordering::SeqCst);
        drop(state);
        let tag = TAG_WRITE | self.next_write_tag;
        self.next_write_tag += 1;
        let len = ready.len as usize;
        self.writes.insert(
            tag,
            WriteOp {
                device: d,
                idx: ready.idx,
                channel: ready.buf.channel,
                len,
                done: 0,
            },
        );
        self.submit_write(tag, ready.buf.buf, 0)
    }

    fn submit_write(&mut self, tag: u64, buf: Buffer, from: usize) -> Result<(), DataPlaneError> {
        let op = &self.writes[&tag];
        let device = &self.shared.devices[op.device];
        let file = self.device_files[op.device];
        if self.shared.write_now[op.device] {
            self.ring.write_now(tag, file, buf, from..op.len);
            return Ok(());
        }
        self.ring
            .write(tag, file, buf, from..op.len)
            .map_err(|source| DataPlaneError::WriteDevice {
                device: device.id.clone(),
                idx: op.idx,
                channel: op.channel,
                source,
            })
    }

    fn write_done(&mut self, done: Completion) -> Result<(), DataPlaneError> {
        // One count per logical write (a partial write continues it); it drops only after the
        // next write was handed out, so there is no gap between two writes.
        let result = self.write_finished(done);
        if !matches!(result, Ok(WriteProgress::Partial)) {
            self.shared.writes_in_flight.fetch_sub(1, Ordering::SeqCst);
            self.shared.active_ops.fetch_sub(1, Ordering::SeqCst);
        }
        result.map(drop)
    }

    fn write_finished(&mut self, done: Completion) -> Result<WriteProgress, DataPlaneError> {
        let Some(op) = self.writes.get_mut(&done.tag) else {
            return Ok(WriteProgress::Done);
        };
        let written = match done.result {
            // A packet without data writes nothing and is done.
            Ok(0) if op.done < op.len => Err(io::Error::from(io::ErrorKind::WriteZero)),
            other => other,
        };
        let n = written.map_err(|source| DataPlaneError::WriteDevice {
            device: self.shared.devices[op.device].id.clone(),
            idx: op.idx,
            channel: op.channel,
            source,
        })?;
        op.done += n;
        let buf = done.buf.expect("a write returns its buffer");
        if op.done < op.len {
            let from = op.done;
            return self
                .submit_write(done.tag, buf, from)
                .map(|()| WriteProgress::Partial);
        }
        let op = self.writes.remove(&done.tag).expect("looked up above");
        self.release(buf);
        let now = monotonic_ns();
        {
            let mut state = self.shared.state(op.device);
            let report = &mut state.report;
            record_packet_ns(&mut report.written_ns, op.idx, now);
            report.bytes += op.len as u64;
            report.data_packets += 1;
            state.reassembly.complete(op.len as u32);
        }
        self.progress.add(op.len);
        self.shared.progress_events.fetch_add(1, Ordering::SeqCst);
        self.deliver(op.device)?;
        // Something was written: parked channels anywhere may fit now.
        for w in 0..self.shared.parked.len() {
            if w != self.w && self.shared.parked[w].load(Ordering::SeqCst) > 0 {
                if let Some(waker) = self.shared.waker(w) {
                    waker.wake();
                }
            }
        }
        self.retry_parked().map(|()| WriteProgress::Done)
    }

    fn buffer_bytes(&mut self, buf: &Buffer, len: usize) -> Vec<u8> {
        match buf {
            Buffer::Pool(id) => self.ring.slot_mut(id)[..len].to_vec(),
            Buffer::Heap(heap) => heap[..len].to_vec(),
            Buffer::Lent(slot) => slot.bytes()[..len].to_vec(),
        }
    }

    fn release(&mut self, buf: Buffer) {
        match buf {
            Buffer::Pool(id) => self.ring.put(id),
            Buffer::Heap(_) => self.heap_held -= 1,
            // Destination workers lend nothing; a lent slot here would just be dropped.
            Buffer::Lent(_) => {}
        }
    }

    fn deliver_mine(&mut self) -> Result<(), DataPlaneError> {
        for d in 0..self.shared.devices.len() {
            self.deliver(d)?;
        }
        Ok(())
    }

    fn retry_parked(&mut self) -> Result<(), DataPlaneError> {
        for c in 0..self.channels.len() {
            if matches!(
                self.channels[c].state,
                ChanState::Packet(PacketInfo { parked: true, .. })
            ) {
                self.place(c)?;
            }
        }
        Ok(())
    }

    /// Fails when no channel anywhere can move, as the threads engine does: a channel of this
    /// worker is parked, every other channel not at EOF (in any worker) is parked too, and no
    /// write is in flight or ready, for longer than a wake-up can take. A channel still
    /// receiving, even one idle between packets, could bring the idx that unparks the others,
    /// so it keeps the run waiting; a peer that never sends it is the session's `--timeout`.
    fn check_stall(&mut self) -> Result<(), DataPlaneError> {
        let events = self.shared.progress_events.load(Ordering::SeqCst);
        let blocked = self.has_parked()
            && self.shared.all_open_parked()
            && self.shared.writes_in_flight.load(Ordering::SeqCst) == 0;
        if events != self.last_progress.0 || !blocked {
            self.last_progress = (events, Instant::now());
            return Ok(());
        }
        // Asked only once the grace has passed: it locks every device.
        if self.last_progress.1.elapsed() < STALL_GRACE || self.shared.any_device_can_move() {
            return Ok(());
        }
        let mut parked: Vec<(usize, String)> = self
            .shared
            .parked_detail
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(c, d)| (*c, d.clone()))
            .collect();
        parked.sort();
        let parked: Vec<String> = parked.into_iter().map(|(_, d)| d).collect();
        Err(DataPlaneError::Stalled {
            detail: format!(
                "{}; {} of {} buffers free: raise the queued-bytes limit or the buffer pool",
                parked.join("; "),
                self.ring.free_slots(),
                self.ring.buffers().slots()
            ),
        })
    }
}
