//! Returning the sandbox to a clean state: no process but the supervisor, every writable mount
//! empty, no System V IPC object. Each step is verified; anything left over is reported so the
//! agent discards the container instead of reusing it.

use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::sys;

/// The mounts a job can write to; all are emptied between jobs.
pub const WRITABLE: &[&str] = &["/work", "/tmp", "/dev/shm", "/dev/mqueue"];

/// Kills every process but PID 1 and reaps them, waiting at most `timeout`.
pub fn kill_and_reap(timeout: Duration) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    loop {
        sys::kill_all();
        loop {
            match sys::wait_any() {
                Ok(Some(_)) => continue,
                Ok(None) => break,
                Err(_) => return Ok(()), // ECHILD: nothing left to reap
            }
        }
        if Instant::now() >= deadline {
            return Err("processes survived SIGKILL".to_string());
        }
        std::thread::sleep(Duration::from_micros(200));
    }
}

/// Full reset between jobs for a sandbox whose job user is `uid`/`gid`.
pub fn reset(uid: u32, gid: u32) -> Result<(), String> {
    kill_and_reap(Duration::from_secs(2))?;
    let others = other_processes();
    if !others.is_empty() {
        return Err(format!("processes still present: {others:?}"));
    }
    sys::become_user(uid, gid).map_err(|e| format!("switching to the job user: {e}"))?;
    let wiped = wipe_all().and_then(|()| remove_ipc());
    sys::restore_root().map_err(|e| format!("switching back to root: {e}"))?;
    wiped?;
    for dir in WRITABLE {
        if let Ok(mut entries) = fs::read_dir(dir) {
            if let Some(Ok(entry)) = entries.next() {
                return Err(format!(
                    "{} is not empty after the wipe",
                    entry.path().display()
                ));
            }
        }
    }
    let left = ipc_ids();
    if !left.is_empty() {
        return Err(format!("System V IPC objects left: {left:?}"));
    }
    Ok(())
}

fn wipe_all() -> Result<(), String> {
    for dir in WRITABLE {
        let path = Path::new(dir);
        if !path.exists() {
            continue;
        }
        wipe_contents(path).map_err(|e| format!("wiping {dir}: {e}"))?;
    }
    Ok(())
}

/// Removes everything below `dir` (not `dir` itself) without following symlinks.
pub fn wipe_contents(dir: &Path) -> io::Result<()> {
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        let meta = fs::symlink_metadata(&path)?;
        if meta.is_dir() {
            // The job may have made its own directories unreadable; it owns them, so we may
            // open them up again.
            let _ = fs::set_permissions(&path, fs::Permissions::from_mode(0o700));
            wipe_contents(&path)?;
            fs::remove_dir(&path)?;
        } else {
            fs::remove_file(&path)?;
        }
    }
    Ok(())
}

fn remove_ipc() -> Result<(), String> {
    for (kind, id) in ipc_ids() {
        sys::ipc_remove(kind, id).map_err(|e| format!("removing {kind} {id}: {e}"))?;
    }
    Ok(())
}

/// System V IPC objects in this IPC namespace, from `/proc/sysvipc`.
fn ipc_ids() -> Vec<(&'static str, i32)> {
    let mut out = Vec::new();
    for kind in ["shm", "msg", "sem"] {
        let Ok(text) = fs::read_to_string(format!("/proc/sysvipc/{kind}")) else {
            continue;
        };
        for line in text.lines().skip(1) {
            // Columns: key id ...
            if let Some(id) = line.split_whitespace().nth(1).and_then(|s| s.parse().ok()) {
                out.push((kind, id));
            }
        }
    }
    out
}

/// Pids other than our own visible in this pid namespace.
pub fn other_processes() -> Vec<u32> {
    let me = std::process::id();
    fs::read_dir("/proc")
        .map(|entries| {
            entries
                .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
                .filter(|&pid| pid != me)
                .collect()
        })
        .unwrap_or_default()
}
