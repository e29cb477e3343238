//! Turning an upload into a dataset: the `ingesting` row, the ingest itself
//! on a blocking thread with its progress written to the row every second,
//! publishing the stored dataset to the shared store, and the row's end:
//! `ready` with the ingest's report, or removed with its files when the
//! ingest fails or the request is dropped midway.

use serde_json::json;
use uuid::Uuid;

use crate::api::error::ApiError;
use crate::api::upload::RemoveOnDrop;
use crate::api::AppState;
use crate::artifacts::Artifacts;
use crate::data::{self, IngestOptions, Progress};
use crate::store::datasets::{self as store, DatasetRow, Ingested};
use crate::store::Pool;

/// Records the new dataset as `ingesting`, ingests the upload into its
/// directory and marks the dataset `ready` with the report. On failure, or
/// when the request is dropped midway, the row and the files are removed.
pub(super) async fn run(
    state: &AppState,
    id: Uuid,
    name: &str,
    archive_bytes: u64,
    upload: RemoveOnDrop,
    options: IngestOptions,
) -> Result<DatasetRow, ApiError> {
    let key = Artifacts::dataset_key(id);
    // Armed before the insert: a request dropped while the insert is in
    // flight may still have committed it.
    let row_guard = DiscardOnDrop {
        pool: Some(state.pool.clone()),
        id,
    };
    let stored_size = options.stored_size as i32;
    store::insert_ingesting(
        &state.pool,
        id,
        name,
        archive_bytes as i64,
        stored_size,
        &key,
    )
    .await?;
    let dataset_dir = RemoveOnDrop(state.artifacts.path(&key));
    match ingest_and_publish(state, id, upload, dataset_dir, options).await {
        Ok((report, dataset_dir)) => {
            let row = store::finish_ingest(&state.pool, id, ingested(&report)).await?;
            let Some(row) = row else {
                return Err(ApiError::Conflict(format!(
                    "dataset {id} was deleted while it was ingesting"
                )));
            };
            row_guard.disarm();
            dataset_dir.keep();
            tracing::info!(dataset_id = %id, classes = row.classes.len(), images = row.num_train + row.num_val + row.num_test, "dataset stored");
            Ok(row)
        }
        Err(err) => {
            store::discard_ingesting(&state.pool, id).await?;
            row_guard.disarm();
            Err(err)
        }
    }
}

/// Runs the ingest on a blocking thread, recording its progress on the row
/// every second, and publishes the result to the shared store.
async fn ingest_and_publish(
    state: &AppState,
    id: Uuid,
    upload: RemoveOnDrop,
    dataset_dir: RemoveOnDrop,
    options: IngestOptions,
) -> Result<(data::IngestReport, RemoveOnDrop), ApiError> {
    let latest = std::sync::Arc::new(std::sync::Mutex::new(Progress {
        stage: "reading",
        done: 0,
        total: 0,
    }));
    let sink = latest.clone();
    // The ingest owns the cleanup guards: when the request is dropped (client
    // gone, deadline passed) they are dropped after the ingest stops writing.
    let mut task = tokio::task::spawn_blocking(move || {
        let report_progress = |p: Progress| *sink.lock().expect("progress lock") = p;
        let report = data::ingest_archive(&upload.0, &dataset_dir.0, &options, &report_progress);
        drop(upload);
        (report, dataset_dir)
    });
    let mut beat = tokio::time::interval(std::time::Duration::from_secs(1));
    beat.tick().await;
    let (report, dataset_dir) = loop {
        tokio::select! {
            done = &mut task => break done?,
            _ = beat.tick() => {
                let now = *latest.lock().expect("progress lock");
                if let Err(err) = store::set_progress(&state.pool, id, json!(now)).await {
                    tracing::warn!(dataset_id = %id, error = %err, "recording ingest progress failed");
                }
            }
        }
    };
    let report = report?;
    state
        .artifacts
        .publish_dir(&Artifacts::dataset_key(id))
        .await?;
    Ok((report, dataset_dir))
}

/// What the row records of a finished ingest.
fn ingested(report: &data::IngestReport) -> Ingested<'_> {
    let counts = |per_class: &[i64]| -> serde_json::Map<String, serde_json::Value> {
        report
            .classes
            .iter()
            .cloned()
            .zip(per_class.iter().map(|&n| json!(n)))
            .collect()
    };
    let total = |per_class: &[i64]| per_class.iter().sum::<i64>() as i32;
    Ingested {
        classes: &report.classes,
        counts: json!({
            "train": counts(&report.train_counts),
            "val": counts(&report.val_counts),
            "test": counts(&report.test_counts),
        }),
        num_train: total(&report.train_counts),
        num_val: total(&report.val_counts),
        num_test: total(&report.test_counts),
        report: report_json(report),
    }
}

/// Entries of each report list kept (in the answer and the row); a few
/// kilobytes of archive may name millions of skipped files.
const REPORT_ENTRIES: usize = 1000;

/// The report, each list cut to [`REPORT_ENTRIES`] with the rest counted
/// (`skipped_omitted`, …).
fn report_json(report: &data::IngestReport) -> serde_json::Value {
    let mut out = serde_json::Map::new();
    let mut list = |name: &str, items: Vec<serde_json::Value>| {
        let omitted = items.len().saturating_sub(REPORT_ENTRIES);
        out.insert(
            name.to_string(),
            items.into_iter().take(REPORT_ENTRIES).collect(),
        );
        if omitted > 0 {
            out.insert(format!("{name}_omitted"), omitted.into());
        }
    };
    let values = |items: &[Vec<String>]| items.iter().map(|group| json!(group)).collect();
    list("skipped", report.skipped.iter().map(|s| json!(s)).collect());
    list("duplicates", values(&report.duplicates));
    list("leakage", values(&report.leakage));
    serde_json::Value::Object(out)
}

/// Removes the `ingesting` row of a request that was dropped mid-ingest.
struct DiscardOnDrop {
    /// `None` once disarmed.
    pool: Option<Pool>,
    id: Uuid,
}

impl DiscardOnDrop {
    fn disarm(mut self) {
        self.pool = None;
    }
}

impl Drop for DiscardOnDrop {
    fn drop(&mut self) {
        let (Some(pool), id) = (self.pool.take(), self.id) else {
            return;
        };
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                if let Err(err) = store::discard_ingesting(&pool, id).await {
                    tracing::warn!(dataset_id = %id, error = %err, "removing an abandoned ingest failed");
                }
            });
        }
    }
}
