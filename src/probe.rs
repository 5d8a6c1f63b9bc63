//! `vfio-multifd probe`: what this kernel gives the data plane, found by trying it. Which
//! io_uring features and setup flags work (or why not, with the Linux release that added
//! them), whether the configured buffer pool can be pinned, which VFIO interfaces exist, and
//! the path a helper would take here with the current feature mask (`--forbid` and
//! `VFIO_MULTIFD_FORBID`). Human table, or one JSON object with `--json`.

use std::fmt::Write as _;
use std::path::Path;

use serde_json::{json, Value};
use uring::{Feature, FeatureMask};

use crate::config::{parse_size, FORBID_ENV, MAX_CHUNK, MIN_CHUNK};
use crate::wire::PACKET_HEADER_ROOM;

/// `probe`.
#[derive(Debug, Clone, clap::Args)]
pub struct ProbeArgs {
    /// io_uring features to forbid, as `send`/`recv`/`demo` take them (comma-separated:
    /// send-zc, fixed-buffers, linked-chains, defer-taskrun, coop-taskrun, sqpoll,
    /// buffer-ring, io-uring, all); added to VFIO_MULTIFD_FORBID. Changes only the path shown.
    #[arg(long, value_name = "FEATURES")]
    pub forbid: Option<String>,
    /// Device bytes per packet of the helper to check pinning for (as `--chunk` of the
    /// helpers).
    #[arg(long, default_value = "1MiB", value_name = "BYTES")]
    pub chunk: String,
    /// Packet buffers per helper to check pinning for (as `--pool-buffers` of the helpers).
    #[arg(long, default_value = "auto", value_name = "N|auto")]
    pub pool_buffers: String,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
}

/// The validated mask and where it came from.
#[derive(Debug)]
struct Mask {
    mask: FeatureMask,
    env: Option<String>,
    flag: Option<String>,
}

fn parse_mask(args: &ProbeArgs, env: Option<String>) -> Result<Mask, String> {
    let mut mask = FeatureMask::empty();
    if let Some(text) = &env {
        mask = FeatureMask::parse(text).map_err(|why| format!("{FORBID_ENV} {text:?}: {why}"))?;
    }
    if let Some(text) = &args.forbid {
        let more = FeatureMask::parse(text).map_err(|why| format!("--forbid {text:?}: {why}"))?;
        for feature in Feature::ALL {
            if more.contains(feature) {
                mask = mask.with(feature);
            }
        }
    }
    Ok(Mask {
        mask,
        env,
        flag: args.forbid.clone(),
    })
}

fn parse_pool(args: &ProbeArgs) -> Result<(usize, usize), String> {
    let chunk = parse_size("chunk", &args.chunk).map_err(|e| e.to_string())?;
    if !(MIN_CHUNK..=MAX_CHUNK).contains(&chunk) {
        return Err(format!(
            "--chunk {chunk}: must be {MIN_CHUNK} bytes to {MAX_CHUNK} bytes (64 MiB)"
        ));
    }
    let slot = chunk as usize + PACKET_HEADER_ROOM;
    let buffers = match args.pool_buffers.trim() {
        "auto" => crate::config::auto_pool_buffers(slot),
        n => n
            .parse::<usize>()
            .ok()
            .filter(|&n| (2..=crate::config::MAX_POOL_BUFFERS as usize).contains(&n))
            .ok_or_else(|| {
                format!(
                    "--pool-buffers {:?}: must be `auto` or 2 to {}",
                    args.pool_buffers,
                    crate::config::MAX_POOL_BUFFERS
                )
            })?,
    };
    // The helpers refuse a pool over MAX_POOL_BYTES; probing it would report a path that no
    // helper given these flags takes.
    let bytes = buffers as u64 * slot as u64;
    if bytes > crate::config::MAX_POOL_BYTES {
        return Err(format!(
            "--pool-buffers {buffers}: {buffers} buffers of --chunk {chunk} take {bytes} bytes; at most {} (4 GiB)",
            crate::config::MAX_POOL_BYTES
        ));
    }
    Ok((buffers, slot))
}

/// One VFIO interface node.
#[derive(Debug)]
struct VfioNode {
    path: &'static str,
    present: bool,
    /// Entries of a directory node (device cdevs), or VFIO groups beside `/dev/vfio/vfio`.
    entries: Vec<String>,
    /// Opened read-write (a fresh container or iommufd context, closed at once), or why not;
    /// None where not tried (directories).
    open: Option<Result<(), String>>,
    note: String,
}

