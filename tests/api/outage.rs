//! A Postgres restart in the middle of training: the worker keeps its job,
//! retries its writes until the server is back, and finishes the same
//! attempt with every epoch recorded.

use std::time::Duration;

use finetuned::store::{self, EmbeddedPostgres};
use serde_json::json;

use crate::helpers::{ran_status, torch_rng, TestApp};

#[tokio::test]
async fn a_postgres_restart_mid_training_loses_nothing() {
    let _rng = torch_rng().await;
    // A cluster of its own, so stopping it leaves the other tests alone.
    let dir = std::env::temp_dir().join(format!(
        "ft-outage-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    ));
    let start = {
        let dir = dir.clone();
        move || EmbeddedPostgres::start(&dir, None).expect("Postgres starts")
    };
    let pg = tokio::task::spawn_blocking(start.clone()).await.unwrap();
    let pool = store::connect(&pg.url()).await.expect("connects");
    let app_pool = pool.clone();
    let app = TestApp::spawn_custom(crate::helpers::small_batching(), move |state| {
        state.auth = finetuned::auth::Auth::new(app_pool.clone());
        state.pool = app_pool;
    })
    .await;
    let worker = finetuned::train::Worker {
        pool: pool.clone(),
        ..app.worker.clone()
    };
    let dataset = app.shapes_dataset(8, 48).await;
    let epochs = 6;
    let job = app
        .submit_job(json!({
            "dataset_id": dataset, "epochs": epochs, "image_size": 64,
            "batch_size": 2, "freeze": "full",
        }))
        .await;

    let running = tokio::spawn(async move { worker.try_execute_one(None).await });
    // Stop Postgres once the first epoch is recorded; start it again later.
    let job_id = uuid::Uuid::parse_str(&job).unwrap();
    loop {
        let epoch: i32 = sqlx::query_scalar("SELECT epoch FROM jobs WHERE id = $1")
            .bind(job_id)
            .fetch_one(&pool)
            .await
            .unwrap();
        if epoch >= 1 {
            break;
        }
        assert!(!running.is_finished(), "the job ended before the restart");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::task::spawn_blocking(move || pg.stop())
        .await
        .unwrap()
        .unwrap();
    tokio::time::sleep(Duration::from_secs(4)).await;
    let pg = tokio::task::spawn_blocking(start).await.unwrap();

    let outcome = running
        .await
        .unwrap()
        .expect("the worker survives the outage");
    assert_eq!(ran_status(outcome), "succeeded");
    let (attempts, recorded): (i32, Vec<i32>) = (
        sqlx::query_scalar("SELECT attempts FROM jobs WHERE id = $1")
            .bind(job_id)
            .fetch_one(&pool)
            .await
            .unwrap(),
        sqlx::query_scalar("SELECT epoch FROM epoch_metrics WHERE job_id = $1 ORDER BY epoch")
            .bind(job_id)
            .fetch_all(&pool)
            .await
            .unwrap(),
    );
    assert_eq!(attempts, 1, "the same attempt finished");
    assert_eq!(recorded, (1..=epochs).collect::<Vec<_>>());
    pool.close().await;
    tokio::task::spawn_blocking(move || pg.stop())
        .await
        .unwrap()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}
