//! The public request and response bodies of `docs/api.md` (v1). Field names are fixed by
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
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "object_only::option_vec"
    )]
    pub files: Option<Vec<FileSpec>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdin: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub args: Option<Vec<String>>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "object_only::option"
    )]
    pub limits: Option<Limits>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub isolation: Option<Isolation>,
    /// Names or globs (below the work dir) of files the program writes, returned in the
    /// answer's `files`; see `validate::check_outputs`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outputs: Option<Vec<String>>,
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

/// Per-request limits; a missing field takes the server's default. Each value is a whole
/// number; JSON Schema counts `1000.0` as one, so it is taken too (see [`whole_number`]).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Limits {
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "whole_number"
    )]
    pub wall_time_ms: Option<u64>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "whole_number"
    )]
    pub cpu_time_ms: Option<u64>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "whole_number"
    )]
    pub compile_wall_time_ms: Option<u64>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "whole_number"
    )]
    pub memory_bytes: Option<u64>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "whole_number"
    )]
    pub processes: Option<u64>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "whole_number"
    )]
    pub output_bytes: Option<u64>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "whole_number"
    )]
    pub file_size_bytes: Option<u64>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "whole_number"
    )]
    pub output_files: Option<u64>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "whole_number"
    )]
    pub output_files_bytes: Option<u64>,
}

/// An optional non-negative whole number, as JSON Schema's `integer` means it: `1000` and
/// `1000.0` alike; `1000.5`, `-1` and numbers past `u64::MAX` are refused with serde's message.
pub mod whole_number {
    use serde::de::{self, Deserializer, Visitor};
    use serde::Serializer;

    pub fn serialize<S: Serializer>(value: &Option<u64>, serializer: S) -> Result<S::Ok, S::Error> {
        match value {
            Some(v) => serializer.serialize_u64(*v),
            None => serializer.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Option<u64>, D::Error> {
        deserializer.deserialize_option(OptionalWhole)
    }

    struct OptionalWhole;

    impl<'de> Visitor<'de> for OptionalWhole {
        type Value = Option<u64>;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a non-negative whole number")
        }

        fn visit_none<E: de::Error>(self) -> Result<Option<u64>, E> {
            Ok(None)
        }

        fn visit_unit<E: de::Error>(self) -> Result<Option<u64>, E> {
            Ok(None)
        }

        fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Option<u64>, D::Error> {
            d.deserialize_any(Whole).map(Some)
        }
    }

    struct Whole;

    /// 2^64 as a float: the first whole float that does not fit a `u64`.
    const TWO_POW_64: f64 = 18_446_744_073_709_551_616.0;

    impl Visitor<'_> for Whole {
        type Value = u64;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a non-negative whole number")
        }

        fn visit_u64<E: de::Error>(self, v: u64) -> Result<u64, E> {
            Ok(v)
        }

        fn visit_i64<E: de::Error>(self, v: i64) -> Result<u64, E> {
            u64::try_from(v).map_err(|_| E::invalid_value(de::Unexpected::Signed(v), &self))
        }

        fn visit_f64<E: de::Error>(self, v: f64) -> Result<u64, E> {
            if v.is_finite() && v.fract() == 0.0 && (0.0..TWO_POW_64).contains(&v) {
                Ok(v as u64)
            } else {
                Err(E::invalid_value(de::Unexpected::Float(v), &self))
            }
        }
    }
}

/// Objects as JSON objects only. serde's derived structs also take a JSON array of their fields
/// in order (`"limits": [1000]`), which JSON Schema's `object` does not: the request bodies and
/// their nested objects go through [`object_only::Object`] so the server takes what the spec says.
pub mod object_only {
    use std::marker::PhantomData;

