//! The queue at scale: claim latency with 100,000 queued jobs (inserted
//! with SQL) and 8 claimers at once, each claiming with the worker's own
//! `store::jobs::claim` and then finishing the job, as a worker does. Three
//! copies of one database, in one invocation:
//!
//! - `0009`: the indexes of migration 0009 (`jobs_queued`, `jobs_leased`);
//! - `no index`: the same claim with those indexes dropped (the reference a
//!   claim must beat: a scan of the table);
//! - `before 0009`: the claim statement and index (`jobs_claimable`: queued
//!   and running jobs) this replaced, kept here as text to compare against.
//!
//! Each starts with `BENCH_QUEUE_RUNNING` jobs running under live leases
//! (other workers busy). Then pages of `GET /jobs` (`store::jobs::list`) at
//! the top, the middle and the end of the list, with and without
//! `jobs_newest`; and the claim's `EXPLAIN (ANALYZE, BUFFERS)`.
//!
//! `scripts/bench-queue`, or `cargo bench --bench queue` after
//! `source scripts/env.sh`. Uses `DATABASE_URL`'s server when set (it
//! creates and drops its own databases there), else a private cluster.
//! BENCH_QUEUE_JOBS (default 100000), BENCH_QUEUE_CLAIMERS (8),
//! BENCH_QUEUE_CLAIMS (claims per claimer, 250), BENCH_QUEUE_RUNNING (200).

use std::str::FromStr;
use std::time::{Duration, Instant};

use finetuned::store::{self, jobs, EmbeddedPostgres, JobStatus};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, PgPool};
use uuid::Uuid;

fn setting(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The claim before migration 0009: one search over queued and running jobs
/// in `jobs_claimable` (priority DESC, created_at; status queued or running).
const CLAIM_BEFORE_0009: &str = "
    WITH claimed AS (
        UPDATE jobs SET status = 'running', attempts = attempts + 1,
            lease_owner = $1, lease_expires_at = now() + make_interval(secs => $2),
            started_at = coalesce(started_at, now()), updated_at = now(), error = NULL
        WHERE id = (
            SELECT id FROM jobs
            WHERE (status = 'queued' OR (status = 'running' AND lease_expires_at < now()))
              AND NOT cancel_requested
              AND attempts < max_attempts
            ORDER BY priority DESC, created_at
            LIMIT 1
            FOR UPDATE SKIP LOCKED)
        RETURNING id),
    superseded AS (
        UPDATE runs SET outcome = 'lost', finished_at = now(),
            error = 'the lease expired; a later attempt took the job over'
        WHERE outcome IS NULL AND job_id IN (SELECT id FROM claimed))
    SELECT id FROM claimed";

#[derive(Clone, Copy, PartialEq)]
enum Variant {
    Indexed,
    NoIndex,
    Before0009,
}

impl Variant {
    fn name(self) -> &'static str {
        match self {
            Self::Indexed => "0009 (jobs_queued + jobs_leased)",
            Self::NoIndex => "no queue index (reference)",
            Self::Before0009 => "before 0009 (jobs_claimable)",
        }
    }

    /// What turns the migrated template into this variant.
    fn setup(self) -> &'static str {
        match self {
            Self::Indexed => "",
            Self::NoIndex => "DROP INDEX jobs_queued, jobs_leased, jobs_newest",
            Self::Before0009 => {
                "DROP INDEX jobs_queued, jobs_leased;
                 CREATE INDEX jobs_claimable ON jobs (priority DESC, created_at)
                     WHERE status IN ('queued', 'running')"
            }
        }
    }

    async fn claim(self, pool: &PgPool, worker: &str) -> Option<Uuid> {
        match self {
            Self::Before0009 => sqlx::query_scalar(CLAIM_BEFORE_0009)
                .bind(worker)
                .bind(60.0_f64)
                .fetch_optional(pool)
                .await
                .unwrap(),
            _ => jobs::claim(pool, worker, 60.0).await.unwrap().map(|j| j.id),
        }
    }
}

