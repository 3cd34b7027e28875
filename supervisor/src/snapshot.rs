//! The compile cache's side of the sandbox: the work dir as the compiler left it, read back to
//! the agent once the compile stage has ended (every process of the stage is gone by then), so
//! the agent can keep it outside every container and write it into another sandbox instead of
//! compiling the same program again.
//!
//! Read as the job user (the supervisor has no `CAP_DAC_OVERRIDE`), never following a link.
//! Only regular files and directories can be kept: anything else (a symlink, a FIFO, a socket),
//! an unreadable entry or more than the allowed bytes means no snapshot, and the program is
//! simply not cached.

use std::fs;
use std::io::Read;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;

use base64::Engine as _;
use codefleet_shared::sandbox::SandboxFile;

use crate::run::WORKDIR;
use crate::sys;

/// The work dir's regular files (paths relative to it, executable bits kept), at most
/// `max_bytes` of content in all; `None` when it cannot be kept whole.
pub fn take(uid: u32, gid: u32, max_bytes: u64) -> Option<Vec<SandboxFile>> {
    sys::become_user(uid, gid).ok()?;
    let mut files = Vec::new();
    let mut budget = max_bytes;
    let read = walk(Path::new(WORKDIR), "", &mut budget, &mut files);
    sys::restore_root().ok()?;
    read.map(|()| files)
}

fn walk(dir: &Path, prefix: &str, budget: &mut u64, out: &mut Vec<SandboxFile>) -> Option<()> {
    let mut entries: Vec<_> = fs::read_dir(dir).ok()?.collect::<Result<_, _>>().ok()?;
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let name = entry.file_name().into_string().ok()?;
        let path = entry.path();
        let relative = format!("{prefix}{name}");
        let meta = fs::symlink_metadata(&path).ok()?;
        if meta.is_dir() {
            walk(&path, &format!("{relative}/"), budget, out)?;
        } else if meta.is_file() {
            *budget = budget.checked_sub(meta.len())?;
            let mut content = Vec::with_capacity(meta.len() as usize);
            fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NOFOLLOW)
                .open(&path)
                .ok()?
                // One byte more than the size seen: a file that grew is not kept.
                .take(meta.len() + 1)
                .read_to_end(&mut content)
                .ok()?;
            if content.len() as u64 != meta.len() {
                return None;
            }
            out.push(SandboxFile {
                name: relative,
                content_b64: base64::engine::general_purpose::STANDARD.encode(&content),
                executable: meta.mode() & 0o111 != 0,
            });
        } else {
            return None;
        }
    }
    Some(())
}
