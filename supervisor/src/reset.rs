//! Returning the sandbox to a clean state: no process but the supervisor, every writable mount
//! empty, no System V IPC object. Each step is verified; anything left over is reported so the
//! agent discards the container instead of reusing it.
//!
//! Judging adds two steps: `freeze` makes the compiled program root's (read-only to the job
//! user, who may still add files beside it), and `restore` brings the sandbox back to that state
//! between two runs.

use std::collections::BTreeSet;
use std::fs;
use std::io;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::run::WORKDIR;
use crate::sys;

/// The work dir's paths a freeze kept: the judged program.
pub type Frozen = BTreeSet<PathBuf>;

/// Where the job's files wait while they are copied to root's. `~` is outside the characters a
/// job's file names may use.
const HOLD: &str = ".codefleet~frozen";

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
    // What the job user made goes as that user; what is left is root's (a judge's frozen
    // program, in root's directories) and goes as root.
    as_user(uid, gid, || {
        for dir in WRITABLE {
            let path = Path::new(dir);
            if path.exists() {
                remove_owned(path, uid)?;
            }
        }
        Ok(())
    })?;
    as_user(uid, gid, || Ok(remove_ipc()))??;
    wipe_all()?;
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

/// Runs `f` as the job user, back to root afterwards whatever it returned.
pub fn as_user<T>(uid: u32, gid: u32, f: impl FnOnce() -> io::Result<T>) -> Result<T, String> {
    sys::become_user(uid, gid).map_err(|e| format!("switching to the job user: {e}"))?;
    let out = f();
    sys::restore_root().map_err(|e| format!("switching back to root: {e}"))?;
    out.map_err(|e| e.to_string())
}

/// Removes every entry below `dir` owned by `uid` (the caller runs as that user), descending
/// into directories of others to find them.
fn remove_owned(dir: &Path, uid: u32) -> io::Result<()> {
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        let meta = fs::symlink_metadata(&path)?;
        if meta.uid() == uid {
            if meta.is_dir() {
                let _ = fs::set_permissions(&path, fs::Permissions::from_mode(0o700));
                wipe_contents(&path)?;
                fs::remove_dir(&path)?;
            } else {
                fs::remove_file(&path)?;
            }
        } else if meta.is_dir() {
            remove_owned(&path, uid)?;
        }
    }
    Ok(())
}

/// Makes the work dir as the last job left it (a judge's compiled program) root's: each file
/// copied to a root-owned one, read-only (executable where it was), each directory root-owned
/// with mode 1777, symlinks kept, anything else (FIFOs, sockets) dropped. Without `CAP_CHOWN`
/// a copy is the only way to change an owner. The job user can then add entries anywhere but
/// change or remove none of the program's (sticky directories of root's, files it cannot
/// write). Everything else the job could write is emptied. Returns the paths kept.
pub fn freeze(uid: u32, gid: u32) -> Result<Frozen, String> {
    kill_and_reap(Duration::from_secs(2))?;
    let work = Path::new(WORKDIR);
    let hold = work.join(HOLD);
    fs::create_dir(&hold)
        .and_then(|()| fs::set_permissions(&hold, fs::Permissions::from_mode(0o1777)))
        .map_err(|e| format!("making {}: {e}", hold.display()))?;
    // The user moves its own entries aside (moving a directory needs write access to it).
    as_user(uid, gid, || {
        for entry in fs::read_dir(work)? {
            let entry = entry?;
            if entry.file_name() != HOLD {
                fs::rename(entry.path(), hold.join(entry.file_name()))?;
            }
        }
        Ok(())
    })
    .map_err(|e| format!("moving the program aside: {e}"))?;
    let mut kept = Frozen::new();
    copy_tree(&hold, work, (uid, gid), &mut kept)?;
    fs::remove_dir(&hold).map_err(|e| format!("removing {}: {e}", hold.display()))?;
    empty_scratch(uid, gid)?;
    Ok(kept)
}

