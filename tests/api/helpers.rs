//! Test harness: a private Postgres cluster shared by the tests of this
//! process (or `DATABASE_URL`'s server), a fresh database and data directory
//! per test, and the router called without a socket.

use std::io::{Cursor, Write};
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::OnceLock;
use std::time::Duration;

use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use axum::Router;
use finetuned::api::{self, AppState, HttpLimits};
use finetuned::artifacts::Artifacts;
use finetuned::auth::Auth;
use finetuned::sandbox::ScriptCheck;
use finetuned::serve::{BatchingConfig, Predictor};
use finetuned::store::{self, EmbeddedPostgres};
use finetuned::train::{Outcome, Worker};
use http_body_util::BodyExt;
use image::{ImageFormat, Rgb, RgbImage};
use rand::{Rng, SeedableRng};
use serde_json::Value;
use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, PgPool};
use tower::ServiceExt;
use uuid::Uuid;

/// The URL of database `name` on the tests' server.
pub fn database_url(name: &str) -> String {
    server();
    let base = SERVER_URL.get().expect("server started");
    // postgres://user@host:port/<database>?params
    let (head, tail) = base.split_at(base.find("://").unwrap() + 3);
    let slash = tail.find('/').map_or(tail.len(), |i| i);
    let query = tail.find('?').map_or("", |i| &tail[i..]);
    format!("{head}{}/{name}{query}", &tail[..slash])
}

static SERVER_URL: OnceLock<String> = OnceLock::new();

/// The admin connection of the server tests create their databases in.
fn server() -> &'static PgConnectOptions {
    static SERVER: OnceLock<PgConnectOptions> = OnceLock::new();
    SERVER.get_or_init(|| {
        if let Ok(url) = std::env::var("DATABASE_URL") {
            SERVER_URL.set(url.clone()).ok();
            return PgConnectOptions::from_str(&url).expect("DATABASE_URL parses");
        }
        // Short, fixed path: a Unix socket path must be short, and a later
        // run adopts the cluster instead of initialising another.
        let dir = std::env::temp_dir().join("finetuned-test-pg");
        let pg = EmbeddedPostgres::start(&dir, None).expect("embedded Postgres starts");
        let url = pg.url();
        SERVER_URL.set(url.clone()).ok();
        let pg: &'static EmbeddedPostgres = Box::leak(Box::new(pg));
        STOP_AT_EXIT.set(pg).ok();
        unsafe { libc::atexit(stop_cluster) };
        PgConnectOptions::from_str(&url).expect("embedded URL parses")
    })
}

static STOP_AT_EXIT: OnceLock<&'static EmbeddedPostgres> = OnceLock::new();

extern "C" fn stop_cluster() {
    if let Some(pg) = STOP_AT_EXIT.get() {
        let _ = pg.stop();
    }
}

/// A fresh, migrated database and its name.
pub async fn fresh_named_database() -> (PgPool, String) {
    let admin = server().clone();
    let name = format!("test_{}", Uuid::new_v4().simple());
    let mut conn = admin.connect().await.expect("admin connection");
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&mut conn)
        .await
        .expect("create test database");
    let url_options = admin.database(&name);
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(8)
        .connect_with(url_options)
        .await
        .expect("test database connects");
    store::migrate(&pool).await.expect("migrations apply");
    (pool, name)
}

/// libtorch's random generator is one per process: tests that draw from it
/// (every training run) take this lock, so a seeded run is reproducible.
static TORCH_RNG: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

pub async fn torch_rng() -> tokio::sync::MutexGuard<'static, ()> {
    TORCH_RNG.lock().await
}

pub fn torch_rng_blocking() -> tokio::sync::MutexGuard<'static, ()> {
    TORCH_RNG.blocking_lock()
}

/// The final status of a job the worker ran (panics if it ran none).
pub fn ran_status(outcome: Outcome) -> String {
    match outcome {
        Outcome::Ran { status, .. } => status,
        Outcome::Idle => panic!("the worker found no job"),
    }
}

/// A port nothing listens on now, for a server process the test starts.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Where setup put the pretrained weights.
pub fn weights_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("FINETUNED_WEIGHTS_DIR") {
        return dir.into();
    }
    cache_dir().join("weights")
}

/// The python of the torch virtualenv (`scripts/env.sh` names it).
pub fn torch_python() -> PathBuf {
    std::env::var_os("FINETUNED_VENV")
        .map(|venv| PathBuf::from(venv).join("bin/python"))
        .unwrap_or_else(|| "python3".into())
}

pub fn fixtures_dir() -> PathBuf {
    cache_dir().join("fixtures")
}

fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("FINETUNED_CACHE") {
        return dir.into();
    }
    let home = std::env::var_os("HOME").expect("HOME is set");
    PathBuf::from(home).join(".cache/finetuned")
}

/// Checks of uploaded modules by the built `finetuned` binary, with these
/// limits.
pub fn script_check(memory_mib: u64, timeout_secs: u64) -> ScriptCheck {
    ScriptCheck {
        program: env!("CARGO_BIN_EXE_finetuned").into(),
        memory_bytes: memory_mib * 1024 * 1024,
        timeout: Duration::from_secs(timeout_secs),
    }
}

/// A small inference setup for tests that do not study batching.
pub fn small_batching() -> BatchingConfig {
    BatchingConfig {
        device: tch::Device::Cpu,
        threads: 1,
        torch_threads: 0,
        cache_capacity: 1,
        cache_bytes: usize::MAX,
        window: Duration::from_millis(1),
        max_batch: 4,
        queue: 8,
    }
}

pub struct TestApp {
    pub router: Router,
    pub pool: PgPool,
    pub artifacts: Artifacts,
    pub worker: Worker,
    database: String,
    dir: PathBuf,
}

impl TestApp {
    pub async fn spawn() -> Self {
        Self::spawn_with(BatchingConfig {
            device: tch::Device::Cpu,
            cache_capacity: 2,
            threads: 1,
            torch_threads: 0,
            cache_bytes: usize::MAX,
            window: Duration::from_millis(2),
            max_batch: 32,
            queue: 64,
        })
        .await
    }

    /// An app that accepts TorchScript backbones, checked by the real binary.
    pub async fn spawn_allowing_scripts() -> Self {
        Self::spawn_custom(small_batching(), |state| {
            state.script_check = Some(script_check(4096, 60))
        })
        .await
    }

    /// An app whose inference thread batches and queues as told.
    pub async fn spawn_with(batching: BatchingConfig) -> Self {
        Self::spawn_custom(batching, |_| {}).await
    }

    /// An app whose state the caller adjusts before the router is built.
    pub async fn spawn_custom(
        batching: BatchingConfig,
        adjust: impl FnOnce(&mut AppState),
    ) -> Self {
        let (pool, database) = fresh_named_database().await;
        let dir = std::env::temp_dir().join(format!("finetuned-test-{}", Uuid::new_v4().simple()));
        let artifacts = Artifacts::open(dir.join("artifacts")).expect("artifacts dir");
        tch::set_num_threads(1);
        let mut state = AppState {
            pool: pool.clone(),
            artifacts: artifacts.clone(),
            predictor: Predictor::start(batching).expect("inference thread"),
            auth: Auth::new(pool.clone()),
            predict_timeout: Duration::from_secs(30),
            decode_permits: std::sync::Arc::new(tokio::sync::Semaphore::new(2)),
            events: api::EventStreams::new(pool.clone(), 256),
            weights_dir: weights_dir(),
            limits: HttpLimits {
                max_upload_bytes: 64 * 1024 * 1024,
                max_predict_bytes: 4 * 1024 * 1024,
                ..HttpLimits::default()
            },
            script_check: None,
        };
        adjust(&mut state);
        let worker = Worker {
            id: format!("test-worker-{}", Uuid::new_v4().simple()),
            pool: pool.clone(),
            artifacts: artifacts.clone(),
            weights_dir: state.weights_dir.clone(),
            device: tch::Device::Cpu,
            lease: Duration::from_secs(60),
            idle_poll: Duration::from_secs(1),
        };
        Self {
            router: api::router(state),
            pool,
            artifacts,
            worker,
            database,
            dir,
        }
    }

    /// The URL of this test's database, for processes the test starts.
    pub fn database_url(&self) -> String {
        database_url(&self.database)
    }

    /// The data directory whose `artifacts/` this app stores into.
    pub fn data_dir(&self) -> &std::path::Path {
        &self.dir
    }

    pub async fn send(&self, request: Request<Body>) -> Reply {
        let response = self
            .router
            .clone()
            .oneshot(request)
            .await
            .expect("router answers");
        let status = response.status();
        let content_type = response
            .headers()
            .get(header::CONTENT_TYPE)
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default();
        let location = response
            .headers()
            .get(header::LOCATION)
            .map(|v| v.to_str().unwrap().to_string());
        let headers = response.headers().clone();
        let bytes = response
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes();
        let json = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        Reply {
            status,
            content_type,
            location,
            headers,
            json,
            body: bytes.to_vec(),
        }
    }

    pub async fn get(&self, path: &str) -> Reply {
        self.send(Request::get(path).body(Body::empty()).unwrap())
            .await
    }

