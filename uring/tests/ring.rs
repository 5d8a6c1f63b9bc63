//! The ring against the real kernel: tmpfs files as device streams, unix socket pairs as
//! channels.
#![allow(clippy::unwrap_used)]
use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use vfio_multifd_uring::{
    Buffer, BufferPool, Completion, Feature, FeatureMask, OpKind, Ring, RingConfig,
};

fn ring(forbid: FeatureMask) -> Ring {
    Ring::new(
        &RingConfig {
            entries: 64,
            forbid,
        },
        BufferPool::new(4, 64 << 10).unwrap(),
    )
    .unwrap()
}

fn stream_file(bytes: &[u8]) -> std::fs::File {
    let path = std::env::temp_dir().join(format!(
        "uring-test-{}-{}",
        std::process::id(),
        rand_suffix()
    ));
    std::fs::write(&path, bytes).unwrap();
    let file = std::fs::File::open(&path).unwrap();
    std::fs::remove_file(&path).unwrap();
    file
}

fn tcp_pair() -> (std::net::TcpStream, std::net::TcpStream) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let tx = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (rx, _) = listener.accept().unwrap();
    (tx, rx)
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

fn wait_for(ring: &mut Ring, kind: OpKind) -> Completion {
    for _ in 0..200 {
        ring.wait(1, Some(Duration::from_millis(50))).unwrap();
        while let Some(done) = ring.next_completion() {
            if done.kind == kind {
                return done;
            }
        }
    }
    panic!("no {kind:?} completion");
}

fn chain_cases(forbid: FeatureMask, zc: bool) {
    let mut ring = ring(forbid);
    let data: Vec<u8> = (0..100_000u32).map(|i| (i * 7) as u8).collect();
    let file = stream_file(&data);
    let (tx, mut rx) = tcp_pair();

    // A full read: the linked send carries header + chunk.
    let buf = ring.pool().take().unwrap();
    ring.pool().slot_mut(&buf)[..4].copy_from_slice(b"HEAD");
    ring.read_then_send(
        1,
        file.as_fd(),
        tx.as_fd(),
        buf,
        4..4 + 60_000,
        0..4 + 60_000,
        zc,
    )
    .unwrap();
    let read = wait_for(&mut ring, OpKind::ChainRead);
    assert_eq!(read.result.unwrap(), 60_000);
    let sent = wait_for(&mut ring, OpKind::ChainSend);
    assert_eq!(sent.result.unwrap(), 60_004);
    let Some(Buffer::Pool(buf)) = sent.buf else {
        panic!("buffer comes back")
    };
    let mut got = vec![0u8; 60_004];
    rx.read_exact(&mut got).unwrap();
    assert_eq!(&got[..4], b"HEAD");
    assert_eq!(&got[4..], &data[..60_000]);

    // A short read (40_000 left of 60_000 asked) cancels the send; nothing reaches the socket.
    ring.read_then_send(
        2,
        file.as_fd(),
        tx.as_fd(),
        buf,
        4..4 + 60_000,
        0..4 + 60_000,
        zc,
    )
    .unwrap();
    assert_eq!(
        wait_for(&mut ring, OpKind::ChainRead).result.unwrap(),
        40_000
    );
    let cancelled = wait_for(&mut ring, OpKind::ChainSend);
    assert_eq!(
        cancelled.result.unwrap_err().raw_os_error(),
        Some(libc::ECANCELED)
    );
    let Some(Buffer::Pool(buf)) = cancelled.buf else {
        panic!("buffer comes back")
    };
    // The caller sends what was read.
    ring.send(3, tx.as_fd(), Buffer::Pool(buf), 4..4 + 40_000, zc)
        .unwrap();
    let sent = wait_for(&mut ring, OpKind::Send);
    assert_eq!(sent.result.unwrap(), 40_000);
    let mut got = vec![0u8; 40_000];
    rx.read_exact(&mut got).unwrap();
    assert_eq!(&got[..], &data[60_000..]);

    // End of stream: the read returns 0 and the send is cancelled.
    let Some(Buffer::Pool(buf)) = sent.buf else {
        panic!()
    };
    ring.read_then_send(4, file.as_fd(), tx.as_fd(), buf, 4..1004, 0..1004, zc)
        .unwrap();
    assert_eq!(wait_for(&mut ring, OpKind::ChainRead).result.unwrap(), 0);
    assert!(wait_for(&mut ring, OpKind::ChainSend).result.is_err());
    assert_eq!(ring.in_flight(), 0);
}

#[test]
fn linked_read_send_full_short_and_eof() {
    chain_cases(FeatureMask::empty(), false);
}

