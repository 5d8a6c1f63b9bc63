#![allow(clippy::unwrap_used)]
//! Kernel-feature matrix in the suite (`tools/kernel-matrix/matrix.py`): every cell's
//! end-to-end transfer (several devices, odd sizes, odd small chunks, short reads, several
//! channels; `demo` verifies every byte and config blob) must verify.
//!
//! - Host column: the default path, every single-feature mask, `--forbid all`, io_uring off,
//!   SQPOLL used, and io_uring refused by a real seccomp filter (ENOSYS, EPERM) with the log
//!   saying the helper fell back to threads because io_uring_setup was refused.
//! - Guest columns: Debian 6.1 (bookworm) and 6.12 (bookworm-security) kernels booted under
//!   qemu-system-x86_64 TCG by the VFIO lab, the same cells on the guest's loopback. Skipped
//!   only when QEMU is missing.
//!
//! Cold, matrix.py builds static binaries into `target/kernel-matrix` (about 70 s on 2 cores)
//! and the lab fetches the kernels (cached under `tools/vfio-lab/work`); warm, the file takes
//! about a minute and a half.

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::Value;

/// The two tests share CPUs and the static build: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

/// Writes past the harness's capture, so CI logs show passing matrices too.
fn report(line: &str) {
    let _ = writeln!(std::io::stderr(), "{line}");
}

fn have(tool: &str) -> bool {
    Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

/// Runs matrix.py with `args` in its own process group, killed (with every helper and qemu
/// it started) after `limit`. Returns the parsed JSON result and stderr.
fn matrix(args: &[&str], limit: Duration) -> (Value, String) {
    use std::os::unix::process::CommandExt;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/kernel-matrix/matrix.py");
    let mut child = Command::new("python3")
        .arg(script)
        .args(args)
        .arg("--json")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .expect("running tools/kernel-matrix/matrix.py");
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if start.elapsed() > limit {
            let pgid = nix::unistd::Pid::from_raw(child.id() as i32);
            let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL);
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let (out, err) = (out.join().unwrap(), err.join().unwrap());
    report(&format!(
        "kernel-matrix: matrix.py {} took {:.0} s ({status:?})",
        args.join(" "),
        start.elapsed().as_secs_f64()
    ));
    let Some(status) = status else {
        panic!("matrix.py ran past {limit:?}\n--- stderr ---\n{err}");
    };
    let result: Value = serde_json::from_str(out.trim()).unwrap_or_else(|e| {
        panic!("matrix.py ({status}) printed no JSON ({e})\n--- stdout ---\n{out}\n--- stderr ---\n{err}")
    });
    (result, err)
}

/// Whether this `vfio-multifd` has the `probe` subcommand (the matrix then has every path).
fn has_probe(bin: &str) -> bool {
    Command::new(bin)
        .args(["probe", "--help"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Reports every cell and panics naming each one that did not verify.
fn assert_all_verified(result: &Value, expect_probe: bool) {
    let mut failures = Vec::new();
    for col in result["columns"].as_array().unwrap() {
        let kernel = col["kernel"].as_str().unwrap_or("(did not boot)");
        if !col["complete"].as_bool().unwrap_or(false) {
            failures.push(format!("{kernel}: the column did not finish"));
        }
        if expect_probe && col["probe"].is_null() {
            failures.push(format!(
                "{kernel}: `vfio-multifd probe --json` gave nothing"
            ));
        }
        for cell in col["cells"].as_array().unwrap() {
            let name = cell["cell"].as_str().unwrap();
            let rel = cell["relative"]
                .as_f64()
                .map_or(String::new(), |r| format!(" {r:.2}x"));
            let pass = cell["pass"].as_bool().unwrap();
            report(&format!(
                "kernel-matrix: {kernel:<24} {name:<15} {}{rel}  {}",
                if pass { "PASS" } else { "FAIL" },
                cell["path"].as_str().unwrap_or("?")
            ));
            for reason in cell["reasons"].as_array().unwrap() {
                failures.push(format!("{kernel} {name}: {}", reason.as_str().unwrap()));
            }
        }
    }
    assert!(
        failures.is_empty() && result["pass"].as_bool() == Some(true),
        "cells that did not verify:\n  {}\n(raw lines under {})",
        failures.join("\n  "),
        result["runs_dir"]
    );
}

#[test]
fn host_masked_and_seccomp_cells_verify() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if !have("python3") {
        report("SKIP host_masked_and_seccomp_cells_verify: python3 not found");
        return;
    }
    let bin = env!("CARGO_BIN_EXE_vfio-multifd");
    let (result, _) = matrix(
        &["--kernels", "host", "--perf-reps", "1", "--bin", bin],
        Duration::from_secs(600),
    );
    let col = &result["columns"][0];
    let cells: Vec<&str> = col["cells"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["cell"].as_str().unwrap())
        .collect();
    for must in [
        "default",
        "send-zc",
        "fixed-buffers",
        "linked-chains",
        "defer-taskrun",
        "coop-taskrun",
        "sqpoll",
        "buffer-ring",
        "all",
        "io-uring",
        "seccomp-enosys",
        "seccomp-eperm",
    ] {
        assert!(cells.contains(&must), "no {must} cell in {cells:?}");
    }
    assert_all_verified(&result, has_probe(bin));
}

#[test]
fn guest_kernel_columns_verify() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if !have("python3") || !have("qemu-system-x86_64") {
        report("SKIP guest_kernel_columns_verify: python3 or qemu-system-x86_64 not found (tools/install-test-deps.sh installs QEMU)");
        return;
    }
    let (result, _) = matrix(
        &["--kernels", "6.1,6.12", "--guest-perf-reps", "1"],
        Duration::from_secs(1500),
    );
    let kernels: Vec<&str> = result["columns"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|c| c["kernel"].as_str())
        .collect();
    assert!(
        kernels.iter().any(|k| k.starts_with("6.1."))
            && kernels.iter().any(|k| k.starts_with("6.12.")),
        "guest kernels booted: {kernels:?}"
    );
    let static_bin = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("target/kernel-matrix/x86_64-unknown-linux-gnu/release/vfio-multifd");
    assert_all_verified(&result, has_probe(static_bin.to_str().unwrap()));
}

/// The matrix's path check itself: a cell whose demo took another path than probe predicted
/// (fixed buffers with `fixed-buffers` forbidden) must fail; the bytes verify either way, so
/// without this check such a cell would pass.
#[test]
fn a_path_other_than_predicted_fails_the_cell() {
    if !have("python3") {
        report("SKIP a_path_other_than_predicted_fails_the_cell: python3 not found");
        return;
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/kernel-matrix/matrix.py");
    let out = Command::new("python3")
        .arg(script)
        .arg("--self-test")
        .output()
        .expect("running matrix.py --self-test");
    assert!(
        out.status.success(),
        "matrix.py --self-test: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
