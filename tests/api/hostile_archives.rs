//! Hostile archives, built here at test time and sent to a real `serve`
//! process, whose memory /proc reports apart from the other tests': each is
//! refused with a short problem document naming the upload, the server's
//! resident memory barely grows, nothing is stored, and the server still
//! answers.

use std::io::Write;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use flate2::Compression;
use image::ImageFormat;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::helpers::{encode, free_port, render, weights_dir, zip, TestApp, SHAPES};

const MIB: u64 = 1024 * 1024;
/// Most an answer to a hostile upload may hold.
const MAX_ANSWER_BYTES: usize = MIB as usize;
/// Most the server's resident memory may rise while it refuses one.
const MAX_RSS_GROWTH: u64 = 300 * MIB;

#[tokio::test]
async fn a_long_name_header_declaring_gigabytes_is_refused_before_it_is_read() {
    let app = TestApp::spawn().await;
    let server = Server::start(&app).await;
    // One GNU long-name header declaring 2 GiB, and 512 MiB of name after
    // it (the whole 2 GiB takes seconds to compress): the tar crate reads
    // such a name whole.
    let archive = gzip(Compression::best(), |out| {
        out.write_all(&gnu_header("././@LongLink", b'L', 2 << 30))
            .unwrap();
        zeros(out, 512 * MIB);
    });
    let problem = assert_refused(&app, &server, "long-name header", archive).await;
    assert_eq!(problem["errors"][0]["path"], "file");
    let reason = problem["errors"][0]["reason"].as_str().unwrap();
    assert!(reason.contains("GNU long name"), "{reason}");
}

#[tokio::test]
async fn a_manifest_of_millions_of_bad_rows_lists_the_first_hundred() {
    let app = TestApp::spawn().await;
    let server = Server::start(&app).await;
    let rows = 8_000_000;
    let manifest = |rows: u64| {
        gzip(Compression::best(), |out| {
            out.write_all(&gnu_header("labels.csv", b'0', 2 * rows))
                .unwrap();
            for _ in 0..rows / 1000 {
                out.write_all(&b"x\n".repeat(1000)).unwrap();
            }
            zeros(out, (2 * rows).next_multiple_of(512) - 2 * rows + 1024);
        })
    };
    let archive = manifest(rows);
    assert!(archive.len() < 32 * 1024, "{} bytes", archive.len());
    let problem = assert_refused(&app, &server, "8 M bad manifest rows", archive).await;
    let errors = problem["errors"].as_array().unwrap();
    assert_eq!(errors.len(), 100);
    assert_eq!(errors[0]["path"], "labels.csv:1");
    assert_eq!(errors[99]["path"], "labels.csv:100");
    assert_eq!(problem["errors_omitted"], json!(rows - 100));
    let detail = problem["detail"].as_str().unwrap();
    assert!(detail.contains("100 of 8000000"), "{detail}");

    // A manifest over its size bound is refused unread.
    let problem = assert_refused(&app, &server, "oversized manifest", manifest(rows * 3)).await;
    assert_eq!(problem["errors"][0]["path"], "file:labels.csv");
}

#[tokio::test]
async fn a_gzip_bomb_is_refused_as_it_inflates() {
    let app = TestApp::spawn().await;
    let server = Server::start(&app).await;
    // Two "images" of 200 MiB of zeros each: within the size of an image,
    // but a thousand times their compressed size.
    let size = 200 * MIB;
    let archive = gzip(Compression::best(), |out| {
        for name in ["a/0.png", "b/0.png"] {
            out.write_all(&gnu_header(name, b'0', size)).unwrap();
            zeros(out, size);
        }
        zeros(out, 1024);
    });
    assert!(archive.len() < MIB as usize, "{} bytes", archive.len());
    let problem = assert_refused(&app, &server, "gzip bomb", archive).await;
    assert_eq!(problem["errors"][0]["path"], "file");
    let reason = problem["errors"][0]["reason"].as_str().unwrap();
    assert!(reason.contains("times its compressed size"), "{reason}");
}

