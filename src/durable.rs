//! Files that are whole or absent, even across a crash or power loss:
//! written under a unique temporary name in the same directory, flushed to
//! disk, renamed over the final name, and the directory flushed so the
//! rename itself survives. A crash mid-write leaves only a `.partial` file,
//! which no reader opens and [`sweep_partials`] removes.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

const PARTIAL: &str = ".partial";

/// A fresh temporary name beside `path`: `.<name>.<random>.partial`.
fn partial_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(
        ".{name}.{}{PARTIAL}",
        uuid::Uuid::new_v4().simple()
    ))
}

/// Flushes a directory's entries (a rename in it) to disk.
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Writes `path` whole or not at all: `write` fills a temporary file at the
/// path it is given; it is then synced and renamed into place. On error the
/// temporary file is removed and `path` is untouched.
pub fn write_with(
    path: &Path,
    write: impl FnOnce(&Path) -> std::io::Result<()>,
) -> std::io::Result<()> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let partial = partial_path(path);
    let result = write(&partial)
        .and_then(|_| File::open(&partial)?.sync_all())
        .and_then(|_| std::fs::rename(&partial, path))
        .and_then(|_| sync_dir(dir));
    if result.is_err() {
        let _ = std::fs::remove_file(&partial);
    }
    result
}

/// Writes `bytes` to `path` whole or not at all.
pub fn write_bytes(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    write_with(path, |partial| {
        let mut file = File::create(partial)?;
        file.write_all(bytes)?;
        file.sync_all()
    })
}

/// Copies `from` to `to`, whole or not at all.
pub fn copy(from: &Path, to: &Path) -> std::io::Result<()> {
    write_with(to, |partial| std::fs::copy(from, partial).map(drop))
}

/// Removes `.partial` files under `root` older than `age` (what crashed
/// writers left; younger ones may belong to a writer still running).
/// Returns the paths removed.
pub fn sweep_partials(root: &Path, age: Duration) -> Vec<PathBuf> {
    let mut removed = Vec::new();
    let mut dirs = vec![root.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = entry.path();
            let Ok(kind) = entry.file_type() else {
                continue;
            };
            if kind.is_dir() {
                dirs.push(path);
            } else if path.to_string_lossy().ends_with(PARTIAL) {
                let old = entry
                    .metadata()
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.elapsed().ok())
                    .is_some_and(|elapsed| elapsed >= age);
                if old && std::fs::remove_file(&path).is_ok() {
                    removed.push(path);
                }
            }
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch() -> PathBuf {
        let dir = std::env::temp_dir().join(format!("durable-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn a_write_that_fails_midway_leaves_the_previous_file_and_no_partial() {
        let dir = scratch();
        let path = dir.join("best.safetensors");
        write_bytes(&path, b"epoch 1").unwrap();
        let failed = write_with(&path, |partial| {
            std::fs::write(partial, b"half of epoch")?;
            Err(std::io::Error::other("disk full"))
        });
        assert!(failed.is_err());
        assert_eq!(std::fs::read(&path).unwrap(), b"epoch 1");
        assert_eq!(names(&dir), ["best.safetensors"]);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_crash_before_the_rename_leaves_only_a_partial_that_is_swept() {
        let dir = scratch();
        let path = dir.join("model.json");
        write_bytes(&path, b"{\"v\": 1}").unwrap();
        // A process killed between writing and renaming: the hook panics
        // where the crash would be, after the temporary file is written.
        let crashed = std::panic::catch_unwind(|| {
            let _ = write_with(&path, |partial| {
                std::fs::write(partial, b"{\"v\": 2")?;
                panic!("killed before the rename");
            });
        });
        assert!(crashed.is_err());
        assert_eq!(std::fs::read(&path).unwrap(), b"{\"v\": 1}");
        let left = names(&dir);
        assert_eq!(left.len(), 2, "{left:?}");
        assert!(left.iter().any(|n| n.ends_with(".partial")));
        // Young partials may be a live writer's; old ones are swept.
        assert!(sweep_partials(&dir, Duration::from_secs(3600)).is_empty());
        assert_eq!(sweep_partials(&dir, Duration::ZERO).len(), 1);
        assert_eq!(names(&dir), ["model.json"]);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
