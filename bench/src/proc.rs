//! Measured child processes: each runs under `__measure` (this binary), has a deadline, and is
//! killed (it and the wrapper, each by its own pid) on every path that does not see it exit.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::Sender;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde::Deserialize;

use crate::measure::{self, Rusage};

/// A QMP-style event line (`{"event", "data"}`) from a child's stdout.
#[derive(Debug, Clone, Deserialize)]
pub struct Event {
    pub event: String,
    #[serde(default)]
    pub data: serde_json::Value,
}

/// What a child's stdout reader passes on.
#[derive(Debug)]
pub enum Line {
    Event(usize, Event),
    Closed(usize),
}

/// A child under `__measure`.
pub struct Measured {
    name: String,
    wrapper: Child,
    rusage: PathBuf,
    stderr: PathBuf,
    reader: Option<JoinHandle<()>>,
}

/// What to start.
pub struct Spec<'a> {
    pub name: &'a str,
    pub program: &'a OsStr,
    pub args: Vec<OsString>,
    /// Files (`<name>.rusage`, `<name>.stderr`) go here.
    pub dir: &'a Path,
    pub timeout: Duration,
    /// Forward stdout's JSON event lines here, tagged; None sends stdout to /dev/null.
    pub events: Option<(Sender<Line>, usize)>,
}

impl Measured {
    pub fn spawn(bench_exe: &Path, spec: Spec<'_>) -> Result<Measured, String> {
        let rusage = spec.dir.join(format!("{}.rusage", spec.name));
        let stderr = spec.dir.join(format!("{}.stderr", spec.name));
        let err_file = File::create(&stderr)
            .map_err(|e| format!("{}: creating {}: {e}", spec.name, stderr.display()))?;
        let mut cmd = Command::new(bench_exe);
        cmd.arg(measure::SUBCOMMAND)
            .arg("--rusage-out")
            .arg(&rusage)
            .arg("--timeout-ms")
            .arg(spec.timeout.as_millis().to_string())
            .arg("--")
            .arg(spec.program)
            .args(&spec.args)
            .stdin(Stdio::null())
            .stderr(err_file)
            .stdout(if spec.events.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            });
        let wrapper = cmd
            .spawn()
            .map_err(|e| format!("{}: starting {}: {e}", spec.name, bench_exe.display()))?;
        let mut measured = Measured {
            name: spec.name.to_string(),
            wrapper,
            rusage,
            stderr,
            reader: None,
        };
        if let Some((tx, tag)) = spec.events {
            let Some(stdout) = measured.wrapper.stdout.take() else {
                return Err(format!("{}: stdout was not piped", spec.name));
            };
            let reader = std::thread::Builder::new()
                .name(format!("read-{}", spec.name))
                .spawn(move || {
                    for line in BufReader::new(stdout).lines() {
                        let Ok(line) = line else { break };
                        if let Ok(event) = serde_json::from_str::<Event>(&line) {
                            if tx.send(Line::Event(tag, event)).is_err() {
                                return;
                            }
                        }
                    }
                    let _ = tx.send(Line::Closed(tag));
                })
                .map_err(|e| format!("{}: starting its reader: {e}", spec.name))?;
            measured.reader = Some(reader);
        }
        Ok(measured)
    }

    /// The measured program's pid (not the wrapper's), once the wrapper wrote it.
    pub fn target_pid(&self) -> Option<Pid> {
        let text = std::fs::read_to_string(measure::pid_path(&self.rusage)).ok()?;
        text.trim().parse::<i32>().ok().map(Pid::from_raw)
    }

    /// Waits up to `within` for the wrapper to exit and returns the child's totals; kills both
    /// at the deadline.
    pub fn finish(mut self, within: Duration) -> Result<Rusage, String> {
        let deadline = Instant::now() + within;
        loop {
            match self.wrapper.try_wait() {
                Ok(Some(_)) => break,
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5))
                }
                Ok(None) => {
                    self.kill();
                    return Err(format!(
                        "{} did not exit within {within:?}; killed{}",
                        self.name,
                        self.stderr_tail()
                    ));
                }
                Err(e) => return Err(format!("{}: waiting: {e}", self.name)),
            }
        }
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
        Rusage::read(&self.rusage).map_err(|e| format!("{}: {e}{}", self.name, self.stderr_tail()))
    }

    /// The last lines of the child's stderr, as `: ...` for an error message (empty if none).
    pub fn stderr_tail(&self) -> String {
        stderr_tail(&self.stderr)
    }

    /// Kills the measured program (while the wrapper still holds it unreaped) and the wrapper.
    fn kill(&mut self) {
        if let Ok(None) = self.wrapper.try_wait() {
            if let Some(pid) = self.target_pid() {
                let _ = kill(pid, Signal::SIGKILL);
            }
            let _ = self.wrapper.kill();
        }
        let _ = self.wrapper.wait();
    }
}

impl Drop for Measured {
    fn drop(&mut self) {
        self.kill();
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
    }
}

/// `: <last 3 lines>` of a stderr file, or empty.
pub fn stderr_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    if lines.is_empty() {
        return String::new();
    }
    let start = lines.len().saturating_sub(3);
    format!(" (stderr: {})", lines[start..].join(" | "))
}
