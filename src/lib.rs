//! `vfio-multifd`: moves VFIO device state during live migration over QEMU 10.x multifd
//! channels. The library is the whole service; `main.rs` only parses arguments and reports.
#![forbid(unsafe_code)]

pub mod cli;
pub mod engine;
pub mod inspect;
pub mod session;
pub mod wire;
