//! The queue at scale: a claim among 100,000 queued jobs reads an index,
//! not the table; concurrent claimers never take the same job; `GET /jobs`
//! pages through any number of jobs by a cursor.

use std::collections::HashSet;

use axum::http::StatusCode;
use finetuned::store::jobs;
use sqlx::PgPool;
use uuid::Uuid;

use crate::helpers::TestApp;

/// A ready dataset row for jobs inserted directly.
async fn dataset_row(pool: &PgPool) -> Uuid {
    let id = Uuid::new_v4();
    sqlx::query(
        "INSERT INTO datasets (id, name, status, classes, counts, num_train, num_val, bytes, artifact_key)
         VALUES ($1, 'direct', 'ready', '[\"a\", \"b\"]', '{}', 0, 0, 0, 'none')",
    )
    .bind(id)
    .execute(pool)
    .await
    .unwrap();
    id
}

/// Inserts `n` queued jobs with SQL: priorities 0..=2, one second apart
/// (the newest first), and returns nothing; `ANALYZE`s the table after.
async fn queue_jobs(pool: &PgPool, dataset: Uuid, n: i32) {
    sqlx::query(
        "INSERT INTO jobs (id, dataset_id, config, priority, created_at)
         SELECT gen_random_uuid(), $1, '{\"epochs\": 1}', i % 3, now() - make_interval(secs => i)
         FROM generate_series(1, $2) i",
    )
    .bind(dataset)
    .bind(n)
    .execute(pool)
    .await
    .unwrap();
    sqlx::query("ANALYZE jobs").execute(pool).await.unwrap();
}

#[tokio::test]
async fn a_claim_among_100k_queued_jobs_reads_the_queued_index_not_the_table() {
    let app = TestApp::spawn().await;
    let pool = &app.pool;
    let dataset = dataset_row(pool).await;
    queue_jobs(pool, dataset, 100_000).await;
    // Running jobs with live leases: before migration 0009 they sat at the
    // head of the index a claim walks, each one read and thrown away.
    for worker in 0..200 {
        jobs::claim(pool, &format!("busy-{worker}"), 600.0)
            .await
            .unwrap()
            .expect("a queued job");
    }

    let plan = jobs::explain_claim(pool, "explainer").await.unwrap();
    let text = plan.join("\n");
    assert!(text.contains("using jobs_queued on jobs"), "{text}");
    assert!(text.contains("using jobs_leased on jobs"), "{text}");
    assert!(!text.contains("Seq Scan on jobs"), "{text}");
    // The queued arm stops at its first row: no running job is read and
    // discarded on the way.
    assert!(!text.contains("Rows Removed by Filter"), "{text}");

    // The next claim takes the most urgent job left: priority 2, oldest.
    let expected: Uuid = sqlx::query_scalar(
        "SELECT id FROM jobs WHERE status = 'queued' ORDER BY priority DESC, created_at LIMIT 1",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    let claimed = jobs::claim(pool, "next", 60.0).await.unwrap().unwrap();
    assert_eq!(claimed.id, expected);
    assert_eq!(claimed.priority, 2);
    // EXPLAIN ANALYZE claimed nothing: it ran in a transaction rolled back.
    let running: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs WHERE status = 'running'")
        .fetch_one(pool)
        .await
        .unwrap();
    assert_eq!(running, 201);
}

#[tokio::test]
async fn an_expired_lease_competes_with_queued_jobs_by_priority_then_age() {
    let app = TestApp::spawn().await;
    let pool = &app.pool;
    let dataset = dataset_row(pool).await;
    queue_jobs(pool, dataset, 30).await;
    // A job whose worker vanished: its lease expired, one attempt left.
    let lost = jobs::claim(pool, "vanished", 60.0).await.unwrap().unwrap();
    assert_eq!(lost.priority, 2);
    sqlx::query("UPDATE jobs SET lease_expires_at = now() - interval '1 second' WHERE id = $1")
        .bind(lost.id)
        .execute(pool)
        .await
        .unwrap();
    // It is older than every queued job of its priority: it comes back first.
    let again = jobs::claim(pool, "rescuer", 60.0).await.unwrap().unwrap();
    assert_eq!(again.id, lost.id);
    assert_eq!(again.attempts, 2);

    // With a lower priority than the queued jobs left, it waits for them.
    sqlx::query(
        "UPDATE jobs SET priority = -1, lease_expires_at = now() - interval '1 second' WHERE id = $1",
    )
    .bind(lost.id)
    .execute(pool)
    .await
    .unwrap();
    let next = jobs::claim(pool, "rescuer-2", 60.0).await.unwrap().unwrap();
    assert_ne!(next.id, lost.id);
    assert_eq!(next.priority, 2);
    // A job past its last attempt is not claimed, whichever arm finds it.
    sqlx::query("UPDATE jobs SET max_attempts = 2 WHERE id = $1")
        .bind(lost.id)
        .execute(pool)
        .await
        .unwrap();
    sqlx::query("UPDATE jobs SET status = 'cancelled' WHERE status = 'queued'")
        .execute(pool)
        .await
        .unwrap();
    assert!(jobs::claim(pool, "rescuer-3", 60.0)
        .await
        .unwrap()
        .is_none());
}

#[tokio::test]
async fn eight_concurrent_claimers_never_take_the_same_job() {
    let app = TestApp::spawn().await;
    let pool = &app.pool;
    let dataset = dataset_row(pool).await;
    queue_jobs(pool, dataset, 400).await;
    let claimers = (0..8).map(|w| {
        let pool = pool.clone();
        tokio::spawn(async move {
            let mut mine = Vec::new();
            while let Some(job) = jobs::claim(&pool, &format!("claimer-{w}"), 60.0)
                .await
                .unwrap()
            {
                mine.push(job.id);
            }
            mine
        })
    });
    let mut all = Vec::new();
    for claimer in claimers {
        all.extend(claimer.await.unwrap());
    }
    let distinct: HashSet<Uuid> = all.iter().copied().collect();
    assert_eq!(all.len(), 400);
    assert_eq!(distinct.len(), 400);
}

/// The target of a `Link: <…>; rel="next"` header.
fn next_link(reply: &crate::helpers::Reply) -> Option<String> {
    let link = reply.headers.get("link")?.to_str().unwrap();
    assert!(link.ends_with("; rel=\"next\""), "{link}");
    Some(link[link.find('<').unwrap() + 1..link.find('>').unwrap()].to_string())
}

fn ids(reply: &crate::helpers::Reply) -> Vec<Uuid> {
    reply
        .json
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["id"].as_str().unwrap().parse().unwrap())
        .collect()
}