fn list_dir(path: &str, keep: impl Fn(&str) -> bool) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(path)
        .map(|dir| {
            dir.filter_map(Result::ok)
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|n| keep(n))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

fn try_open(path: &str) -> Result<(), String> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map(drop)
        .map_err(|e| e.to_string())
}

fn vfio_nodes() -> Vec<VfioNode> {
    let container = Path::new("/dev/vfio/vfio").exists();
    let groups = list_dir("/dev/vfio", |n| n.chars().all(|c| c.is_ascii_digit()));
    let devices_dir = Path::new("/dev/vfio/devices").is_dir();
    let devices = list_dir("/dev/vfio/devices", |_| true);
    let iommu = Path::new("/dev/iommu").exists();
    vec![
        VfioNode {
            path: "/dev/vfio/vfio",
            present: container,
            open: container.then(|| try_open("/dev/vfio/vfio")),
            note: if !container {
                "absent: the vfio module is not loaded (modprobe vfio-pci), so the legacy \
                 container/group interface is unavailable"
                    .into()
            } else if groups.is_empty() {
                "legacy container/group interface; no VFIO group exists (no device is bound \
                 to vfio-pci or a variant driver)"
                    .into()
            } else {
                format!(
                    "legacy container/group interface; groups: {}",
                    groups.join(", ")
                )
            },
            entries: groups,
        },
        VfioNode {
            path: "/dev/vfio/devices",
            present: devices_dir,
            open: None,
            note: if !devices_dir {
                "absent: no device is bound to a VFIO driver, or the kernel lacks VFIO device \
                 cdevs (CONFIG_VFIO_DEVICE_CDEV, Linux 6.2)"
                    .into()
            } else if devices.is_empty() {
                "device cdev interface; no device cdev yet".into()
            } else {
                format!("device cdev interface; devices: {}", devices.join(", "))
            },
            entries: devices,
        },
        VfioNode {
            path: "/dev/iommu",
            present: iommu,
            open: iommu.then(|| try_open("/dev/iommu")),
            note: if iommu {
                "iommufd (binds device cdevs without a container)".into()
            } else {
                "absent: the kernel lacks iommufd (CONFIG_IOMMUFD, Linux 6.2) or its module \
                 is not loaded"
                    .into()
            },
            entries: Vec::new(),
        },
    ]
}

fn disabled_words(value: Option<u8>) -> String {
    match value {
        Some(0) => "0 (io_uring enabled for every process)".into(),
        Some(1) => "1 (io_uring only for CAP_SYS_ADMIN or members of kernel.io_uring_group)".into(),
        Some(2) => "2 (io_uring disabled for every process)".into(),
        Some(v) => format!("{v} (unknown value)"),
        None => "absent (the sysctl came in Linux 6.6; io_uring is not restricted by it)".into(),
    }
}

fn why(result: &Result<(), String>) -> Value {
    match result {
        Ok(()) => Value::Null,
        Err(why) => Value::String(why.clone()),
    }
}

/// The probe result as one JSON object (also the source of the table).
fn report(probe: &uring::Probe, path: &uring::DataPath, mask: &Mask, vfio: &[VfioNode]) -> Value {
    let words = crate::metrics::path_words(path.fixed_buffers, path.linked_chains, path.send_zc);
    let features: Vec<Value> = probe
        .features
        .iter()
        .map(|(f, r)| {
            json!({
                "name": f.name(),
                "description": f.describe(),
                "since": f.since(),
                "available": r.is_ok(),
                "why_not": why(r),
                "forbidden": mask.mask.contains(*f),
            })
        })
        .collect();
    let checks: Vec<Value> = probe
        .checks
        .iter()
        .map(|c| {
            json!({
                "name": c.name,
                "since": c.since,
                "available": c.result.is_ok(),
                "why_not": why(&c.result),
            })
        })
        .collect();
    let vfio: Vec<Value> = vfio
        .iter()
        .map(|n| {
            json!({
                "path": n.path,
                "present": n.present,
                "entries": n.entries,
                "opens": n.open.as_ref().map(Result::is_ok),
                "open_error": n.open.as_ref().and_then(|r| r.as_ref().err()),
                "note": n.note,
            })
        })
        .collect();
    json!({
        "kernel": probe.kernel,
        "io_uring_disabled": probe.io_uring_disabled,
        "io_uring": {
            "usable": probe.unusable.is_none(),
            "why_not": probe.unusable,
        },
        "memlock_limit_bytes": probe.memlock_limit,
        "cap_ipc_lock": probe.cap_ipc_lock,
        "features": features,
        "checks": checks,
        "registered_buffers": {
            "slots": probe.pin_slots,
            "slot_size": probe.pin_slot_size,
            "bytes": probe.pin_bytes(),
            "pinnable": probe.pinning.is_ok(),
            "why_not": why(&probe.pinning),
        },
        "vfio": vfio,
        "forbid": {
            "features": mask.mask.names(),
            "env": mask.env,
            "flag": mask.flag,
        },
        "data_path": {
            "engine": path.engine,
            "why_threads": path.why_threads,
            "setup": path.setup,
            "buffers": words[0],
            "chains": words[1],
            "send": words[2],
            "summary": path_summary(path),
            "notes": path.notes,
        },
    })
}

