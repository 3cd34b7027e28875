//! The protocol between a node agent and the supervisor that runs as PID 1 in every sandbox.
//!
//! The channel is set up once, when the container starts: a unix socket that the agent binds in
//! a host directory only root may enter, mounted into the sandbox (the job's user cannot reach
//! it), or else the container's attached stdin (agent → supervisor) and stdout (supervisor →
//! agent). The socket skips dockerd and containerd-shim on every message. Each message is one JSON object on one line
//! (newline-delimited JSON): serde_json never writes a raw newline inside a value, so a line is a
//! frame however Docker splits or merges the bytes on the way. The supervisor speaks first with
//! `Hello`, which names the protocol version; an agent that does not know that version discards
//! the container. Messages carry a `type` tag, so new kinds (streamed output, for one) can be
//! added without breaking the ones here.

use serde::{Deserialize, Serialize};

use crate::api::{OutputFile, SkippedOutput, StageResult};

/// Version of this protocol. Bumped on any incompatible change (5: a job's `outputs`, collected
/// into its result; 6: the work dir's snapshot after a compile, for the compile cache).
pub const PROTOCOL_VERSION: u32 = 6;

/// Environment variable naming the unix socket the supervisor connects to. When it is absent
/// the supervisor speaks on its stdin and stdout (the container's attach stream) instead.
pub const CHANNEL_ENV: &str = "CODEFLEET_CHANNEL";
/// Where the agent mounts the channel's directory inside the sandbox.
pub const CHANNEL_DIR_IN_SANDBOX: &str = "/run/codefleet";
/// The socket's name in that directory.
pub const CHANNEL_SOCKET: &str = "agent.sock";

/// Agent → supervisor.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Command {
    /// Run a job: write its files, then run its stages in order, stopping at the first that fails.
    Job(Job),
    /// Make the sandbox as if no job had run; answered by `Ready` or `ResetFailed`.
    Reset,
    /// Answered by `Pong`; a liveness check.
    Ping,
    /// Judging: makes what the last job left in the work dir (the judged program's files and
    /// compile artifacts) the program every later run sees, out of the job user's hands: each
    /// file copied to a root-owned read-only one, each directory root-owned and sticky (the
    /// job may add entries, never change or remove the program's). Everything else a job can
    /// write is emptied and every process killed. Answered by `Ready` or `ResetFailed`.
    Freeze,
    /// Judging, between two runs: every process killed, everything the job user made removed
    /// (the work dir back to exactly what `Freeze` kept; `/tmp`, `/dev/shm`, `/dev/mqueue`
    /// and System V IPC emptied), then checked. Answered by `Ready` or `ResetFailed`.
    Restore,
    /// Bytes for the standard input of the running stage of job `id`, when that stage is
    /// `interactive`; ignored otherwise, and when no such job runs.
    Stdin { id: String, data_b64: String },
    /// Closes the standard input of job `id`'s interactive stage.
    CloseStdin { id: String },
    /// Sends `signal` (a number, e.g. 9) to every process of job `id`'s running stage.
    Signal { id: String, signal: i32 },
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Job {
    pub id: String,
    /// The unprivileged user and group the job's processes run as.
    pub uid: u32,
    pub gid: u32,
    /// Files to write below the work dir, relative paths already validated.
    pub files: Vec<SandboxFile>,
    pub stages: Vec<Stage>,
    /// Environment of every stage (the supervisor adds nothing else but `HOME` and `PATH`
    /// defaults when they are absent).
    pub env: Vec<(String, String)>,
    /// Send `StageStarted` and `Output` events while the job runs (the `Result` carries the
    /// output either way).
    #[serde(default)]
    pub stream: bool,
    /// Files to send back with the result, read after the last stage that ran.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outputs: Option<Outputs>,
    /// The compile cache: when non-zero and the job's `compile` stage ends `ok`, the work dir
    /// as the compiler left it (every regular file, at most this many bytes in all) comes back
    /// in the `Result`'s `snapshot`, taken before any later stage runs. 0: no snapshot.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub snapshot_max_bytes: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// The files a job asks back: regular files only, never through a link.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Outputs {
    /// Names or globs below the work dir, already validated (`validate::check_outputs`).
    pub patterns: Vec<String>,
    /// At most this many files are returned...
    pub max_files: u64,
    /// ...with at most this many bytes of content together.
    pub max_bytes: u64,
}

