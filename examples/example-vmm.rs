//! An example VMM driving two `vfio-multifd serve` helpers through a whole migration.
//!
//! It plays both VMMs: it launches a source and a destination helper, makes simulated
//! devices (their data_fds are real memfds, handed over by SCM_RIGHTS in `data-fd` mode, the
//! VMM driving the device states, as QEMU does), connects the two helpers with socketpairs it
//! hands over (main channel + multifd channels), and drives: precopy with switchover-ack on
//! the first devices, "VM stop" (devices to STOP_COPY), switchover-start, the destination's
//! DEVICE_LOADED events (one device with load-config-after-iter, released by
//! load-config-ready), and checks every byte and config blob on the destination devices. It
//! prints every event and exits non-zero on any failure.
//!
//! ```sh
//! cargo build --release && cargo run --release --example example-vmm -- [--devices 4] \
//!     [--size 64MiB] [--channels 4] [--precopy 2] [--engine uring|threads] \
//!     [--helper target/release/vfio-multifd]
//! ```

use std::collections::BTreeMap;
use std::error::Error;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use vfio::sim::{SimSink, SimSource, SimSpec};
use vfio::{MigState, MigrationDevice};
use vfio_multifd::control::client::Client;
use vfio_multifd::control::schema::{base64_decode, base64_encode, EventLine};
use vfio_multifd::metrics::{self, DeviceTimes};

type Result<T> = std::result::Result<T, Box<dyn Error>>;

const EVENT_WAIT: Duration = Duration::from_secs(60);

struct Options {
    helper: PathBuf,
    devices: u32,
    size: u64,
    channels: u8,
    precopy: u32,
    engine: String,
}

fn parse_size(text: &str) -> Result<u64> {
    let text = text.trim();
    let (digits, unit) = text.split_at(
        text.find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len()),
    );
    let n: u64 = digits.parse()?;
    let shift = match unit {
        "" | "B" => 0,
        "K" | "KiB" => 10,
        "M" | "MiB" => 20,
        "G" | "GiB" => 30,
        other => return Err(format!("unknown size unit {other:?}").into()),
    };
    Ok(n << shift)
}

fn options() -> Result<Options> {
    let exe = std::env::current_exe()?;
    // target/release/examples/example-vmm -> target/release/vfio-multifd
    let default_helper = exe
        .parent()
        .and_then(Path::parent)
        .map(|dir| dir.join("vfio-multifd"))
        .ok_or("cannot locate the helper next to the example; pass --helper")?;
    let mut o = Options {
        helper: default_helper,
        devices: 4,
        size: 64 << 20,
        channels: 4,
        precopy: 2,
        engine: "uring".into(),
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || args.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--helper" => o.helper = PathBuf::from(value()?),
            "--devices" => o.devices = value()?.parse()?,
            "--size" => o.size = parse_size(&value()?)?,
            "--channels" => o.channels = value()?.parse()?,
            "--precopy" => o.precopy = value()?.parse()?,
            "--engine" => o.engine = value()?,
            "--help" | "-h" => {
                println!("example-vmm [--devices N] [--size BYTES] [--channels N] [--precopy N] [--engine uring|threads] [--helper PATH]");
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other}").into()),
        }
    }
    if o.devices == 0 || o.channels == 0 || o.precopy > o.devices {
        return Err("need --devices >= 1, --channels >= 1, --precopy <= --devices".into());
    }
    Ok(o)
}

/// A helper process, killed (by its own id) if still running at the end.
struct Helper {
    name: &'static str,
    child: Child,
    socket: PathBuf,
}