/// One line: engine, setup, buffers, chains, send.
pub fn path_summary(path: &uring::DataPath) -> String {
    match path.setup {
        None => "threads engine (blocking read/send threads, userspace copies)".into(),
        Some(setup) => format!(
            "uring engine, ring {setup}, {} buffers, {}, {}",
            if path.fixed_buffers { "fixed" } else { "plain" },
            if path.linked_chains {
                "linked read->send"
            } else {
                "unlinked read then send"
            },
            if path.send_zc {
                "SEND_ZC"
            } else {
                "plain send"
            },
        ),
    }
}

fn table(
    r: &Value,
    probe: &uring::Probe,
    path: &uring::DataPath,
    mask: FeatureMask,
    vfio: &[VfioNode],
) -> String {
    let mut out = String::new();
    let yes_no = |ok: bool| if ok { "yes" } else { "no" };
    let _ = writeln!(out, "kernel              {}", probe.kernel);
    let _ = writeln!(
        out,
        "io_uring_disabled   {}",
        disabled_words(probe.io_uring_disabled)
    );
    let _ = writeln!(
        out,
        "io_uring            {}",
        probe
            .unusable
            .as_deref()
            .map_or("usable".to_string(), |why| format!("NOT usable: {why}"))
    );
    let memlock = probe
        .memlock_limit
        .map_or("unlimited".to_string(), |l| format!("{} KiB", l / 1024));
    let cap = match probe.cap_ipc_lock {
        Some(true) => "CAP_IPC_LOCK held (pinned pages are not charged to the limit)",
        Some(false) => "no CAP_IPC_LOCK (pinned pages count against the limit)",
        None => "CAP_IPC_LOCK unknown",
    };
    let _ = writeln!(out, "memlock             {memlock}; {cap}");
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "{:<15} {:<6} {:<5} why not",
        "feature", "since", "here"
    );
    for (f, res) in &probe.features {
        let forbidden = if mask.contains(*f) {
            " [forbidden]"
        } else {
            ""
        };
        let line = format!(
            "{:<15} {:<6} {:<5} {}{}",
            f.name(),
            f.since(),
            yes_no(res.is_ok()),
            res.as_ref().err().map_or("", String::as_str),
            forbidden
        );
        let _ = writeln!(out, "{}", line.trim_end());
    }
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "{:<21} {:<6} {:<5} why not",
        "engine relies on", "since", "here"
    );
    for c in &probe.checks {
        let line = format!(
            "{:<21} {:<6} {:<5} {}",
            c.name,
            c.since,
            yes_no(c.result.is_ok()),
            c.result.as_ref().err().map_or("", String::as_str)
        );
        let _ = writeln!(out, "{}", line.trim_end());
    }
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "registered buffers  {} x {} bytes = {:.1} MiB per helper: {}",
        probe.pin_slots,
        probe.pin_slot_size,
        probe.pin_bytes() as f64 / f64::from(1 << 20),
        match &probe.pinning {
            Ok(()) => "can be pinned".to_string(),
            Err(why) => format!("cannot: {why}"),
        }
    );
    let _ = writeln!(out, "VFIO interfaces");
    for n in vfio {
        let open = match &n.open {
            Some(Ok(())) => " (opens read-write)",
            Some(Err(_)) => " (cannot be opened read-write)",
            None => "",
        };
        let _ = writeln!(out, "  {:<18} {}{open}", n.path, n.note);
    }
    let _ = writeln!(out);
    let forbidden = r["forbid"]["features"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .collect::<Vec<_>>()
                .join(",")
        })
        .unwrap_or_default();
    let _ = writeln!(
        out,
        "forbidden           {} ({FORBID_ENV}={}, --forbid {})",
        if forbidden.is_empty() {
            "none"
        } else {
            &forbidden
        },
        r["forbid"]["env"].as_str().unwrap_or("unset"),
        r["forbid"]["flag"].as_str().unwrap_or("not given"),
    );
    let _ = writeln!(out, "data path           {}", path_summary(path));
    if let Some(why) = &path.why_threads {
        let _ = writeln!(out, "  - threads because {why}");
    }
    for note in &path.notes {
        let _ = writeln!(out, "  - {note}");
    }
    out
}

