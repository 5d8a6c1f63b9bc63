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
    let file = ring.dup_fd(file.as_fd()).unwrap();
    let tx = ring.dup_fd(tx.as_fd()).unwrap();
    // SEND_ZC on loopback: the kernel copies and says so in the notification.
    let zc_notified = zc && ring.send_zc();

    // A full read: the linked send carries header + chunk.
    let buf = ring.take().unwrap();
    ring.slot_mut(&buf)[..4].copy_from_slice(b"HEAD");
    ring.read_then_send(1, file, tx, buf, 4..4 + 60_000, 0..4 + 60_000, zc)
        .unwrap();
    let read = wait_for(&mut ring, OpKind::ChainRead);
    assert_eq!(read.result.unwrap(), 60_000);
    let sent = wait_for(&mut ring, OpKind::ChainSend);
    assert_eq!(sent.result.unwrap(), 60_004);
    // The buffer came back with the notification, not with the send's first completion
    // (F_MORE): only the notification says the kernel copied.
    assert_eq!(
        sent.zc_copied, zc_notified,
        "a zero-copy send's buffer comes back only after its notification"
    );
    let Some(Buffer::Pool(buf)) = sent.buf else {
        panic!("buffer comes back")
    };
    let mut got = vec![0u8; 60_004];
    rx.read_exact(&mut got).unwrap();
    assert_eq!(&got[..4], b"HEAD");
    assert_eq!(&got[4..], &data[..60_000]);

    // A short read (40_000 left of 60_000 asked) cancels the send; nothing reaches the socket.
    ring.read_then_send(2, file, tx, buf, 4..4 + 60_000, 0..4 + 60_000, zc)
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
    ring.send(3, tx, Buffer::Pool(buf), 4..4 + 40_000, zc)
        .unwrap();
    let sent = wait_for(&mut ring, OpKind::Send);
    assert_eq!(sent.result.unwrap(), 40_000);
    assert_eq!(sent.zc_copied, zc_notified, "the plain-slot SEND_ZC too");
    let mut got = vec![0u8; 40_000];
    rx.read_exact(&mut got).unwrap();
    assert_eq!(&got[..], &data[60_000..]);

    // End of stream: the read returns 0 and the send is cancelled.
    let Some(Buffer::Pool(buf)) = sent.buf else {
        panic!()
    };
    ring.read_then_send(4, file, tx, buf, 4..1004, 0..1004, zc)
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
    let tx = ring.dup_fd(tx.as_fd()).unwrap();
    let buf = ring.take().unwrap();
    ring.send(9, tx, Buffer::Pool(buf), 0..65536, true).unwrap();
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
    let (rx, out) = (
        ring.dup_fd(rx.as_fd()).unwrap(),
        ring.dup_fd(out.as_fd()).unwrap(),
    );
    let buf = ring.take().unwrap();
    ring.recv(1, rx, Buffer::Pool(buf), 0..10).unwrap();
    let got = wait_for(&mut ring, OpKind::Recv);
    assert_eq!(got.result.unwrap(), 10, "MSG_WAITALL gathers split writes");
    let buf = got.buf.unwrap();
    ring.write(2, out, buf, 0..10).unwrap();
    let written = wait_for(&mut ring, OpKind::Write);
    assert_eq!(written.result.unwrap(), 10);
    writer.join().unwrap();
    let heap = Buffer::Heap(vec![0u8; 8].into_boxed_slice());
    ring.recv(3, rx, heap, 0..8).unwrap();
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
    let tx = ring.dup_fd(tx.as_fd()).unwrap();
    let buf = ring.take().unwrap();
    ring.send(1, tx, Buffer::Pool(buf), 0..100, true).unwrap();
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
    let rx = ring.adopt_fd(rx.into());
    let buf = ring.take().unwrap();
    ring.recv(1, rx, Buffer::Pool(buf), 0..100).unwrap();
    ring.wait(0, Some(Duration::from_millis(10))).unwrap();
    assert_eq!(ring.in_flight(), 1);
    assert!(
        ring.cancel_all(Duration::from_secs(2)),
        "a blocked recv is cancellable"
    );
    assert_eq!(ring.free_slots(), 4);
}

/// An op queued but not yet submitted names its file by id: once the caller's fd number names
/// another file (closed and reused) before the submit, the op still reads its own file.
#[test]
fn a_queued_op_reads_its_own_file_after_the_callers_fd_number_is_reused() {
    use std::os::fd::AsRawFd;
    let mut ring = ring(FeatureMask::empty());
    let original = stream_file(b"the right file");
    let file = ring.dup_fd(original.as_fd()).unwrap();
    let buf = ring.take().unwrap();
    ring.read(1, file, Buffer::Pool(buf), 0..14).unwrap();
    // Queued, not submitted: the next `wait` submits. Meanwhile the number the caller lent
    // is closed and names another file (dup2 does both at once, so no other thread can take
    // the number in between).
    let impostor = stream_file(b"a wrong file!!");
    // SAFETY: both fds are open and owned by this test; dup2 makes `original`'s number name
    // the impostor's file, which `original` then owns (and closes on drop).
    let duped = unsafe { libc::dup2(impostor.as_raw_fd(), original.as_raw_fd()) };
    assert_eq!(duped, original.as_raw_fd());
    let done = wait_for(&mut ring, OpKind::Read);
    assert_eq!(done.result.unwrap(), 14);
    let Some(Buffer::Pool(buf)) = done.buf else {
        panic!("buffer comes back")
    };
    assert_eq!(&ring.slot_mut(&buf)[..14], b"the right file");
}

