//! The example VMM (`examples/example-vmm.rs`) drives a full migration of 4 simulated devices
//! through two `vfio-multifd serve` helpers by fd passing, with precopy and a held config, and
//! must report every byte and config blob verified.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

fn example() -> PathBuf {
    // target/<profile>/deps/example_vmm-<hash> -> target/<profile>/examples/example-vmm
    let test = std::env::current_exe().unwrap();
    let profile = test.parent().and_then(|d| d.parent()).unwrap();
    profile.join("examples").join("example-vmm")
}

#[test]
fn example_vmm_migrates_four_devices_through_two_serve_helpers() {
    let example = example();
    assert!(
        example.exists(),
        "{} is missing: `cargo test` builds examples",
        example.display()
    );
    let start = Instant::now();
    let out = Command::new(&example)
        .args(["--helper", env!("CARGO_BIN_EXE_vfio-multifd")])
        .args(["--devices", "4", "--size", "16MiB", "--channels", "4"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "example-vmm failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    let all = format!("{stdout}{stderr}");
    assert!(
        all.contains("migration completed, every byte and config blob verified"),
        "{all}"
    );
    for event in ["SWITCHOVER_ACK", "DEVICE_LOADED", "completed"] {
        assert!(
            all.contains(event),
            "no {event} in the example's output:\n{all}"
        );
    }
    // Every device's queue peak is known by the time the VMM queries the destination.
    let queues = all
        .lines()
        .find_map(|l| l.strip_prefix("most bytes queued at once per destination device: "))
        .unwrap_or_else(|| panic!("no queue line in the example's output:\n{all}"));
    assert_eq!(queues.matches("(limit unlimited)").count(), 4, "{queues}");
    assert!(!queues.contains('?'), "{queues}");
    assert!(start.elapsed() < Duration::from_secs(120));
}
