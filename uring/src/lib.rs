//! Per-core io_uring engine for `vfio-multifd`.
#![deny(missing_docs)]

mod probe;

pub use probe::{Feature, FeatureMask};
