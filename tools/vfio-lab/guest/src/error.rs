//! One error type for the lab: errors of our vfio layer as they are, or a failed lab step
//! with its cause as `source`.

use std::error::Error;

use vfio::VfioError;

/// A failed lab step. Messages name the step; causes ride in `source`.
#[derive(Debug, thiserror::Error)]
pub enum LabError {
    /// Our vfio layer's own error (it names the device and the step).
    #[error(transparent)]
    Vfio(#[from] VfioError),
    /// A lab step or check.
    #[error("{step}")]
    Step {
        /// What the lab was doing or checking.
        step: String,
        /// The cause, if any.
        #[source]
        source: Option<Box<dyn Error + Send + Sync + 'static>>,
    },
}

pub type Result<T> = std::result::Result<T, LabError>;

impl LabError {
    /// A failed check with no underlying error.
    pub fn check(step: impl Into<String>) -> Self {
        LabError::Step {
            step: step.into(),
            source: None,
        }
    }

    /// The error followed by every cause: "a: b: c".
    pub fn chain(e: &(dyn Error + 'static)) -> String {
        let mut s = e.to_string();
        let mut cur = e.source();
        while let Some(c) = cur {
            s.push_str(": ");
            s.push_str(&c.to_string());
            cur = c.source();
        }
        s
    }
}

/// Names the step on any error.
pub trait Context<T> {
    fn context(self, step: impl FnOnce() -> String) -> Result<T>;
}

impl<T, E: Error + Send + Sync + 'static> Context<T> for std::result::Result<T, E> {
    fn context(self, step: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| LabError::Step {
            step: step(),
            source: Some(Box::new(e)),
        })
    }
}

/// Fails with `step` unless `cond` holds.
pub fn ensure(cond: bool, step: impl FnOnce() -> String) -> Result<()> {
    if cond {
        Ok(())
    } else {
        Err(LabError::check(step()))
    }
}
