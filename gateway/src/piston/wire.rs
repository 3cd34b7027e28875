//! Piston v2's bodies and messages as its clients see them (engineer-man/piston's
//! `api/src/api/v2.js` and `job.js`): what `/api/v2/*` answers, and the `/api/v2/connect`
//! messages the server sends.

use serde::Serialize;

/// One entry of `GET /api/v2/runtimes`.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Runtime {
    pub language: String,
    pub version: String,
    pub aliases: Vec<String>,
    /// The package that provides the language, when it provides several (Piston's `node` for
    /// `javascript`, `gcc` for `c` and `c++`, `mono` for `csharp`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub runtime: Option<String>,
}

/// One entry of `GET /api/v2/packages`.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Package {
    pub language: String,
    pub language_version: String,
    pub installed: bool,
}

/// One stage of an execute answer.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct Stage {
    pub stdout: String,
    pub stderr: String,
    /// stdout and stderr together, in the order the program wrote them.
    pub output: String,
    pub code: Option<i32>,
    pub signal: Option<String>,
    pub message: Option<String>,
    /// `RE`, `SG`, `TO`, `OL`, `EL`, `XX`, or null for a stage that exited with 0.
    pub status: Option<&'static str>,
    pub cpu_time: u64,
    pub wall_time: u64,
    pub memory: u64,
}

/// `POST /api/v2/execute`'s 200.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Answer {
    pub language: String,
    pub version: String,
    pub run: Stage,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub compile: Option<Stage>,
}

/// Every error body under `/api/v2/`.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Message {
    pub message: String,
}

/// What the server sends on `/api/v2/connect`.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum ServerMessage {
    /// The job was taken: the runtime that runs it.
    Runtime { language: String, version: String },
    /// A stage (`compile` or `run`) started.
    Stage { stage: String },
    /// Output of the running stage.
    Data { stream: String, data: String },
    /// A stage ended.
    Exit {
        stage: String,
        code: Option<i32>,
        signal: Option<String>,
    },
    /// The job could not be run or went wrong; the socket then closes with 4002.
    Error { message: String },
}

impl ServerMessage {
    pub fn text(&self) -> String {
        serde_json::to_string(self).expect("messages serialize")
    }
}

/// `/api/v2/connect`'s close codes, as Piston uses them.
pub mod close {
    /// A second `init`.
    pub const ALREADY_INITIALIZED: u16 = 4000;
    /// No `init` within a second of the socket opening.
    pub const INIT_TIMEOUT: u16 = 4001;
    /// After an `error` message.
    pub const NOTIFIED_ERROR: u16 = 4002;
    /// `data` or `signal` before `init`.
    pub const NOT_INITIALIZED: u16 = 4003;
    /// `data` for a stream other than stdin.
    pub const STDIN_ONLY: u16 = 4004;
    /// A signal the server does not send.
    pub const INVALID_SIGNAL: u16 = 4005;
    /// The job ended: its last `exit` was sent.
    pub const JOB_COMPLETED: u16 = 4999;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_tagged_as_piston_tags_them() {
        let exit = ServerMessage::Exit {
            stage: "run".into(),
            code: Some(0),
            signal: None,
        };
        assert_eq!(
            exit.text(),
            r#"{"type":"exit","stage":"run","code":0,"signal":null}"#
        );
        let data = ServerMessage::Data {
            stream: "stderr".into(),
            data: "x".into(),
        };
        assert_eq!(
            data.text(),
            r#"{"type":"data","stream":"stderr","data":"x"}"#
        );
        let runtime = Runtime {
            language: "python".into(),
            version: "3.11.2".into(),
            aliases: vec!["py".into()],
            runtime: None,
        };
        assert_eq!(
            serde_json::to_string(&runtime).unwrap(),
            r#"{"language":"python","version":"3.11.2","aliases":["py"]}"#
        );
    }
}
