//! The input rules of docs/api.md that need no catalog: file names and contents, the source/files
//! choice, and limits against a configured maximum. Pure functions, shared by gateway and agent so
//! both reject the same requests before anything runs.

use base64::Engine as _;

use crate::api::{Encoding, FileSpec, Limits, ResolvedLimits};
use crate::problem::{ErrorCode, Problem};

/// At most this many files per job.
pub const MAX_FILES: usize = 64;
/// At most this many bytes in one file name (the whole relative path).
pub const MAX_FILE_NAME: usize = 255;
/// At most this many path segments in one file name.
pub const MAX_FILE_DEPTH: usize = 8;

/// At most this many `args`. The kernel refuses an exec whose arguments are too many or too
/// long (E2BIG); these maxima keep every accepted request well inside what it takes, with room
/// for the language's own command line.
pub const MAX_ARGS: usize = 1024;
/// At most this many bytes in one argument (the kernel's own cap is 128 KiB).
pub const MAX_ARG_BYTES: usize = 64 * 1024;
/// At most this many bytes in all arguments together, counting one terminating byte each.
pub const MAX_ARGS_TOTAL_BYTES: usize = 128 * 1024;

/// Checks a job's `args` against what the kernel accepts for an exec: the caller's fault
/// beyond it, rejected before anything runs.
pub fn check_args(args: &[String]) -> Result<(), Problem> {
    let bad = |why: String| Err(Problem::new(ErrorCode::InvalidRequest, why));
    if args.len() > MAX_ARGS {
        return bad(format!(
            "{} args; at most {MAX_ARGS} are accepted",
            args.len()
        ));
    }
    let mut total = 0;
    for (i, arg) in args.iter().enumerate() {
        if arg.len() > MAX_ARG_BYTES {
            return bad(format!(
                "args[{i}] is {} bytes; at most {MAX_ARG_BYTES} are accepted",
                arg.len()
            ));
        }
        if arg.contains('\0') {
            return bad(format!("args[{i}] holds a NUL byte"));
        }
        total += arg.len() + 1;
    }
    if total > MAX_ARGS_TOTAL_BYTES {
        return bad(format!(
            "args take {total} bytes; at most {MAX_ARGS_TOTAL_BYTES} are accepted"
        ));
    }
    Ok(())
}

/// A file ready to be written into the sandbox's work dir.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobFile {
    pub name: String,
    pub content: Vec<u8>,
}

/// Checks one file name: a relative path of `[A-Za-z0-9._-]` segments, no `.`/`..` segment,
/// and no segment starting with `-` (a compiler or interpreter given the entry file, or a
/// glob of the work dir, would read it as an option).
pub fn check_file_name(name: &str) -> Result<(), Problem> {
    check_relative_path(name, "file name", false)
}

/// At most this many `outputs` per job.
pub const MAX_OUTPUTS: usize = 32;

/// Checks a job's `outputs`: names or globs of files the program writes, below the work dir.
/// Each follows the file name rules, except that a segment may also hold `*` (any run of
/// characters) and `?` (any one character); no pattern reaches outside the work dir.
pub fn check_outputs(outputs: &[String]) -> Result<(), Problem> {
    if outputs.len() > MAX_OUTPUTS {
        return Err(Problem::new(
            ErrorCode::InvalidFileName,
            format!(
                "{} outputs; at most {MAX_OUTPUTS} are allowed",
                outputs.len()
            ),
        ));
    }
    for pattern in outputs {
        check_relative_path(pattern, "output", true)?;
    }
    Ok(())
}

/// Whether `c` may appear in a file name's segment.
fn valid_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')
}

/// Whether `segment` is one segment a file name may have (what a directory entry must be
/// called for a glob of `outputs` to match it).
pub fn is_valid_segment(segment: &str) -> bool {
    !segment.is_empty()
        && segment != "."
        && segment != ".."
        && !segment.starts_with('-')
        && segment.chars().all(valid_name_char)
}

