//! `vfio-multifd`: moves VFIO device state during live migration over QEMU 10.x multifd
//! channels. The library is the whole service; `main.rs` only parses arguments and reports.
#![forbid(unsafe_code)]

pub mod cli;
pub mod config;
pub mod control;
pub mod demo;
pub mod engine;
pub mod error;
pub mod inspect;
pub mod metrics;
pub mod probe;
pub mod session;
pub mod wire;
