//! codefleet-supervisor: PID 1 of every sandbox container.
//!
//! It reads commands from stdin and answers on stdout, one JSON object per line (see
//! `codefleet_shared::sandbox`). A job's files are written and its stages run as the job user,
//! and nothing of a stage outlives it. On `reset` (which the agent sends after answering its
//! caller, never for a session) the sandbox is made clean: every other process killed, every
//! writable mount emptied, System V IPC removed; `ready` follows, or `reset_failed` when anything
//! is left over, in which case the agent discards the container. A judge freezes its compiled
//! program (`freeze`) and restores the sandbox to it between runs (`restore`, see `reset`). The
//! files a job's `outputs` name are read after its last stage (`outputs`). When
//! stdin closes the agent is gone: the
//! supervisor kills everything and exits, which ends the container.
//!
//! Built statically (`-C target-feature=+crt-static`) so it runs in any image, and mounted
//! read-only into each container.

mod cgroup;
mod channel;
mod outputs;
mod reset;
mod run;
mod snapshot;
mod sys;

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use codefleet_shared::sandbox::{Command, Event, CHANNEL_ENV, PROTOCOL_VERSION};

use crate::channel::Channel;

fn main() {
    sys::set_non_dumpable();
    let cgroup = cgroup::Cgroup::detect();
    // The channel: a unix socket the agent bound in a directory only root can enter (set up
    // once at container start), or else the container's attached stdin and stdout.
    let opened: io::Result<(OwnedFd, Box<dyn io::Write>)> = match std::env::var_os(CHANNEL_ENV) {
        Some(path) => UnixStream::connect(&path)
            .and_then(|s| {
                Ok((
                    OwnedFd::from(s.try_clone()?),
                    Box::new(s) as Box<dyn io::Write>,
                ))
            })
            .map_err(|e| io::Error::other(format!("cannot connect to {path:?}: {e}"))),
        None => io::stdin()
            .as_fd()
            .try_clone_to_owned()
            .map(|fd| (fd, Box::new(io::stdout().lock()) as Box<dyn io::Write>)),
    };
    let mut chan = match opened {
        Ok((input, out)) => Channel::new(input, out),
        Err(e) => {
            eprintln!("codefleet-supervisor: {e}");
            return;
        }
    };
    let sigchld = match sys::sigchld_fd() {
        Ok(fd) => fd,
        Err(e) => {
            eprintln!("codefleet-supervisor: cannot watch for exiting children: {e}");
            return;
        }
    };
    let hello = Event::Hello {
        version: PROTOCOL_VERSION,
        cgroup: cgroup.version.to_string(),
    };
    let ctx = run::Context { cgroup, sigchld };
    if chan.send(&hello).is_err() {
        return;
    }
    let mut last_user = None;
    // A judge's program, once frozen: what `restore` brings the work dir back to.
    let mut frozen: Option<reset::Frozen> = None;
    while let Some(command) = chan.next() {
        let event = match command {
            Ok(Command::Ping) => Event::Pong,
            Ok(Command::Reset) => {
                frozen = None;
                match last_user {
                    Some((uid, gid)) => reset_event(uid, gid),
                    None => Event::Ready,
                }
            }
            Ok(Command::Freeze) => match last_user {
                Some((uid, gid)) => match reset::freeze(uid, gid) {
                    Ok(kept) => {
                        frozen = Some(kept);
                        Event::Ready
                    }
                    Err(message) => Event::ResetFailed { message },
                },
                None => Event::ResetFailed {
                    message: "no job ran here: nothing to freeze".to_string(),
                },
            },
            Ok(Command::Restore) => match (last_user, &frozen) {
                (Some((uid, gid)), Some(kept)) => match reset::restore(uid, gid, kept) {
                    Ok(()) => Event::Ready,
                    Err(message) => Event::ResetFailed { message },
                },
                _ => Event::ResetFailed {
                    message: "nothing was frozen here: nothing to restore".to_string(),
                },
            },
            // Between jobs there is no stage to feed or signal.
            Ok(Command::Stdin { .. } | Command::CloseStdin { .. } | Command::Signal { .. }) => {
                continue
            }
            Ok(Command::Job(job)) => {
                // Before anything of the job happens: until the agent has read this, it knows
                // the job did not start and may run it elsewhere if this sandbox dies.
                let accepted = Event::Accepted { id: job.id.clone() };
                if chan.send(&accepted).is_err() {
                    break;
                }
                last_user = Some((job.uid, job.gid));
                // Answer first, so the reset is off the caller's path.
                let ran = run::run_job(&job, &ctx, &mut chan).and_then(|(stages, snapshot)| {
                    // After the last stage, when nothing of the job runs any more.
                    let outputs = match &job.outputs {
                        Some(wanted) => Some(outputs::collect(wanted, job.uid, job.gid)?),
                        None => None,
                    };
                    Ok((stages, outputs, snapshot))
                });
                match ran {
                    Ok((stages, outputs, snapshot)) => Event::Result {
                        id: job.id.clone(),
                        stages,
                        outputs,
                        snapshot,
                    },
                    Err(message) => Event::JobFailed {
                        id: job.id.clone(),
                        message,
                    },
                }
            }
            Err(message) => Event::ResetFailed { message },
        };
        if chan.is_closed() || chan.send(&event).is_err() {
            break;
        }
    }
    shutdown();
}

fn reset_event(uid: u32, gid: u32) -> Event {
    match reset::reset(uid, gid) {
        Ok(()) => Event::Ready,
        Err(message) => Event::ResetFailed { message },
    }
}

fn shutdown() {
    let _ = reset::kill_and_reap(Duration::from_secs(2));
}