    use serde::de::value::MapAccessDeserializer;
    use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};

    /// A `T` read from a JSON object, never from an array.
    #[derive(Debug, Clone, PartialEq)]
    pub struct Object<T>(pub T);

    impl<'de, T: Deserialize<'de>> Deserialize<'de> for Object<T> {
        fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
            struct Only<T>(PhantomData<T>);

            impl<'de, T: Deserialize<'de>> Visitor<'de> for Only<T> {
                type Value = T;

                fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                    f.write_str("a JSON object")
                }

                fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<T, A::Error> {
                    T::deserialize(MapAccessDeserializer::new(map))
                }
            }

            deserializer.deserialize_map(Only(PhantomData)).map(Object)
        }
    }

    /// An optional object field (`null` or absent: `None`).
    pub fn option<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
    where
        D: Deserializer<'de>,
        T: Deserialize<'de>,
    {
        let value = Option::<Object<T>>::deserialize(deserializer)?;
        Ok(value.map(|Object(v)| v))
    }

    /// An optional array of objects.
    pub fn option_vec<'de, D, T>(deserializer: D) -> Result<Option<Vec<T>>, D::Error>
    where
        D: Deserializer<'de>,
        T: Deserialize<'de>,
    {
        let value = Option::<Vec<Object<T>>>::deserialize(deserializer)?;
        Ok(value.map(|items| items.into_iter().map(|Object(v)| v).collect()))
    }
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
    /// How many of the files `outputs` names the answer carries.
    pub output_files: u64,
    /// How many bytes of their content it carries, all together.
    pub output_files_bytes: u64,
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
        output_files: 16,
        output_files_bytes: 1 << 20,
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
        output_files: 64,
        output_files_bytes: 8 << 20,
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
    /// Whether the compiled program came from the node's compile cache (an extension): present
    /// for a job whose language compiles, `true` when its compile stage was not run again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cached: Option<bool>,
    /// How the sandbox was obtained: `warm`, `fresh`, `cold` or `session` (an extension).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<String>,
    /// How many nodes the gateway tried (an extension; absent on an agent's own answer).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempts: Option<u32>,
    /// The request's `X-Request-Id` (an extension): the id every log line of this job carries,
    /// on the gateway and on the agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    /// The files the request's `outputs` named, when it named any: regular files only, in name
    /// order, at most `limits.output_files`, their contents cut at `limits.output_files_bytes`
    /// together.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub files: Option<Vec<OutputFile>>,
    /// What `outputs` named or matched and `files` does not carry, and why (at most
    /// [`MAX_SKIPPED_OUTPUTS`], in name order).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub files_skipped: Vec<SkippedOutput>,
}

/// One file of an answer's `files`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct OutputFile {
    /// Relative to the work dir, as a request's `files` names it.
    pub name: String,
    /// The file's whole size, bytes.
    pub size: u64,
    /// The content, in `encoding` (always `base64`): all of it, or its first bytes when
    /// `truncated`.
    pub content: String,
    pub encoding: Encoding,
    pub truncated: bool,
}

/// At most this many entries in an answer's `files_skipped`.
pub const MAX_SKIPPED_OUTPUTS: usize = 64;

/// A path that `outputs` named or matched whose content is not returned.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SkippedOutput {
    pub name: String,
    pub reason: SkipReason,
}

/// Why a path is in `files_skipped`. Only regular files are read: links and special files are
/// never followed or opened.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum SkipReason {
    /// A name without wildcards that names nothing.
    Missing,
    Symlink,
    Directory,
    Fifo,
    Socket,
    Device,
    /// The job's user may not read it (its mode).
    Unreadable,
    /// Past `limits.output_files`.
    CountLimit,
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
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "whole_number"
    )]
    pub ttl_s: Option<u64>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "object_only::option"
    )]
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn objects_are_objects_not_arrays() {
        use object_only::Object;
        let ok: Object<ExecuteRequest> =
            serde_json::from_str(r#"{"source": "x", "files": null, "limits": {"processes": 2}}"#)
                .unwrap();
        assert_eq!(ok.0.limits.unwrap().processes, Some(2));
        let files: ExecuteRequest =
            serde_json::from_str(r#"{"files": [{"name": "a", "content": "b"}]}"#).unwrap();
        assert_eq!(files.files.unwrap()[0].name, "a");
        for bad in [
            r#"{"limits": [1000]}"#,
            r#"{"limits": [null, null]}"#,
            r#"{"files": [["a", "b"]]}"#,
        ] {
            assert!(
                serde_json::from_str::<ExecuteRequest>(bad).is_err(),
                "{bad}"
            );
        }
        assert!(serde_json::from_str::<Object<ExecuteRequest>>(r#"["python"]"#).is_err());
        assert!(serde_json::from_str::<Object<CreateSession>>(r#"["python", "3", 60]"#).is_err());
        assert!(serde_json::from_str::<CreateSession>(r#"{"limits": [5]}"#).is_err());
    }

    #[test]
    fn whole_floats_are_integers_as_in_json_schema() {
        let limits: Limits = serde_json::from_str(
            r#"{"wall_time_ms": 1000.0, "memory_bytes": 1e8, "processes": 7}"#,
        )
        .unwrap();
        assert_eq!(limits.wall_time_ms, Some(1000));
        assert_eq!(limits.memory_bytes, Some(100_000_000));
        assert_eq!(limits.processes, Some(7));
        let session: CreateSession = serde_json::from_str(r#"{"ttl_s": 60.0}"#).unwrap();
        assert_eq!(session.ttl_s, Some(60));
        let absent: Limits = serde_json::from_str(r#"{"cpu_time_ms": null}"#).unwrap();
        assert_eq!(absent, Limits::default());
        for bad in ["1000.5", "-1", "-1.0", "1e20", "\"5\"", "true", "[1]"] {
            let text = format!(r#"{{"wall_time_ms": {bad}}}"#);
            assert!(serde_json::from_str::<Limits>(&text).is_err(), "{bad}");
        }
        let back = serde_json::to_string(&Limits {
            output_bytes: Some(5),
            ..Limits::default()
        })
        .unwrap();
        assert_eq!(back, r#"{"output_bytes":5}"#);
    }
}
