//! `serve --print-capabilities` and `query-capabilities`: what this helper speaks and what this
//! kernel gives it, as one JSON object (vhost-user backends' convention: printed before any
//! logging, so a VMM can parse stdout).

use serde_json::{json, Value};

use crate::config::{MigrationConfig, MAX_DEVICES};
use crate::control::lines::{MAX_FDS, MAX_LINE};
use crate::control::schema::{COMMANDS, EVENTS, PROTOCOL_VERSION};

/// The capabilities object for a helper configured as `base` (engine, chunk, pool, forbidden
/// io_uring features).
pub fn capabilities(base: &MigrationConfig) -> Value {
    let ec = &base.engine_config;
    let slot = ec.chunk_size + crate::wire::PACKET_HEADER_ROOM;
    let probe = uring::probe_pool(ec.pool_buffers, slot);
    let sqpoll = uring::sqpoll_opt_in();
    let path = uring::data_path(&probe, ec.forbid, sqpoll);
    let features: serde_json::Map<String, Value> = probe
        .features
        .iter()
        .map(|(feature, result)| {
            (
                feature.name().to_string(),
                json!({
                    "available": result.is_ok(),
                    "forbidden": ec.forbid.contains(*feature),
                    "since": feature.since(),
                    "why-not": result.as_ref().err(),
                }),
            )
        })
        .collect();
    let (kind, why) = base.engine_kind();
    json!({
        "protocol": PROTOCOL_VERSION,
        "version": env!("CARGO_PKG_VERSION"),
        "roles": ["source", "destination"],
        "commands": COMMANDS,
        "events": EVENTS,
        "device-modes": ["device", "data-fd"],
        "transports": ["connect/listen HOST:PORT (TCP)", "passed connected stream sockets (unix or TCP)"],
        "engines": {
            "available": ["uring", "threads"],
            "selected": kind.name(),
            "why": why,
            "data-path": {
                "engine": path.engine,
                "why-threads": path.why_threads,
                "ring-setup": path.setup,
                "fixed-buffers": path.fixed_buffers,
                "linked-chains": path.linked_chains,
                "send-zc": path.send_zc,
                "notes": path.notes,
            },
        },
        "io-uring": {
            "kernel": probe.kernel,
            "usable": probe.unusable.is_none(),
            "why-not": probe.unusable,
            "features": features,
            "memlock-limit": probe.memlock_limit,
            "pinning": probe.pinning.as_ref().err().map_or_else(|| json!("ok"), |why| json!(why)),
        },
        "properties": {
            "multifd-transfer": ["on", "off", "auto"],
            "load-config-after-iter": ["on", "off", "auto"],
            "max-queued-buffers-size": "bytes per device (QEMU 10.1 semantics); the helper applies it as backpressure",
            "switchover-ack": "always: the destination acks once every precopy device's initial data is loaded",
        },
        "limits": {
            "max-devices": MAX_DEVICES,
            "max-channels": 255,
            "max-passed-channels": MAX_FDS - 1,
            "max-fds-per-message": MAX_FDS,
            "max-line-bytes": MAX_LINE,
            "chunk-bytes": ec.chunk_size,
            "pool-buffers": ec.pool_buffers,
            "workers": ec.workers,
            "timeout-seconds": base.timeout.as_secs(),
        },
    })
}