/// The path rules of file names and output patterns: relative, at most `MAX_FILE_NAME` bytes
/// and `MAX_FILE_DEPTH` segments, each segment non-empty, neither `.` nor `..`, not starting
/// with `-`, made of `[A-Za-z0-9._-]` and, for a `glob`, `*` and `?`. `what` names the thing
/// in the message.
fn check_relative_path(name: &str, what: &str, glob: bool) -> Result<(), Problem> {
    let allowed = |c: char| valid_name_char(c) || (glob && matches!(c, '*' | '?'));
    let bad = |why: &str| {
        Err(Problem::new(
            ErrorCode::InvalidFileName,
            format!("{what} {name:?} {why}"),
        ))
    };
    if name.is_empty() {
        return bad("is empty");
    }
    if name.len() > MAX_FILE_NAME {
        return bad(&format!("is longer than {MAX_FILE_NAME} bytes"));
    }
    if name.starts_with('/') {
        return bad("is absolute");
    }
    let segments: Vec<&str> = name.split('/').collect();
    if segments.len() > MAX_FILE_DEPTH {
        return bad(&format!("has more than {MAX_FILE_DEPTH} path segments"));
    }
    for segment in segments {
        if segment.is_empty() {
            return bad("has an empty path segment");
        }
        if segment == "." || segment == ".." {
            return bad("has a '.' or '..' segment");
        }
        if segment.starts_with('-') {
            return bad("has a segment starting with '-', which a command would read as an option");
        }
        if let Some(c) = segment.chars().find(|c| !allowed(*c)) {
            let wildcards = if glob { " * ?" } else { "" };
            return bad(&format!(
                "contains {c:?}; allowed are A-Z a-z 0-9 . _ -{wildcards} and / between segments"
            ));
        }
    }
    Ok(())
}

/// Turns `source` or `files` into the job's files. `default_name` names a lone `source`.
pub fn job_files(
    source: Option<&str>,
    files: Option<&[FileSpec]>,
    default_name: &str,
) -> Result<Vec<JobFile>, Problem> {
    match (source, files) {
        (Some(_), Some(_)) => Err(Problem::new(
            ErrorCode::InvalidRequest,
            "give either `source` or `files`, not both",
        )),
        (None, None) => Err(Problem::new(
            ErrorCode::InvalidRequest,
            "one of `source` or `files` is required",
        )),
        (Some(source), None) => Ok(vec![JobFile {
            name: default_name.to_string(),
            content: source.as_bytes().to_vec(),
        }]),
        (None, Some([])) => Err(Problem::new(
            ErrorCode::InvalidRequest,
            "`files` must hold at least one file",
        )),
        (None, Some(files)) if files.len() > MAX_FILES => Err(Problem::new(
            ErrorCode::InvalidFileName,
            format!("{} files; at most {MAX_FILES} are allowed", files.len()),
        )),
        (None, Some(files)) => {
            let mut out: Vec<JobFile> = Vec::with_capacity(files.len());
            for file in files {
                check_file_name(&file.name)?;
                if out.iter().any(|f| f.name == file.name) {
                    return Err(Problem::new(
                        ErrorCode::InvalidFileName,
                        format!("file name {:?} appears twice", file.name),
                    ));
                }
                let content = match file.encoding {
                    Encoding::Utf8 => file.content.as_bytes().to_vec(),
                    Encoding::Base64 => base64::engine::general_purpose::STANDARD
                        .decode(file.content.as_bytes())
                        .map_err(|e| {
                            Problem::new(
                                ErrorCode::InvalidRequest,
                                format!("file {:?} is not valid base64: {e}", file.name),
                            )
                        })?,
                };
                out.push(JobFile {
                    name: file.name.clone(),
                    content,
                });
            }
            // A file may not also be a directory of another file (`a` and `a/b`).
            for f in &out {
                let prefix = format!("{}/", f.name);
                if out.iter().any(|g| g.name.starts_with(&prefix)) {
                    return Err(Problem::new(
                        ErrorCode::InvalidFileName,
                        format!("file name {:?} is also used as a directory", f.name),
                    ));
                }
            }
            Ok(out)
        }
    }
}

