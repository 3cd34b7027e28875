//! The lease on a node id: one live agent per node id on a machine. Every agent removes the
//! containers labelled with its node id when it starts, so a second agent with the same id would
//! destroy the first one's sandboxes; the lease makes the second refuse to start instead. It is
//! an exclusive `flock` on `<run dir>/<node id>.lock`, which the kernel releases when its holder
//! exits however it exits (a `kill -9` included), so a restarted agent takes over from a dead one
//! at once and never from a live one. The run dir is a host path (the sandboxes' sockets live
//! there too), so agents in containers on one host see the same locks.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// Held for the agent's whole life; dropping it (or the process ending) frees the node id.
#[derive(Debug)]
pub struct NodeLease {
    _file: File,
    pub path: PathBuf,
}

/// Another live agent holds the node id.
#[derive(Debug, thiserror::Error)]
#[error("node id {node:?} is in use by another agent on this machine ({holder}; lock {path}): give this agent another --node-id, or stop the other one")]
pub struct LeaseHeld {
    pub node: String,
    pub holder: String,
    pub path: String,
}

#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error(transparent)]
    Held(#[from] LeaseHeld),
    #[error("cannot take the lock {path}: {error}")]
    Io { path: String, error: std::io::Error },
}

impl NodeLease {
    /// Takes the lease on `node` below `run_dir`, or says who holds it.
    pub fn acquire(run_dir: &Path, node: &str) -> Result<NodeLease, LeaseError> {
        let path = run_dir.join(format!("{node}.lock"));
        let io = |error| LeaseError::Io {
            path: path.display().to_string(),
            error,
        };
        std::fs::create_dir_all(run_dir).map_err(io)?;
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                let holder = match holder.trim() {
                    "" => "pid unknown".to_string(),
                    pid => format!("pid {pid}"),
                };
                return Err(LeaseHeld {
                    node: node.to_string(),
                    holder,
                    path: path.display().to_string(),
                }
                .into());
            }
            Err(TryLockError::Error(e)) => return Err(io(e)),
        }
        // Who holds it, for the message a second agent prints.
        file.set_len(0).map_err(io)?;
        file.seek(SeekFrom::Start(0)).map_err(io)?;
        write!(file, "{}", std::process::id()).map_err(io)?;
        Ok(NodeLease { _file: file, path })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_holder_per_node_id_until_it_lets_go() {
        let dir = std::env::temp_dir().join(format!("codefleet-lease-{}", std::process::id()));
        let first = NodeLease::acquire(&dir, "n1").expect("free id");
        match NodeLease::acquire(&dir, "n1") {
            Err(LeaseError::Held(held)) => {
                assert_eq!(held.holder, format!("pid {}", std::process::id()));
                assert!(held.to_string().contains("in use"), "{held}");
            }
            other => panic!("second holder: {other:?}"),
        }
        let other = NodeLease::acquire(&dir, "n2").expect("another id is free");
        drop(first);
        let again = NodeLease::acquire(&dir, "n1").expect("free again once dropped");
        drop((again, other));
        let _ = std::fs::remove_dir_all(dir);
    }
}
