//! The supervisor's end of the channel to its agent: commands in (one JSON object per line),
//! events out. Commands are read from a raw descriptor, so the job loop can poll it beside the
//! stage's pipes: a running job is fed stdin and signals while it runs. Commands that are not
//! for the running job (a protocol slip: the agent sends one command at a time) wait until the
//! job is over.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::time::Duration;

use codefleet_shared::sandbox::{Command, Event};

use crate::sys;

/// A command line, decoded or not (an unreadable one is answered, not dropped).
pub type Incoming = Result<Command, String>;

pub struct Channel {
    input: OwnedFd,
    out: Box<dyn Write>,
    /// Bytes read but not yet split into lines.
    pending: Vec<u8>,
    /// Commands that arrived while a job ran and were not for it.
    deferred: VecDeque<Incoming>,
    /// The agent closed its end: it is gone.
    closed: bool,
}

impl Channel {
    pub fn new(input: OwnedFd, out: Box<dyn Write>) -> Channel {
        Channel {
            input,
            out,
            pending: Vec::new(),
            deferred: VecDeque::new(),
            closed: false,
        }
    }

    pub fn send(&mut self, event: &Event) -> io::Result<()> {
        let mut line = serde_json::to_vec(event).expect("events always serialize");
        line.push(b'\n');
        self.out.write_all(&line)?;
        self.out.flush()
    }

    /// The descriptor to poll for commands; `None` once the agent is gone.
    pub fn fd(&self) -> Option<RawFd> {
        (!self.closed).then(|| self.input.as_raw_fd())
    }

    pub fn is_closed(&self) -> bool {
        self.closed
    }

    /// The next command, waiting for it; `None` once the agent is gone.
    pub fn next(&mut self) -> Option<Incoming> {
        loop {
            if let Some(command) = self.deferred.pop_front() {
                return Some(command);
            }
            if let Some(command) = self.take_line() {
                return Some(command);
            }
            if self.closed {
                return None;
            }
            let fd = self.input.as_raw_fd();
            // Blocks until there is something to read (poll with an hour's timeout, repeated).
            match sys::poll(&[(fd, libc::POLLIN)], Duration::from_secs(3600)) {
                Ok(revents) if revents[0] != 0 => self.read_once(),
                Ok(_) => {}
                Err(_) => self.closed = true,
            }
        }
    }

    /// Reads what is there (call when the descriptor polled readable) and returns the complete
    /// commands it held.
    pub fn read_ready(&mut self) -> Vec<Incoming> {
        self.read_once();
        self.buffered()
    }

    /// The complete commands read already (with an earlier one) and not yet taken.
    pub fn buffered(&mut self) -> Vec<Incoming> {
        let mut out = Vec::new();
        while let Some(command) = self.take_line() {
            out.push(command);
        }
        out
    }

    /// Keeps `command` for after the running job.
    pub fn defer(&mut self, command: Incoming) {
        self.deferred.push_back(command);
    }

    fn read_once(&mut self) {
        let mut buf = [0u8; 64 * 1024];
        loop {
            match sys::read(&self.input, &mut buf) {
                Ok(0) => self.closed = true,
                Ok(n) => self.pending.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => self.closed = true,
            }
            return;
        }
    }

    fn take_line(&mut self) -> Option<Incoming> {
        loop {
            let end = self.pending.iter().position(|&b| b == b'\n')?;
            let line: Vec<u8> = self.pending.drain(..=end).collect();
            if self.pending.is_empty() {
                // A big job's line is not kept for the sandbox's whole life.
                self.pending.shrink_to(64 * 1024);
            }
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            return Some(
                serde_json::from_slice::<Command>(&line)
                    .map_err(|e| format!("unreadable command: {e}")),
            );
        }
    }
}