    pub async fn post_empty(&self, path: &str) -> Reply {
        self.send(Request::post(path).body(Body::empty()).unwrap())
            .await
    }

    pub async fn post_json(&self, path: &str, body: &Value) -> Reply {
        self.send(
            Request::post(path)
                .header(header::CONTENT_TYPE, "application/json")
                .body(Body::from(body.to_string()))
                .unwrap(),
        )
        .await
    }

    pub async fn post_multipart(&self, path: &str, parts: &[Part]) -> Reply {
        let (content_type, body) = multipart_body(parts);
        self.post_bytes(path, &content_type, body).await
    }

    pub async fn post_bytes(&self, path: &str, content_type: &str, body: Vec<u8>) -> Reply {
        self.send(
            Request::post(path)
                .header(header::CONTENT_TYPE, content_type)
                .body(Body::from(body))
                .unwrap(),
        )
        .await
    }

    pub async fn upload_dataset(&self, zip: Vec<u8>) -> Reply {
        self.post_multipart("/datasets", &[Part::file("file", "shapes.zip", zip)])
            .await
    }

    /// Uploads a rendered shapes dataset; returns its id.
    pub async fn shapes_dataset(&self, per_class: u64, side: u32) -> String {
        let reply = self.upload_dataset(shapes_zip(per_class, side)).await;
        assert_eq!(reply.status, StatusCode::CREATED, "{:?}", reply.json);
        reply.json["id"].as_str().unwrap().to_string()
    }

    /// Queues a job; returns its id.
    pub async fn submit_job(&self, config: Value) -> String {
        let reply = self.post_json("/jobs", &config).await;
        assert_eq!(reply.status, StatusCode::ACCEPTED, "{:?}", reply.json);
        reply.json["id"].as_str().unwrap().to_string()
    }

    pub async fn count(&self, table: &str) -> i64 {
        sqlx::query_scalar(&format!("SELECT count(*) FROM {table}"))
            .fetch_one(&self.pool)
            .await
            .expect("count")
    }

    /// Asserts that no dataset row, dataset file or temporary file is left,
    /// and that the server still answers.
    pub async fn assert_no_dataset_stored(&self) {
        assert_eq!(self.count("datasets").await, 0);
        for sub in ["datasets", "tmp"] {
            let left = self.files_under(sub);
            assert!(left.is_empty(), "left in {sub}: {left:?}");
        }
        assert_eq!(self.get("/healthz").await.status, StatusCode::OK);
    }

    /// Posts one image to `/predict` (the default model, or `model`);
    /// asserts success and returns the image's predictions.
    pub async fn predict_one(
        &self,
        model: Option<&str>,
        filename: &str,
        image: Vec<u8>,
    ) -> Vec<Value> {
        let path = match model {
            Some(model) => format!("/predict?model={model}"),
            None => "/predict".to_string(),
        };
        let reply = self
            .post_multipart(&path, &[Part::file("image", filename, image)])
            .await;
        assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.json);
        reply.json["results"][0]["predictions"]
            .as_array()
            .expect("predictions")
            .clone()
    }

    /// Runs the queued job `job_id` on this app's worker, expects it to
    /// succeed, and expects the model it deployed to label a photo with the
    /// three shape classes.
    pub async fn assert_job_trains_and_serves(&self, job_id: &str) {
        self.worker
            .try_execute_one(None)
            .await
            .expect("worker step");
        let job = self.get(&format!("/jobs/{job_id}")).await.json;
        assert_eq!(job["status"], "succeeded", "{job:?}");
        let photo = encode(&render(2, 7, 80), ImageFormat::Png);
        assert_eq!(self.predict_one(None, "stripes.png", photo).await.len(), 3);
    }

    /// Files under an artifacts subdirectory (recursively).
    pub fn files_under(&self, sub: &str) -> Vec<PathBuf> {
        fn walk(dir: &std::path::Path, out: &mut Vec<PathBuf>) {
            for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                if entry.path().is_dir() {
                    walk(&entry.path(), out);
                }
                out.push(entry.path());
            }
        }
        let mut out = Vec::new();
        walk(&self.artifacts.path(sub), &mut out);
        out
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub struct Reply {
    pub status: StatusCode,
    pub content_type: String,
    pub location: Option<String>,
    pub headers: axum::http::HeaderMap,
    pub json: Value,
    pub body: Vec<u8>,
}