#[tokio::test]
async fn get_jobs_pages_through_every_job_once_while_jobs_are_added() {
    let app = TestApp::spawn().await;
    let pool = &app.pool;
    let dataset = dataset_row(pool).await;
    queue_jobs(pool, dataset, 120).await;
    // Ten jobs created in the same microsecond: the id orders them.
    sqlx::query(
        "INSERT INTO jobs (id, dataset_id, config, created_at)
         SELECT gen_random_uuid(), $1, '{}', now() - interval '30.5 seconds'
         FROM generate_series(1, 10)",
    )
    .bind(dataset)
    .execute(pool)
    .await
    .unwrap();
    let expected: Vec<Uuid> =
        sqlx::query_scalar("SELECT id FROM jobs ORDER BY created_at DESC, id DESC")
            .fetch_all(pool)
            .await
            .unwrap();
    assert_eq!(expected.len(), 130);

    // The default page: 50, and a link to the next.
    let first = app.get("/jobs").await;
    assert_eq!(first.status, StatusCode::OK);
    assert_eq!(ids(&first), expected[..50]);
    assert_eq!(
        next_link(&first).unwrap(),
        format!("/jobs?limit=50&starting_after={}", expected[49])
    );

    let mut seen = Vec::new();
    let mut added = Vec::new();
    let mut next = Some("/jobs?limit=7".to_string());
    let mut pages = 0;
    while let Some(path) = next {
        let page = app.get(&path).await;
        assert_eq!(page.status, StatusCode::OK, "{path}");
        let page_ids = ids(&page);
        assert!(page_ids.len() <= 7);
        seen.extend(page_ids);
        next = next_link(&page);
        pages += 1;
        // Someone queues a job between every two pages.
        let job: Uuid = sqlx::query_scalar(
            "INSERT INTO jobs (id, dataset_id, config) VALUES (gen_random_uuid(), $1, '{}') RETURNING id",
        )
        .bind(dataset)
        .fetch_one(pool)
        .await
        .unwrap();
        added.push(job);
    }
    // 130 jobs in pages of 7: 19 pages, the last one of 4, without a link.
    assert_eq!(pages, 19);
    assert_eq!(seen, expected, "every job once, newest first");

    // The jobs added meanwhile lead a fresh first page.
    let fresh = app.get("/jobs?limit=500").await;
    let fresh_ids = ids(&fresh);
    assert_eq!(fresh_ids.len(), 130 + added.len());
    assert!(next_link(&fresh).is_none());
    added.reverse();
    assert_eq!(fresh_ids[..added.len()], added[..]);

    // The page after the oldest job is empty, with no link.
    let last = app
        .get(&format!("/jobs?starting_after={}", expected[129]))
        .await;
    assert_eq!(last.status, StatusCode::OK);
    assert_eq!(last.json, serde_json::json!([]));
    assert!(next_link(&last).is_none());
}

#[tokio::test]
async fn bad_page_parameters_are_422_problems_naming_the_parameter() {
    let app = TestApp::spawn().await;
    let unknown = Uuid::new_v4();
    for (query, path) in [
        ("limit=0", "limit"),
        ("limit=501", "limit"),
        ("limit=-3", "limit"),
        ("limit=ten", "limit"),
        ("limit=", "limit"),
        ("starting_after=not-a-uuid", "starting_after"),
        (
            &format!("starting_after={unknown}") as &str,
            "starting_after",
        ),
        ("limit=9&limit=10", "query"),
        ("page=2", "query"),
    ] {
        let reply = app.get(&format!("/jobs?{query}")).await;
        let errors = reply.assert_problem(StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(errors[0]["path"], path, "{query}: {errors:?}");
    }
    // Both wrong: both named.
    let reply = app.get("/jobs?limit=0&starting_after=x").await;
    let errors = reply.assert_problem(StatusCode::UNPROCESSABLE_ENTITY);
    let paths: Vec<&str> = errors.iter().map(|e| e["path"].as_str().unwrap()).collect();
    assert_eq!(paths, ["limit", "starting_after"]);
    // The bounds themselves are fine.
    assert_eq!(app.get("/jobs?limit=1").await.status, StatusCode::OK);
    assert_eq!(app.get("/jobs?limit=500").await.status, StatusCode::OK);
}
