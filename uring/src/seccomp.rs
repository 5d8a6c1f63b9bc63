//! A real seccomp filter that refuses `io_uring_setup` with a chosen errno, as a container
//! runtime's profile does (Docker's default returns EPERM; a kernel without io_uring, ENOSYS).
//! Used to prove the fallback path on a kernel that has io_uring; its tests also fail
//! `io_uring_enter` on one thread, to fail a submit.

use std::io;

/// `io_uring_setup` is 425 in the unified syscall table (x86_64, aarch64, and others).
const NR_IO_URING_SETUP: u32 = 425;
/// `io_uring_enter`, next to it.
#[cfg(test)]
const NR_IO_URING_ENTER: u32 = 426;

#[cfg(target_arch = "x86_64")]
const AUDIT_ARCH: u32 = 0xC000_003E;
#[cfg(target_arch = "aarch64")]
const AUDIT_ARCH: u32 = 0xC000_00B7;

const SECCOMP_RET_ALLOW: u32 = 0x7fff_0000;
const SECCOMP_RET_ERRNO: u32 = 0x0005_0000;
const SECCOMP_SET_MODE_FILTER: libc::c_uint = 1;
const SECCOMP_FILTER_FLAG_TSYNC: libc::c_ulong = 1;

fn stmt(code: u16, k: u32) -> libc::sock_filter {
    libc::sock_filter {
        code,
        jt: 0,
        jf: 0,
        k,
    }
}

fn jump(code: u16, k: u32, jt: u8, jf: u8) -> libc::sock_filter {
    libc::sock_filter { code, jt, jf, k }
}

/// Installs, for every thread of this process and its future children, a filter under which
/// `io_uring_setup` fails with `errno`. Irreversible for the process.
pub fn deny_io_uring_setup(errno: i32) -> io::Result<()> {
    deny(NR_IO_URING_SETUP, errno, SECCOMP_FILTER_FLAG_TSYNC)
}

/// Makes `io_uring_enter` fail with `errno` on the calling thread only (and threads it starts
/// later), so that a test can fail a submit without touching the rest of the test process.
/// Irreversible for the thread.
#[cfg(test)]
pub(crate) fn deny_io_uring_enter_on_this_thread(errno: i32) -> io::Result<()> {
    deny(NR_IO_URING_ENTER, errno, 0)
}

fn deny(nr: u32, errno: i32, flags: libc::c_ulong) -> io::Result<()> {
    let ld_w_abs = (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16;
    let jeq_k = (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16;
    let ret_k = (libc::BPF_RET | libc::BPF_K) as u16;
    let program = [
        stmt(ld_w_abs, 4), // seccomp_data.arch
        jump(jeq_k, AUDIT_ARCH, 1, 0),
        stmt(ret_k, SECCOMP_RET_ALLOW),
        stmt(ld_w_abs, 0), // seccomp_data.nr
        jump(jeq_k, nr, 0, 1),
        stmt(ret_k, SECCOMP_RET_ERRNO | (errno as u32 & 0xffff)),
        stmt(ret_k, SECCOMP_RET_ALLOW),
    ];
    let fprog = libc::sock_fprog {
        len: program.len() as u16,
        filter: program.as_ptr().cast_mut(),
    };
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fprog` points at `program`, both live across the call; the kernel copies the
    // filter before returning.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            SECCOMP_SET_MODE_FILTER,
            flags,
            &fprog as *const libc::sock_fprog,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn refused_setup_reports_the_chosen_errno() {
        // The filter is per process and irreversible: run it in a child.
        let exe = std::env::current_exe().unwrap();
        if std::env::var_os("URING_SECCOMP_CHILD").is_some() {
            super::deny_io_uring_setup(libc::EPERM).unwrap();
            let Err(err) = io_uring::IoUring::new(8) else {
                panic!("io_uring_setup must be refused")
            };
            assert_eq!(err.raw_os_error(), Some(libc::EPERM));
            let probe = crate::probe(4096);
            assert!(probe.unusable.unwrap().contains("EPERM"));
            return;
        }
        let status = std::process::Command::new(exe)
            .args([
                "--exact",
                "seccomp::tests::refused_setup_reports_the_chosen_errno",
                "--test-threads=1",
            ])
            .env("URING_SECCOMP_CHILD", "1")
            .status()
            .unwrap();
        assert!(status.success());
    }
}
