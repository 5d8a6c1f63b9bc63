//! The command line through the built binary: bad values are refused before anything runs,
//! with exit code 2 and a message naming the flag.

// Test helpers unwrap too: a failed step is a failed test (clippy allows it only in #[test] fns).
#![allow(clippy::unwrap_used)]

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_vfio-multifd");

fn refused(args: &[&str], env: &[(&str, &str)], expect: &str) {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .env_remove("RUST_LOG")
        .env_remove("VFIO_MULTIFD_FORBID");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run vfio-multifd");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
    assert!(
        stderr.contains(expect),
        "{args:?}: expected {expect:?} in {stderr}"
    );
}

#[test]
fn out_of_range_values_are_refused_with_the_flag_named() {
    for (args, expect) in [
        (
            &["demo", "--channels", "0"][..],
            "--channels 0: must be 1 to 255",
        ),
        (
            &["demo", "--channels", "256"][..],
            "--channels 256: must be 1 to 255",
        ),
        (&["demo", "--chunk", "0"][..], "--chunk 0"),
        (&["demo", "--chunk", "65MiB"][..], "--chunk 68157440"),
        (&["demo", "--devices", "0"][..], "--devices 0"),
        (&["demo", "--size", "lots"][..], "--size \"lots\""),
        (&["demo", "--size", "4XB"][..], "unknown suffix"),
        (&["demo", "--timeout", "0"][..], "--timeout 0"),
        (&["demo", "--uuid", "not-a-uuid"][..], "--uuid"),
        (&["send", "--connect", "no-port-here"][..], "--connect"),
        (&["recv", "--listen", "127.0.0.1"][..], "--listen"),
    ] {
        refused(args, &[], expect);
    }
}

#[test]
fn a_bad_forbid_list_in_the_environment_is_refused() {
    refused(
        &["demo"],
        &[("VFIO_MULTIFD_FORBID", "warp-drive")],
        "VFIO_MULTIFD_FORBID",
    );
}

#[test]
fn a_refused_flag_is_reported_whatever_the_log_filter() {
    // The log filter silences logging, not the reason for exit 2.
    refused(
        &["--log-level", "off", "demo", "--channels", "0"],
        &[],
        "--channels 0: must be 1 to 255",
    );
    refused(
        &["demo", "--channels", "0"],
        &[("RUST_LOG", "off")],
        "--channels 0: must be 1 to 255",
    );
    refused(
        &["--log-level", "off", "probe", "--chunk", "0"],
        &[],
        "--chunk 0",
    );
    refused(
        &["--log-level", "off", "probe"],
        &[("VFIO_MULTIFD_FORBID", "warp-drive")],
        "VFIO_MULTIFD_FORBID",
    );
}

#[test]
fn simulated_devices_larger_than_memory_are_refused() {
    // Accepted, these would fill this machine's memory with memfd pages (ulimit -v does not
    // count them). The file-size limit keeps a regression from doing so: a helper that tries
    // is killed at its first ftruncate, and the exit code is then not 2.
    for args in [
        "demo --size 1TiB --devices 256 --timeout 2",
        "send --connect 127.0.0.1:9 --size 1TiB --devices 256 --timeout 2",
        "recv --listen 127.0.0.1:0 --size 1TiB --devices 256 --timeout 1",
    ] {
        let out = Command::new("sh")
            .args(["-c", &format!("ulimit -f 1024; exec \"$0\" {args}"), BIN])
            .env_remove("RUST_LOG")
            .env_remove("VFIO_MULTIFD_FORBID")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args}: {stderr}");
        assert!(
            stderr.contains("--size 1099511627776: --devices 256"),
            "{args}: {stderr}"
        );
    }
}

#[test]
fn vfio_multifd_sqpoll_0_keeps_sqpoll_off() {
    // probe predicts the engine's ring setup with the engine's own reading of the variable.
    let setup = |value: &str| {
        let out = Command::new(BIN)
            .args(["probe", "--json", "--forbid", "defer-taskrun,coop-taskrun"])
            .env_remove("VFIO_MULTIFD_FORBID")
            .env("VFIO_MULTIFD_SQPOLL", value)
            .output()
            .unwrap();
        assert!(out.status.success(), "{value}");
        let probe: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        if probe["io_uring"]["usable"] != true {
            return None;
        }
        probe["data_path"]["setup"].as_str().map(str::to_string)
    };
    let Some(on) = setup("1") else {
        return; // no io_uring here: no ring setup to compare
    };
    assert_eq!(on, "sqpoll");
    for off in ["0", "", "no", "false"] {
        assert_eq!(
            setup(off).as_deref(),
            Some("plain"),
            "VFIO_MULTIFD_SQPOLL={off:?}"
        );
    }
}

#[test]
fn help_lists_the_jobs() {
    let out = Command::new(BIN).arg("--help").output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    for job in ["send", "recv", "demo", "inspect"] {
        assert!(text.contains(job), "{job} missing from --help: {text}");
    }
}

#[test]
fn sizes_accept_suffixes_and_zero() {
    // Accepted values get past validation: a send to nowhere then fails to connect (exit 1).
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    drop(listener);
    for size in ["0", "1", "4KiB", "1MiB", "2m"] {
        let out = Command::new(BIN)
            .args([
                "send",
                "--connect",
                &addr,
                "--devices",
                "1",
                "--size",
                size,
                "--timeout",
                "2",
            ])
            .output()
            .unwrap();
        assert_eq!(
            out.status.code(),
            Some(1),
            "--size {size}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
