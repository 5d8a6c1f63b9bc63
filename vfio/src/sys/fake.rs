//! The fake kernel for unit tests: the same functions as `sys::real`, backed by objects in a
//! process-wide table. A stand-in fd is a memfd (or a file) whose first 8 bytes are the
//! object's key, so dups and reopened paths find the same object, and parallel tests never
//! share one.
//!
//! Devices follow the kernel's rules independently of `crate::planner`: the single arcs of
//! the uAPI comment (optional states skipped when the device lacks them), multi-arc SETs
//! walked along a shortest path with no saving-group state inside it, EINVAL from ERROR or for
//! a state the device lacks, a new memfd data_fd on arcs that open a session, the saving fd
//! shared PRE_COPY -> STOP_COPY, and failure injection per arc.

use std::collections::{HashMap, VecDeque};
use std::ffi::CStr;
use std::io;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use crate::os;
use crate::uapi::*;
use crate::MigState;

/// An injected SET failure: when an arc ends in `on`, fail with `errno` and leave the device
/// in `ends_in` (None: where it was before the arc).
#[derive(Debug, Clone, Copy)]
pub(crate) struct FailSet {
    pub(crate) on: MigState,
    pub(crate) errno: i32,
    pub(crate) ends_in: Option<MigState>,
}

/// A fake device's kernel-side state.
#[derive(Debug, Clone)]
pub(crate) struct FakeDev {
    pub(crate) flags: u64,
    pub(crate) state: MigState,
    pub(crate) data_size: u64,
    pub(crate) v2_supported: bool,
    pub(crate) v2_on: bool,
    pub(crate) reinit: bool,
    pub(crate) precopy: (u64, u64),
    pub(crate) fail: Option<FailSet>,
    /// Driver bugs: no fd on an opening arc / an fd on a non-opening one.
    pub(crate) bug_no_fd: bool,
    pub(crate) bug_extra_fd: bool,
    /// Every single arc taken, in order.
    pub(crate) arcs: Vec<(MigState, MigState)>,
    /// Number of SET calls (one per planned arc for a VfioDevice).
    pub(crate) sets: u32,
    pub(crate) resets: u32,
    /// Key of the open session's data_fd object.
    pub(crate) session: Option<u64>,
    pub(crate) region: (u64, u64),
}

impl FakeDev {
    pub(crate) fn new(flags: u64) -> FakeDev {
        FakeDev {
            flags,
            state: MigState::Running,
            data_size: 4096,
            v2_supported: false,
            v2_on: false,
            reinit: false,
            precopy: (0, 0),
            fail: None,
            bug_no_fd: false,
            bug_extra_fd: false,
            arcs: Vec::new(),
            sets: 0,
            resets: 0,
            session: None,
            region: (0, 8),
        }
    }
}

#[derive(Debug)]
enum Obj {
    Device(FakeDev),
    DataFd {
        device: u64,
    },
    Container {
        iommu: Option<u32>,
    },
    Group {
        viable: bool,
        container: Option<u64>,
        devices: Vec<(String, u64)>,
    },
    Iommufd {
        next_ioas: u32,
    },
}

static OBJECTS: Mutex<Option<HashMap<u64, Obj>>> = Mutex::new(None);
static NEXT: AtomicU64 = AtomicU64::new(1);

fn with_objects<R>(f: impl FnOnce(&mut HashMap<u64, Obj>) -> R) -> R {
    let mut g = OBJECTS.lock().unwrap_or_else(|p| p.into_inner());
    f(g.get_or_insert_with(HashMap::new))
}

fn insert(obj: Obj) -> u64 {
    let key = NEXT.fetch_add(1, Ordering::Relaxed);
    with_objects(|m| m.insert(key, obj));
    key
}

fn stand_in(key: u64) -> io::Result<OwnedFd> {
    let fd = os::memfd(c"fake-vfio")?;
    os::pwrite_all(std::os::fd::AsFd::as_fd(&fd), &key.to_le_bytes(), 0)?;
    Ok(fd)
}