/// Runs `probe`; returns the exit status (0, or 2 for a bad argument).
pub fn run(args: &ProbeArgs) -> i32 {
    let mask = match parse_mask(args, std::env::var(FORBID_ENV).ok()) {
        Ok(mask) => mask,
        Err(why) => {
            // Not through the log filter, as for the helpers' flags (see main.rs).
            eprintln!("vfio-multifd probe: {why}");
            return 2;
        }
    };
    let (slots, slot_size) = match parse_pool(args) {
        Ok(pool) => pool,
        Err(why) => {
            // Not through the log filter, as for the helpers' flags (see main.rs).
            eprintln!("vfio-multifd probe: {why}");
            return 2;
        }
    };
    let probe = uring::probe_pool(slots, slot_size);
    let path = uring::data_path(&probe, mask.mask, uring::sqpoll_opt_in());
    let vfio = vfio_nodes();
    let r = report(&probe, &path, &mask, &vfio);
    if args.json {
        println!("{r}");
    } else {
        print!("{}", table(&r, &probe, &path, mask.mask, &vfio));
    }
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(forbid: Option<&str>) -> ProbeArgs {
        ProbeArgs {
            forbid: forbid.map(str::to_string),
            chunk: "1MiB".into(),
            pool_buffers: "auto".into(),
            json: true,
        }
    }

    #[test]
    fn env_and_flag_masks_add_up() {
        let mask = parse_mask(&args(Some("send-zc")), Some("fixed-buffers".into())).unwrap();
        assert_eq!(mask.mask.names(), ["send-zc", "fixed-buffers"]);
        assert!(parse_mask(&args(None), Some("bogus".into()))
            .unwrap_err()
            .starts_with(FORBID_ENV));
        assert!(parse_mask(&args(Some("bogus")), None)
            .unwrap_err()
            .starts_with("--forbid"));
    }

    #[test]
    fn default_pool_is_32_buffers_of_a_chunk_and_headers() {
        assert_eq!(parse_pool(&args(None)).unwrap(), (32, (1 << 20) + 288));
        let mut large = args(None);
        large.chunk = "8MiB".into();
        assert_eq!(parse_pool(&large).unwrap(), (12, (8 << 20) + 288));
        let mut bad = args(None);
        bad.pool_buffers = "1".into();
        assert!(parse_pool(&bad).is_err());
    }

    #[test]
    fn pool_counts_the_helpers_refuse_are_refused() {
        // 65536 slots: the uring pool refuses it, so a helper given it fails to start.
        let mut most = args(None);
        most.chunk = "4KiB".into();
        most.pool_buffers = "65535".into();
        assert_eq!(parse_pool(&most).unwrap().0, 65535);
        most.pool_buffers = "65536".into();
        assert!(parse_pool(&most).is_err());
    }

    #[test]
    fn a_pool_over_4_gib_is_refused_as_the_helpers_refuse_it() {
        let mut big = args(None);
        big.chunk = "64MiB".into();
        big.pool_buffers = "64".into();
        let err = parse_pool(&big).unwrap_err();
        assert!(err.starts_with("--pool-buffers 64:"), "{err}");
        big.pool_buffers = "63".into();
        assert_eq!(parse_pool(&big).unwrap().0, 63);
    }

    #[test]
    fn report_names_every_feature_and_the_path() {
        let mask = parse_mask(&args(Some("io-uring")), None).unwrap();
        let probe = uring::probe_pool(2, 4096);
        let path = uring::data_path(&probe, mask.mask, false);
        let r = report(&probe, &path, &mask, &vfio_nodes());
        assert_eq!(r["features"].as_array().unwrap().len(), Feature::ALL.len());
        assert_eq!(r["data_path"]["engine"], "threads");
        assert_eq!(r["vfio"].as_array().unwrap().len(), 3);
        let text = table(&r, &probe, &path, mask.mask, &vfio_nodes());
        assert!(
            text.contains("threads because io_uring is forbidden"),
            "{text}"
        );
    }
}
