//! The public request and response bodies of `../shared/api.md` (v1). Field names are fixed by
//! that contract; new fields may be added, none renamed.

use serde::{Deserialize, Serialize};

/// `POST /v1/execute` as it arrives: every field optional so that a missing one becomes a clear
/// `invalid_request` problem rather than a serde message. See `validate` for the checks.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ExecuteRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub language: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub files: Option<Vec<FileSpec>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdin: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub args: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<Limits>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub isolation: Option<Isolation>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct FileSpec {
    pub name: String,
    pub content: String,
    #[serde(default)]
    pub encoding: Encoding,
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Encoding {
    #[default]
    Utf8,
    Base64,
}

/// Per-request limits; a missing field takes the server's default.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Limits {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wall_time_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_time_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compile_wall_time_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub processes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file_size_bytes: Option<u64>,
}

/// Limits with every field decided: the server defaults filled in, the maxima checked.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash)]
pub struct ResolvedLimits {
    pub wall_time_ms: u64,
    pub cpu_time_ms: u64,
    pub compile_wall_time_ms: u64,
    pub memory_bytes: u64,
    pub processes: u64,
    pub output_bytes: u64,
    pub file_size_bytes: u64,
}

impl ResolvedLimits {
    /// The built-in defaults (also the defaults of the agent's configuration).
    pub const DEFAULT: ResolvedLimits = ResolvedLimits {
        wall_time_ms: 5_000,
        cpu_time_ms: 5_000,
        compile_wall_time_ms: 10_000,
        memory_bytes: 256 << 20,
        processes: 64,
        output_bytes: 64 << 10,
        file_size_bytes: 10 << 20,
    };

    /// The built-in maxima a request may ask for.
    pub const MAX: ResolvedLimits = ResolvedLimits {
        wall_time_ms: 30_000,
        cpu_time_ms: 30_000,
        compile_wall_time_ms: 60_000,
        memory_bytes: 1 << 30,
        processes: 256,
        output_bytes: 1 << 20,
        file_size_bytes: 64 << 20,
    };
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum Isolation {
    /// A warm sandbox that was reset after earlier jobs.
    #[default]
    Recycled,
    /// A sandbox that never ran another job.
    Fresh,
}

/// Outcome of one stage, and of the whole job.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Ok,
    RuntimeError,
    Timeout,
    MemoryLimit,
    OutputLimit,
    CompileError,
    InternalError,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::RuntimeError => "runtime_error",
            Status::Timeout => "timeout",
            Status::MemoryLimit => "memory_limit",
            Status::OutputLimit => "output_limit",
            Status::CompileError => "compile_error",
            Status::InternalError => "internal_error",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StageResult {
    pub status: Status,
    pub exit_code: Option<i32>,
    pub signal: Option<String>,
    pub stdout: String,
    pub stderr: String,
    pub stdout_truncated: bool,
    pub stderr_truncated: bool,
    pub wall_time_ms: u64,
    pub cpu_time_ms: u64,
    pub memory_bytes: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct LanguageRef {
    pub name: String,
    pub version: String,
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Timing {
    pub queued_ms: u64,
    pub total_ms: u64,
}

/// `200` answer of `POST /v1/execute`: the job ran, whatever the program did.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ExecuteResponse {
    pub id: String,
    pub language: LanguageRef,
    pub status: Status,
    pub compile: Option<StageResult>,
    pub run: Option<StageResult>,
    pub node: String,
    pub timing: Timing,
    /// How the sandbox was obtained: `warm`, `fresh`, `cold` or `session` (an extension).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<String>,
    /// How many nodes the gateway tried (an extension; absent on an agent's own answer).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempts: Option<u32>,
}

/// One entry of `GET /v1/languages`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LanguageInfo {
    pub name: String,
    pub aliases: Vec<String>,
    pub version: String,
    pub compiled: bool,
    pub file_name: String,
    pub nodes_ready: u32,
    /// On an agent: `preparing`, `ready` or `failed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<ImageState>,
    /// On an agent: why the image failed, when it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum ImageState {
    Preparing,
    Ready,
    Failed,
}

/// `POST /v1/sessions` body.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct CreateSession {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub language: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_s: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<Limits>,
}

/// `201` answer of `POST /v1/sessions`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SessionInfo {
    pub id: String,
    pub language: LanguageRef,
    pub node: String,
    /// RFC 3339, UTC.
    pub expires_at: String,
}