/// What the supervisor found for a job's `outputs`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Collected {
    pub files: Vec<OutputFile>,
    pub skipped: Vec<SkippedOutput>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SandboxFile {
    pub name: String,
    /// Standard base64 of the content.
    pub content_b64: String,
    #[serde(default)]
    pub executable: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Stage {
    /// `compile` or `run`; echoed back in the result.
    pub name: String,
    pub argv: Vec<String>,
    #[serde(default)]
    pub stdin: String,
    pub wall_time_ms: u64,
    pub cpu_time_ms: u64,
    /// The sandbox's memory limit as the agent configured the container; the supervisor uses it
    /// only to tell a memory kill from other kills when the cgroup cannot say.
    pub memory_bytes: u64,
    pub processes: u64,
    pub output_bytes: u64,
    pub file_size_bytes: u64,
    pub open_files: u64,
    /// Keep standard input open after `stdin` is written, fed by `Stdin` commands until
    /// `CloseStdin`.
    #[serde(default)]
    pub interactive: bool,
}

/// Supervisor → agent.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    /// First message after start.
    Hello {
        version: u32,
        /// `v1`, `v2` or `none`: which cgroup files the supervisor reads.
        cgroup: String,
    },
    /// The job was read and is about to start (sent before its files are written). A sandbox
    /// that dies before sending this did not start the job.
    Accepted {
        id: String,
    },
    /// A stage of a streaming job began (its process was started).
    StageStarted {
        id: String,
        stage: String,
    },
    /// Bytes a streaming job's stage wrote, in the order it wrote them, up to its output limit.
    /// `offset` is the position of the first byte in that stream.
    Output {
        id: String,
        stage: String,
        stream: crate::stream::OutputStream,
        offset: u64,
        data_b64: String,
    },
    /// A stage of a streaming job ended: its outcome, with empty `stdout` and `stderr` (they
    /// came as `Output`; the truncated flags are set).
    StageFinished {
        id: String,
        outcome: StageOutcome,
    },
    /// A job's outcome; one result per stage that ran, and the files its `outputs` named.
    Result {
        id: String,
        stages: Vec<StageOutcome>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        outputs: Option<Collected>,
        /// The work dir after its `compile` stage, when the job asked for it
        /// (`Job::snapshot_max_bytes`) and it held only regular files and directories within
        /// that size.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        snapshot: Option<Vec<SandboxFile>>,
    },
    /// The job could not be run at all (the sandbox is broken, not the program).
    JobFailed {
        id: String,
        message: String,
    },
    /// The sandbox is clean again and may take another job.
    Ready,
    /// Resetting failed or found something it could not remove: discard this sandbox.
    ResetFailed {
        message: String,
    },
    Pong,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StageOutcome {
    pub name: String,
    pub result: StageResult,
    /// Milliseconds past the wall limit at which the kill landed, when the stage timed out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kill_overshoot_ms: Option<f64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_single_lines() {
        let job = Command::Job(Job {
            id: "j".into(),
            uid: 1,
            gid: 1,
            files: vec![SandboxFile {
                name: "a".into(),
                content_b64: "YQo=".into(),
                executable: false,
            }],
            stages: vec![Stage {
                name: "run".into(),
                argv: vec!["echo".into(), "a\nb".into()],
                stdin: "x\ny\n".into(),
                wall_time_ms: 1,
                cpu_time_ms: 1,
                memory_bytes: 1,
                processes: 1,
                output_bytes: 1,
                file_size_bytes: 1,
                open_files: 1,
                interactive: false,
            }],
            env: vec![("A".into(), "b\nc".into())],
            stream: false,
            outputs: Some(Outputs {
                patterns: vec!["out/*.png".into()],
                max_files: 2,
                max_bytes: 10,
            }),
            snapshot_max_bytes: 0,
        });
        let line = serde_json::to_string(&job).unwrap();
        assert!(!line.contains('\n'));
        assert_eq!(serde_json::from_str::<Command>(&line).unwrap(), job);
        let hello = serde_json::to_string(&Event::Hello {
            version: PROTOCOL_VERSION,
            cgroup: "v1".into(),
        })
        .unwrap();
        assert_eq!(hello, r#"{"type":"hello","version":6,"cgroup":"v1"}"#);
    }
}