fn key_of(fd: BorrowedFd<'_>) -> io::Result<u64> {
    let mut b = [0u8; 8];
    match os::pread(fd, &mut b, 0) {
        Ok(8) => Ok(u64::from_le_bytes(b)),
        // Not a stand-in: like a VFIO request on a foreign fd.
        _ => Err(io::Error::from_raw_os_error(libc::ENOTTY)),
    }
}

fn enotty() -> io::Error {
    io::Error::from_raw_os_error(libc::ENOTTY)
}

fn einval() -> io::Error {
    io::Error::from_raw_os_error(libc::EINVAL)
}

/// A fake device and its stand-in device fd.
pub(crate) fn new_device(dev: FakeDev) -> io::Result<(u64, OwnedFd)> {
    let key = insert(Obj::Device(dev));
    Ok((key, stand_in(key)?))
}

/// Runs `f` on a fake device's state.
pub(crate) fn with_device<R>(key: u64, f: impl FnOnce(&mut FakeDev) -> R) -> Option<R> {
    with_objects(|m| match m.get_mut(&key) {
        Some(Obj::Device(d)) => Some(f(d)),
        _ => None,
    })
}

/// Writes a stand-in for a new fake container into `path`.
pub(crate) fn container_file(path: &std::path::Path) -> io::Result<u64> {
    let key = insert(Obj::Container { iommu: None });
    std::fs::write(path, key.to_le_bytes())?;
    Ok(key)
}

/// Writes a stand-in for a new fake group holding `devices` into `path`.
pub(crate) fn group_file(
    path: &std::path::Path,
    viable: bool,
    devices: Vec<(String, u64)>,
) -> io::Result<u64> {
    let key = insert(Obj::Group {
        viable,
        container: None,
        devices,
    });
    std::fs::write(path, key.to_le_bytes())?;
    Ok(key)
}

/// Writes a stand-in for a new fake iommufd into `path`.
pub(crate) fn iommufd_file(path: &std::path::Path) -> io::Result<u64> {
    let key = insert(Obj::Iommufd { next_ioas: 1 });
    std::fs::write(path, key.to_le_bytes())?;
    Ok(key)
}

/// The single arcs of the uAPI comment block.
const ARCS: [(MigState, MigState); 15] = {
    use MigState::*;
    [
        (Stop, Resuming),
        (Stop, RunningP2p),
        (Stop, StopCopy),
        (Running, RunningP2p),
        (Running, PreCopy),
        (PreCopy, Running),
        (PreCopy, PreCopyP2p),
        (PreCopyP2p, PreCopy),
        (PreCopyP2p, RunningP2p),
        (PreCopyP2p, StopCopy),
        (Resuming, Stop),
        (RunningP2p, Running),
        (RunningP2p, Stop),
        (RunningP2p, PreCopyP2p),
        (StopCopy, Stop),
    ]
};

fn has(flags: u64, s: MigState) -> bool {
    let need = s.required_flags().bits();
    flags & need == need
}

/// Whether `a -> b` is one arc for a device with `flags`: a uAPI arc, or a chain of them whose
/// interior states the device lacks (a saving one only between two saving states). "Arcs touching PRE_COPY and PRE_COPY_P2P are removed if
/// support for PRE_COPY is not present"; missing P2P states are skipped over.
pub(crate) fn is_single_arc(a: MigState, b: MigState, flags: u64) -> bool {
    let no_precopy = flags & crate::MigrationFlags::PRE_COPY.bits() == 0;
    let mut seen = vec![a];
    let mut queue = VecDeque::from([a]);
    while let Some(cur) = queue.pop_front() {
        for &(x, y) in ARCS.iter() {
            if x != cur || seen.contains(&y) {
                continue;
            }
            if no_precopy && (x.is_precopy() || y.is_precopy()) {
                continue;
            }
            // A skipped saving state only collapses an arc inside the saving group
            // (PRE_COPY -> [PRE_COPY_P2P] -> STOP_COPY).
            if y != b && y.is_saving() && !(a.is_saving() && b.is_saving()) {
                continue;
            }
            if y == b {
                return true;
            }
            if !has(flags, y) {
                seen.push(y);
                queue.push_back(y);
            }
        }
    }
    false
}