/// Fills missing limits from `defaults` and rejects any value above `max`, or zero.
pub fn resolve_limits(
    asked: Option<&Limits>,
    defaults: &ResolvedLimits,
    max: &ResolvedLimits,
) -> Result<ResolvedLimits, Problem> {
    let asked = asked.copied().unwrap_or_default();
    let pick = |name: &str, v: Option<u64>, d: u64, m: u64| -> Result<u64, Problem> {
        match v {
            None => Ok(d.min(m)),
            Some(0) => Err(Problem::new(
                ErrorCode::InvalidRequest,
                format!("limits.{name} must be positive"),
            )),
            Some(v) if v > m => Err(Problem::new(
                ErrorCode::LimitExceedsMax,
                format!("limits.{name} = {v} is above the maximum of {m}"),
            )),
            Some(v) => Ok(v),
        }
    };
    Ok(ResolvedLimits {
        wall_time_ms: pick(
            "wall_time_ms",
            asked.wall_time_ms,
            defaults.wall_time_ms,
            max.wall_time_ms,
        )?,
        cpu_time_ms: pick(
            "cpu_time_ms",
            asked.cpu_time_ms,
            defaults.cpu_time_ms,
            max.cpu_time_ms,
        )?,
        compile_wall_time_ms: pick(
            "compile_wall_time_ms",
            asked.compile_wall_time_ms,
            defaults.compile_wall_time_ms,
            max.compile_wall_time_ms,
        )?,
        memory_bytes: pick(
            "memory_bytes",
            asked.memory_bytes,
            defaults.memory_bytes,
            max.memory_bytes,
        )?,
        processes: pick(
            "processes",
            asked.processes,
            defaults.processes,
            max.processes,
        )?,
        output_bytes: pick(
            "output_bytes",
            asked.output_bytes,
            defaults.output_bytes,
            max.output_bytes,
        )?,
        file_size_bytes: pick(
            "file_size_bytes",
            asked.file_size_bytes,
            defaults.file_size_bytes,
            max.file_size_bytes,
        )?,
        output_files: pick(
            "output_files",
            asked.output_files,
            defaults.output_files,
            max.output_files,
        )?,
        output_files_bytes: pick(
            "output_files_bytes",
            asked.output_files_bytes,
            defaults.output_files_bytes,
            max.output_files_bytes,
        )?,
    })
}

