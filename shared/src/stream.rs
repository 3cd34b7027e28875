//! The events of a streamed job: the lines of `POST /v1/execute` answered as
//! `application/x-ndjson`, and the server's messages on the `GET /v1/connect` WebSocket.
//!
//! A stream is `accepted`, then for each stage `stage_started`, its `output` chunks in the order
//! the program wrote them, and `stage_finished`; it ends with exactly one `result` (the very
//! object the buffered answer would have been) or one `error` (a problem object, e.g.
//! `node_lost` when the node went away mid-stream). Nothing follows the last event.

use serde::{Deserialize, Serialize};

use crate::api::{ExecuteResponse, LanguageRef, Status};
use crate::problem::Problem;

/// The media type of a streamed answer, asked for with `Accept`.
pub const NDJSON: &str = "application/x-ndjson";

/// The most bytes of output one `output` event carries.
pub const CHUNK_BYTES: usize = 16 * 1024;

/// Whether an `Accept` header asks for the NDJSON stream.
pub fn wants_stream(accept: Option<&str>) -> bool {
    accept.is_some_and(|a| {
        a.split(',')
            .map(|part| part.split(';').next().unwrap_or("").trim())
            .any(|media| media.eq_ignore_ascii_case(NDJSON))
    })
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum OutputStream {
    Stdout,
    Stderr,
}

/// Server → client.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum JobEvent {
    /// A sandbox took the job.
    Accepted {
        id: String,
        node: String,
        language: LanguageRef,
        queued_ms: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        sandbox: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        request_id: Option<String>,
    },
    StageStarted {
        stage: String,
    },
    /// Bytes the program wrote, as text (invalid UTF-8 replaced, as in the buffered answer).
    /// `offset` is the byte offset of this chunk in its stream; chunks never split a character.
    Output {
        stage: String,
        stream: OutputStream,
        offset: u64,
        data: String,
    },
    /// A stage's outcome without its output (which came as `output` events).
    StageFinished {
        stage: String,
        status: Status,
        exit_code: Option<i32>,
        signal: Option<String>,
        stdout_truncated: bool,
        stderr_truncated: bool,
        wall_time_ms: u64,
        cpu_time_ms: u64,
        memory_bytes: u64,
    },
    /// The last event of a job that ran: the buffered answer.
    Result {
        result: Box<ExecuteResponse>,
    },
    /// The last event of a job that could not finish (e.g. `node_lost`).
    Error {
        error: Problem,
    },
}

impl JobEvent {
    /// Whether nothing follows this event.
    pub fn is_last(&self) -> bool {
        matches!(self, JobEvent::Result { .. } | JobEvent::Error { .. })
    }

    /// One NDJSON line, newline included.
    pub fn to_line(&self) -> Vec<u8> {
        let mut line = serde_json::to_vec(self).expect("events serialize");
        line.push(b'\n');
        line
    }
}

/// Client → server on `/v1/connect`, after the first message (the execute body itself).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ClientMessage {
    /// Bytes for the program's standard input.
    Stdin { data: String },
    /// Closes the program's standard input.
    Eof {},
    /// Sends a signal to the program: `SIGKILL`, `SIGTERM`, `SIGINT`, `SIGQUIT`, `SIGHUP`,
    /// `SIGUSR1` or `SIGUSR2` (with or without the `SIG` prefix).
    Signal { signal: String },
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::problem::ErrorCode;

    #[test]
    fn accept_headers_that_ask_for_the_stream() {
        for (accept, wants) in [
            (None, false),
            (Some("application/json"), false),
            (Some("application/x-ndjson"), true),
            (Some("application/json, application/x-ndjson;q=0.9"), true),
            (Some("APPLICATION/X-NDJSON"), true),
            (Some("*/*"), false),
        ] {
            assert_eq!(wants_stream(accept), wants, "{accept:?}");
        }
    }

    #[test]
    fn events_are_tagged_single_lines() {
        let out = JobEvent::Output {
            stage: "run".into(),
            stream: OutputStream::Stdout,
            offset: 2,
            data: "a\nb".into(),
        };
        let line = out.to_line();
        assert_eq!(line.iter().filter(|b| **b == b'\n').count(), 1);
        assert_eq!(
            std::str::from_utf8(&line).unwrap(),
            "{\"type\":\"output\",\"stage\":\"run\",\"stream\":\"stdout\",\"offset\":2,\"data\":\"a\\nb\"}\n"
        );
        let err = JobEvent::Error {
            error: Problem::new(ErrorCode::NodeLost, "gone"),
        };
        let v: serde_json::Value = serde_json::from_slice(&err.to_line()).unwrap();
        assert_eq!(v["type"], "error");
        assert_eq!(v["error"]["code"], "node_lost");
        assert!(err.is_last() && !out.is_last());
    }

    #[test]
    fn client_messages() {
        let m: ClientMessage = serde_json::from_str(r#"{"type":"stdin","data":"1\n"}"#).unwrap();
        assert_eq!(m, ClientMessage::Stdin { data: "1\n".into() });
        assert!(serde_json::from_str::<ClientMessage>(r#"{"type":"eof","x":1}"#).is_err());
        assert!(serde_json::from_str::<ClientMessage>(r#"{"type":"nope"}"#).is_err());
    }
}