/// Shortest single-arc path from `a` to `b` that passes through no saving-group state unless
/// it starts and ends in the saving group.
pub(crate) fn shortest_path(a: MigState, b: MigState, flags: u64) -> Option<Vec<MigState>> {
    let states: Vec<MigState> = MigState::ALL
        .into_iter()
        .filter(|&s| s != MigState::Error && has(flags, s))
        .collect();
    let mut prev: HashMap<MigState, MigState> = HashMap::new();
    let mut queue = VecDeque::from([a]);
    while let Some(cur) = queue.pop_front() {
        if cur == b {
            let mut path = vec![b];
            let mut at = b;
            while let Some(&p) = prev.get(&at) {
                if p == a {
                    break;
                }
                path.push(p);
                at = p;
            }
            path.reverse();
            return Some(path);
        }
        if cur != a && cur.is_saving() && !(a.is_saving() && b.is_saving()) {
            continue; // never pass through the saving group from outside it
        }
        for &next in &states {
            if next != a && !prev.contains_key(&next) && is_single_arc(cur, next, flags) {
                prev.insert(next, cur);
                queue.push_back(next);
            }
        }
    }
    None
}

fn opens(a: MigState, b: MigState) -> bool {
    use MigState::*;
    matches!(
        (a, b),
        (Running, PreCopy) | (RunningP2p, PreCopyP2p) | (Stop, StopCopy) | (Stop, Resuming)
    )
}

pub(crate) fn get_api_version(container: BorrowedFd<'_>) -> io::Result<i32> {
    let key = key_of(container)?;
    with_objects(|m| match m.get(&key) {
        Some(Obj::Container { .. }) => Ok(0),
        _ => Err(enotty()),
    })
}

pub(crate) fn check_extension(container: BorrowedFd<'_>, ext: u32) -> io::Result<i32> {
    let key = key_of(container)?;
    with_objects(|m| match m.get(&key) {
        Some(Obj::Container { .. }) => Ok(i32::from(ext == VFIO_TYPE1v2_IOMMU)),
        _ => Err(enotty()),
    })
}

pub(crate) fn set_iommu(container: BorrowedFd<'_>, ty: u32) -> io::Result<()> {
    let key = key_of(container)?;
    with_objects(|m| {
        let has_group = m
            .values()
            .any(|o| matches!(o, Obj::Group { container: Some(c), .. } if *c == key));
        match m.get_mut(&key) {
            Some(Obj::Container { iommu }) => {
                if !has_group || iommu.is_some() {
                    return Err(einval());
                }
                *iommu = Some(ty);
                Ok(())
            }
            _ => Err(enotty()),
        }
    })
}

pub(crate) fn group_get_status(group: BorrowedFd<'_>) -> io::Result<u32> {
    let key = key_of(group)?;
    with_objects(|m| match m.get(&key) {
        Some(Obj::Group {
            viable, container, ..
        }) => Ok(if *viable { VFIO_GROUP_FLAGS_VIABLE } else { 0 }
            | if container.is_some() {
                VFIO_GROUP_FLAGS_CONTAINER_SET
            } else {
                0
            }),
        _ => Err(enotty()),
    })
}

pub(crate) fn group_set_container(
    group: BorrowedFd<'_>,
    container: BorrowedFd<'_>,
) -> io::Result<()> {
    let g = key_of(group)?;
    let c = key_of(container)?;
    with_objects(|m| {
        if !matches!(m.get(&c), Some(Obj::Container { .. })) {
            return Err(einval());
        }
        match m.get_mut(&g) {
            Some(Obj::Group {
                container, viable, ..
            }) => {
                if container.is_some() {
                    return Err(io::Error::from_raw_os_error(libc::EBUSY));
                }
                if !*viable {
                    return Err(io::Error::from_raw_os_error(libc::EPERM));
                }
                *container = Some(c);
                Ok(())
            }
            _ => Err(enotty()),
        }
    })
}

