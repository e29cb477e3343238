//! Who uses an embedded cluster, decided with flock(2) on files beside its
//! directory (not inside: initdb wants that directory empty).
//!
//! - `<dir>.lock`: every process using the cluster holds it shared for as
//!   long as it does; one that can take it exclusively is alone.
//! - `<dir>.start.lock`: held exclusively around every start, adoption,
//!   restart and stop, so those decisions never interleave.
//! - `<dir>.owner`: the postmaster pid a starter leaving before the other
//!   users handed on to them; the last of them to leave stops it.
//!
//! The kernel drops the locks of a process that dies, so none goes stale.

use std::fs::{File, OpenOptions, TryLockError};
use std::io;
use std::path::{Path, PathBuf};

fn beside(dir: &Path, suffix: &str) -> PathBuf {
    let mut name = dir.as_os_str().to_os_string();
    name.push(suffix);
    PathBuf::from(name)
}

fn open(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
}

/// Takes the start lock, waiting for another process's start or stop.
/// Opened anew each time: two threads of one process then exclude each
/// other too (a flock belongs to the open file, not the process).
pub fn control(dir: &Path) -> io::Result<File> {
    let file = open(&beside(dir, ".start.lock"))?;
    file.lock()?;
    Ok(file)
}

/// Registers this process as a user of the cluster (call under `control`).
pub fn join(dir: &Path) -> io::Result<File> {
    let file = open(&beside(dir, ".lock"))?;
    file.lock_shared()?;
    Ok(file)
}

/// Gives up this process's use (call under `control`) and says whether no
/// other process uses the cluster. The file is left unlocked.
pub fn leave(users: &File) -> io::Result<bool> {
    users.unlock()?;
    let alone = match users.try_lock() {
        Ok(()) => true,
        Err(TryLockError::WouldBlock) => false,
        Err(TryLockError::Error(err)) => return Err(err),
    };
    users.unlock()?;
    Ok(alone)
}

/// The postmaster a departed starter left to the remaining users.
pub fn handed_over(dir: &Path) -> Option<u32> {
    std::fs::read_to_string(beside(dir, ".owner"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

pub fn hand_over(dir: &Path, pid: u32) -> io::Result<()> {
    std::fs::write(beside(dir, ".owner"), pid.to_string())
}

pub fn clear_hand_over(dir: &Path) {
    let _ = std::fs::remove_file(beside(dir, ".owner"));
}
