//! The one description of a model that every front-end renders: the socket
//! API's `/v1/models`, MQTT's retained status, `inferd models` and the
//! /metrics gauges. Built from the registry, the memory manager's and the
//! engine's plans, and the model's state; front-ends choose what to show.

use crate::backend::BackendKind;
use crate::backend::providers::ProviderSpec;
use crate::engine::Engine;
use crate::error::InferError;
use crate::manager::{Manager, VariantNeed};
use crate::registry::ModelSpec;
use crate::worker::ModelState;
use serde::Serialize;

/// A model: its spec, the variant and engine it would load (or runs), and where it stands.
#[derive(Debug, Clone, Serialize)]
pub struct ModelReport {
    pub name: String,
    pub task: &'static str,
    pub description: String,
    pub variants: Vec<VariantReport>,
    /// Jobs waiting for the model.
    pub queue_depth: usize,
    /// What each variant needs in memory, and where the figure comes from.
    pub needs: Vec<VariantNeed>,
    /// The variant it runs, or would load with the memory free now.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub variant_reason: Option<String>,
    /// Why no variant fits now.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub variant_error: Option<InferError>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backend: Option<BackendKind>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backend_reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub providers: Option<Vec<ProviderSpec>>,
    /// Why no engine can run it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub plan_error: Option<InferError>,
    /// Why its last load failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<InferError>,
    /// What a loaded model runs on.
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub running: Option<Running>,
    /// `unloaded`, `loading`, `loaded` or `failed`.
    pub state: &'static str,
    pub loaded: bool,
}

/// One variant as models.json declares it.
#[derive(Debug, Clone, Serialize)]
pub struct VariantReport {
    pub name: String,
    pub quality: u32,
    pub parameters: Option<u64>,
    pub memory_mb: Option<u64>,
}

/// A loaded model's sessions.
#[derive(Debug, Clone, Serialize)]
pub struct Running {
    /// Sessions serving jobs side by side.
    pub instances: usize,
    pub provider: String,
    /// What its load added to the process.
    pub memory_bytes: Option<u64>,
    /// What it counts against `memory.budget_mb`: at least its need, and what it held after its first job.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub charged_bytes: Option<u64>,
    /// Room kept for its requests' work beyond the charge (a decoder's KV
    /// cache): no other load takes it.
    #[serde(skip_serializing_if = "is_zero")]
    pub working_bytes: u64,
    /// Providers registered and graph nodes per provider (ONNX Runtime).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub placement: Option<crate::backend::Placement>,
}

impl ModelReport {
    /// The report of `spec` in `state` with `queue_depth` jobs waiting.
    pub(crate) fn of(
        engine: &Engine,
        manager: &Manager,
        spec: &ModelSpec,
        state: &ModelState,
        queue_depth: usize,
    ) -> Self {
        let mut r = ModelReport {
            name: spec.name.clone(),
            task: spec.task.task(),
            description: spec.description.clone(),
            variants: spec
                .variants
                .iter()
                .map(|v| VariantReport {
                    name: v.name.clone(),
                    quality: v.quality,
                    parameters: v.parameters,
                    memory_mb: v.memory_mb,
                })
                .collect(),
            queue_depth,
            needs: manager.needs(spec),
            variant: None,
            variant_reason: None,
            variant_error: None,
            backend: None,
            backend_reason: None,
            providers: None,
            plan_error: None,
            error: None,
            running: None,
            state: "unloaded",
            loaded: false,
        };
        match manager.plan_load(spec, None) {
            Ok(plan) => (r.variant, r.variant_reason) = (Some(plan.variant), Some(plan.reason)),
            Err(e) => r.variant_error = Some(e),
        }
        match engine.plan(&spec.name, None) {
            Ok(plan) => {
                r.backend = Some(plan.backend.backend);
                r.backend_reason = Some(plan.backend.reason);
                r.providers = Some(plan.providers);
            }
            Err(e) => r.plan_error = Some(e),
        }
        match state {
            ModelState::Unloaded => {}
            ModelState::Loading => r.state = "loading",
            ModelState::Failed { error } => (r.state, r.error) = ("failed", Some(error.clone())),
            ModelState::Loaded { variant, reason, instances, backend, provider, memory_bytes, placement } => {
                r.variant = Some(variant.clone());
                r.variant_reason = Some(reason.clone());
                r.backend = Some(*backend);
                r.running = Some(Running {
                    instances: *instances,
                    provider: provider.clone(),
                    memory_bytes: *memory_bytes,
                    charged_bytes: manager.charges().into_iter().find(|(m, _)| *m == spec.name).map(|(_, b)| b),
                    working_bytes: manager.working(&spec.name),
                    placement: placement.clone(),
                });
                (r.state, r.loaded) = ("loaded", true);
            }
        }
        r
    }

    /// The provider a loaded model runs on.
    pub fn provider(&self) -> Option<&str> {
        self.running.as_ref().map(|r| r.provider.as_str())
    }

    /// Where a loaded model's graph nodes went.
    pub fn placement(&self) -> Option<&crate::backend::Placement> {
        self.running.as_ref().and_then(|r| r.placement.as_ref())
    }
}

/// A loaded model whose engine (TensorRT) is being built in the background.
#[derive(Debug, Clone, Serialize)]
pub struct BuildingEngine {
    pub model: String,
    /// The provider being built.
    pub building: String,
    /// The provider it serves on meanwhile.
    pub serving_on: String,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}
