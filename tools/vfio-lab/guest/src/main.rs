//! Guest side of the VFIO lab (`tools/vfio-lab/lab.sh`): runs inside a busybox initramfs
//! on a Debian kernel under QEMU TCG, against two real `mtty` mdevs, and prints one line
//! per test that the host parses:
//!
//! ```text
//! LAB-BYTES <test> <device> precopy=<n> stop_copy=<n> total=<n>
//! LAB <test> PASS|FAIL <detail>
//! LAB ALL PASSED            (or: LAB FAILED <n> of <m>)
//! ```
//!
//! Usage: `vfio-lab-guest --mdev <uuid-A> --mdev <uuid-B> run [TEST...]` or `list`.
//! A new guest test (for example the full multifd migration between two helpers) is one
//! more entry in [`tests::TESTS`].

mod dev;
mod error;
mod mtty;
mod tests;

use std::process::ExitCode;

use error::{LabError, Result};

/// What the tests get: the two mdevs, opened on demand so that a test can hand them to
/// other processes (a VFIO group has one opener at a time).
pub struct Lab {
    /// UUIDs of mdev A and mdev B (same mtty type).
    pub mdevs: [String; 2],
}

fn usage() -> &'static str {
    "usage: vfio-lab-guest --mdev <uuid-A> --mdev <uuid-B> run [TEST...]\n       vfio-lab-guest list"
}

fn main() -> ExitCode {
    let mut mdevs = Vec::new();
    let mut args = std::env::args().skip(1);
    let mut cmd = None;
    let mut names = Vec::new();
    while let Some(a) = args.next() {
        match a.as_str() {
            "--mdev" => match args.next() {
                Some(u) => mdevs.push(u),
                None => return bad_usage("--mdev needs a uuid"),
            },
            "-h" | "--help" => {
                println!("{}", usage());
                return ExitCode::SUCCESS;
            }
            _ if cmd.is_none() => cmd = Some(a),
            _ => names.push(a),
        }
    }
    match cmd.as_deref() {
        Some("list") => {
            for t in tests::TESTS {
                println!("{:<16} {}", t.name, t.about);
            }
            ExitCode::SUCCESS
        }
        Some("run") => {
            let Ok(mdevs) = <[String; 2]>::try_from(mdevs) else {
                return bad_usage("run needs exactly two --mdev");
            };
            run(&Lab { mdevs }, &names)
        }
        _ => bad_usage("missing command"),
    }
}

fn bad_usage(why: &str) -> ExitCode {
    eprintln!("vfio-lab-guest: {why}\n{}", usage());
    ExitCode::from(2)
}

fn run(lab: &Lab, names: &[String]) -> ExitCode {
    let selected: Vec<&tests::Test> = if names.is_empty() {
        tests::TESTS.iter().collect()
    } else {
        let mut v = Vec::new();
        for n in names {
            match tests::TESTS.iter().find(|t| t.name == n) {
                Some(t) => v.push(t),
                None => return bad_usage(&format!("unknown test {n}")),
            }
        }
        v
    };
    let mut failed = 0;
    for t in &selected {
        let start = std::time::Instant::now();
        let res: Result<String> = (t.run)(lab);
        let ms = start.elapsed().as_secs_f64() * 1e3;
        match res {
            Ok(detail) => println!("LAB {} PASS {detail} ({ms:.1} ms)", t.name),
            Err(e) => {
                failed += 1;
                println!("LAB {} FAIL {}", t.name, LabError::chain(&e));
            }
        }
    }
    if failed == 0 {
        println!("LAB ALL PASSED");
        ExitCode::SUCCESS
    } else {
        println!("LAB FAILED {failed} of {}", selected.len());
        ExitCode::FAILURE
    }
}
