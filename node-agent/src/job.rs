//! A validated job (`Prepared`: nothing deeper sees the raw request) and the supervisor's job
//! message for it.

use std::time::Duration;

use base64::Engine as _;

use codefleet_shared::sandbox::{Job, Outputs, SandboxFile, Stage};
use codefleet_shared::validate::{check_args, check_outputs, job_files, resolve_limits, JobFile};
use codefleet_shared::{ExecuteRequest, Isolation, Problem, ResolvedLimits};

use crate::catalog::Language;
use crate::config::Config;

/// Open files per job process.
pub const OPEN_FILES: u64 = 256;
/// Added to a job's own time limits when waiting for its answer.
const ANSWER_MARGIN: Duration = Duration::from_secs(10);

/// A validated job, ready for a sandbox.
#[derive(Clone)]
pub struct Prepared {
    pub language: Language,
    pub version: String,
    pub limits: ResolvedLimits,
    pub job_files: Vec<JobFile>,
    pub stdin: String,
    pub args: Vec<String>,
    pub isolation: Isolation,
    /// Keep the run stage's stdin open for the caller (a WebSocket client).
    pub interactive: bool,
    /// Names or globs of files to return with the answer (validated).
    pub outputs: Option<Vec<String>>,
}

impl Prepared {
    /// Validates an execute request for `language` at `version` completely; nothing runs for
    /// a rejected one.
    pub fn new(
        req: &ExecuteRequest,
        (language, version): (Language, String),
        config: &Config,
    ) -> Result<Prepared, Problem> {
        let files = job_files(
            req.source.as_deref(),
            req.files.as_deref(),
            &language.file_name,
        )?;
        let limits = resolve_limits(
            req.limits.as_ref(),
            &config.default_limits(),
            &config.max_limits(),
        )?;
        let args = req.args.clone().unwrap_or_default();
        check_args(&args)?;
        if let Some(outputs) = &req.outputs {
            check_outputs(outputs)?;
        }
        Ok(Prepared {
            language,
            version,
            limits,
            job_files: files,
            stdin: req.stdin.clone().unwrap_or_default(),
            args,
            isolation: req.isolation.unwrap_or_default(),
            interactive: false,
            outputs: req.outputs.clone(),
        })
    }

    /// How long to wait for the job's answer: its own limits plus a margin.
    pub fn deadline(&self) -> Duration {
        job_deadline(&self.limits)
    }

    /// The supervisor's job, run as `uid`; `stream` asks for its progress events.
    pub fn job(&self, uid: u32, config: &Config, stream: bool) -> Job {
        let entry = self.job_files[0].name.clone();
        let (compile, run) = self.language.commands(&entry, &self.args);
        let l = &self.limits;
        let stage = |name: &str,
                     argv: Vec<String>,
                     stdin: String,
                     (wall, cpu): (u64, u64),
                     file_size: u64| Stage {
            name: name.to_string(),
            argv,
            stdin,
            wall_time_ms: wall,
            cpu_time_ms: cpu,
            memory_bytes: l.memory_bytes,
            processes: l.processes,
            output_bytes: l.output_bytes,
            file_size_bytes: file_size,
            open_files: OPEN_FILES,
            interactive: false,
        };
        let mut stages = Vec::new();
        if let Some(argv) = compile {
            // Compilers and linkers write larger files than programs usually do; the tmpfs size
            // still bounds them.
            let t = l.compile_wall_time_ms;
            let file_size = config.max_limits().file_size_bytes.max(l.file_size_bytes);
            stages.push(stage("compile", argv, String::new(), (t, t), file_size));
        }
        let times = (l.wall_time_ms, l.cpu_time_ms);
        let mut run = stage("run", run, self.stdin.clone(), times, l.file_size_bytes);
        run.interactive = self.interactive;
        stages.push(run);
        Job {
            id: new_id("ex"),
            uid,
            gid: uid,
            files: self
                .job_files
                .iter()
                .map(|f| SandboxFile {
                    name: f.name.clone(),
                    content_b64: base64::engine::general_purpose::STANDARD.encode(&f.content),
                    executable: false,
                })
                .collect(),
            stages,
            env: self
                .language
                .env
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            stream,
            outputs: self.outputs.as_ref().map(|patterns| Outputs {
                patterns: patterns.clone(),
                max_files: l.output_files,
                max_bytes: l.output_files_bytes,
            }),
            snapshot_max_bytes: 0,
        }
    }
}

/// How long to wait for a job's answer: its own limits plus a margin.
pub fn job_deadline(l: &ResolvedLimits) -> Duration {
    Duration::from_millis(l.compile_wall_time_ms + l.wall_time_ms) + ANSWER_MARGIN
}

/// `ex_…`, `probe_…`: a prefix and 16 random hex digits.
pub fn new_id(prefix: &str) -> String {
    format!("{prefix}_{:016x}", rand::random::<u64>())
}