#[test]
#[should_panic(expected = "another ring")]
fn a_file_id_of_another_ring_is_refused() {
    let mut mine = ring(FeatureMask::empty());
    let mut theirs = ring(FeatureMask::empty());
    let (a, _b) = UnixStream::pair().unwrap();
    let file = theirs.adopt_fd(a.into());
    let buf = mine.take().unwrap();
    let _ = mine.recv(1, file, Buffer::Pool(buf), 0..1);
}

/// A SEND_ZC of 64 MiB to a peer that never reads (a stopped destination): far more than the
/// two sockets' buffers hold, so the send and its notification stay outstanding. `None` where
/// the kernel has no SEND_ZC.
fn stuck_zero_copy_send() -> Option<(Ring, vfio_multifd_uring::FileId, std::net::TcpStream)> {
    let mut ring = ring(FeatureMask::empty());
    if !ring.send_zc() {
        println!("skipping: no SEND_ZC on this kernel");
        return None;
    }
    let (tx, rx) = tcp_pair();
    let tx = ring.adopt_fd(tx.into());
    let len = 64 << 20;
    let buf = vec![7u8; len].into_boxed_slice();
    ring.send(1, tx, Buffer::Heap(buf), 0..len, true).unwrap();
    for _ in 0..4 {
        ring.wait(1, Some(Duration::from_millis(50))).unwrap();
        assert!(ring.next_completion().is_none(), "the peer reads nothing");
    }
    assert_eq!(ring.in_flight(), 1);
    Some((ring, tx, rx))
}

#[test]
fn a_zero_copy_send_to_a_peer_that_never_reads_drains_once_its_socket_is_aborted() {
    let Some((mut ring, tx, _rx)) = stuck_zero_copy_send() else {
        return;
    };
    // The premise: cancelling is not enough, the notification waits for the queued data.
    assert!(
        !ring.cancel_all(Duration::from_millis(200)),
        "a cancelled SEND_ZC to a zero window finished without an abort: the kernel frees \
         its data on cancel now, and this test no longer holds one in flight"
    );
    ring.abort_socket(tx).unwrap();
    let start = std::time::Instant::now();
    assert!(
        ring.cancel_all(Duration::from_secs(3)),
        "the abort frees the queued data, so the notification posts"
    );
    assert!(
        start.elapsed() < Duration::from_secs(1),
        "drained after {:?}",
        start.elapsed()
    );
    assert_eq!(ring.in_flight(), 0);
}

#[test]
fn dropping_a_ring_whose_cancel_gave_up_does_not_wait_again() {
    let Some((mut ring, _tx, _rx)) = stuck_zero_copy_send() else {
        return;
    };
    assert!(!ring.cancel_all(Duration::from_millis(200)));
    let start = std::time::Instant::now();
    // Leaks the send's buffer and socket (the kernel still holds the pages): a test process.
    drop(ring);
    assert!(
        start.elapsed() < Duration::from_secs(1),
        "the drop waited {:?} for ops its cancel_all had given up on",
        start.elapsed()
    );
}

#[test]
fn aborting_a_unix_socket_fails_without_closing_it() {
    let mut ring = ring(FeatureMask::empty());
    let (tx, mut rx) = UnixStream::pair().unwrap();
    let tx = ring.adopt_fd(tx.into());
    assert!(
        ring.abort_socket(tx).is_err(),
        "connect(AF_UNSPEC) is TCP's"
    );
    // Still connected: the ring's send arrives.
    ring.send(
        1,
        tx,
        Buffer::Heap(vec![9u8; 3].into_boxed_slice()),
        0..3,
        false,
    )
    .unwrap();
    assert_eq!(wait_for(&mut ring, OpKind::Send).result.unwrap(), 3);
    let mut got = [0u8; 3];
    rx.read_exact(&mut got).unwrap();
    assert_eq!(got, [9; 3]);
}

#[test]
fn too_many_buffers_to_register_is_not_blamed_on_memlock() {
    // 16385+ buffers is EINVAL whatever the memlock limit; the note must say so, as probe does.
    let Ok(ring) = Ring::new(
        &RingConfig {
            entries: 8,
            forbid: FeatureMask::empty(),
        },
        BufferPool::new(16385, 4096).unwrap(),
    ) else {
        return; // no io_uring here
    };
    assert!(!ring.fixed_buffers());
    let note = ring
        .notes()
        .iter()
        .find(|n| n.contains("registered buffers unavailable"))
        .expect("a note on the registration that failed");
    assert!(note.contains("16384 buffers"), "{note}");
    assert!(!note.contains("memlock limit too low"), "{note}");
}
