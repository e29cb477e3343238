//! The uploaded backbone a job or model names: its row in the store, and the
//! [`ScriptSpec`] that training and serving load from it.

use crate::artifacts::Artifacts;
use crate::models::{self, script::ScriptSpec};
use crate::store::{self, backbones::ScriptBackboneRow, Pool};

/// The uploaded backbone called `name`; `None` for catalogue names (which
/// uploads cannot take) and unknown ones.
pub async fn uploaded(pool: &Pool, name: &str) -> store::Result<Option<ScriptBackboneRow>> {
    if models::find(name).is_some() {
        return Ok(None);
    }
    store::backbones::get(pool, name).await
}

/// What training and serving need of an uploaded backbone, its module at its
/// local path under `artifacts`.
pub fn script_spec(row: &ScriptBackboneRow, artifacts: &Artifacts) -> ScriptSpec {
    ScriptSpec {
        name: row.name.clone(),
        module_path: artifacts.path(&row.artifact_key),
        image_size: row.image_size.into(),
        normalization: row.normalization.0,
        feature_dim: row.feature_dim.into(),
        stages: row.stages.0.clone(),
        removed_layer: row.removed_layer.clone(),
    }
}
