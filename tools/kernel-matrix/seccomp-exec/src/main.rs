//! `seccomp-exec ERRNO [--] COMMAND [ARGS...]`: installs a real seccomp filter under which
//! `io_uring_setup` fails with ERRNO (`ENOSYS`, `EPERM`, or a number), as a container
//! runtime's profile does, then execs COMMAND. The filter is inherited by every thread and
//! child of COMMAND, so a helper and the helpers it spawns all see io_uring refused.
//!
//! Exit status: COMMAND's, or 2 for a usage error, 126 when the filter cannot be installed,
//! 127 when COMMAND cannot be executed.

use std::os::unix::process::CommandExt;
use std::process::{Command, ExitCode};

const USAGE: &str = "usage: seccomp-exec ENOSYS|EPERM|<errno> [--] COMMAND [ARGS...]";

fn parse_errno(text: &str) -> Option<i32> {
    match text {
        "ENOSYS" | "enosys" => Some(libc::ENOSYS),
        "EPERM" | "eperm" => Some(libc::EPERM),
        "EACCES" | "eacces" => Some(libc::EACCES),
        n => n.parse().ok().filter(|n| (1..4096).contains(n)),
    }
}

fn main() -> ExitCode {
    let mut args = std::env::args_os().skip(1);
    let Some(errno) = args
        .next()
        .and_then(|a| a.into_string().ok())
        .and_then(|a| parse_errno(&a))
    else {
        eprintln!("{USAGE}");
        return ExitCode::from(2);
    };
    let mut command = args.next();
    if command.as_deref() == Some(std::ffi::OsStr::new("--")) {
        command = args.next();
    }
    let Some(command) = command else {
        eprintln!("{USAGE}");
        return ExitCode::from(2);
    };
    if let Err(err) = uring::deny_io_uring_setup(errno) {
        eprintln!("seccomp-exec: installing the seccomp filter: {err}");
        return ExitCode::from(126);
    }
    let err = Command::new(&command).args(args).exec();
    eprintln!(
        "seccomp-exec: executing {}: {err}",
        command.to_string_lossy()
    );
    ExitCode::from(127)
}

#[cfg(test)]
mod tests {
    #[test]
    fn errno_names_and_numbers() {
        assert_eq!(super::parse_errno("ENOSYS"), Some(libc::ENOSYS));
        assert_eq!(super::parse_errno("EPERM"), Some(libc::EPERM));
        assert_eq!(super::parse_errno("13"), Some(13));
        assert_eq!(super::parse_errno("0"), None);
        assert_eq!(super::parse_errno("nope"), None);
    }
}
