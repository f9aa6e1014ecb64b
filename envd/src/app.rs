//! The state shared by all request handlers.

use std::sync::Arc;

use crate::metrics::CpuSampler;
use crate::process::Registry;
use crate::settings::SharedSettings;

/// Everything handlers share: settings, the process table, the CPU sampler.
#[derive(Default)]
pub struct App {
    pub settings: SharedSettings,
    pub processes: Arc<Registry>,
    pub cpu: CpuSampler,
}