impl Helper {
    fn launch(name: &'static str, binary: &Path, dir: &Path, engine: &str) -> Result<Helper> {
        let socket = dir.join(format!("{name}.sock"));
        let child = Command::new(binary)
            .args(["serve", "--socket-path"])
            .arg(&socket)
            .args(["--log-level", "warn", "--timeout", "30", "--engine", engine])
            .stdin(Stdio::null())
            .spawn()
            .map_err(|e| format!("launching {}: {e}", binary.display()))?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while !socket.exists() {
            if Instant::now() > deadline {
                return Err(
                    format!("the {name} helper did not create {}", socket.display()).into(),
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(Helper {
            name,
            child,
            socket,
        })
    }
}

impl Drop for Helper {
    fn drop(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("the {} helper did not exit; killing it", self.name);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn print_event(side: &str, event: &EventLine) {
    let mut data = event.data.clone();
    if let Some(config) = data.get_mut("config") {
        let len = config.as_str().map_or(0, str::len);
        *config = json!(format!("<{len} base64 chars>"));
    }
    println!(
        "[{side}] {}.{:06} {} {}",
        event.timestamp.seconds, event.timestamp.microseconds, event.event, data
    );
}

fn run(
    client: &mut Client,
    side: &str,
    command: &str,
    arguments: Value,
    fds: &[BorrowedFd<'_>],
) -> Result<Value> {
    match client.execute(command, arguments, fds)? {
        Ok(ret) => {
            println!("[{side}] {command} -> {ret}");
            Ok(ret)
        }
        Err(e) => Err(format!("{side}: {command} refused: {}", e.desc).into()),
    }
}

/// Waits for an event on `client`, printing everything; fails on MIGRATION_FAILED.
fn wait_for(
    client: &mut Client,
    side: &str,
    what: &str,
    mut pick: impl FnMut(&EventLine) -> bool,
) -> Result<EventLine> {
    let event = client.wait_event(
        what,
        EVENT_WAIT,
        |e| print_event(side, e),
        |e| {
            e.event == "MIGRATION_FAILED"
                || (e.event == "MIGRATION" && e.data["status"] == "failed")
                || pick(e)
        },
    )?;
    if event.event == "MIGRATION_FAILED" || event.data["status"] == "failed" {
        return Err(format!("{side}: the migration failed: {}", event.data).into());
    }
    Ok(event)
}

fn main() -> ExitCode {
    match example() {
        Ok(()) => {
            println!("example-vmm: migration completed, every byte and config blob verified");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("example-vmm: FAILED: {e}");
            ExitCode::FAILURE
        }
    }
}

fn example() -> Result<()> {
    let o = options()?;
    let dir = std::env::temp_dir().join(format!("example-vmm-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let result = migrate(&o, &dir);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn migrate(o: &Options, dir: &Path) -> Result<()> {
    let source_helper = Helper::launch("source", &o.helper, dir, &o.engine)?;
    let dest_helper = Helper::launch("destination", &o.helper, dir, &o.engine)?;
    let mut src = Client::connect(&source_helper.socket)?;
    let mut dst = Client::connect(&dest_helper.socket)?;
    println!("[source] greeting {}", src.greeting);
    println!("[destination] greeting {}", dst.greeting);

    // The devices: device i is 0000:0i:02.0/vfio; the first `precopy` have precopy data.
    let mut sources = Vec::new();
    let mut sinks = Vec::new();
    let mut configs = Vec::new();
    for i in 0..o.devices {
        let idstr = format!("0000:{i:02x}:02.0/vfio");
        let spec = SimSpec {
            size: o.size,
            seed: 0x5eed + u64::from(i),
            precopy_initial: if i < o.precopy { o.size / 4 } else { 0 },
            precopy_dirty: 0,
            speed: None,
            config_len: 512,
        };
        let source = SimSource::new(&idstr, spec)?;
        configs.push(source.config_blob());
        sources.push((idstr.clone(), i < o.precopy, source));
        sinks.push((idstr, SimSink::new(&format!("sink-{i}"), spec)?));
    }

    // Destination VMM: each device RUNNING -> RESUMING; its data_fd to the helper.
    let last = sinks.len() - 1;
    for (i, (idstr, sink)) in sinks.iter_mut().enumerate() {
        let fd = sink
            .set_state(MigState::Resuming)?
            .ok_or("RESUMING opened no data_fd")?;
        run(
            &mut dst,
            "destination",
            "add-device",
            json!({
                "idstr": idstr, "mode": "data-fd", "fds": ["data-fd"],
                "load-config-after-iter": if i == last { "on" } else { "off" },
            }),
            &[fd.as_fd()],
        )?;
    }
    // Source VMM: precopy devices RUNNING -> PRE_COPY (their data_fd now), the others later.
    for (idstr, precopy, source) in sources.iter_mut() {
        let config = base64_encode(&source.config_blob());
        if *precopy {
            let fd = source
                .set_state(MigState::PreCopy)?
                .ok_or("PRE_COPY opened no data_fd")?;
            run(
                &mut src,
                "source",
                "add-device",
                json!({ "idstr": idstr, "mode": "data-fd", "precopy": true, "config": config,
                        "fds": ["data-fd"] }),
                &[fd.as_fd()],
            )?;
        } else {
            run(
                &mut src,
                "source",
                "add-device",
                json!({ "idstr": idstr, "mode": "data-fd", "config": config }),
                &[],
            )?;
        }
    }

    // The channels: one socketpair each for the main channel and every multifd channel.
    let mut source_ends: Vec<OwnedFd> = Vec::new();
    let mut dest_ends: Vec<OwnedFd> = Vec::new();
    for _ in 0..=o.channels {
        let (a, b) = vfio::fd::socketpair()?;
        source_ends.push(a);
        dest_ends.push(b);
    }
    let names: Vec<String> = std::iter::once("main".to_string())
        .chain((0..o.channels).map(|i| format!("multifd-{i}")))
        .collect();
    let uuid = "12345678-9abc-def0-1122-334455667788";
    run(
        &mut dst,
        "destination",
        "migrate-incoming",
        json!({ "channels": o.channels, "uuid": uuid, "fds": names }),
        &borrowed(&dest_ends),
    )?;
    run(
        &mut src,
        "source",
        "migrate-outgoing",
        json!({ "channels": o.channels, "uuid": uuid, "fds": names }),
        &borrowed(&source_ends),
    )?;
    // The helpers hold their own copies now.
    drop(source_ends);
    drop(dest_ends);

    // Precopy until the destination acks (its initial data is loaded).
    let started = Instant::now();
    wait_for(&mut src, "source", "SWITCHOVER_ACK", |e| {
        e.event == "SWITCHOVER_ACK"
    })?;
    println!("--- switchover-ack after {:?}", started.elapsed());
    while let Some(event) = dst.next_event(Duration::from_millis(100))? {
        print_event("destination", &event);
    }

    // Stop the VM: every device to STOP_COPY (a precopy device keeps its data_fd).
    let stop = Instant::now();
    for (idstr, _, source) in sources.iter_mut() {
        if let Some(fd) = source.set_state(MigState::StopCopy)? {
            run(
                &mut src,
                "source",
                "update-device",
                json!({ "device": format!("{idstr}/0"), "fds": ["data-fd"] }),
                &[fd.as_fd()],
            )?;
        }
    }
    run(&mut src, "source", "switchover-start", json!({}), &[])?;

    // Destination: devices load; the last one's config waits for load-config-ready.
    let mut loaded: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let record = |e: &EventLine, loaded: &mut BTreeMap<String, Vec<u8>>| -> bool {
        if e.event == "DEVICE_LOADED" {
            if let (Some(device), Some(config)) = (
                e.data["device"].as_str(),
                e.data["config"].as_str().and_then(base64_decode),
            ) {
                loaded.insert(device.to_string(), config);
            }
        }
        e.event == "MIGRATION" && e.data["status"] == "loaded"
    };
    wait_for(&mut dst, "destination", "MIGRATION loaded", |e| {
        record(e, &mut loaded)
    })?;
    let downtime_seen = stop.elapsed();
    println!(
        "--- destination loaded {} of {} devices' configs; the VMM loads the rest of the VM state, then load-config-ready",
        loaded.len(),
        o.devices
    );
    run(&mut dst, "destination", "load-config-ready", json!({}), &[])?;
    wait_for(&mut dst, "destination", "MIGRATION completed", |e| {
        record(e, &mut loaded);
        e.event == "MIGRATION" && e.data["status"] == "completed"
    })?;
    wait_for(&mut src, "source", "MIGRATION completed", |e| {
        e.event == "MIGRATION" && e.data["status"] == "completed"
    })?;

    // Check: every sink verifies its stream at RESUMING -> STOP, every config blob.
    for (i, (idstr, sink)) in sinks.iter_mut().enumerate() {
        let handle = format!("{idstr}/0");
        let config = loaded
            .get(&handle)
            .ok_or_else(|| format!("no DEVICE_LOADED for {handle}"))?;
        sink.verify_config(config)?;
        if *config != configs[i] {
            return Err(format!("config of {handle} differs").into());
        }
        sink.set_state(MigState::Stop)?;
        sink.set_state(MigState::Running)?;
    }
    for (_, _, source) in sources.iter_mut() {
        source.set_state(MigState::Stop)?;
    }

    let src_query = run_quiet(&mut src, "query", json!({ "timestamps": true }))?;
    let dst_query = run_quiet(&mut dst, "query", json!({ "timestamps": true }))?;
    summary(o, &src_query, &dst_query, downtime_seen);

    run(&mut src, "source", "quit", json!({}), &[])?;
    run(&mut dst, "destination", "quit", json!({}), &[])?;
    Ok(())
}

fn borrowed(fds: &[OwnedFd]) -> Vec<BorrowedFd<'_>> {
    fds.iter().map(|f| f.as_fd()).collect()
}

fn run_quiet(client: &mut Client, command: &str, arguments: Value) -> Result<Value> {
    client
        .execute(command, arguments, &[])?
        .map_err(|e| format!("{command} refused: {}", e.desc).into())
}

fn times(query: &Value) -> Vec<DeviceTimes> {
    query["devices"]
        .as_array()
        .map(|devices| {
            devices
                .iter()
                .map(|d| DeviceTimes {
                    idstr: d["idstr"].as_str().unwrap_or_default().to_string(),
                    instance_id: d["instance-id"].as_u64().unwrap_or(0) as u32,
                    timestamps_ns: d["timestamps-ns"]
                        .as_array()
                        .map(|t| t.iter().filter_map(Value::as_u64).collect())
                        .unwrap_or_default(),
                    ..DeviceTimes::default()
                })
                .collect()
        })
        .unwrap_or_default()
}

fn summary(o: &Options, src: &Value, dst: &Value, downtime_seen: Duration) {
    let latency = metrics::summarize(&metrics::pair_latencies(&times(src), &times(dst)));
    let total = u64::from(o.devices) * o.size;
    println!("--- summary");
    println!(
        "devices {} x {}, channels {}, engine {} -> {}",
        o.devices,
        metrics::human_bytes(o.size),
        o.channels,
        src["engine"],
        dst["engine"]
    );
    println!(
        "precopy bytes {} (main channel), stop-copy bytes {} (multifd), total device state {}",
        src["bytes"]["precopy"],
        src["bytes"]["stop-copy"],
        metrics::human_bytes(total)
    );
    println!(
        "downtime: destination {} ms (SWITCHOVER_START -> last device loaded), as seen by this VMM {:.1} ms (VM stop -> MIGRATION loaded)",
        dst["downtime-ms"],
        downtime_seen.as_secs_f64() * 1e3
    );
    println!(
        "per-packet latency (source read issued -> destination written): p50 {:.0} us, p99 {:.0} us, max {:.0} us over {} packets",
        latency.p50, latency.p99, latency.max, latency.count
    );
    println!("per channel (source): {}", src["per-channel"]);
    let queues: Vec<String> = dst["devices"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|d| {
            let peak = d["peak-queued-bytes"]
                .as_u64()
                .map_or("?".to_string(), metrics::human_bytes);
            let limit = &d["max-queued-buffers-size"];
            let limit = limit.as_u64().map_or_else(
                || limit.as_str().unwrap_or("?").to_string(),
                metrics::human_bytes,
            );
            format!("{peak} (limit {limit})")
        })
        .collect();
    println!(
        "most bytes queued at once per destination device: {}",
        queues.join(", ")
    );
    println!(
        "notes: source {}, destination {}",
        src["notes"], dst["notes"]
    );
}