/// Copies `from` (the user's) into `to` (root's) as root's, removing each original once copied
/// so the scratch space holds one extra file at most.
fn copy_tree(from: &Path, to: &Path, user: (u32, u32), kept: &mut Frozen) -> Result<(), String> {
    let (uid, gid) = user;
    let entries = as_user(uid, gid, || {
        let mut out = Vec::new();
        for entry in fs::read_dir(from)? {
            let path = entry?.path();
            out.push((fs::symlink_metadata(&path)?, path));
        }
        Ok(out)
    })
    .map_err(|e| format!("reading {}: {e}", from.display()))?;
    for (meta, src) in entries {
        let dst = to.join(src.file_name().expect("an entry has a name"));
        let failed = |e: String| format!("freezing {}: {e}", dst.display());
        if meta.is_dir() {
            fs::create_dir(&dst)
                .and_then(|()| fs::set_permissions(&dst, fs::Permissions::from_mode(0o1777)))
                .map_err(|e| failed(e.to_string()))?;
            copy_tree(&src, &dst, user, kept)?;
            as_user(uid, gid, || fs::remove_dir(&src)).map_err(failed)?;
        } else if meta.is_file() {
            let mut input = as_user(uid, gid, || {
                fs::OpenOptions::new()
                    .read(true)
                    .custom_flags(libc::O_NOFOLLOW)
                    .open(&src)
            })
            .map_err(failed)?;
            let mode = if meta.mode() & 0o111 != 0 {
                0o555
            } else {
                0o444
            };
            let copied = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&dst)
                .and_then(|mut out| {
                    io::copy(&mut input, &mut out)?;
                    out.set_permissions(fs::Permissions::from_mode(mode))
                });
            copied.map_err(|e| failed(e.to_string()))?;
            as_user(uid, gid, || fs::remove_file(&src)).map_err(failed)?;
        } else {
            if meta.file_type().is_symlink() {
                let target = as_user(uid, gid, || fs::read_link(&src)).map_err(failed)?;
                std::os::unix::fs::symlink(target, &dst).map_err(|e| failed(e.to_string()))?;
            }
            as_user(uid, gid, || fs::remove_file(&src)).map_err(failed)?;
            if !meta.file_type().is_symlink() {
                continue;
            }
        }
        kept.insert(dst);
    }
    Ok(())
}

/// Empties the scratch mounts other than the work dir and removes System V IPC, as the user.
fn empty_scratch(uid: u32, gid: u32) -> Result<(), String> {
    as_user(uid, gid, || {
        for dir in WRITABLE.iter().filter(|d| **d != WORKDIR) {
            let path = Path::new(dir);
            if path.exists() {
                wipe_contents(path)?;
            }
        }
        Ok(remove_ipc())
    })?
}

/// Between two runs of a judge: every process killed, everything the job user made removed,
/// the work dir back to exactly the `frozen` paths (a name root's directories gained some other
/// way, a hard link, say, is removed as root), the other scratch mounts and IPC empty; then
/// all of that checked.
pub fn restore(uid: u32, gid: u32, frozen: &Frozen) -> Result<(), String> {
    kill_and_reap(Duration::from_secs(2))?;
    let others = other_processes();
    if !others.is_empty() {
        return Err(format!("processes still present: {others:?}"));
    }
    as_user(uid, gid, || remove_owned(Path::new(WORKDIR), uid))
        .map_err(|e| format!("emptying the work dir: {e}"))?;
    empty_scratch(uid, gid)?;
    let mut seen = Frozen::new();
    prune(Path::new(WORKDIR), frozen, &mut seen)?;
    if &seen != frozen {
        let missing: Vec<_> = frozen.difference(&seen).collect();
        return Err(format!("the program's files changed: missing {missing:?}"));
    }
    for dir in WRITABLE.iter().filter(|d| **d != WORKDIR) {
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

/// Walks root's part of the work dir (as root), removing what is not `frozen` and noting what is.
fn prune(dir: &Path, frozen: &Frozen, seen: &mut Frozen) -> Result<(), String> {
    let entries = fs::read_dir(dir).map_err(|e| format!("reading {}: {e}", dir.display()))?;
    for entry in entries {
        let path = entry.map_err(|e| e.to_string())?.path();
        let meta = fs::symlink_metadata(&path).map_err(|e| e.to_string())?;
        if meta.uid() != 0 {
            return Err(format!("{} is left after the wipe", path.display()));
        }
        if !frozen.contains(&path) {
            let removed = if meta.is_dir() {
                wipe_contents(&path).and_then(|()| fs::remove_dir(&path))
            } else {
                fs::remove_file(&path)
            };
            removed.map_err(|e| format!("removing {}: {e}", path.display()))?;
            continue;
        }
        if meta.is_dir() {
            prune(&path, frozen, seen)?;
        }
        seen.insert(path);
    }
    Ok(())
}
