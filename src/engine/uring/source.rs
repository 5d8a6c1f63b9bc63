//! The source's workers. Each owns some devices and some channels, one ring and one buffer pool;
//! each buffer slot is [device-state header | VFIO header | chunk]. The headers are written for a
//! full chunk, then the `data_fd` read into the chunk is linked to the send of the whole slot on an
//! idle channel. A short read cancels the send; the completion path rewrites `next_packet_size` and
//! sends what was read. A read of 0 ends the device, whose config packet goes last. One read in
//! flight per device (a `data_fd` is a stream), one send per channel. With fewer devices than
//! workers, one worker reads each device and lends the filled slots to the other workers, which own
//! the channels and send (`handoff`): otherwise a single device would run on one worker, its read
//! and send copies on one core.

use std::collections::VecDeque;
use std::time::Instant;

use ::uring::{Buffer, BufferPool, Completion, FileId, OpKind, Ring};

use super::*;
use crate::wire::{
    write_packet_headers, DeviceStatePacketHeader, DEVICE_STATE_HEADER_LEN, PACKET_HEADER_ROOM,
    VFIO_HEADER_LEN,
};

struct SrcDevice {
    index: usize,
    id: DeviceId,
    /// The `data_fd`, held by the ring.
    file: FileId,
    idstr_field: [u8; crate::wire::IDSTR_LEN],
    read_size: usize,
    config: Option<Vec<u8>>,
    next_idx: u32,
    /// A read of `next_idx` is in flight, since then (for the stall's account).
    reading: Option<Instant>,
    /// A short read cancelled its linked send: the packet must be queued for resending before
    /// this device's next read, so each channel carries each device's idx in order.
    resend_pending: bool,
    at_end: bool,
    report: SourceDeviceReport,
}

/// A packet in a buffer, ready to go on any idle channel.
pub(super) struct ReadyPacket {
    pub(super) device: usize,
    pub(super) idx: u32,
    pub(super) buf: Buffer,
    pub(super) len: usize,
}

/// What a channel is sending.
struct InFlightSend {
    device: usize,
    idx: u32,
    /// Bytes of the whole packet as submitted.
    len: usize,
    /// For a chained send: the read's result once known.
    read: Option<usize>,
    chained: bool,
    /// When it was submitted, for the stall's account of what is outstanding.
    since: Instant,
}

struct SrcChannel {
    index: usize,
    /// The socket, held by the ring.
    file: FileId,
    zc: bool,
    sending: Option<InFlightSend>,
    report: ChannelReport,
}

const TAG_DEVICE: u64 = 1 << 32;

/// A source worker's devices and channels, with their global indexes.
pub(super) type SourceShare = (Vec<(usize, SourceDevice)>, Vec<(usize, OwnedFd)>);

/// A source worker's reports, by global device and channel index, its notes and its ring's path.
pub(super) type SourceWorkerReport = (
    Vec<(usize, SourceDeviceReport)>,
    Vec<(usize, ChannelReport)>,
    Vec<String>,
    ::uring::RingPath,
);

/// A source worker's part in the run.
#[derive(Clone, Copy)]
pub(super) enum Role<'a> {
    /// Reads its devices and sends their packets on its channels.
    Alone,
    /// Reads device `device` (its only one) and hands the packets to the senders.
    Reader { handoff: &'a Handoff, device: usize },
    /// Owns channels and sends what the readers hand it.
    Sender { handoff: &'a Handoff, me: usize },
}

struct SourceWorker<'a> {
    w: usize,
    /// What this worker serves, for errors that are the ring's rather than one op's.
    serves: String,
    role: Role<'a>,
    ring: Ring,
    devices: Vec<SrcDevice>,
    channels: Vec<SrcChannel>,
    ready: VecDeque<ReadyPacket>,
    next_channel: usize,
    next_device: usize,
    sequential: bool,
    progress: &'a Progress,
    failure: &'a Failure,
    notes: Vec<String>,
}

