//! Adapter over the `uring` crate. Under construction.
use super::*;

pub struct UringEngine {
    #[allow(dead_code)]
    config: EngineConfig,
}

impl UringEngine {
    pub fn new(config: EngineConfig) -> io::Result<Self> {
        Err(io::Error::new(io::ErrorKind::Unsupported, format!("uring engine not built yet ({:?})", config.workers)))
    }
}

impl Engine for UringEngine {
    fn kind(&self) -> EngineKind {
        EngineKind::Uring
    }
    fn run_source(&self, _plan: SourcePlan) -> Result<SourceReport, DataPlaneError> {
        unreachable!("never constructed yet")
    }
    fn run_dest(&self, _plan: DestPlan) -> Result<DestReport, DataPlaneError> {
        unreachable!("never constructed yet")
    }
}