#[tokio::test]
async fn a_path_past_its_bound_is_refused() {
    let app = TestApp::spawn().await;
    // A long name within the cap on extension headers, past a path's.
    let name = format!("{}0.png\0", "a/".repeat(1000));
    let archive = gzip(Compression::best(), |out| {
        let size = name.len() as u64;
        out.write_all(&gnu_header("././@LongLink", b'L', size))
            .unwrap();
        out.write_all(name.as_bytes()).unwrap();
        zeros(out, size.next_multiple_of(512) - size);
        out.write_all(&gnu_header("0.png", b'0', 0)).unwrap();
        zeros(out, 1024);
    });
    let reply = app
        .post_bytes("/datasets", "application/gzip", archive)
        .await;
    let errors = reply.assert_problem(StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(errors[0]["path"], "file");
    let reason = errors[0]["reason"].as_str().unwrap();
    assert!(reason.contains("a path of 2005 bytes"), "{reason}");
    app.assert_no_dataset_stored().await;
}

#[tokio::test]
async fn a_deep_path_is_skipped_and_a_long_manifest_field_shown_in_part() {
    let app = TestApp::spawn().await;
    let mut entries: Vec<(String, Vec<u8>)> = (0..8)
        .map(|i| {
            let image = encode(&render(i % 2, i as u64, 32), ImageFormat::Png);
            (format!("{}/{i}.png", SHAPES[i % 2]), image)
        })
        .collect();
    let deep = format!("{}0.png", "d/".repeat(20));
    entries.push((deep.clone(), entries[0].1.clone()));
    let reply = app.upload_dataset(zip(&entries)).await;
    assert_eq!(reply.status, StatusCode::CREATED, "{:?}", reply.json);
    assert_eq!(
        reply.json["report"]["skipped"],
        json!([{"path": deep, "reason": "nested deeper than 16 folders"}])
    );

    // A manifest row naming a 10,000-byte path: its error quotes 4 KiB of it.
    entries.push((
        "labels.csv".to_string(),
        format!("{},disc\n", "p".repeat(10_000)).into_bytes(),
    ));
    let reply = app.upload_dataset(zip(&entries)).await;
    let errors = reply.assert_problem(StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(errors[0]["path"], "labels.csv:1");
    let reason = errors[0]["reason"].as_str().unwrap();
    assert_eq!(reason, format!("{}…", "p".repeat(4096)));
}

/// Sends a hostile archive and asserts the refusal; returns its problem
/// document.
async fn assert_refused(app: &TestApp, server: &Server, what: &str, archive: Vec<u8>) -> Value {
    let sent = archive.len();
    let started = Instant::now();
    let (answer, growth) = server.upload(archive).await;
    eprintln!(
        "{what}: {sent} bytes sent; {} with {} bytes in {:.1} s; server RSS rose {} MiB",
        answer.status,
        answer.body.len(),
        started.elapsed().as_secs_f64(),
        growth / MIB
    );
    let head = String::from_utf8_lossy(&answer.body[..answer.body.len().min(600)]).into_owned();
    assert_eq!(answer.status, StatusCode::UNPROCESSABLE_ENTITY, "{head}");
    assert_eq!(answer.content_type, "application/problem+json");
    assert!(
        answer.body.len() < MAX_ANSWER_BYTES,
        "{} bytes: {head}",
        answer.body.len()
    );
    assert!(growth < MAX_RSS_GROWTH, "RSS rose {} MiB", growth / MIB);
    app.assert_no_dataset_stored().await;
    let listed = server.request("GET", "/datasets", None).await.unwrap();
    assert_eq!(listed.status, StatusCode::OK);
    assert_eq!(listed.json(), json!([]));
    let problem = answer.json();
    // The upload, one of its members, or a row of its manifest.
    for error in problem["errors"].as_array().expect("errors") {
        let path = error["path"].as_str().unwrap();
        assert!(
            path == "file" || path.starts_with("file:") || path.starts_with("labels.csv:"),
            "{path}"
        );
    }
    problem
}

/// A gzip stream of what `write` writes.
fn gzip(level: Compression, write: impl FnOnce(&mut dyn Write)) -> Vec<u8> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), level);
    write(&mut gz);
    gz.finish().unwrap()
}

fn zeros(out: &mut dyn Write, mut n: u64) {
    let block = vec![0u8; MIB as usize];
    while n > 0 {
        let k = n.min(MIB);
        out.write_all(&block[..k as usize]).unwrap();
        n -= k;
    }
}

/// A GNU tar header block of type `kind` declaring `size` (under 8 GiB),
/// written field by field.
fn gnu_header(name: &str, kind: u8, size: u64) -> [u8; 512] {
    let mut block = [0u8; 512];
    block[..name.len()].copy_from_slice(name.as_bytes());
    block[100..108].copy_from_slice(b"0000644\0");
    block[108..116].copy_from_slice(b"0000000\0");
    block[116..124].copy_from_slice(b"0000000\0");
    block[124..136].copy_from_slice(format!("{size:011o}\0").as_bytes());
    block[136..148].copy_from_slice(b"00000000000\0");
    block[156] = kind;
    block[257..265].copy_from_slice(b"ustar  \0");
    // The checksum is taken with its own field as spaces.
    block[148..156].fill(b' ');
    let sum: u32 = block.iter().map(|&b| b as u32).sum();
    block[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    block
}

/// `finetuned serve` on a port of its own, against the test's database and
/// data directory; killed when dropped.
struct Server {
    child: Child,
    listen: String,
}

struct Answer {
    status: StatusCode,
    content_type: String,
    body: Vec<u8>,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }
}

