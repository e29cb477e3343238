//! The first run of uploaded code happens out of the server's reach.
//!
//! Checking a TorchScript backbone (`POST /backbones`) means loading it
//! (which runs its `__setstate__`) and running a forward pass: code the
//! uploader wrote. It runs in a child process of our own binary (`finetuned
//! check-backbone`, hidden) that reads the module on stdin, then gives up
//! what the server has: it may open no file or socket, write no file, and
//! (when started as root) runs as `nobody`; its address space and CPU time
//! are capped, and the parent kills it at a wall-clock deadline. Its answer
//! is one JSON line on stdout followed by the prepared module's bytes.
//!
//! Once accepted, a module contains only allowlisted pure tensor operations
//! (`models::script_ops`), and training and serving run it in-process.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::AsyncReadExt;

use crate::models::script::{self, Inspected, Output};

/// The hidden subcommand the child runs.
pub const SUBCOMMAND: &str = "check-backbone";

/// How uploads are checked: which binary runs the check, and its limits.
#[derive(Debug, Clone)]
pub struct ScriptCheck {
    /// The `finetuned` binary (the server's own executable).
    pub program: PathBuf,
    /// Memory the check may allocate beyond what the process starts with.
    pub memory_bytes: u64,
    /// Wall-clock limit; CPU time is capped at the same number of seconds.
    pub timeout: Duration,
}

/// What the check found: the inspected module and its prepared bytes, or
/// the reasons to refuse it (shown to the uploader).
pub type CheckOutcome = Result<(Inspected, Vec<u8>), Vec<String>>;

/// The child's answer.
#[derive(Serialize, Deserialize)]
enum Verdict {
    Accepted(Inspected),
    Refused(Vec<String>),
}

/// Bound on what the child may print to stderr that we keep.
const STDERR_BYTES: u64 = 64 * 1024;

impl ScriptCheck {
    /// Checks the module at `upload` in a confined child. `Ok(Err(reasons))`
    /// is a refusal to show the uploader; `Err` a failure of ours.
    pub async fn run(
        &self,
        upload: &Path,
        image_size: i64,
        output: Output,
    ) -> std::io::Result<CheckOutcome> {
        let input = std::fs::File::open(upload)?;
        let upload_bytes = input.metadata()?.len();
        let mut child = tokio::process::Command::new(&self.program)
            .arg(SUBCOMMAND)
            .arg(image_size.to_string())
            .arg(output.name())
            .arg(self.memory_bytes.to_string())
            .arg(self.timeout.as_secs().max(1).to_string())
            .env_clear()
            .current_dir("/")
            .stdin(Stdio::from(input))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()?;
        // The prepared module is the upload plus one method.
        let stdout_limit = upload_bytes.saturating_mul(2) + 16 * 1024 * 1024;
        let mut stdout = child.stdout.take().expect("piped").take(stdout_limit);
        let mut stderr = child.stderr.take().expect("piped").take(STDERR_BYTES);
        let run = async {
            let (mut out, mut err) = (Vec::new(), Vec::new());
            let (read_out, read_err, status) = tokio::join!(
                stdout.read_to_end(&mut out),
                stderr.read_to_end(&mut err),
                child.wait()
            );
            read_out?;
            read_err?;
            Ok::<_, std::io::Error>((status?, out, err))
        };
        let (status, out, err) = match tokio::time::timeout(self.timeout, run).await {
            Ok(done) => done?,
            Err(_) => {
                return Ok(Err(vec![format!(
                    "running the module did not finish within the check's {} s limit",
                    self.timeout.as_secs()
                )]))
            }
        };
        Ok(parse_answer(&out).unwrap_or_else(|| {
            let last = String::from_utf8_lossy(&err)
                .lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .map(|l| format!(": {}", l.trim()))
                .unwrap_or_default();
            Err(vec![format!(
                "running the module failed ({status}; the check may use {} MiB and {} s of CPU){last}",
                self.memory_bytes / (1024 * 1024),
                self.timeout.as_secs()
            )])
        }))
    }
}

