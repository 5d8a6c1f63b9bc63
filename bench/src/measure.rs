//! `__measure`: runs one program as this process's only child, then writes the kernel's
//! accounting of it: `getrusage(RUSAGE_CHILDREN)` after reaping it gives exactly that child's
//! user and system CPU time (all its threads, io_uring's io-wq workers included), its peak RSS
//! and its context switches. The bench puts every measured process under one of these.
//!
//! The child is killed at `--timeout-ms`, or when this wrapper's parent (the bench) goes away.
//! Its pid is written to `<rusage-out>.pid` so the bench can kill it by id while this wrapper
//! still holds it unreaped.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::{Duration, Instant};

use clap::Parser;
use nix::sys::resource::{getrusage, UsageWho};
use nix::sys::wait::{waitid, Id, WaitPidFlag};
use nix::unistd::{getppid, Pid};
use serde::{Deserialize, Serialize};

pub const SUBCOMMAND: &str = "__measure";

/// One process's totals from the kernel.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Rusage {
    pub user_s: f64,
    pub sys_s: f64,
    /// Peak resident set, KiB.
    pub maxrss_kib: u64,
    pub voluntary_switches: u64,
    pub involuntary_switches: u64,
    /// `exit 0`, `signal 9`, ...
    pub exit: String,
    pub success: bool,
    pub timed_out: bool,
}

impl Rusage {
    pub fn cpu_s(&self) -> f64 {
        self.user_s + self.sys_s
    }

    pub fn read(path: &Path) -> Result<Rusage, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("reading {}: {e}", path.display()))?;
        serde_json::from_str(&text).map_err(|e| format!("parsing {}: {e}", path.display()))
    }
}

/// The pid file next to a rusage file.
pub fn pid_path(rusage_out: &Path) -> PathBuf {
    let mut name = rusage_out.as_os_str().to_owned();
    name.push(".pid");
    PathBuf::from(name)
}

#[derive(Debug, Parser)]
#[command(name = SUBCOMMAND)]
struct MeasureArgs {
    /// Where the JSON totals go.
    #[arg(long)]
    rusage_out: PathBuf,
    /// Kill the child after this long.
    #[arg(long)]
    timeout_ms: u64,
    /// The program and its arguments.
    #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
    command: Vec<OsString>,
}

pub fn main(argv: &[OsString]) -> ExitCode {
    let mut full = vec![OsString::from(SUBCOMMAND)];
    full.extend(argv.iter().cloned());
    let args = match MeasureArgs::try_parse_from(full) {
        Ok(args) => args,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(2);
        }
    };
    match run(&args) {
        Ok(usage) => {
            let code = usage
                .exit
                .strip_prefix("exit ")
                .and_then(|c| c.parse::<u8>().ok())
                .unwrap_or(1);
            ExitCode::from(code)
        }
        Err(e) => {
            eprintln!("{SUBCOMMAND}: {e}");
            ExitCode::from(125)
        }
    }
}

fn run(args: &MeasureArgs) -> Result<Rusage, String> {
    let parent = getppid();
    let (program, rest) = args
        .command
        .split_first()
        .ok_or_else(|| "no command given".to_string())?;
    let mut child = Command::new(program)
        .args(rest)
        .stdin(Stdio::null())
        .spawn()
        .map_err(|e| format!("starting {}: {e}", Path::new(program).display()))?;
    let pid = Pid::from_raw(child.id() as i32);
    if let Err(e) = std::fs::write(pid_path(&args.rusage_out), pid.to_string()) {
        let _ = child.kill();
        let _ = child.wait();
        return Err(format!("writing the pid file: {e}"));
    }
    // Wakes when the child exits but leaves it unreaped: until this thread's owner reaps it,
    // the pid stays the child's, so killing it by pid is always safe.
    let (tx, rx) = mpsc::channel();
    let waiter = std::thread::Builder::new()
        .name("measure-wait".into())
        .spawn(move || {
            let result = waitid(Id::Pid(pid), WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT);
            let _ = tx.send(result.map(|_| ()));
        });
    if let Err(e) = waiter {
        let _ = child.kill();
        let _ = child.wait();
        return Err(format!("starting the wait thread: {e}"));
    }
    let deadline = Instant::now() + Duration::from_millis(args.timeout_ms);
    let mut timed_out = false;
    let mut killed = false;
    loop {
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(_) | Err(RecvTimeoutError::Disconnected) => break,
            Err(RecvTimeoutError::Timeout) => {
                let orphaned = getppid() != parent;
                if !killed && (orphaned || Instant::now() >= deadline) {
                    timed_out = !orphaned;
                    killed = true;
                    let _ = child.kill();
                }
            }
        }
    }
    let status = child
        .wait()
        .map_err(|e| format!("reaping the child: {e}"))?;
    let usage =
        getrusage(UsageWho::RUSAGE_CHILDREN).map_err(|e| format!("getrusage(CHILDREN): {e}"))?;
    let secs = |tv: nix::sys::time::TimeVal| tv.tv_sec() as f64 + tv.tv_usec() as f64 / 1e6;
    let exit = match (
        status.code(),
        std::os::unix::process::ExitStatusExt::signal(&status),
    ) {
        (Some(code), _) => format!("exit {code}"),
        (None, Some(sig)) => format!("signal {sig}"),
        (None, None) => "unknown".into(),
    };
    let totals = Rusage {
        user_s: secs(usage.user_time()),
        sys_s: secs(usage.system_time()),
        maxrss_kib: u64::try_from(usage.max_rss()).unwrap_or(0),
        voluntary_switches: u64::try_from(usage.voluntary_context_switches()).unwrap_or(0),
        involuntary_switches: u64::try_from(usage.involuntary_context_switches()).unwrap_or(0),
        exit,
        success: status.success(),
        timed_out,
    };
    let text = serde_json::to_string(&totals).map_err(|e| format!("encoding: {e}"))?;
    std::fs::write(&args.rusage_out, text)
        .map_err(|e| format!("writing {}: {e}", args.rusage_out.display()))?;
    Ok(totals)
}