impl Server {
    async fn start(app: &TestApp) -> Self {
        let port = free_port();
        let listen = format!("127.0.0.1:{port}");
        let log = std::fs::File::create(app.data_dir().join("serve.log")).expect("log file");
        let child = Command::new(env!("CARGO_BIN_EXE_finetuned"))
            .args(["serve", "--listen", &listen, "--workers", "0"])
            .env("DATABASE_URL", app.database_url())
            .env("FINETUNED_DATA_DIR", app.data_dir())
            .env("FINETUNED_WEIGHTS_DIR", weights_dir())
            .env("FINETUNED_TORCH_THREADS", "1")
            .env("FINETUNED_DEVICE", "cpu")
            .env("RUST_LOG", "warn")
            .stdout(log.try_clone().expect("log file"))
            .stderr(log)
            .spawn()
            .expect("the finetuned binary starts");
        let server = Self { child, listen };
        let started = Instant::now();
        loop {
            match server.request("GET", "/healthz", None).await {
                Ok(answer) if answer.status == StatusCode::OK => return server,
                _ => {}
            }
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "serve did not answer; its log:\n{}",
                std::fs::read_to_string(app.data_dir().join("serve.log")).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Sends `archive` as a raw-body upload; returns the answer and how far
    /// the server's peak resident memory rose above its resident memory
    /// before.
    async fn upload(&self, archive: Vec<u8>) -> (Answer, u64) {
        let pid = self.child.id();
        // Writing 5 resets the peak (VmHWM) to the current resident size.
        std::fs::write(format!("/proc/{pid}/clear_refs"), "5").expect("peak resets");
        let before = self.memory("VmRSS:");
        let answer = tokio::time::timeout(
            Duration::from_secs(300),
            self.request("POST", "/datasets", Some(("application/gzip", archive))),
        )
        .await
        .expect("answered in time")
        .expect("answered");
        (answer, self.memory("VmHWM:").saturating_sub(before))
    }

    /// A memory figure of the server's, in bytes.
    fn memory(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .expect("the server runs");
        let kib = status
            .lines()
            .find_map(|line| line.strip_prefix(field))
            .and_then(|v| v.trim().strip_suffix("kB"))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or_else(|| panic!("no {field} in {status}"));
        kib * 1024
    }

    /// One HTTP/1.1 request on its own connection.
    async fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<(&str, Vec<u8>)>,
    ) -> std::io::Result<Answer> {
        let mut stream = tokio::net::TcpStream::connect(&self.listen).await?;
        let (content_type, body) = body.unwrap_or_default();
        let mut head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nContent-Length: {}\r\n",
            self.listen,
            body.len()
        );
        if !content_type.is_empty() {
            head += &format!("Content-Type: {content_type}\r\n");
        }
        head += "\r\n";
        stream.write_all(head.as_bytes()).await?;
        stream.write_all(&body).await?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await?;
        parse_answer(&raw)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn parse_answer(raw: &[u8]) -> std::io::Result<Answer> {
    let bad = || std::io::Error::other("malformed HTTP answer");
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(bad)?;
    let head = String::from_utf8_lossy(&raw[..end]);
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|line| line.split(' ').nth(1))
        .and_then(|code| code.parse::<u16>().ok())
        .and_then(|code| StatusCode::from_u16(code).ok())
        .ok_or_else(bad)?;
    let (mut content_type, mut chunked) = (String::new(), false);
    for (name, value) in lines.filter_map(|line| line.split_once(':')) {
        match name.trim().to_ascii_lowercase().as_str() {
            "content-type" => content_type = value.trim().to_string(),
            "transfer-encoding" => chunked = value.to_ascii_lowercase().contains("chunked"),
            _ => {}
        }
    }
    let mut body = &raw[end + 4..];
    if !chunked {
        return Ok(Answer {
            status,
            content_type,
            body: body.to_vec(),
        });
    }
    let mut joined = Vec::new();
    while let Some(line) = body.windows(2).position(|w| w == b"\r\n") {
        let size = String::from_utf8_lossy(&body[..line]);
        let size = usize::from_str_radix(size.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|_| bad())?;
        if size == 0 {
            break;
        }
        let chunk = body.get(line + 2..line + 2 + size).ok_or_else(bad)?;
        joined.extend_from_slice(chunk);
        body = body.get(line + 4 + size..).ok_or_else(bad)?;
    }
    Ok(Answer {
        status,
        content_type,
        body: joined,
    })
}

#[tokio::test]
async fn a_report_lists_at_most_a_thousand_skipped_files_and_counts_the_rest() {
    let app = TestApp::spawn().await;
    let mut entries = Vec::new();
    for (c, name) in SHAPES.iter().enumerate() {
        for i in 0..4 {
            let image = encode(&render(c, i, 32), ImageFormat::Png);
            entries.push((format!("{name}/{i:02}.png"), image));
        }
    }
    for i in 0..2500 {
        entries.push((format!("{}/notes-{i:04}.txt", SHAPES[0]), b"x".to_vec()));
    }
    let created = app.upload_dataset(zip(&entries)).await;
    assert_eq!(created.status, StatusCode::CREATED, "{:?}", created.json);
    let report = &created.json["report"];
    assert_eq!(report["skipped"].as_array().unwrap().len(), 1000);
    assert_eq!(report["skipped_omitted"], 1500);
    assert!(report.get("duplicates_omitted").is_none());
    let id = created.json["id"].as_str().unwrap();
    let stored = app.get(&format!("/datasets/{id}")).await.json;
    assert_eq!(stored["report"]["skipped_omitted"], 1500);
}
