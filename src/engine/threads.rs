//! The seed's thread-per-channel design (QEMU 10.0). Under construction.
use super::*;

pub struct ThreadsEngine {
    #[allow(dead_code)]
    config: EngineConfig,
}

impl ThreadsEngine {
    pub fn new(config: EngineConfig) -> Self {
        Self { config }
    }
}

impl Engine for ThreadsEngine {
    fn kind(&self) -> EngineKind {
        EngineKind::Threads
    }
    fn run_source(&self, _plan: SourcePlan) -> Result<SourceReport, DataPlaneError> {
        Err(DataPlaneError::Stalled { detail: "threads engine not built yet".into() })
    }
    fn run_dest(&self, _plan: DestPlan) -> Result<DestReport, DataPlaneError> {
        Err(DataPlaneError::Stalled { detail: "threads engine not built yet".into() })
    }
}