#[tokio::main]
async fn main() {
    let queued = setting("BENCH_QUEUE_JOBS", 100_000);
    let claimers = setting("BENCH_QUEUE_CLAIMERS", 8);
    let per_claimer = setting("BENCH_QUEUE_CLAIMS", 250);
    let running = setting("BENCH_QUEUE_RUNNING", 200);

    let (server, _embedded) = match std::env::var("DATABASE_URL") {
        Ok(url) => (url, None),
        Err(_) => {
            let dir = std::env::temp_dir().join(format!("ftq-{}", std::process::id()));
            let pg = EmbeddedPostgres::start(&dir, None).expect("embedded Postgres starts");
            let url = pg.url();
            (url, Some(Private { pg, dir }))
        }
    };
    let admin = PgConnectOptions::from_str(&server).expect("a Postgres URL");
    let tag = Uuid::new_v4().simple().to_string()[..8].to_string();
    let template = format!("bench_queue_{tag}");
    let mut conn = admin.connect().await.expect("admin connection");
    sqlx::query(&format!("CREATE DATABASE {template}"))
        .execute(&mut conn)
        .await
        .unwrap();

    let started = Instant::now();
    let pool = connect(&admin, &template, 2).await;
    store::migrate(&pool).await.expect("migrations apply");
    fill(&pool, queued, running).await;
    pool.close().await;
    eprintln!(
        "{queued} queued jobs and {running} running inserted in {:.1} s",
        started.elapsed().as_secs_f64()
    );

    let mut rows = Vec::new();
    let mut pages = Vec::new();
    let mut plans = Vec::new();
    for variant in [Variant::Indexed, Variant::NoIndex, Variant::Before0009] {
        let name = format!("{template}_{}", rows.len());
        // An autovacuum worker may still be on the template after the insert:
        // the copy waits for it to leave.
        for attempt in 0.. {
            let copied = sqlx::query(&format!("CREATE DATABASE {name} TEMPLATE {template}"))
                .execute(&mut conn)
                .await;
            match copied {
                Ok(_) => break,
                Err(err) if attempt < 100 => {
                    eprintln!("copying the template: {err}; again");
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
                Err(err) => panic!("copying the template: {err}"),
            }
        }
        let pool = connect(&admin, &name, claimers as u32 + 2).await;
        if !variant.setup().is_empty() {
            sqlx::raw_sql(variant.setup()).execute(&pool).await.unwrap();
        }
        sqlx::query("VACUUM ANALYZE jobs")
            .execute(&pool)
            .await
            .unwrap();
        rows.push((
            variant,
            claim_concurrently(&pool, variant, claimers, per_claimer).await,
        ));
        // After the run: the claims' dead row versions are still there.
        plans.push((variant, explain(&pool, variant).await));
        if variant != Variant::Before0009 {
            pages.push((variant, page_latencies(&pool).await));
        }
        pool.close().await;
        sqlx::query(&format!("DROP DATABASE {name} WITH (FORCE)"))
            .execute(&mut conn)
            .await
            .unwrap();
    }
    sqlx::query(&format!("DROP DATABASE {template} WITH (FORCE)"))
        .execute(&mut conn)
        .await
        .unwrap();
    drop(conn);
    println!(
        "claim latency: {queued} queued jobs, {running} running, {claimers} claimers x {per_claimer} claims \
         (each claimed job then finished)"
    );
    println!(
        "{:<34} | {:>8} | {:>8} | {:>8} | {:>9} | {:>12}",
        "", "p50 ms", "p99 ms", "max ms", "claims/s", "p50 vs 0009"
    );
    let reference = rows[0].1.p50;
    for (variant, r) in &rows {
        println!(
            "{:<34} | {:>8.2} | {:>8.2} | {:>8.2} | {:>9.0} | {:>11.1}x",
            variant.name(),
            r.p50,
            r.p99,
            r.max,
            r.per_second,
            r.p50 / reference
        );
    }
    println!();
    println!("GET /jobs page of 50 (store::jobs::list), median of 20, ms");
    println!(
        "{:<34} | {:>8} | {:>8} | {:>8}",
        "", "first", "middle", "last"
    );
    for (variant, [first, middle, last]) in &pages {
        let name = match variant {
            Variant::Indexed => "0009 (jobs_newest)",
            _ => "no index (reference)",
        };
        println!("{name:<34} | {first:>8.2} | {middle:>8.2} | {last:>8.2}");
    }
    for (variant, plan) in plans {
        println!();
        println!(
            "EXPLAIN (ANALYZE, BUFFERS) of the claim, {}:",
            variant.name()
        );
        for line in plan {
            println!("  {line}");
        }
    }
}

/// The private cluster, stopped and removed when the bench ends (or panics).
struct Private {
    pg: EmbeddedPostgres,
    dir: std::path::PathBuf,
}

impl Drop for Private {
    fn drop(&mut self) {
        self.pg.stop().ok();
        std::fs::remove_dir_all(&self.dir).ok();
        for lock in ["lock", "start.lock"] {
            std::fs::remove_file(self.dir.with_extension(lock)).ok();
        }
    }
}

async fn connect(admin: &PgConnectOptions, database: &str, size: u32) -> PgPool {
    PgPoolOptions::new()
        .max_connections(size)
        .min_connections(size)
        .acquire_timeout(Duration::from_secs(30))
        .connect_with(admin.clone().database(database))
        .await
        .expect("bench database connects")
}

/// `queued` jobs inserted with SQL (priorities 0..=2, a second apart) and
/// `running` of the most urgent claimed for other workers, leases live.
async fn fill(pool: &PgPool, queued: usize, running: usize) {
    let dataset = Uuid::new_v4();
    sqlx::query(
        "INSERT INTO datasets (id, name, status, classes, counts, num_train, num_val, bytes, artifact_key)
         VALUES ($1, 'bench', 'ready', '[\"a\", \"b\"]', '{}', 0, 0, 0, 'none')",
    )
    .bind(dataset)
    .execute(pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO jobs (id, dataset_id, config, priority, created_at)
         SELECT gen_random_uuid(), $1, '{\"epochs\": 3}', i % 3, now() - make_interval(secs => i)
         FROM generate_series(1, $2) i",
    )
    .bind(dataset)
    .bind(queued as i32)
    .execute(pool)
    .await
    .unwrap();
    for worker in 0..running {
        jobs::claim(pool, &format!("busy-{worker}"), 3600.0)
            .await
            .unwrap();
    }
}

struct Latencies {
    p50: f64,
    p99: f64,
    max: f64,
    per_second: f64,
}

/// `claimers` tasks, each claiming `per_claimer` jobs one after another
/// (timing each claim) and finishing each, as a worker would.
async fn claim_concurrently(
    pool: &PgPool,
    variant: Variant,
    claimers: usize,
    per_claimer: usize,
) -> Latencies {
    let started = Instant::now();
    let tasks: Vec<_> = (0..claimers)
        .map(|c| {
            let pool = pool.clone();
            tokio::spawn(async move {
                let worker = format!("claimer-{c}");
                let mut took = Vec::with_capacity(per_claimer);
                for _ in 0..per_claimer {
                    let t = Instant::now();
                    let id = variant.claim(&pool, &worker).await.expect("a queued job");
                    took.push(t.elapsed().as_secs_f64() * 1e3);
                    let mut conn = pool.acquire().await.unwrap();
                    let mut tx = conn.begin().await.unwrap();
                    assert!(
                        jobs::finish(&mut tx, id, &worker, JobStatus::Succeeded, None)
                            .await
                            .unwrap()
                    );
                    tx.commit().await.unwrap();
                }
                took
            })
        })
        .collect();
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await.unwrap());
    }
    let wall = started.elapsed().as_secs_f64();
    all.sort_by(f64::total_cmp);
    let at = |q: f64| all[((all.len() - 1) as f64 * q).round() as usize];
    Latencies {
        p50: at(0.5),
        p99: at(0.99),
        max: at(1.0),
        per_second: all.len() as f64 / wall,
    }
}

