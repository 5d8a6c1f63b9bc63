//! The mtty sample's registers (a 16550-like UART per port; `samples/vfio-mdev/mtty.c`).
//! Port N is BAR N (8 bytes of I/O space). A byte written to TX lands in the port's
//! 16-byte loopback FIFO and is read back from RX; the scratch register holds one byte.
//! Both are part of the migrated state.

use vfio::device::VfioDevice;
use vfio::MigrationDevice;

use crate::dev::Region;
use crate::error::{ensure, Result};

const UART_TX_RX: u64 = 0;
const UART_LSR: u64 = 5;
const UART_SCR: u64 = 7;
const UART_LSR_DR: u8 = 0x01;
const FIFO_SIZE: usize = 16;

/// What the lab writes into a source device and expects back from the destination.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Regs {
    /// Scratch register of port 0 and port 1.
    pub scr: [u8; 2],
    /// Bytes waiting in the loopback FIFO of port 0 and port 1.
    pub fifo: [Vec<u8>; 2],
}

impl std::fmt::Display for Regs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "SCR {:#04x}/{:#04x} RX {:?}/{:?}",
            self.scr[0],
            self.scr[1],
            String::from_utf8_lossy(&self.fifo[0]),
            String::from_utf8_lossy(&self.fifo[1])
        )
    }
}

/// Number of ports (BARs 0 and 1) of an mtty-2 device.
pub const PORTS: u32 = 2;

/// Writes `regs` into the device: scratch registers, then the FIFO bytes through TX.
pub fn write(dev: &VfioDevice, regs: &Regs) -> Result<()> {
    for port in 0..PORTS {
        let bar = Region::new(dev, port)?;
        let i = port as usize;
        ensure(regs.fifo[i].len() <= FIFO_SIZE, || {
            "FIFO pattern too long".into()
        })?;
        bar.write8(UART_SCR, regs.scr[i])?;
        for &b in &regs.fifo[i] {
            bar.write8(UART_TX_RX, b)?;
        }
    }
    Ok(())
}

/// Reads the scratch registers and drains each FIFO through RX (destructive).
pub fn read(dev: &VfioDevice) -> Result<Regs> {
    let mut regs = Regs {
        scr: [0; 2],
        fifo: [Vec::new(), Vec::new()],
    };
    for port in 0..PORTS {
        let bar = Region::new(dev, port)?;
        let i = port as usize;
        regs.scr[i] = bar.read8(UART_SCR)?;
        while bar.read8(UART_LSR)? & UART_LSR_DR != 0 {
            ensure(regs.fifo[i].len() < FIFO_SIZE, || {
                format!("port {port} of {} never drains", dev.name())
            })?;
            regs.fifo[i].push(bar.read8(UART_TX_RX)?);
        }
    }
    Ok(regs)
}
