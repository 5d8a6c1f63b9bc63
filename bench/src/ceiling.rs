//! The `ceiling` row: the same kernel copies as a device-state migration, with no framing and
//! no protocol. Source: blocking threads, one per TCP connection, read the simulated device's
//! data_fd into a buffer and send it; destination: one blocking thread per connection receives
//! a chunk and writes it to the simulated sink's data_fd in order. Same simulated devices
//! (`vfio::sim`, memfd or paced pipe), same sizes, chunk and device speed as the helpers.
//!
//! With no headers, both sides derive which chunk travels on which connection from the shape:
//! with at least as many connections as devices, device d owns connections c = d, d + D, ...
//! and its chunk k goes on the (k mod n_d)-th of them; with fewer, connection c carries devices
//! c, c + N, ... interleaved chunk by chunk. A device's reads are taken in order (a data_fd is a
//! stream) and its writes are made in order; sends and receives run in parallel.
//!
//! Timing matches the helpers': the source's clock starts (its `switchover_ns`) just before
//! its devices go to STOP_COPY, once every connection is up and the destination's devices are
//! RESUMING; the destination's `end_ns` is when every device has its last byte: its last chunk
//! written, or, for a paced sink, later, when the sink's drain consumed the last byte from its
//! pipe ([`SimSink::loaded_ns`], read after RESUMING -> STOP).
//! Setup (a one-byte connection index, a one-byte "ready") is outside the timed window.
//!
//! With `--memory` (the `loopback` row) there are no devices: each source thread sends its
//! connection's share of the bytes from one buffer, each destination thread reads it into one
//! and drops it. That is the transport alone, the reference the 16-core scaling goal is
//! measured against (blocking threads over 8 connections).

use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use clap::Parser;
use vfio::sim::{DeviceSpeed, SimSink, SimSource, SimSpec};
use vfio::{MigState, MigrationDevice};

use crate::runs::{DeviceTimes, SideReport};
use crate::scenario::{parse_size, parse_speed};

pub const SEND: &str = "__ceiling-send";
pub const RECV: &str = "__ceiling-recv";

/// Arguments of both pump sides (`--connect` for the source, `--listen` for the destination).
#[derive(Debug, Parser)]
pub struct PumpArgs {
    #[arg(long)]
    pub connect: Option<String>,
    #[arg(long)]
    pub listen: Option<String>,
    #[arg(long)]
    pub devices: u32,
    #[arg(long)]
    pub size: String,
    #[arg(long)]
    pub channels: u32,
    #[arg(long)]
    pub chunk: String,
    #[arg(long)]
    pub device_speed: Option<String>,
    /// No devices: send a buffer, receive and drop it (the `loopback` row).
    #[arg(long)]
    pub memory: bool,
    /// Seconds any blocking socket operation may wait.
    #[arg(long, default_value = "60")]
    pub timeout: u64,
    #[arg(long, default_value = "warn")]
    pub log_level: String,
}

/// The pump's shape, parsed.
#[derive(Debug, Clone, Copy)]
struct PumpShape {
    devices: usize,
    size: u64,
    channels: usize,
    chunk: u64,
    speed: Option<u64>,
}

impl PumpShape {
    fn from_args(args: &PumpArgs) -> Result<PumpShape, String> {
        let speed = match &args.device_speed {
            Some(text) => parse_speed(text)?,
            None => None,
        };
        let chunk = parse_size("chunk", &args.chunk)?;
        if chunk == 0 || args.devices == 0 || args.channels == 0 {
            return Err("devices, channels and chunk must be positive".into());
        }
        Ok(PumpShape {
            devices: args.devices as usize,
            size: parse_size("size", &args.size)?,
            channels: args.channels as usize,
            chunk,
            speed,
        })
    }

    fn chunks(&self) -> u64 {
        self.size.div_ceil(self.chunk)
    }

    fn chunk_len(&self, k: u64) -> usize {
        (self.size - k * self.chunk).min(self.chunk) as usize
    }

    fn spec(&self, index: usize) -> SimSpec {
        SimSpec {
            size: self.size,
            seed: 0x5eed_0000 + index as u64,
            precopy_initial: 0,
            precopy_dirty: 0,
            speed: self.speed.map(|rate| DeviceSpeed {
                save_bytes_per_sec: rate,
                load_bytes_per_sec: rate,
                per_read_latency: Duration::ZERO,
            }),
            config_len: 16,
        }
    }
}

