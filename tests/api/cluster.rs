//! The embedded cluster as operators share it: the subcommands and a second
//! server on the same data directory leave a serving process's cluster
//! running, and a killed postmaster comes back on its own. These run the
//! real binary without `DATABASE_URL`.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::helpers::{free_port, weights_dir};

/// A short data directory (the cluster's socket path must be short); on drop
/// its postmaster is stopped, whatever the test left, and it is removed.
struct DataDir(PathBuf);

impl DataDir {
    fn new() -> Self {
        let id = &uuid::Uuid::new_v4().simple().to_string()[..8];
        let dir = PathBuf::from(format!("/tmp/ftc-{id}"));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    fn path(&self) -> &Path {
        &self.0
    }

    fn postmaster(&self) -> Option<i32> {
        postmaster_of(&self.0)
    }

    fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.0.join(name)).unwrap_or_default()
    }
}

impl Drop for DataDir {
    fn drop(&mut self) {
        if let Some(pid) = self.postmaster() {
            // SIGINT: Postgres's fast shutdown.
            unsafe { libc::kill(pid, libc::SIGINT) };
            let started = Instant::now();
            while alive(pid) && started.elapsed() < Duration::from_secs(20) {
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The live postmaster's pid, from the first line of `postmaster.pid`.
fn postmaster_of(data: &Path) -> Option<i32> {
    let text = std::fs::read_to_string(data.join("postgres/postmaster.pid")).ok()?;
    let pid = text.lines().next()?.trim().parse().ok()?;
    alive(pid).then_some(pid)
}

/// Running: it exists and is no zombie (our init may not reap it).
fn alive(pid: i32) -> bool {
    let exists = unsafe { libc::kill(pid, 0) } == 0;
    exists
        && std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|stat| stat.rsplit_once(')').map(|(_, rest)| rest.to_string()))
            .is_some_and(|rest| !rest.trim_start().starts_with(['Z', 'X']))
}

fn finetuned(data: &DataDir, args: &[&str], log: &str) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_finetuned"));
    cmd.args(args)
        .env_remove("DATABASE_URL")
        .env_remove("FINETUNED_ARTIFACT_URL")
        .env("FINETUNED_DATA_DIR", data.path())
        .env("FINETUNED_WEIGHTS_DIR", weights_dir())
        .env("FINETUNED_TORCH_THREADS", "1")
        .env("FINETUNED_DEVICE", "cpu")
        .env("RUST_LOG", "info")
        .stderr(std::fs::File::create(data.path().join(log)).unwrap());
    cmd
}

/// A running `serve`, killed if the test ends early.
struct Server {
    child: Child,
    port: u16,
}

impl Server {
    fn start(data: &DataDir, log: &str) -> Self {
        let port = free_port();
        let listen = format!("127.0.0.1:{port}");
        let child = finetuned(data, &["serve", "--workers", "0", "--listen", &listen], log)
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("the finetuned binary starts");
        let mut server = Self { child, port };
        let started = Instant::now();
        while get(port, "/readyz", None).map(|r| r.0) != Some(200) {
            if let Some(status) = server.child.try_wait().unwrap() {
                panic!("serve exited with {status:?}; log:\n{}", data.log(log));
            }
            assert!(
                started.elapsed() < Duration::from_secs(120),
                "serve not ready after 2 minutes; log:\n{}",
                data.log(log)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        server
    }

    fn terminate(&mut self) -> ExitStatus {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "serve ignored SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `GET path` on the loopback port: the status and body, `None` when the
/// server could not be reached.
fn get(port: u16, path: &str, token: Option<&str>) -> Option<(u16, String)> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .ok()?;
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    let request =
        format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n{auth}\r\n");
    stream.write_all(request.as_bytes()).ok()?;
    let mut reply = Vec::new();
    stream.read_to_end(&mut reply).ok()?;
    let reply = String::from_utf8_lossy(&reply).into_owned();
    let status = reply.split(' ').nth(1)?.parse().ok()?;
    let body = reply
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string();
    Some((status, body))
}

/// Runs a subcommand to its end: its stdout, or a panic with its log.
fn run(data: &DataDir, args: &[&str]) -> String {
    let log = format!("{}.log", args.join("-").replace(' ', "_"));
    let out = finetuned(data, args, &log)
        .stdout(std::process::Stdio::piped())
        .output()
        .expect("the finetuned binary runs");
    assert!(
        out.status.success(),
        "finetuned {args:?} failed: {:?}; log:\n{}",
        out.status,
        data.log(&log)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Asks a server for `/readyz` and `/jobs` until stopped, keeping every
/// answer other than 200 (and 401 while the test has no key yet).
struct Watch {
    token: Arc<Mutex<Option<String>>>,
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Vec<String>>,
}

impl Watch {
    fn start(port: u16) -> Self {
        let token = Arc::new(Mutex::new(None::<String>));
        let stop = Arc::new(AtomicBool::new(false));
        let (t, s) = (token.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let mut failures = Vec::new();
            while !s.load(Ordering::Relaxed) {
                if let Some(failure) = check(port, t.lock().unwrap().clone().as_deref()) {
                    failures.push(failure);
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            failures
        });
        Self {
            token,
            stop,
            thread,
        }
    }

    fn finish(self) -> Vec<String> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap()
    }
}

/// One round of `/readyz` and `/jobs`: what went wrong, if anything.
fn check(port: u16, token: Option<&str>) -> Option<String> {
    match get(port, "/readyz", None) {
        Some((200, _)) => {}
        other => return Some(format!("/readyz: {other:?}")),
    }
    match get(port, "/jobs", token) {
        Some((200, _)) => None,
        Some((401, _)) if token.is_none() => None,
        other => Some(format!("/jobs: {other:?}")),
    }
}

#[test]
fn subcommands_and_a_second_server_leave_the_cluster_running() {
    let data = DataDir::new();
    let mut server = Server::start(&data, "serve.log");
    let postmaster = data.postmaster().expect("serve started the cluster");
    let watch = Watch::start(server.port);

    let admin = run(&data, &["keys", "create", "--scope", "admin"]);
    let admin = admin.trim().to_string();
    *watch.token.lock().unwrap() = Some(admin.clone());
    run(
        &data,
        &["keys", "create", "--scope", "predict", "--name", "spare"],
    );
    let listed = run(&data, &["keys", "list"]);
    let spare = listed
        .lines()
        .find(|line| line.ends_with("spare"))
        .and_then(|line| line.split_whitespace().next())
        .unwrap_or_else(|| panic!("the spare key is listed:\n{listed}"))
        .to_string();
    run(&data, &["keys", "revoke", &spare]);
    assert!(run(&data, &["keys", "list"]).contains("revoked"));
    run(&data, &["migrate"]);

    let mut second = Server::start(&data, "serve-2.log");
    assert_eq!(
        get(second.port, "/jobs", Some(&admin)).map(|r| r.0),
        Some(200)
    );
    assert!(second.terminate().success(), "{}", data.log("serve-2.log"));

    // Let the watch see the state after the last exit, too.
    std::thread::sleep(Duration::from_secs(3));
    let failures = watch.finish();
    assert!(
        failures.is_empty(),
        "the first server faltered: {failures:?}; log:\n{}",
        data.log("serve.log")
    );
    assert_eq!(check(server.port, Some(&admin)), None);
    assert_eq!(
        data.postmaster(),
        Some(postmaster),
        "the same cluster ran throughout"
    );
    let second_log = data.log("serve-2.log");
    assert!(second_log.contains("SIGTERM received"), "{second_log}");

    // Its starter, the last user, stops it on the way out.
    assert!(server.terminate().success(), "{}", data.log("serve.log"));
    assert_eq!(
        data.postmaster(),
        None,
        "the cluster stopped with its starter"
    );
}

#[test]
fn a_killed_postmaster_is_started_again() {
    let data = DataDir::new();
    let mut server = Server::start(&data, "serve.log");
    let killed = data.postmaster().expect("serve started the cluster");
    assert_eq!(unsafe { libc::kill(killed, libc::SIGKILL) }, 0);
    let started = Instant::now();
    // A request racing the kill may pass the liveness check and then wait
    // out the outage in the pool: ask only once the process is gone.
    while alive(killed) {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "SIGKILL ignored"
        );
        std::thread::sleep(Duration::from_millis(10));
    }

    let mut unready = None;
    loop {
        match get(server.port, "/readyz", None) {
            Some((200, _)) if unready.is_some() => break,
            Some((200, _)) => {}
            other => {
                unready.get_or_insert(other);
            }
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "not ready again 30 s after the kill (first unready answer {unready:?}); log:\n{}",
            data.log("serve.log")
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let unready = unready.unwrap();
    assert!(
        matches!(&unready, Some((503, body)) if body.contains("not running")),
        "{unready:?}"
    );
    let restarted = data.postmaster().expect("a postmaster runs again");
    assert_ne!(restarted, killed);
    // Requests recover without the server being restarted.
    assert_eq!(get(server.port, "/jobs", None).map(|r| r.0), Some(200));
    // The supervisor logs once `pg_ctl start` returns, which may be a
    // moment after the new postmaster already answers.
    let logged = Instant::now();
    while !data.log("serve.log").contains("running again")
        && logged.elapsed() < Duration::from_secs(15)
    {
        std::thread::sleep(Duration::from_millis(100));
    }
    let log = data.log("serve.log");
    assert!(log.contains("running again"), "{log}");

    // It restarted the cluster, so it stops it.
    assert!(server.terminate().success(), "{}", data.log("serve.log"));
    assert_eq!(
        data.postmaster(),
        None,
        "the cluster stopped with the server"
    );
}

#[test]
fn the_last_user_stops_the_cluster() {
    let data = DataDir::new();
    // Alone, a subcommand starts the cluster and stops it again.
    run(&data, &["keys", "list"]);
    assert_eq!(data.postmaster(), None, "keys left the cluster running");

    // A starter leaving first hands the cluster on to the others.
    let mut first = Server::start(&data, "serve.log");
    let postmaster = data.postmaster().expect("serve started the cluster");
    let mut second = Server::start(&data, "serve-2.log");
    assert!(first.terminate().success(), "{}", data.log("serve.log"));
    assert_eq!(data.postmaster(), Some(postmaster), "stopped under a user");
    assert_eq!(check(second.port, None), None);
    assert!(second.terminate().success(), "{}", data.log("serve-2.log"));
    assert_eq!(data.postmaster(), None, "the last user left it running");
}
