//! One server per data dir: an exclusive lock on `DATA_DIR/server.lock`.
//!
//! Two servers on one store would each believe they own every task in it
//! (both dispatch, both time out, both retry). The lock is a `flock` (std's
//! [`std::fs::File::try_lock`] on Linux), so the kernel releases it when the
//! process ends however it ends, SIGKILL included: a stale lock file never
//! keeps a server from starting. The file holds the holder's pid, for the
//! error a second server prints.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// The lock file's name inside the data dir.
pub const LOCK_FILE: &str = "server.lock";

/// Why the data dir could not be locked.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another process holds the lock.
    #[error(
        "data dir {} is in use by another openclaw-server (pid {pid}, lock file {}); \
         two servers must not share a data dir",
        dir.display(),
        file.display()
    )]
    Held {
        dir: PathBuf,
        file: PathBuf,
        /// The pid written by the holder, or "unknown" if it could not be read.
        pid: String,
    },
    #[error("cannot lock data dir {} (lock file {}): {source}", dir.display(), file.display())]
    Io {
        dir: PathBuf,
        file: PathBuf,
        source: std::io::Error,
    },
}

/// The held lock: released when dropped, or when the process ends.
#[derive(Debug)]
pub struct DataDirLock {
    _file: File,
    path: PathBuf,
}

impl DataDirLock {
    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Creates `dir` if needed and takes the exclusive lock on
/// `dir/server.lock` without waiting, writing this process's pid into it.
pub fn acquire(dir: &Path) -> Result<DataDirLock, LockError> {
    let file_path = dir.join(LOCK_FILE);
    let io = |source| LockError::Io {
        dir: dir.to_path_buf(),
        file: file_path.clone(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(io)?;
    // Not truncated on open: before the lock is ours, the pid in it is the
    // holder's, and the error below reads it.
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&file_path)
        .map_err(io)?;
    match file.try_lock() {
        Ok(()) => {}
        Err(TryLockError::WouldBlock) => {
            let mut text = String::new();
            let _ = file.read_to_string(&mut text);
            let pid = text.trim();
            // Empty: the holder has the lock but has not written its pid yet.
            let pid = if pid.is_empty() || pid.len() > 20 {
                "unknown".to_string()
            } else {
                pid.to_string()
            };
            return Err(LockError::Held {
                dir: dir.to_path_buf(),
                file: file_path,
                pid,
            });
        }
        Err(TryLockError::Error(e)) => return Err(io(e)),
    }
    file.set_len(0)
        .and_then(|()| file.seek(SeekFrom::Start(0)))
        .and_then(|_| writeln!(file, "{}", std::process::id()))
        .and_then(|()| file.flush())
        .map_err(io)?;
    Ok(DataDirLock {
        _file: file,
        path: file_path,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_is_refused_with_the_holders_pid_and_freed_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let held = acquire(dir.path()).unwrap();
        let text = std::fs::read_to_string(held.path()).unwrap();
        assert_eq!(text.trim(), std::process::id().to_string());
        // flock locks belong to the open file description: a second open in
        // the same process conflicts like another process would.
        let err = acquire(dir.path()).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains(&dir.path().display().to_string()),
            "names the dir: {msg}"
        );
        assert!(
            msg.contains(&format!("pid {}", std::process::id())),
            "names the pid: {msg}"
        );
        drop(held);
        acquire(dir.path()).expect("free again once dropped");
    }
}
