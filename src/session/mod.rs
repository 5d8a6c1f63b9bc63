//! Sessions: a migration as devices, packets and channels (never syscalls).

pub mod reassembly;