fn parse_answer(out: &[u8]) -> Option<CheckOutcome> {
    let newline = out.iter().position(|b| *b == b'\n')?;
    match serde_json::from_slice(&out[..newline]).ok()? {
        Verdict::Accepted(inspected) => Some(Ok((inspected, out[newline + 1..].to_vec()))),
        Verdict::Refused(reasons) => Some(Err(reasons)),
    }
}

/// The child: `finetuned check-backbone SIZE OUTPUT MEMORY_BYTES CPU_SECS`,
/// the module on stdin. Returns the process exit code.
pub fn child_main(args: &[String]) -> i32 {
    let parsed = match args {
        [size, output, memory, cpu] => size
            .parse::<i64>()
            .ok()
            .zip(Output::parse(output))
            .zip(memory.parse::<u64>().ok().zip(cpu.parse::<u64>().ok())),
        _ => None,
    };
    let Some(((image_size, output), (memory, cpu_secs))) = parsed else {
        eprintln!("usage: finetuned {SUBCOMMAND} SIZE auto|features|logits MEMORY_BYTES CPU_SECS");
        return 2;
    };
    prepare_torch();
    let mut upload = Vec::new();
    if let Err(err) = std::io::stdin().read_to_end(&mut upload) {
        eprintln!("reading the module: {err}");
        return 1;
    }
    if let Err(err) = confine(memory, cpu_secs) {
        eprintln!("confining the check: {err}");
        return 1;
    }
    let (verdict, module) = match script::inspect(&upload, image_size, output) {
        Ok((inspected, module)) => (Verdict::Accepted(inspected), module),
        Err(reasons) => (Verdict::Refused(reasons), Vec::new()),
    };
    let mut stdout = std::io::stdout().lock();
    let line = serde_json::to_vec(&verdict).expect("verdict serializes");
    let written = stdout
        .write_all(&line)
        .and_then(|_| stdout.write_all(b"\n"))
        .and_then(|_| stdout.write_all(&module))
        .and_then(|_| stdout.flush());
    i32::from(written.is_err())
}

/// One thread, and libtorch's one-time setup (which reads /proc and /sys)
/// done before files are closed off.
fn prepare_torch() {
    tch::set_num_threads(1);
    let input = tch::Tensor::zeros([1, 3, 8, 8], (tch::Kind::Float, tch::Device::Cpu));
    let weight = tch::Tensor::zeros([2, 3, 3, 3], (tch::Kind::Float, tch::Device::Cpu));
    let _ = tch::no_grad(|| input.conv2d(&weight, None::<tch::Tensor>, [1, 1], [1, 1], [1, 1], 1));
}

/// Gives up what the server's process has: new files (opening or writing),
/// privileges, unbounded memory and CPU.
fn confine(memory_bytes: u64, cpu_secs: u64) -> std::io::Result<()> {
    fn check(result: libc::c_int) -> std::io::Result<()> {
        if result == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }
    fn limit(resource: libc::__rlimit_resource_t, value: u64) -> std::io::Result<()> {
        let limit = libc::rlimit {
            rlim_cur: value,
            rlim_max: value,
        };
        // SAFETY: a valid rlimit for the duration of the call.
        check(unsafe { libc::setrlimit(resource, &limit) })
    }
    // SAFETY: plain system calls on this process, no pointers kept.
    unsafe {
        check(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0))?;
        if libc::geteuid() == 0 {
            const NOBODY: libc::uid_t = 65534;
            check(libc::setgroups(0, std::ptr::null()))?;
            check(libc::setgid(NOBODY))?;
            check(libc::setuid(NOBODY))?;
        }
    }
    limit(
        libc::RLIMIT_AS,
        address_space()?.saturating_add(memory_bytes),
    )?;
    limit(libc::RLIMIT_CPU, cpu_secs)?;
    limit(libc::RLIMIT_FSIZE, 0)?;
    limit(libc::RLIMIT_NOFILE, 0)
}

/// The process's current virtual size (libtorch maps large libraries), in bytes.
fn address_space() -> std::io::Result<u64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmSize:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kib| kib * 1024)
        .ok_or_else(|| std::io::Error::other("no VmSize in /proc/self/status"))
}