pub(crate) fn group_get_device_fd(group: BorrowedFd<'_>, name: &CStr) -> io::Result<OwnedFd> {
    let g = key_of(group)?;
    let name = name.to_string_lossy();
    let dev = with_objects(|m| match m.get(&g) {
        Some(Obj::Group {
            container, devices, ..
        }) => {
            let Some(c) = container else {
                return Err(einval());
            };
            if !matches!(m.get(c), Some(Obj::Container { iommu: Some(_) })) {
                return Err(einval());
            }
            devices
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, k)| *k)
                .ok_or_else(|| io::Error::from_raw_os_error(libc::ENODEV))
        }
        _ => Err(enotty()),
    })?;
    stand_in(dev)
}

pub(crate) fn region_info(dev: BorrowedFd<'_>, index: u32) -> io::Result<vfio_region_info> {
    let key = key_of(dev)?;
    let (offset, size) = with_device(key, |d| d.region).ok_or_else(enotty)?;
    Ok(vfio_region_info {
        argsz: argsz::<vfio_region_info>(),
        index,
        offset: offset + (u64::from(index) << 40),
        size,
        ..Default::default()
    })
}

pub(crate) fn device_reset(dev: BorrowedFd<'_>) -> io::Result<()> {
    let key = key_of(dev)?;
    with_device(key, |d| {
        d.resets += 1;
        d.state = MigState::Running;
        d.session = None;
    })
    .ok_or_else(enotty)
}

pub(crate) fn bind_iommufd(dev: BorrowedFd<'_>, iommufd: BorrowedFd<'_>) -> io::Result<u32> {
    let key = key_of(dev)?;
    let i = key_of(iommufd)?;
    with_objects(|m| match (m.get(&key), m.get(&i)) {
        (Some(Obj::Device(_)), Some(Obj::Iommufd { .. })) => Ok(u32::try_from(key).unwrap_or(0)),
        _ => Err(einval()),
    })
}

pub(crate) fn ioas_alloc(iommufd: BorrowedFd<'_>) -> io::Result<u32> {
    let key = key_of(iommufd)?;
    with_objects(|m| match m.get_mut(&key) {
        Some(Obj::Iommufd { next_ioas }) => {
            *next_ioas += 1;
            Ok(*next_ioas - 1)
        }
        _ => Err(enotty()),
    })
}

pub(crate) fn attach_iommufd_pt(dev: BorrowedFd<'_>, pt_id: u32) -> io::Result<u32> {
    let key = key_of(dev)?;
    with_device(key, |_| pt_id).ok_or_else(enotty)
}

fn device<R>(fd: BorrowedFd<'_>, f: impl FnOnce(&mut FakeDev) -> io::Result<R>) -> io::Result<R> {
    let key = key_of(fd)?;
    with_device(key, f).unwrap_or_else(|| Err(enotty()))
}

/// The twin of `real::check_device`: a fake device's stand-in (a memfd) passes; anything else
/// gets the real check, so tests see the real refusal.
pub(crate) fn check_device(dev: BorrowedFd<'_>) -> Result<(), crate::VfioError> {
    let fake = key_of(dev).ok().and_then(|key| with_device(key, |_| ()));
    match fake {
        Some(()) => Ok(()),
        None => crate::fd::check_device_fd(dev),
    }
}

pub(crate) fn mig_flags(dev: BorrowedFd<'_>) -> io::Result<u64> {
    device(dev, |d| {
        if d.flags == 0 {
            Err(enotty())
        } else {
            Ok(d.flags)
        }
    })
}