impl Reply {
    /// Asserts a problem+json error with this status; returns its `errors`.
    pub fn assert_problem(&self, status: StatusCode) -> Vec<Value> {
        assert_eq!(
            self.status,
            status,
            "body: {}",
            String::from_utf8_lossy(&self.body)
        );
        assert_eq!(self.content_type, "application/problem+json");
        assert_eq!(self.json["status"], status.as_u16());
        assert!(self.json["detail"].as_str().is_some_and(|d| !d.is_empty()));
        self.json["errors"].as_array().cloned().unwrap_or_default()
    }
}

pub struct Part {
    name: String,
    filename: Option<String>,
    bytes: Vec<u8>,
}

impl Part {
    pub fn file(name: &str, filename: &str, bytes: Vec<u8>) -> Self {
        Self {
            name: name.into(),
            filename: Some(filename.into()),
            bytes,
        }
    }

    pub fn text(name: &str, value: &str) -> Self {
        Self {
            name: name.into(),
            filename: None,
            bytes: value.as_bytes().to_vec(),
        }
    }
}

fn multipart_body(parts: &[Part]) -> (String, Vec<u8>) {
    let boundary = format!("finetuned-test-{}", Uuid::new_v4().simple());
    let mut body = Vec::new();
    for part in parts {
        write!(
            body,
            "--{boundary}\r\nContent-Disposition: form-data; name=\"{}\"",
            part.name
        )
        .unwrap();
        if let Some(filename) = &part.filename {
            write!(
                body,
                "; filename=\"{filename}\"\r\nContent-Type: application/octet-stream"
            )
            .unwrap();
        }
        body.extend_from_slice(b"\r\n\r\n");
        body.extend_from_slice(&part.bytes);
        body.extend_from_slice(b"\r\n");
    }
    write!(body, "--{boundary}--\r\n").unwrap();
    (format!("multipart/form-data; boundary={boundary}"), body)
}

/// Shapes the tests render as classes.
pub const SHAPES: [&str; 3] = ["disc", "square", "stripes"];

/// Renders one image of a shape class: a random-coloured shape of random
/// size and position on a noisy random background.
pub fn render(shape: usize, seed: u64, side: u32) -> RgbImage {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed * 31 + shape as u64);
    let bg = Rgb([
        rng.gen_range(0..120u8),
        rng.gen_range(0..120u8),
        rng.gen_range(0..120u8),
    ]);
    let fg = Rgb([
        rng.gen_range(140..=255u8),
        rng.gen_range(140..=255u8),
        rng.gen_range(140..=255u8),
    ]);
    let s = side as f32;
    let (cx, cy) = (rng.gen_range(0.35..0.65) * s, rng.gen_range(0.35..0.65) * s);
    let r = rng.gen_range(0.2..0.3) * s;
    let period = rng.gen_range(0.12..0.2) * s;
    let mut img = RgbImage::new(side, side);
    for (x, y, px) in img.enumerate_pixels_mut() {
        let (fx, fy) = (x as f32, y as f32);
        let inside = match SHAPES[shape] {
            "disc" => (fx - cx).powi(2) + (fy - cy).powi(2) < r * r,
            "square" => (fx - cx).abs() < r && (fy - cy).abs() < r,
            _ => (fx / period).floor() as i64 % 2 == 0,
        };
        let base = if inside { fg } else { bg };
        let noise: i16 = rng.gen_range(-12..=12);
        *px = Rgb(base.0.map(|c| (c as i16 + noise).clamp(0, 255) as u8));
    }
    img
}

/// Encodes an image as PNG or JPEG.
pub fn encode(img: &RgbImage, format: ImageFormat) -> Vec<u8> {
    let mut out = Cursor::new(Vec::new());
    img.write_to(&mut out, format).expect("encodes");
    out.into_inner()
}

/// Builds a zip archive from (path, bytes) entries.
pub fn zip(entries: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut writer = zip::ZipWriter::new(Cursor::new(Vec::new()));
    let options = zip::write::SimpleFileOptions::default();
    for (path, bytes) in entries {
        writer
            .start_file(path.as_str(), options)
            .expect("zip entry");
        writer.write_all(bytes).expect("zip write");
    }
    writer.finish().expect("zip finishes").into_inner()
}

/// A zip of `per_class` rendered images for each shape, `class/NN.ext`.
pub fn shapes_zip(per_class: u64, side: u32) -> Vec<u8> {
    let mut entries = Vec::new();
    for (c, name) in SHAPES.iter().enumerate() {
        for i in 0..per_class {
            let (format, ext) = if i % 2 == 0 {
                (ImageFormat::Png, "png")
            } else {
                (ImageFormat::Jpeg, "jpg")
            };
            entries.push((
                format!("{name}/{i:02}.{ext}"),
                encode(&render(c, i, side), format),
            ));
        }
    }
    zip(&entries)
}
