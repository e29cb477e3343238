//! `GET /datasets/{id}/samples`: a few stored images of a ready dataset,
//! with their source paths and PNG thumbnails, for a UI to show what the
//! dataset holds.

use std::path::Path as FsPath;

use axum::extract::{Path, State};
use axum::Json;
use serde::Deserialize;
use serde_json::json;

use crate::api::error::{ApiError, FieldError};
use crate::api::extract::ApiQuery;
use crate::api::{parse_id, AppState};
use crate::data::stored;
use crate::store::datasets as store;
use crate::store::DatasetStatus;

/// Query of `GET /datasets/{id}/samples`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SampleParams {
    class: Option<String>,
    split: Option<String>,
    limit: Option<String>,
}

/// Side of the thumbnails `samples` returns.
const THUMBNAIL_SIDE: u32 = 96;

/// A few stored images with their source paths and thumbnails, taken from
/// each class in turn (or from one class), for a UI to show what a dataset
/// holds.
pub async fn samples(
    State(state): State<AppState>,
    Path(id): Path<String>,
    ApiQuery(params): ApiQuery<SampleParams>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let id = parse_id(&id, "dataset")?;
    let dataset = store::get(&state.pool, id)
        .await?
        .filter(|d| d.status != DatasetStatus::Deleted)
        .ok_or_else(|| ApiError::NotFound(format!("no dataset with id {id}")))?;
    if dataset.status != DatasetStatus::Ready {
        return Err(ApiError::Conflict(format!(
            "dataset {id} is {}; samples exist once it is ready",
            dataset.status
        )));
    }
    let mut errors = Vec::new();
    let limit = match params.limit.as_deref().map(str::parse::<usize>) {
        None => 12,
        Some(Ok(n)) if (1..=100).contains(&n) => n,
        Some(_) => {
            errors.push(FieldError::new("limit", "must be an integer in [1, 100]"));
            0
        }
    };
    let splits: Vec<&str> = match params.split.as_deref() {
        None => vec!["train", "val", "test"],
        Some(split @ ("train" | "val" | "test")) => vec![split],
        Some(_) => {
            errors.push(FieldError::new("split", "must be train, val or test"));
            vec![]
        }
    };
    let classes = &dataset.classes.0;
    let wanted_class = match &params.class {
        None => None,
        Some(class) => match classes.iter().position(|c| c == class) {
            Some(label) => Some(label),
            None => {
                errors.push(FieldError::new(
                    "class",
                    format!("no class {class:?}; the classes are {}", classes.join(", ")),
                ));
                None
            }
        },
    };
    if !errors.is_empty() {
        return Err(ApiError::invalid("invalid sample query", errors));
    }
    // A client is waiting: an unreachable store is a 503 now, not minutes of retries.
    let dir = state
        .artifacts
        .impatient()
        .fetch(&dataset.artifact_key)
        .await?;
    let classes = classes.clone();
    let splits: Vec<String> = splits.into_iter().map(str::to_string).collect();
    let items = tokio::task::spawn_blocking(move || {
        pick_samples(&dir, &classes, &splits, wanted_class, limit)
    })
    .await?
    .map_err(|err| match err.kind() {
        std::io::ErrorKind::NotFound => ApiError::Conflict(format!(
            "dataset {id} was stored without a sample index; upload it again to browse it"
        )),
        _ => ApiError::Internal(err.into()),
    })?;
    Ok(Json(json!({ "dataset_id": id, "items": items })))
}

/// Takes up to `limit` images, one from each class in turn, with their
/// thumbnails as PNG data URLs.
fn pick_samples(
    dir: &FsPath,
    classes: &[String],
    splits: &[String],
    wanted_class: Option<usize>,
    limit: usize,
) -> std::io::Result<Vec<serde_json::Value>> {
    use base64::Engine;
    let index = stored::Index::read(dir)?;
    let mut per_class: Vec<std::collections::VecDeque<(&str, usize, &stored::IndexEntry)>> =
        vec![Default::default(); classes.len()];
    for split in splits {
        let entries = index.split(split).unwrap_or_default();
        for (slot, entry) in entries.iter().enumerate() {
            if wanted_class.is_none_or(|label| label == entry.label) {
                per_class[entry.label].push_back((split.as_str(), slot, entry));
            }
        }
    }
    let mut items = Vec::new();
    while items.len() < limit && per_class.iter().any(|queue| !queue.is_empty()) {
        for queue in per_class.iter_mut() {
            let Some((split, slot, entry)) = queue.pop_front() else {
                continue;
            };
            if items.len() == limit {
                break;
            }
            let file = match split {
                "train" => stored::TRAIN_FILE,
                "val" => stored::VAL_FILE,
                _ => stored::TEST_FILE,
            };
            let pixels = stored::read_image(&dir.join(file), slot)?;
            let png = stored::thumbnail_png(&pixels, THUMBNAIL_SIDE);
            items.push(json!({
                "split": split,
                "index": slot,
                "class": classes[entry.label],
                "path": entry.path,
                "thumbnail": format!(
                    "data:image/png;base64,{}",
                    base64::engine::general_purpose::STANDARD.encode(png)
                ),
            }));
        }
    }
    Ok(items)
}
