//! codefleet-supervisor: PID 1 of every sandbox container.
//!
//! It reads commands from stdin and answers on stdout, one JSON object per line (see
//! `codefleet_shared::sandbox`). A job's files are written and its stages run as the job user,
//! and nothing of a stage outlives it. On `reset` (which the agent sends after answering its
//! caller, never for a session) the sandbox is made clean: every other process killed, every
//! writable mount emptied, System V IPC removed; `ready` follows, or `reset_failed` when anything
//! is left over, in which case the agent discards the container. When stdin closes the agent is gone: the
//! supervisor kills everything and exits, which ends the container.
//!
//! Built statically (`-C target-feature=+crt-static`) so it runs in any image, and mounted
//! read-only into each container.

mod cgroup;
mod reset;
mod run;
mod sys;

use std::io::{self, BufRead, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use codefleet_shared::sandbox::{Command, Event, CHANNEL_ENV, PROTOCOL_VERSION};

fn send(out: &mut impl Write, event: &Event) -> io::Result<()> {
    let mut line = serde_json::to_vec(event).expect("events always serialize");
    line.push(b'\n');
    out.write_all(&line)?;
    out.flush()
}

fn main() {
    sys::set_non_dumpable();
    let cgroup = cgroup::Cgroup::detect();
    // The channel: a unix socket the agent bound in a directory only root can enter (set up
    // once at container start), or else the container's attached stdin and stdout.
    let (input, mut out): (Box<dyn BufRead>, Box<dyn Write>) = match std::env::var_os(CHANNEL_ENV) {
        Some(path) => match UnixStream::connect(&path).and_then(|s| Ok((s.try_clone()?, s))) {
            Ok((read, write)) => (Box::new(io::BufReader::new(read)), Box::new(write)),
            Err(e) => {
                eprintln!("codefleet-supervisor: cannot connect to {path:?}: {e}");
                return;
            }
        },
        None => (Box::new(io::stdin().lock()), Box::new(io::stdout().lock())),
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
    if send(&mut out, &hello).is_err() {
        return;
    }
    let mut last_user = None;
    for line in input.lines() {
        let Ok(line) = line else { break };
        if line.trim().is_empty() {
            continue;
        }
        let events = match serde_json::from_str::<Command>(&line) {
            Ok(Command::Ping) => vec![Event::Pong],
            Ok(Command::Reset) => vec![match last_user {
                Some((uid, gid)) => reset_event(uid, gid),
                None => Event::Ready,
            }],
            // Between jobs there is no stage to feed or signal.
            Ok(Command::Stdin { .. } | Command::CloseStdin { .. } | Command::Signal { .. }) => {
                vec![]
            }
            Ok(Command::Job(job)) => {
                // Before anything of the job happens: until the agent has read this, it knows
                // the job did not start and may run it elsewhere if this sandbox dies.
                let accepted = Event::Accepted { id: job.id.clone() };
                if send(&mut out, &accepted).is_err() {
                    break;
                }
                last_user = Some((job.uid, job.gid));
                let result = match run::run_job(&job, &ctx) {
                    Ok(stages) => Event::Result {
                        id: job.id.clone(),
                        stages,
                    },
                    Err(message) => Event::JobFailed {
                        id: job.id.clone(),
                        message,
                    },
                };
                // Answer first, so the reset is off the caller's path.
                if send(&mut out, &result).is_err() {
                    break;
                }
                continue;
            }
            Err(e) => vec![Event::ResetFailed {
                message: format!("unreadable command: {e}"),
            }],
        };
        for event in &events {
            if send(&mut out, event).is_err() {
                return shutdown();
            }
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