pub(crate) fn mig_get_state(dev: BorrowedFd<'_>) -> io::Result<u32> {
    device(dev, |d| {
        if d.flags == 0 {
            Err(enotty())
        } else {
            Ok(d.state.raw())
        }
    })
}

pub(crate) fn mig_set_state(dev: BorrowedFd<'_>, state: u32) -> io::Result<Option<OwnedFd>> {
    let key = key_of(dev)?;
    let new_session = device(dev, |d| {
        if d.flags == 0 {
            return Err(enotty());
        }
        d.sets += 1;
        let Some(target) = MigState::from_raw(state) else {
            return Err(einval());
        };
        if d.state == MigState::Error || target == MigState::Error || !has(d.flags, target) {
            return Err(einval());
        }
        let path = shortest_path(d.state, target, d.flags).ok_or_else(einval)?;
        let mut opened = false;
        for next in path {
            let from = d.state;
            if let Some(f) = d.fail.filter(|f| f.on == next) {
                d.fail = None;
                if let Some(s) = f.ends_in {
                    d.state = s;
                }
                if !d.state.is_saving() && d.state != MigState::Resuming {
                    d.session = None;
                }
                return Err(io::Error::from_raw_os_error(f.errno));
            }
            if (from.is_saving() && !next.is_saving()) || from == MigState::Resuming {
                d.session = None;
            }
            d.arcs.push((from, next));
            d.state = next;
            if opens(from, next) {
                if opened {
                    // A fd mid-path is a driver bug the kernel WARNs about.
                    return Err(einval());
                }
                opened = true;
            }
        }
        Ok((opened && !d.bug_no_fd) || (!opened && d.bug_extra_fd))
    })?;
    if !new_session {
        return Ok(None);
    }
    let data = insert(Obj::DataFd { device: key });
    with_device(key, |d| d.session = Some(data));
    Ok(Some(stand_in(data)?))
}

pub(crate) fn mig_data_size(dev: BorrowedFd<'_>) -> io::Result<u64> {
    device(dev, |d| {
        if d.flags == 0 {
            Err(enotty())
        } else {
            Ok(d.data_size)
        }
    })
}

pub(crate) fn feature_probe(dev: BorrowedFd<'_>, feature_id: u32, _ops: u32) -> io::Result<()> {
    device(dev, |d| match feature_id {
        VFIO_DEVICE_FEATURE_MIG_PRECOPY_INFO_V2 if d.v2_supported => Ok(()),
        VFIO_DEVICE_FEATURE_MIGRATION | VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE if d.flags != 0 => {
            Ok(())
        }
        _ => Err(einval()),
    })
}

pub(crate) fn feature_set_empty(dev: BorrowedFd<'_>, feature_id: u32) -> io::Result<()> {
    device(dev, |d| match feature_id {
        VFIO_DEVICE_FEATURE_MIG_PRECOPY_INFO_V2 if d.v2_supported => {
            d.v2_on = true;
            Ok(())
        }
        _ => Err(einval()),
    })
}

pub(crate) fn precopy_info(data_fd: BorrowedFd<'_>, flags: u32) -> io::Result<vfio_precopy_info> {
    let key = key_of(data_fd)?;
    let dev = with_objects(|m| match m.get(&key) {
        Some(Obj::DataFd { device }) => Ok(*device),
        _ => Err(enotty()),
    })?;
    with_device(dev, |d| {
        if d.session != Some(key) {
            return Err(io::Error::from_raw_os_error(libc::ENODEV));
        }
        if !d.state.is_precopy() {
            return Err(einval());
        }
        let flags_out = if d.v2_on {
            if d.reinit {
                VFIO_PRECOPY_INFO_REINIT
            } else {
                0
            }
        } else {
            flags // v1 drivers echo what they were given
        };
        Ok(vfio_precopy_info {
            argsz: argsz::<vfio_precopy_info>(),
            flags: flags_out,
            initial_bytes: d.precopy.0,
            dirty_bytes: d.precopy.1,
        })
    })
    .unwrap_or_else(|| Err(enotty()))
}