impl UringEngine {
    pub(super) fn source_worker(
        &self,
        w: usize,
        role: Role<'_>,
        (devices, channels): SourceShare,
        pool: BufferPool,
        progress: &Progress,
        failure: &Failure,
    ) -> Result<SourceWorkerReport, DataPlaneError> {
        let mut ring =
            Ring::new(&self.ring_config(), pool).map_err(|err| DataPlaneError::Setup {
                engine: "uring",
                source: io::Error::other(error_chain(&err)),
            })?;
        let serves = serves(
            channels.iter().map(|(index, _)| *index),
            devices.iter().map(|(_, d)| &d.id),
        );
        match role {
            Role::Alone => {}
            Role::Reader { handoff, device } => handoff.register_reader(device, ring.waker()),
            Role::Sender { handoff, me } => handoff.register_sender(me, ring.waker()),
        }
        let zc = ring.send_zc();
        let devices = devices
            .into_iter()
            .map(|(index, d)| SrcDevice {
                index,
                idstr_field: d.id.idstr_field(),
                read_size: d.read_size,
                id: d.id,
                file: ring.adopt_fd(d.data_fd),
                config: Some(d.config),
                next_idx: 0,
                reading: None,
                resend_pending: false,
                at_end: false,
                report: SourceDeviceReport::default(),
            })
            .collect();
        let channels = channels
            .into_iter()
            .map(|(index, fd)| SrcChannel {
                index,
                file: ring.adopt_fd(fd),
                zc,
                sending: None,
                report: ChannelReport::default(),
            })
            .collect();
        let mut worker = SourceWorker {
            w,
            serves,
            role,
            notes: ring.notes().to_vec(),
            ring,
            devices,
            channels,
            ready: VecDeque::new(),
            next_channel: 0,
            next_device: 0,
            sequential: self.config.sequential_devices,
            progress,
            failure,
        };
        let result = worker.run();
        if result.is_err() {
            if progress.cancelled() {
                progress.report_outstanding(worker.outstanding_sends());
            }
            worker.abort_channels();
            worker.ring.cancel_all(progress.cancel_drain());
        }
        result?;
        let path = worker.ring.path();
        Ok((
            worker
                .devices
                .into_iter()
                .map(|d| (d.index, d.report))
                .collect(),
            worker
                .channels
                .into_iter()
                .map(|c| (c.index, c.report))
                .collect(),
            worker.notes,
            path,
        ))
    }
}

