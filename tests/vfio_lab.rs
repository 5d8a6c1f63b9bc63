//! Real-kernel VFIO lab: runs `tools/vfio-lab/lab.sh`, which boots a Debian 6.12 kernel
//! under `qemu-system-x86_64 -accel tcg` with two `mtty` mdevs and runs the guest tests
//! (`tools/vfio-lab/guest`) through our vfio layer. Skips only when QEMU is missing.
//!
//! Cold, the lab downloads the pinned Debian packages and builds `mtty.ko` (cached under
//! `tools/vfio-lab/work`); warm, it rebuilds the static guest binary and boots (~5 s).

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

/// Writes straight to stderr, past the test harness's capture, so CI logs show the byte
/// counts of passing runs too.
fn report(line: &str) {
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// The `key=value` field of a line.
fn field(line: &str, key: &str) -> Option<u64> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
        .and_then(|v| v.parse().ok())
}

#[test]
fn vfio_lab_mtty_migration() {
    match Command::new("qemu-system-x86_64")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
    {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            report("SKIP vfio_lab_mtty_migration: qemu-system-x86_64 not found (tools/install-test-deps.sh installs it)");
            return;
        }
        Err(e) => panic!("running qemu-system-x86_64 --version: {e}"),
    }

    let lab = Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/vfio-lab/lab.sh");
    let start = std::time::Instant::now();
    let out = Command::new("bash")
        .arg(&lab)
        .output()
        .expect("running tools/vfio-lab/lab.sh");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let all = format!("--- lab.sh stdout ---\n{stdout}--- lab.sh stderr ---\n{stderr}");

    for line in stdout.lines().filter(|l| l.starts_with("LAB")) {
        report(&format!("vfio-lab: {line}"));
    }
    report(&format!(
        "vfio-lab: lab.sh took {:.1} s",
        start.elapsed().as_secs_f64()
    ));
    assert!(
        out.status.success(),
        "lab.sh failed ({})\n{all}",
        out.status
    );

    let lines: Vec<&str> = stdout.lines().collect();
    for test in ["stop-copy", "pre-copy", "corrupt", "multifd"] {
        let pass = format!("LAB {test} PASS");
        assert!(
            lines.iter().any(|l| l.starts_with(&pass)),
            "no `{pass}` line\n{all}"
        );
    }
    assert!(
        !lines
            .iter()
            .any(|l| l.starts_with("LAB ") && l.contains(" FAIL")),
        "a LAB test failed\n{all}"
    );
    assert!(
        lines.contains(&"LAB ALL PASSED"),
        "no `LAB ALL PASSED`\n{all}"
    );

    // What mtty (mtty-2: two ports) produces: a 24-byte header plus 36 bytes per port.
    let bytes = |test: &str| -> &str {
        let prefix = format!("LAB-BYTES {test} ");
        lines
            .iter()
            .find(|l| l.starts_with(&prefix))
            .unwrap_or_else(|| panic!("no `{prefix}` line\n{all}"))
    };
    let stop = bytes("stop-copy");
    assert_eq!(field(stop, "stop_copy"), Some(96), "{stop}");
    assert_eq!(field(stop, "total"), Some(96), "{stop}");
    let pre = bytes("pre-copy");
    assert_eq!(field(pre, "precopy"), Some(24), "{pre}");
    assert_eq!(field(pre, "stop_copy"), Some(72), "{pre}");
    assert_eq!(field(pre, "total"), Some(96), "{pre}");
    let corrupt = bytes("corrupt");
    assert_eq!(field(corrupt, "stop_copy"), Some(96), "{corrupt}");
    // The full migration by two helper processes moved the same 96 bytes over multifd.
    let multifd = bytes("multifd");
    assert!(multifd.starts_with("LAB-BYTES multifd A 96 "), "{multifd}");
}