/// Per connection, the (device, chunk idx) it carries, in order.
fn schedule(devices: usize, chunks: u64, channels: usize) -> Vec<Vec<(usize, u64)>> {
    let mut out = vec![Vec::new(); channels];
    if channels >= devices {
        for (c, lane) in out.iter_mut().enumerate() {
            let d = c % devices;
            let owned = (d..channels).step_by(devices).count() as u64;
            let position = (c / devices) as u64;
            lane.extend((position..chunks).step_by(owned as usize).map(|k| (d, k)));
        }
    } else {
        for (c, lane) in out.iter_mut().enumerate() {
            let mine: Vec<usize> = (c..devices).step_by(channels).collect();
            for k in 0..chunks {
                lane.extend(mine.iter().map(|&d| (d, k)));
            }
        }
    }
    out
}

/// A device's stream position, shared by the threads that carry it.
struct Turn<T> {
    state: Mutex<(u64, T)>,
    cv: Condvar,
}

impl<T> Turn<T> {
    fn new(value: T) -> Self {
        Turn {
            state: Mutex::new((0, value)),
            cv: Condvar::new(),
        }
    }

    /// Runs `f` when it is chunk `k`'s turn, then hands the turn to `k + 1`. Gives up when
    /// `abort` is set (another thread failed, so the turn may never come).
    fn at(
        &self,
        k: u64,
        abort: &AtomicBool,
        f: impl FnOnce(&mut T) -> Result<(), String>,
    ) -> Result<(), String> {
        let mut guard = self.state.lock().unwrap_or_else(|p| p.into_inner());
        while guard.0 != k {
            if abort.load(Ordering::Relaxed) {
                return Err("stopped: another pump thread failed".into());
            }
            guard = match self.cv.wait_timeout(guard, Duration::from_millis(50)) {
                Ok((g, _)) => g,
                Err(p) => p.into_inner().0,
            };
        }
        let result = f(&mut guard.1);
        guard.0 += 1;
        self.cv.notify_all();
        result
    }
}

fn now_ns() -> u64 {
    match nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC) {
        Ok(ts) => ts.tv_sec() as u64 * 1_000_000_000 + ts.tv_nsec() as u64,
        Err(_) => 0,
    }
}

fn cpu_seconds() -> f64 {
    match nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_SELF) {
        Ok(u) => {
            let s = |tv: nix::sys::time::TimeVal| tv.tv_sec() as f64 + tv.tv_usec() as f64 / 1e6;
            s(u.user_time()) + s(u.system_time())
        }
        Err(_) => 0.0,
    }
}

fn emit(event: &str, data: serde_json::Value) {
    let line = serde_json::json!({ "event": event, "data": data });
    let mut out = io::stdout().lock();
    let _ = writeln!(out, "{line}").and_then(|()| out.flush());
}

fn engine_name(args: &PumpArgs) -> &'static str {
    if args.memory {
        "loopback"
    } else {
        "ceiling"
    }
}

fn device_name(i: usize) -> String {
    format!("ceiling-{i}")
}