impl SourceWorker<'_> {
    /// The run failed: every channel's connection is aborted before the ring drains its ops.
    /// A SEND_ZC completes only once its socket frees the data it queued, which a stopped
    /// destination (zero window) never lets happen and a `shutdown` does not force: without
    /// the abort each worker waited out the drain's timeout and leaked its pool and sockets.
    /// The channels are finished either way (`run_source` shuts them down after the workers).
    fn abort_channels(&self) {
        for channel in &self.channels {
            if let Err(err) = self.ring.abort_socket(channel.file) {
                // A Unix stream channel cannot be aborted, and has no SEND_ZC to free.
                log::debug!("channel {}: aborting the connection: {err}", channel.index);
            }
        }
    }

    /// "channel 2: send of idx 188 of device X outstanding 3.0 s", one per busy channel, then
    /// "device X: read of idx 4 outstanding 3.0 s" for a read not linked to a send (a reader
    /// lending to senders, or no linked chains): what a session that cancelled for a stall
    /// names as stuck.
    fn outstanding_sends(&self) -> Vec<String> {
        let sends = self.channels.iter().filter_map(|channel| {
            let sending = channel.sending.as_ref()?;
            let what = if sending.chained && sending.read.is_none() {
                "read and send"
            } else {
                "send"
            };
            Some(format!(
                "channel {}: {what} of idx {} of device {} outstanding {:.1} s",
                channel.index,
                sending.idx,
                self.device_id(sending.device),
                sending.since.elapsed().as_secs_f64()
            ))
        });
        let chained_read = |d: usize| {
            self.channels.iter().any(|c| {
                c.sending
                    .as_ref()
                    .is_some_and(|s| s.device == d && s.chained && s.read.is_none())
            })
        };
        let reads = self.devices.iter().enumerate().filter_map(|(d, device)| {
            let since = device.reading.filter(|_| !chained_read(d))?;
            Some(format!(
                "device {}: read of idx {} outstanding {:.1} s",
                device.id,
                device.next_idx,
                since.elapsed().as_secs_f64()
            ))
        });
        sends.chain(reads).collect()
    }

    fn run(&mut self) -> Result<(), DataPlaneError> {
        loop {
            if self.progress.cancelled() {
                return Err(DataPlaneError::Cancelled);
            }
            if self.failure.is_set() {
                return Err(DataPlaneError::Cancelled);
            }
            self.dispatch()?;
            if self.finished() {
                if let Role::Reader { handoff, .. } = self.role {
                    handoff.reader_done();
                }
                return Ok(());
            }
            self.ring
                .wait(1, Some(POLL))
                .map_err(|source| DataPlaneError::Ring {
                    worker: self.w,
                    serves: self.serves.clone(),
                    source,
                })?;
            while let Some(done) = self.ring.next_completion() {
                self.complete(done)?;
            }
        }
    }

    fn finished(&self) -> bool {
        let own_done = self.ready.is_empty()
            && self.devices.iter().all(|d| d.at_end && d.config.is_none())
            && self.channels.iter().all(|c| c.sending.is_none());
        match self.role {
            Role::Sender { handoff, me } => own_done && handoff.inbox_closed(me),
            Role::Alone | Role::Reader { .. } => own_done,
        }
    }

    fn idle_channel(&mut self) -> Option<usize> {
        let n = self.channels.len();
        let found = (0..n)
            .map(|i| (self.next_channel + i) % n)
            .find(|&c| self.channels[c].sending.is_none())?;
        self.next_channel = (found + 1) % n;
        Some(found)
    }

    /// Hands out work: ready packets first (resends, config packets), then new reads, devices
    /// taken round robin so several devices interleave fairly.
    fn dispatch(&mut self) -> Result<(), DataPlaneError> {
        match self.role {
            Role::Alone => {}
            Role::Reader { handoff, device } => {
                for slot in handoff.take_returns(device) {
                    self.ring.take_back(slot);
                }
                while let Some(packet) = self.ready.pop_front() {
                    let packet = self.lend(packet);
                    handoff.hand_over(packet);
                }
            }
            Role::Sender { handoff, me } => self.ready.extend(handoff.take_inbox(me)),
        }
        while !self.ready.is_empty() {
            let Some(c) = self.idle_channel() else { break };
            let packet = self.ready.pop_front().expect("checked non-empty");
            self.send_ready(c, packet)?;
        }
        let n = self.devices.len();
        // Sequential mode: only the first device not yet finished may read.
        let current = self
            .sequential
            .then(|| self.devices.iter().position(|d| !d.at_end))
            .flatten();
        for i in 0..n {
            let d = (self.next_device + i) % n;
            let device = &self.devices[d];
            if device.reading.is_some()
                || device.resend_pending
                || device.at_end
                || current.is_some_and(|c| c != d)
            {
                continue;
            }
            if self.ring.free_slots() == 0 {
                break;
            }
            if let Role::Reader { handoff, .. } = self.role {
                if !handoff.has_room() {
                    break;
                }
            }
            if self.ring.linked_chains() && !self.channels.is_empty() {
                let Some(c) = self.idle_channel() else { break };
                self.start_chain(d, c)?;
            } else {
                self.start_read(d)?;
            }
            self.next_device = (d + 1) % n;
        }
        Ok(())
    }

    fn prepare_slot(&mut self, d: usize) -> Result<(::uring::BufId, usize), DataPlaneError> {
        let device = &self.devices[d];
        check_data_idx(&device.id, device.next_idx)?;
        let buf = self.ring.take().expect("caller checked a free slot");
        let device = &mut self.devices[d];
        let slot = self.ring.slot_mut(&buf);
        let room: &mut [u8; PACKET_HEADER_ROOM] = (&mut slot[..PACKET_HEADER_ROOM])
            .try_into()
            .expect("slot holds the header room");
        write_packet_headers(
            room,
            &device.idstr_field,
            device.id.instance_id,
            device.next_idx,
            false,
            device.read_size as u32,
        );
        device.reading = Some(Instant::now());
        record_packet_ns(
            &mut device.report.read_issued_ns,
            device.next_idx,
            monotonic_ns(),
        );
        Ok((buf, device.read_size))
    }

    fn start_chain(&mut self, d: usize, c: usize) -> Result<(), DataPlaneError> {
        let (buf, read_size) = self.prepare_slot(d)?;
        let device = &self.devices[d];
        let channel = &self.channels[c];
        let idx = device.next_idx;
        let len = PACKET_HEADER_ROOM + read_size;
        self.ring
            .read_then_send(
                c as u64,
                device.file,
                channel.file,
                buf,
                PACKET_HEADER_ROOM..len,
                0..len,
                channel.zc,
            )
            .map_err(|source| DataPlaneError::Send {
                channel: channel.index,
                device: device.id.clone(),
                idx,
                source,
            })?;
        self.channels[c].sending = Some(InFlightSend {
            device: d,
            idx,
            len,
            read: None,
            chained: true,
            since: Instant::now(),
        });
        Ok(())
    }

    fn start_read(&mut self, d: usize) -> Result<(), DataPlaneError> {
        let (buf, read_size) = self.prepare_slot(d)?;
        let device = &self.devices[d];
        self.ring
            .read(
                TAG_DEVICE | d as u64,
                device.file,
                Buffer::Pool(buf),
                PACKET_HEADER_ROOM..PACKET_HEADER_ROOM + read_size,
            )
            .map_err(|source| DataPlaneError::ReadDevice {
                device: device.id.clone(),
                idx: device.next_idx,
                source,
            })
    }

    /// A packet of this reader for a sender: its device by global index, a pool slot lent.
    fn lend(&mut self, packet: ReadyPacket) -> ReadyPacket {
        let buf = match packet.buf {
            Buffer::Pool(id) => Buffer::Lent(self.ring.lend(id)),
            other => other,
        };
        ReadyPacket {
            device: self.devices[packet.device].index,
            buf,
            ..packet
        }
    }

    /// Device `d` (a sender's `d` is the global index of a handed-over packet's device).
    fn device_id(&self, d: usize) -> DeviceId {
        match self.role {
            Role::Sender { handoff, .. } => handoff.device_id(d).clone(),
            Role::Alone | Role::Reader { .. } => self.devices[d].id.clone(),
        }
    }

    fn send_ready(&mut self, c: usize, packet: ReadyPacket) -> Result<(), DataPlaneError> {
        let channel = &self.channels[c];
        self.ring
            .send(
                c as u64,
                channel.file,
                packet.buf,
                0..packet.len,
                channel.zc,
            )
            .map_err(|source| DataPlaneError::Send {
                channel: channel.index,
                device: self.device_id(packet.device),
                idx: packet.idx,
                source,
            })?;
        self.channels[c].sending = Some(InFlightSend {
            device: packet.device,
            idx: packet.idx,
            len: packet.len,
            read: None,
            chained: false,
            since: Instant::now(),
        });
        Ok(())
    }

    /// A read of `n` bytes finished for device `d`: account it; 0 ends the device.
    fn read_done(&mut self, d: usize, result: io::Result<usize>) -> Result<usize, DataPlaneError> {
        let device = &mut self.devices[d];
        device.reading = None;
        let n = result.map_err(|source| DataPlaneError::ReadDevice {
            device: device.id.clone(),
            idx: device.next_idx,
            source,
        })?;
        if n == 0 {
            device.at_end = true;
            // The read issued for next_idx found the end: no packet has that idx.
            device
                .report
                .read_issued_ns
                .truncate(device.next_idx as usize);
            self.queue_config(d);
        } else {
            device.next_idx += 1;
            device.report.bytes += n as u64;
            device.report.data_packets += 1;
            self.progress.add(n);
        }
        Ok(n)
    }

    fn queue_config(&mut self, d: usize) {
        let device = &mut self.devices[d];
        let Some(config) = device.config.take() else {
            return;
        };
        let mut packet = vec![0u8; PACKET_HEADER_ROOM + config.len()].into_boxed_slice();
        let room: &mut [u8; PACKET_HEADER_ROOM] = (&mut packet[..PACKET_HEADER_ROOM])
            .try_into()
            .expect("packet holds the header room");
        write_packet_headers(
            room,
            &device.idstr_field,
            device.id.instance_id,
            device.next_idx,
            true,
            config.len() as u32,
        );
        packet[PACKET_HEADER_ROOM..].copy_from_slice(&config);
        let len = packet.len();
        // The config packet counts as sent once its send completes (kept in `config` until
        // then would need another flag; `ready` plus `sending` cover it for `finished`).
        self.ready.push_back(ReadyPacket {
            device: d,
            idx: device.next_idx,
            buf: Buffer::Heap(packet),
            len,
        });
    }

    /// The packet for a short read of `n` bytes: `next_packet_size` rewritten.
    fn short_packet(&mut self, d: usize, idx: u32, buf: Buffer, n: usize) -> Option<ReadyPacket> {
        let Buffer::Pool(id) = buf else { return None };
        let slot = self.ring.slot_mut(&id);
        let header: &mut [u8; DEVICE_STATE_HEADER_LEN] = (&mut slot[..DEVICE_STATE_HEADER_LEN])
            .try_into()
            .expect("slot holds the header");
        DeviceStatePacketHeader::set_next_packet_size(header, (VFIO_HEADER_LEN + n) as u32);
        Some(ReadyPacket {
            device: d,
            idx,
            buf: Buffer::Pool(id),
            len: PACKET_HEADER_ROOM + n,
        })
    }

    fn recycle(&mut self, buf: Option<Buffer>) {
        if let Some(Buffer::Pool(id)) = buf {
            self.ring.put(id);
        }
    }

    /// A packet of device `d` is on the wire: its buffer is free again (a lent one goes back
    /// to its reader).
    fn sent(&mut self, d: usize, buf: Option<Buffer>) {
        match self.role {
            Role::Sender { handoff, me } => {
                let slot = match buf {
                    Some(Buffer::Lent(slot)) => Some(slot),
                    _ => None,
                };
                handoff.sent(me, d, slot);
            }
            Role::Alone | Role::Reader { .. } => self.recycle(buf),
        }
    }

    fn complete(&mut self, done: Completion) -> Result<(), DataPlaneError> {
        match done.kind {
            OpKind::Wake => Ok(()),
            OpKind::Read => {
                let d = (done.tag & !TAG_DEVICE) as usize;
                let idx = self.devices[d].next_idx;
                let n = self.read_done(d, done.result)?;
                if n == 0 {
                    self.recycle(done.buf);
                } else if let Some(buf) = done.buf {
                    // Queue order is read order.
                    if let Some(packet) = self.short_packet(d, idx, buf, n) {
                        self.ready.push_back(packet);
                    }
                }
                Ok(())
            }
            OpKind::ChainRead => {
                let c = done.tag as usize;
                let Some(sending) = self.channels[c].sending.as_ref() else {
                    return Ok(());
                };
                let d = sending.device;
                let n = self.read_done(d, done.result)?;
                if n > 0 && n < self.devices[d].read_size {
                    self.devices[d].resend_pending = true;
                }
                if let Some(sending) = self.channels[c].sending.as_mut() {
                    sending.read = Some(n);
                }
                Ok(())
            }
            OpKind::ChainSend | OpKind::Send => self.send_done(done),
            OpKind::Write | OpKind::Recv => Ok(()),
        }
    }

    fn send_done(&mut self, done: Completion) -> Result<(), DataPlaneError> {
        let c = done.tag as usize;
        let Some(sending) = self.channels[c].sending.take() else {
            self.recycle(done.buf);
            return Ok(());
        };
        // What the op was sent as: a refused SEND_ZC also posts a notification.
        let sent_zc = self.channels[c].zc;
        if done.zc_copied && sent_zc {
            self.channels[c].zc = false;
            self.note(format!(
                "channel {}: the kernel copied a SEND_ZC (loopback does); plain send from now on",
                self.channels[c].index
            ));
        }
        match done.result {
            Ok(sent) => {
                // A linked send goes only after a full read; a short one must have cancelled it.
                self.check_chain_read(c, &sending)?;
                // MSG_WAITALL: a stream socket sends everything or fails; a send that fails
                // after partial progress reports the bytes it got out instead of the error.
                if sent != sending.len {
                    return Err(self.send_error(
                        c,
                        &sending,
                        io::Error::new(
                            io::ErrorKind::WriteZero,
                            format!("short send, {sent} of {} bytes (peer closed?)", sending.len),
                        ),
                    ));
                }
                let report = &mut self.channels[c].report;
                report.bytes += sent as u64;
                report.packets += 1;
                self.sent(sending.device, done.buf);
                Ok(())
            }
            Err(err) if sending.chained && err.raw_os_error() == Some(libc::ECANCELED) => {
                self.devices[sending.device].resend_pending = false;
                match (sending.read, done.buf) {
                    (Some(n), Some(buf)) if n > 0 => {
                        let packet = self.short_packet(sending.device, sending.idx, buf, n);
                        // The channel the chain had is idle now: the packet goes out on it at
                        // once, before this device's next read.
                        if let Some(packet) = packet {
                            self.send_ready(c, packet)?;
                        }
                    }
                    (_, buf) => self.recycle(buf),
                }
                Ok(())
            }
            // EOPNOTSUPP: not a TCP/UDP socket; EINVAL: a kernel without REPORT_USAGE (6.0/6.1).
            Err(err)
                if matches!(err.raw_os_error(), Some(libc::EOPNOTSUPP | libc::EINVAL))
                    && sent_zc =>
            {
                self.channels[c].zc = false;
                self.note(format!(
                    "channel {}: SEND_ZC refused ({err}); plain send",
                    self.channels[c].index
                ));
                // A linked send runs only after a full read (a short one cancels it), so the
                // slot holds the packet exactly as prepared: resend it plain on the same, now
                // idle, channel.
                self.check_chain_read(c, &sending)?;
                let Some(buf) = done.buf else {
                    let lost = io::Error::other("the refused send came back without its buffer");
                    return Err(self.send_error(c, &sending, lost));
                };
                self.send_ready(
                    c,
                    ReadyPacket {
                        device: sending.device,
                        idx: sending.idx,
                        buf,
                        len: sending.len,
                    },
                )?;
                Ok(())
            }
            Err(source) => Err(self.send_error(c, &sending, source)),
        }
    }

    fn send_error(&self, c: usize, sending: &InFlightSend, source: io::Error) -> DataPlaneError {
        DataPlaneError::Send {
            channel: self.channels[c].index,
            device: self.device_id(sending.device),
            idx: sending.idx,
            source,
        }
    }

    /// A linked send that was not cancelled: its read must have filled the chunk, or the send
    /// carried stale bytes (a kernel that does not break IOSQE_IO_LINK chains on a short read;
    /// `Ring::new` checks that, so this is a last line of defence).
    fn check_chain_read(&self, c: usize, sending: &InFlightSend) -> Result<(), DataPlaneError> {
        if !sending.chained {
            return Ok(());
        }
        let want = sending.len - PACKET_HEADER_ROOM;
        match sending.read {
            Some(n) if n == want => Ok(()),
            read => {
                let read = read.map_or_else(|| "no".to_string(), |n| format!("{n} of {want}"));
                Err(self.send_error(
                    c,
                    sending,
                    io::Error::other(format!(
                        "the linked send completed after a short read ({read} bytes read): \
                         the kernel did not cancel the chain, so stale bytes went out"
                    )),
                ))
            }
        }
    }

    fn note(&mut self, note: String) {
        log::info!("{note}");
        self.notes.push(note);
    }
}