/// Median milliseconds of a page of 50 at the top, the middle and the end.
async fn page_latencies(pool: &PgPool) -> [f64; 3] {
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs")
        .fetch_one(pool)
        .await
        .unwrap();
    let cursor_at = |offset: i64| async move {
        sqlx::query_scalar::<_, Uuid>(
            "SELECT id FROM jobs ORDER BY created_at DESC, id DESC OFFSET $1 LIMIT 1",
        )
        .bind(offset)
        .fetch_one(pool)
        .await
        .unwrap()
    };
    let cursors = [
        None,
        Some(cursor_at(count / 2).await),
        Some(cursor_at(count - 51).await),
    ];
    let mut out = [0.0; 3];
    for (slot, after) in out.iter_mut().zip(cursors) {
        let mut took = Vec::new();
        for _ in 0..20 {
            let t = Instant::now();
            let page = jobs::list(pool, 50, after).await.unwrap().unwrap();
            took.push(t.elapsed().as_secs_f64() * 1e3);
            assert_eq!(page.jobs.len(), 50);
        }
        took.sort_by(f64::total_cmp);
        *slot = took[10];
    }
    out
}

/// The claim's plan, run for real inside a transaction rolled back.
async fn explain(pool: &PgPool, variant: Variant) -> Vec<String> {
    match variant {
        Variant::Before0009 => {
            let mut tx = pool.begin().await.unwrap();
            let plan =
                sqlx::query_scalar(&format!("EXPLAIN (ANALYZE, BUFFERS) {CLAIM_BEFORE_0009}"))
                    .bind("explainer")
                    .bind(60.0_f64)
                    .fetch_all(&mut *tx)
                    .await
                    .unwrap();
            tx.rollback().await.unwrap();
            plan
        }
        _ => jobs::explain_claim(pool, "explainer").await.unwrap(),
    }
}