pub fn main(send: bool, args: &PumpArgs) -> ExitCode {
    let side = if send { "source" } else { "destination" };
    let result = PumpShape::from_args(args).and_then(|shape| {
        if send {
            source(args, shape)
        } else {
            destination(args, shape)
        }
    });
    let report = match result {
        Ok(report) => report,
        Err(error) => SideReport {
            side: side.into(),
            ok: false,
            error: Some(error),
            engine: engine_name(args).into(),
            ..SideReport::default()
        },
    };
    let ok = report.ok;
    match serde_json::to_value(&report) {
        Ok(value) => emit("REPORT", value),
        Err(e) => eprintln!("{side}: encoding the report: {e}"),
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn source(args: &PumpArgs, shape: PumpShape) -> Result<SideReport, String> {
    let addr: SocketAddr = args
        .connect
        .as_deref()
        .ok_or("--connect is required")?
        .parse()
        .map_err(|e| format!("--connect: {e}"))?;
    let timeout = Duration::from_secs(args.timeout);
    let mut devices = (0..shape.devices)
        .filter(|_| !args.memory)
        .map(|i| SimSource::new(&device_name(i), shape.spec(i)))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("simulated source: {e}"))?;
    let mut sockets = Vec::with_capacity(shape.channels);
    for c in 0..shape.channels {
        let mut s = TcpStream::connect_timeout(&addr, timeout)
            .map_err(|e| format!("connecting connection {c}: {e}"))?;
        s.set_nodelay(true)
            .and_then(|()| s.set_read_timeout(Some(timeout)))
            .and_then(|()| s.set_write_timeout(Some(timeout)))
            .and_then(|()| s.write_all(&[c as u8]))
            .map_err(|e| format!("setting up connection {c}: {e}"))?;
        sockets.push(s);
    }
    let mut ready = [0u8; 1];
    sockets[0]
        .read_exact(&mut ready)
        .map_err(|e| format!("waiting for the destination to be ready: {e}"))?;

    let bufs = faulted_buffers(sockets.len(), shape.chunk as usize);
    let cpu0 = cpu_seconds();
    let start_ns = now_ns();
    let mut turns = Vec::with_capacity(shape.devices);
    for d in devices.iter_mut() {
        let fd = d
            .set_state(MigState::StopCopy)
            .map_err(|e| format!("{}: STOP_COPY: {e}", d.name()))?
            .ok_or_else(|| format!("{}: STOP_COPY opened no data_fd", d.name()))?;
        let chunks = shape.chunks() as usize;
        turns.push(Turn::new((File::from(fd), vec![0u64; chunks])));
    }
    let turns = Arc::new(turns);
    let lanes = schedule(shape.devices, shape.chunks(), shape.channels);
    let abort = AtomicBool::new(false);
    let results: Vec<Result<u64, String>> = std::thread::scope(|scope| {
        let handles: Vec<_> = sockets
            .iter_mut()
            .zip(lanes)
            .zip(bufs)
            .enumerate()
            .map(|(c, ((sock, lane), mut buf))| {
                let turns = Arc::clone(&turns);
                let abort = &abort;
                std::thread::Builder::new()
                    .name(format!("pump-send-{c}"))
                    .spawn_scoped(scope, move || -> Result<u64, String> {
                        let result = (|| -> Result<u64, String> {
                            let mut sent = 0u64;
                            for (d, k) in lane {
                                let len = shape.chunk_len(k);
                                // No turn: `--memory`, the buffer is the payload.
                                if let Some(turn) = turns.get(d) {
                                    turn.at(k, abort, |(file, issued)| {
                                        issued[k as usize] = now_ns();
                                        file.read_exact(&mut buf[..len]).map_err(|e| {
                                            format!("reading device {d} chunk {k}: {e}")
                                        })
                                    })?;
                                }
                                sock.write_all(&buf[..len])
                                    .map_err(|e| format!("sending on connection {c}: {e}"))?;
                                sent += len as u64;
                            }
                            sock.shutdown(Shutdown::Write)
                                .map_err(|e| format!("shutting down connection {c}: {e}"))?;
                            Ok(sent)
                        })();
                        if result.is_err() {
                            abort.store(true, Ordering::Relaxed);
                        }
                        result
                    })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| match h {
                Ok(h) => h
                    .join()
                    .unwrap_or_else(|_| Err("a pump thread panicked".into())),
                Err(e) => Err(format!("starting a pump thread: {e}")),
            })
            .collect()
    });
    let end_ns = now_ns();
    let cpu_s = cpu_seconds() - cpu0;
    let mut bytes = 0;
    for r in results {
        bytes += r?;
    }
    let turns = Arc::try_unwrap(turns).map_err(|_| "pump threads still hold the devices")?;
    let mut report = SideReport {
        side: "source".into(),
        ok: true,
        engine: engine_name(args).into(),
        channels: shape.channels as u32,
        chunk: shape.chunk,
        bytes,
        switchover_ns: Some(start_ns),
        end_ns: Some(end_ns),
        cpu_s,
        verified: true,
        ..SideReport::default()
    };
    for (i, (turn, device)) in turns.into_iter().zip(devices.iter_mut()).enumerate() {
        let (_, (file, issued)) = turn.state.into_inner().unwrap_or_else(|p| p.into_inner());
        drop(file);
        // Like a VMM after a completed migration: the source device stops.
        device
            .set_state(MigState::Stop)
            .map_err(|e| format!("{}: STOP: {e}", device.name()))?;
        report.devices.push(DeviceTimes {
            idstr: device_name(i),
            instance_id: 0,
            bytes: shape.size,
            data_packets: issued.len() as u32,
            loaded_ns: None,
            timestamps_ns: issued,
        });
    }
    Ok(report)
}

/// One buffer per connection, every page written before the clock starts, as the helpers'
/// buffer arena is faulted in when their engine is made: fresh pages here cost 0.4-1.9 GiB/s,
/// which would land in the ceiling's downtime and CPU alone.
fn faulted_buffers(count: usize, len: usize) -> Vec<Vec<u8>> {
    (0..count).map(|_| vec![0xa5u8; len]).collect()
}

fn destination(args: &PumpArgs, shape: PumpShape) -> Result<SideReport, String> {
    let listen = args.listen.as_deref().ok_or("--listen is required")?;
    let timeout = Duration::from_secs(args.timeout);
    let mut devices = (0..shape.devices)
        .filter(|_| !args.memory)
        .map(|i| SimSink::new(&device_name(i), shape.spec(i)))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("simulated sink: {e}"))?;
    let chunks = shape.chunks() as usize;
    let mut turns = Vec::with_capacity(shape.devices);
    for d in devices.iter_mut() {
        let fd = d
            .set_state(MigState::Resuming)
            .map_err(|e| format!("{}: RESUMING: {e}", d.name()))?
            .ok_or_else(|| format!("{}: RESUMING opened no data_fd", d.name()))?;
        turns.push(Turn::new((File::from(fd), vec![0u64; chunks])));
    }
    let listener = TcpListener::bind(listen).map_err(|e| format!("binding {listen}: {e}"))?;
    let addr = listener
        .local_addr()
        .map_err(|e| format!("local address: {e}"))?;
    emit("LISTENING", serde_json::json!({ "addr": addr.to_string() }));
    let mut slots: Vec<Option<TcpStream>> = (0..shape.channels).map(|_| None).collect();
    for _ in 0..shape.channels {
        let (mut s, _) = listener.accept().map_err(|e| format!("accepting: {e}"))?;
        let mut id = [0u8; 1];
        s.set_nodelay(true)
            .and_then(|()| s.set_read_timeout(Some(timeout)))
            .and_then(|()| s.set_write_timeout(Some(timeout)))
            .and_then(|()| s.read_exact(&mut id))
            .map_err(|e| format!("setting up a connection: {e}"))?;
        let c = usize::from(id[0]);
        match slots.get_mut(c) {
            Some(slot @ None) => *slot = Some(s),
            _ => return Err(format!("bad or duplicate connection index {c}")),
        }
    }
    let mut sockets: Vec<TcpStream> = slots.into_iter().flatten().collect();
    let bufs = faulted_buffers(sockets.len(), shape.chunk as usize);
    let cpu0 = cpu_seconds();
    let start_ns = now_ns();
    sockets[0]
        .write_all(&[1])
        .map_err(|e| format!("telling the source to start: {e}"))?;
    let turns = Arc::new(turns);
    let lanes = schedule(shape.devices, shape.chunks(), shape.channels);
    let abort = AtomicBool::new(false);
    // Per connection: bytes received, and when its last chunk was received (and written).
    let results: Vec<Result<(u64, u64), String>> = std::thread::scope(|scope| {
        let handles: Vec<_> = sockets
            .iter_mut()
            .zip(lanes)
            .zip(bufs)
            .enumerate()
            .map(|(c, ((sock, lane), mut buf))| {
                let turns = Arc::clone(&turns);
                let abort = &abort;
                std::thread::Builder::new()
                    .name(format!("pump-recv-{c}"))
                    .spawn_scoped(scope, move || -> Result<(u64, u64), String> {
                        let result = (|| -> Result<(u64, u64), String> {
                            let mut got = 0u64;
                            for (d, k) in lane {
                                let len = shape.chunk_len(k);
                                sock.read_exact(&mut buf[..len]).map_err(|e| {
                                    format!("receiving device {d} chunk {k} on connection {c}: {e}")
                                })?;
                                // No turn: `--memory`, the bytes are dropped.
                                if let Some(turn) = turns.get(d) {
                                    turn.at(k, abort, |(file, written)| {
                                        file.write_all(&buf[..len]).map_err(|e| {
                                            format!("writing device {d} chunk {k}: {e}")
                                        })?;
                                        written[k as usize] = now_ns();
                                        Ok(())
                                    })?;
                                }
                                got += len as u64;
                            }
                            // The lane's last chunk is in (and written); an empty lane ends at
                            // the start.
                            let last_ns = if got == 0 { start_ns } else { now_ns() };
                            let mut probe = [0u8; 1];
                            match sock.read(&mut probe) {
                                Ok(0) => Ok((got, last_ns)),
                                Ok(_) => Err(format!("connection {c}: bytes after the last chunk")),
                                Err(e) => Err(format!("connection {c}: waiting for EOF: {e}")),
                            }
                        })();
                        if result.is_err() {
                            abort.store(true, Ordering::Relaxed);
                        }
                        result
                    })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| match h {
                Ok(h) => h
                    .join()
                    .unwrap_or_else(|_| Err("a pump thread panicked".into())),
                Err(e) => Err(format!("starting a pump thread: {e}")),
            })
            .collect()
    });
    let cpu_s = cpu_seconds() - cpu0;
    let (mut bytes, mut end_ns) = (0, start_ns);
    for r in results {
        let (got, last_ns) = r?;
        bytes += got;
        end_ns = end_ns.max(last_ns);
    }
    let turns = Arc::try_unwrap(turns).map_err(|_| "pump threads still hold the devices")?;
    let mut report = SideReport {
        side: "destination".into(),
        ok: true,
        engine: engine_name(args).into(),
        channels: shape.channels as u32,
        chunk: shape.chunk,
        bytes,
        switchover_ns: Some(start_ns),
        cpu_s,
        ..SideReport::default()
    };
    let mut verified = true;
    if args.memory {
        report
            .notes
            .push("no devices: bytes counted, not checked".into());
    }
    for (i, (turn, device)) in turns.into_iter().zip(devices.iter_mut()).enumerate() {
        let (_, (file, written)) = turn.state.into_inner().unwrap_or_else(|p| p.into_inner());
        drop(file);
        let mut loaded = written.last().copied().unwrap_or(start_ns);
        // RESUMING -> STOP checks every byte against the source's content.
        match device.set_state(MigState::Stop) {
            Ok(_) => {
                // A paced sink's last write returned with up to its pipe still to load.
                if let Some(consumed) = device.load_done_ns() {
                    loaded = loaded.max(consumed);
                    end_ns = end_ns.max(consumed);
                }
            }
            Err(e) => {
                verified = false;
                report.error = Some(format!("{}: {e}", device.name()));
            }
        }
        report.devices.push(DeviceTimes {
            idstr: device_name(i),
            instance_id: 0,
            bytes: shape.size,
            data_packets: written.len() as u32,
            loaded_ns: Some(loaded),
            timestamps_ns: written,
        });
    }
    report.end_ns = Some(end_ns);
    report.verified = verified && bytes == shape.size * shape.devices as u64;
    report.ok = report.verified;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn covers_every_chunk_once(devices: usize, chunks: u64, channels: usize) {
        let lanes = schedule(devices, chunks, channels);
        assert_eq!(lanes.len(), channels);
        let mut seen = vec![vec![0u32; chunks as usize]; devices];
        for lane in &lanes {
            for w in lane.windows(2) {
                if w[0].0 == w[1].0 {
                    assert!(w[0].1 < w[1].1, "in order per device on a lane");
                }
            }
            for &(d, k) in lane {
                seen[d][k as usize] += 1;
            }
        }
        assert!(seen.iter().flatten().all(|&n| n == 1), "{seen:?}");
    }

    #[test]
    fn schedules_cover_every_chunk_exactly_once() {
        covers_every_chunk_once(4, 100, 6);
        covers_every_chunk_once(1, 512, 8);
        covers_every_chunk_once(16, 32, 16);
        covers_every_chunk_once(4, 7, 1);
        covers_every_chunk_once(5, 3, 2);
        covers_every_chunk_once(3, 0, 4);
    }
}
