//! The lab's devices, through our vfio layer: two mdevs opened by the helper via the
//! legacy group path (`vfio::device::VfioDevice::open_legacy`, one container), their BARs
//! through the device fd, and their data_fds read by the crate's PRE_COPY/STOP_COPY rules
//! (`vfio::planner::classify_read`).

use std::fs::File;
use std::io::Read;
use std::os::fd::OwnedFd;

use vfio::device::{VfioContainer, VfioDevice};
use vfio::planner::{classify_read, ReadOutcome};
pub use vfio::{MigState, MigrationDevice, MigrationFlags};

use crate::error::{ensure, Context, LabError, Result};

/// Opens both mdevs (by UUID) through one container; the helper owns them. `VfioDevice`
/// refuses a device fd that fails `vfio::fd::check_device_fd` before its first device ioctl,
/// so every lab test also proves that real mtty fds pass that check.
pub fn open_pair(a: &str, b: &str) -> Result<(VfioDevice, VfioDevice)> {
    let container = VfioContainer::open()?;
    let a = VfioDevice::open_legacy(&container, a)?;
    let b = VfioDevice::open_legacy(&container, b)?;
    Ok((a, b))
}

/// One device region (a BAR), read and written through the device fd.
pub struct Region<'a> {
    dev: &'a VfioDevice,
    index: u32,
    offset: u64,
    size: u64,
}

impl<'a> Region<'a> {
    /// Region `index` of `dev` (VFIO_DEVICE_GET_REGION_INFO).
    pub fn new(dev: &'a VfioDevice, index: u32) -> Result<Self> {
        let (offset, size) = dev.region(index)?;
        Ok(Region {
            dev,
            index,
            offset,
            size,
        })
    }

    pub fn read8(&self, reg: u64) -> Result<u8> {
        self.check(reg)?;
        let mut b = [0u8; 1];
        let n = self.dev.read_at(&mut b, self.offset + reg)?;
        ensure(n == 1, || {
            format!(
                "short read at region {} +{reg} of {}",
                self.index,
                self.dev.name()
            )
        })?;
        Ok(b[0])
    }

    pub fn write8(&self, reg: u64, v: u8) -> Result<()> {
        self.check(reg)?;
        Ok(self.dev.write_at(&[v], self.offset + reg)?)
    }

    fn check(&self, reg: u64) -> Result<()> {
        ensure(reg < self.size, || {
            format!(
                "register {reg} outside region {} ({} bytes)",
                self.index, self.size
            )
        })
    }
}

/// A data_fd from `set_state`, as a file for plain read()/write().
pub fn data_file(fd: Option<OwnedFd>, dev: &VfioDevice, arc: &str) -> Result<File> {
    fd.map(File::from)
        .ok_or_else(|| LabError::check(format!("{}: {arc} returned no data_fd", dev.name())))
}

/// How a read loop ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// PRE_COPY drained for now: "read()=0" or "ENOMSG" (mtty returns 0).
    Drained(&'static str),
    /// STOP_COPY end of stream (read 0).
    Eof,
}

/// Reads the saving data_fd of `dev`, which is in `state`, until the crate's rules say
/// stop: PRE_COPY stops when drained (0 or ENOMSG), STOP_COPY at EOF. Appends to `out`.
pub fn read_saving(
    dev: &VfioDevice,
    state: MigState,
    fd: &mut File,
    out: &mut Vec<u8>,
) -> Result<(usize, End)> {
    let start = out.len();
    let mut buf = [0u8; 4096];
    loop {
        let res = fd
            .read(&mut buf)
            .map_err(|e| e.raw_os_error().unwrap_or(libc::EIO));
        let how = if res == Ok(0) { "read()=0" } else { "ENOMSG" };
        match classify_read(state, res) {
            ReadOutcome::Data(n) => out.extend_from_slice(&buf[..n]),
            ReadOutcome::Drained => return Ok((out.len() - start, End::Drained(how))),
            ReadOutcome::Eof => return Ok((out.len() - start, End::Eof)),
            ReadOutcome::Retry => {}
            ReadOutcome::Error(errno) => {
                return Err(std::io::Error::from_raw_os_error(errno)).context(|| {
                    format!(
                        "reading the {state} data_fd of {} after {} bytes",
                        dev.name(),
                        out.len() - start
                    )
                })
            }
        }
    }
}