#[test]
fn linked_read_send_zero_copy_keeps_the_buffer_until_the_notification() {
    chain_cases(FeatureMask::empty(), true);
}

#[test]
fn linked_read_send_without_fixed_buffers() {
    chain_cases(
        FeatureMask::empty()
            .with(Feature::FixedBuffers)
            .with(Feature::DeferTaskrun),
        false,
    );
}

#[test]
fn loopback_zero_copy_reports_copied() {
    let mut ring = ring(FeatureMask::empty());
    let (tx, mut rx) = tcp_pair();
    let buf = ring.pool().take().unwrap();
    ring.send(9, tx.as_fd(), Buffer::Pool(buf), 0..65536, true)
        .unwrap();
    let sent = wait_for(&mut ring, OpKind::Send);
    assert_eq!(sent.result.unwrap(), 65536);
    assert!(
        sent.zc_copied,
        "loopback copies zero-copy sends (kernel 6.x)"
    );
    let mut got = vec![0u8; 65536];
    rx.read_exact(&mut got).unwrap();
}

#[test]
fn recv_waitall_then_write_and_eof() {
    let mut ring = ring(FeatureMask::empty());
    let (mut tx, rx) = UnixStream::pair().unwrap();
    let out = stream_file(&[]);
    let out_path = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&out));
    let out = std::fs::OpenOptions::new()
        .write(true)
        .open(out_path)
        .unwrap();
    let writer = std::thread::spawn(move || {
        for chunk in [b"abc".as_slice(), b"defgh", b"ij"] {
            tx.write_all(chunk).unwrap();
            std::thread::sleep(Duration::from_millis(5));
        }
    });
    let buf = ring.pool().take().unwrap();
    ring.recv(1, rx.as_fd(), Buffer::Pool(buf), 0..10).unwrap();
    let got = wait_for(&mut ring, OpKind::Recv);
    assert_eq!(got.result.unwrap(), 10, "MSG_WAITALL gathers split writes");
    let buf = got.buf.unwrap();
    ring.write(2, out.as_fd(), buf, 0..10).unwrap();
    let written = wait_for(&mut ring, OpKind::Write);
    assert_eq!(written.result.unwrap(), 10);
    writer.join().unwrap();
    let heap = Buffer::Heap(vec![0u8; 8].into_boxed_slice());
    ring.recv(3, rx.as_fd(), heap, 0..8).unwrap();
    assert_eq!(
        wait_for(&mut ring, OpKind::Recv).result.unwrap(),
        0,
        "peer closed: EOF"
    );
}

#[test]
fn zero_copy_on_a_unix_socket_is_refused_not_lost() {
    let mut ring = ring(FeatureMask::empty());
    let (tx, _rx) = UnixStream::pair().unwrap();
    let buf = ring.pool().take().unwrap();
    ring.send(1, tx.as_fd(), Buffer::Pool(buf), 0..100, true)
        .unwrap();
    let sent = wait_for(&mut ring, OpKind::Send);
    assert_eq!(
        sent.result.unwrap_err().raw_os_error(),
        Some(libc::EOPNOTSUPP)
    );
    assert!(
        matches!(sent.buf, Some(Buffer::Pool(_))),
        "the buffer comes back for a plain resend"
    );
}

#[test]
fn waker_interrupts_a_wait_from_another_thread() {
    let mut ring = ring(FeatureMask::empty());
    let waker = ring.waker();
    let t = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(20));
        waker.wake();
    });
    let done = wait_for(&mut ring, OpKind::Wake);
    assert!(done.result.is_ok());
    t.join().unwrap();
}

#[test]
fn forbidding_io_uring_refuses_the_ring() {
    let err = Ring::new(
        &RingConfig {
            entries: 8,
            forbid: FeatureMask::empty().with(Feature::IoUring),
        },
        BufferPool::new(1, 4096).unwrap(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("forbidden"));
}

#[test]
fn dropping_a_ring_with_a_blocked_recv_drains_it() {
    let mut ring = ring(FeatureMask::empty());
    let (_tx, rx) = UnixStream::pair().unwrap();
    let buf = ring.pool().take().unwrap();
    ring.recv(1, rx.as_fd(), Buffer::Pool(buf), 0..100).unwrap();
    ring.wait(0, Some(Duration::from_millis(10))).unwrap();
    assert_eq!(ring.in_flight(), 1);
    assert!(
        ring.cancel_all(Duration::from_secs(2)),
        "a blocked recv is cancellable"
    );
    assert_eq!(ring.pool().free_slots(), 4);
}
