//! `GET /jobs/{id}/events`: a Server-Sent Events stream of a job's life.
//!
//! Events, in order: `status` (on every change, with attempt and error),
//! `progress` (within an epoch, at most every poll), `epoch` (the metrics of
//! each finished epoch, once). The stream ends after the job's final
//! `status`. It follows Postgres, so it works whichever process trains.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::response::sse::{Event, KeepAlive, Sse};
use futures_util::stream::{self, Stream};
use serde_json::{json, Value};
use sqlx::PgPool;
use uuid::Uuid;

use super::jobs::find;
use super::AppState;
use crate::error::ApiError;
use crate::store::{jobs, metrics};

/// How often the stream looks at the job.
const POLL: Duration = Duration::from_millis(250);

pub async fn events(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let job = find(&state, &id).await?;
    let watcher = Watcher {
        pool: state.pool.clone(),
        job_id: job.id,
        status: None,
        attempts: 0,
        epoch: 0,
        progress: None,
        pending: VecDeque::new(),
        finished: false,
        first: true,
    };
    let stream = stream::unfold(watcher, |mut w| async move {
        loop {
            if let Some(event) = w.pending.pop_front() {
                return Some((Ok(event), w));
            }
            if w.finished {
                return None;
            }
            if !w.first {
                tokio::time::sleep(POLL).await;
            }
            w.first = false;
            if let Err(err) = w.poll().await {
                tracing::warn!(error = %err, "job events: polling failed");
                w.pending
                    .push_back(Event::default().event("error").data(err.to_string()));
                w.finished = true;
            }
        }
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}

struct Watcher {
    pool: PgPool,
    job_id: Uuid,
    status: Option<String>,
    attempts: i32,
    /// Last epoch whose metrics were sent.
    epoch: i32,
    progress: Option<Value>,
    pending: VecDeque<Event>,
    finished: bool,
    first: bool,
}

impl Watcher {
    async fn poll(&mut self) -> Result<(), sqlx::Error> {
        let Some(job) = jobs::get(&self.pool, self.job_id).await? else {
            self.finished = true;
            return Ok(());
        };
        let status_changed =
            self.status.as_deref() != Some(job.status.as_str()) || self.attempts != job.attempts;
        let terminal = jobs::TERMINAL.contains(&job.status.as_str());
        if status_changed && !terminal {
            self.push_status(&job);
        }
        for m in metrics::for_job(&self.pool, self.job_id, self.epoch).await? {
            self.epoch = m.epoch;
            self.push(
                "epoch",
                &serde_json::to_value(&m).expect("metrics serialize"),
            );
        }
        let progress = job.progress.as_ref().map(|p| p.0.clone());
        if let Some(p) = progress
            .as_ref()
            .filter(|p| self.progress.as_ref() != Some(*p))
        {
            self.push("progress", p);
        }
        self.progress = progress;
        if terminal {
            self.push_status(&job);
            self.finished = true;
        }
        Ok(())
    }

    fn push_status(&mut self, job: &jobs::JobRow) {
        self.status = Some(job.status.clone());
        self.attempts = job.attempts;
        let data = json!({
            "status": job.status, "attempt": job.attempts, "epoch": job.epoch,
            "best_epoch": job.best_epoch, "error": job.error, "model_id": job.model_id,
        });
        self.push("status", &data);
    }

    fn push(&mut self, kind: &str, data: &Value) {
        self.pending
            .push_back(Event::default().event(kind).data(data.to_string()));
    }
}