/// Depth of nesting of a JSON text (arrays and objects), counted without parsing it, so a
/// deeply nested body is rejected before serde recurses into it.
pub fn json_depth(body: &[u8]) -> usize {
    let (mut depth, mut max, mut in_string, mut escaped) = (0usize, 0usize, false, false);
    for &b in body {
        if in_string {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'{' | b'[' => {
                depth += 1;
                max = max.max(depth);
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    max
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(name: &str) -> FileSpec {
        FileSpec {
            name: name.to_string(),
            content: "x".to_string(),
            encoding: Encoding::Utf8,
        }
    }

    #[test]
    fn file_name_rules() {
        let table: &[(&str, bool)] = &[
            ("main.py", true),
            ("src/lib/util.rs", true),
            ("A-b_c.9", true),
            ("", false),
            ("/etc/passwd", false),
            ("../x", false),
            ("a/../b", false),
            ("./a", false),
            ("a//b", false),
            ("a/", false),
            ("nul\0byte", false),
            ("space name", false),
            ("ünï", false),
            ("a\\b", false),
            ("-version.java", false),
            ("--help.cpp", false),
            ("-o.rs", false),
            ("src/-x.go", false),
            ("a-b.c", true),
        ];
        for (name, ok) in table {
            assert_eq!(check_file_name(name).is_ok(), *ok, "{name:?}");
            if !ok {
                assert_eq!(
                    check_file_name(name).unwrap_err().code,
                    ErrorCode::InvalidFileName
                );
            }
        }
        assert!(check_file_name(&"a".repeat(256)).is_err());
        assert!(check_file_name(&["a"; 9].join("/")).is_err());
    }

    #[test]
    fn output_rules_are_the_file_name_rules_with_wildcards() {
        let table: &[(&str, bool)] = &[
            ("plot.png", true),
            ("*.png", true),
            ("out/*", true),
            ("out/?/*.csv", true),
            ("*", true),
            ("", false),
            ("/etc/passwd", false),
            ("/*", false),
            ("..", false),
            ("../*", false),
            ("out/../../x", false),
            ("-x", false),
            ("*/-*", false),
            ("a\0b", false),
            ("a\nb", false),
            ("[ab].txt", false),
            ("a//b", false),
            ("~/x", false),
        ];
        for (pattern, ok) in table {
            let got = check_outputs(&[pattern.to_string()]);
            assert_eq!(got.is_ok(), *ok, "{pattern:?}");
            if let Err(p) = got {
                assert_eq!(p.code, ErrorCode::InvalidFileName);
                assert!(p.detail.starts_with("output "), "{}", p.detail);
            }
        }
        assert!(check_outputs(&vec!["a".to_string(); MAX_OUTPUTS]).is_ok());
        let many = check_outputs(&vec!["a".to_string(); MAX_OUTPUTS + 1]).unwrap_err();
        assert_eq!(many.code, ErrorCode::InvalidFileName);
        assert!(
            check_file_name("*.png").is_err(),
            "no wildcard in a file name"
        );
        for (segment, ok) in [
            ("a.png", true),
            (".hidden", true),
            ("-x", false),
            ("..", false),
            ("a b", false),
            ("", false),
        ] {
            assert_eq!(is_valid_segment(segment), ok, "{segment:?}");
        }
    }

    #[test]
    fn args_within_what_the_kernel_accepts() {
        let many = |n: usize, len: usize| vec!["a".repeat(len); n];
        let table: &[(Vec<String>, bool)] = &[
            (vec![], true),
            (many(MAX_ARGS, 1), true),
            (many(MAX_ARGS + 1, 1), false),
            (many(1, MAX_ARG_BYTES), true),
            (many(1, MAX_ARG_BYTES + 1), false),
            (many(2, MAX_ARG_BYTES - 1), true),
            (many(3, MAX_ARG_BYTES - 1), false),
            (vec!["a\0b".to_string()], false),
        ];
        for (args, ok) in table {
            let got = check_args(args);
            assert_eq!(
                got.is_ok(),
                *ok,
                "{} args of {:?} bytes",
                args.len(),
                args.first().map(String::len)
            );
            if let Err(p) = got {
                assert_eq!(p.code, ErrorCode::InvalidRequest);
            }
        }
    }

    #[test]
    fn source_xor_files() {
        let both = job_files(Some("x"), Some(&[file("a")]), "main.py");
        assert_eq!(both.unwrap_err().code, ErrorCode::InvalidRequest);
        let neither = job_files(None, None, "main.py");
        assert_eq!(neither.unwrap_err().code, ErrorCode::InvalidRequest);
        let source = job_files(Some("print(1)"), None, "main.py").unwrap();
        assert_eq!(source[0].name, "main.py");
        let dup = job_files(None, Some(&[file("a"), file("a")]), "x");
        assert_eq!(dup.unwrap_err().code, ErrorCode::InvalidFileName);
        let dir_clash = job_files(None, Some(&[file("a"), file("a/b")]), "x");
        assert_eq!(dir_clash.unwrap_err().code, ErrorCode::InvalidFileName);
    }

    #[test]
    fn base64_files_decode() {
        let f = FileSpec {
            name: "data.bin".into(),
            content: "AAEC/w==".into(),
            encoding: Encoding::Base64,
        };
        let out = job_files(None, Some(&[f]), "x").unwrap();
        assert_eq!(out[0].content, vec![0, 1, 2, 255]);
        let bad = FileSpec {
            name: "d".into(),
            content: "!!".into(),
            encoding: Encoding::Base64,
        };
        assert_eq!(
            job_files(None, Some(&[bad]), "x").unwrap_err().code,
            ErrorCode::InvalidRequest
        );
    }

    #[test]
    fn limits_default_and_max() {
        let d = ResolvedLimits::DEFAULT;
        let m = ResolvedLimits::MAX;
        assert_eq!(resolve_limits(None, &d, &m).unwrap(), d);
        let asked = Limits {
            wall_time_ms: Some(100),
            ..Limits::default()
        };
        assert_eq!(
            resolve_limits(Some(&asked), &d, &m).unwrap().wall_time_ms,
            100
        );
        let too_much = Limits {
            memory_bytes: Some(m.memory_bytes + 1),
            ..Limits::default()
        };
        let err = resolve_limits(Some(&too_much), &d, &m).unwrap_err();
        assert_eq!(err.code, ErrorCode::LimitExceedsMax);
        assert!(err.detail.contains(&m.memory_bytes.to_string()));
        let zero = Limits {
            processes: Some(0),
            ..Limits::default()
        };
        assert_eq!(
            resolve_limits(Some(&zero), &d, &m).unwrap_err().code,
            ErrorCode::InvalidRequest
        );
    }

    #[test]
    fn json_depth_counts_nesting_outside_strings() {
        assert_eq!(json_depth(br#"{"a":[1,{"b":2}]}"#), 3);
        assert_eq!(json_depth(br#"{"a":"[[[[{{{"}"#), 1);
        assert_eq!(json_depth(br#"{"a":"\"[[["}"#), 1);
        assert_eq!(json_depth(&b"[".repeat(1000)), 1000);
    }
}
