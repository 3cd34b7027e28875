//! Running one job: write its files as the job user, then run each stage as the job user with
//! rlimits, feeding stdin, capping output, and killing everything at the wall or CPU limit.
//! While a stage runs the channel is polled beside its pipes: an interactive stage is fed the
//! agent's `stdin` commands, `signal` reaches its processes, and a streaming job's output goes
//! out as `output` events as it is read (a blocked channel blocks the stage's output in turn:
//! the agent bounds how long).

use std::ffi::CString;
use std::fs;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use base64::Engine as _;
use codefleet_shared::sandbox::{Command, Event, Job, SandboxFile, Stage, StageOutcome};
use codefleet_shared::stream::{OutputStream, CHUNK_BYTES};
use codefleet_shared::{StageResult, Status};

use crate::cgroup::Cgroup;
use crate::channel::Channel;
use crate::reset::kill_and_reap;
use crate::sys;

pub const WORKDIR: &str = "/work";

/// What the supervisor holds for running jobs: the cgroup it reads and the descriptor that
/// tells it a child exited.
pub struct Context {
    pub cgroup: Cgroup,
    pub sigchld: OwnedFd,
}

/// Pending standard input of an interactive stage is capped here: bytes the agent sends beyond
/// it, before the program has read what came earlier, are dropped.
const STDIN_PENDING_MAX: usize = 1 << 20;

/// The signals a job may be sent on the agent's behalf.
const SIGNALS: &[i32] = &[
    libc::SIGKILL,
    libc::SIGTERM,
    libc::SIGINT,
    libc::SIGQUIT,
    libc::SIGHUP,
    libc::SIGUSR1,
    libc::SIGUSR2,
];

/// The events of one stage of a streaming job, sent as they happen. A send that fails means
/// the agent is gone: the stage is then killed.
struct Streamer<'a> {
    chan: &'a mut Channel,
    job: &'a str,
    stage: &'a str,
    enabled: bool,
    /// Bytes sent so far on stdout and stderr.
    offsets: [u64; 2],
}

impl Streamer<'_> {
    fn event(&mut self, event: impl FnOnce(String) -> Event) -> bool {
        !self.enabled || self.chan.send(&event(self.job.to_string())).is_ok()
    }

    /// Sends `data` of `stream`, in chunks of at most `CHUNK_BYTES`.
    fn output(&mut self, stream: OutputStream, data: &[u8]) -> bool {
        if !self.enabled {
            return true;
        }
        let index = usize::from(stream == OutputStream::Stderr);
        for chunk in data.chunks(CHUNK_BYTES) {
            let event = Event::Output {
                id: self.job.to_string(),
                stage: self.stage.to_string(),
                stream,
                offset: self.offsets[index],
                data_b64: base64::engine::general_purpose::STANDARD.encode(chunk),
            };
            self.offsets[index] += chunk.len() as u64;
            if self.chan.send(&event).is_err() {
                return false;
            }
        }
        true
    }

    /// A stage that ended before its program ran: its message streamed as its stderr.
    fn failed_before_start(&mut self, exit_code: i32, why: &str) -> StageOutcome {
        self.output(OutputStream::Stderr, why.as_bytes());
        failed_before_start(self.stage, exit_code, why)
    }
}

/// What a job's stages did, and the work dir after its compile stage when the job asked for it.
pub type Ran = (Vec<StageOutcome>, Option<Vec<SandboxFile>>);

/// Runs `job`; `Err` means the sandbox itself failed (not the program).
pub fn run_job(job: &Job, ctx: &Context, chan: &mut Channel) -> Result<Ran, String> {
    sys::become_user(job.uid, job.gid).map_err(|e| format!("switching to the job user: {e}"))?;
    let written = write_files(&job.files);
    sys::restore_root().map_err(|e| format!("switching back to root: {e}"))?;
    match written {
        Ok(()) => {}
        // The work dir is the job's own (a session's earlier executions shaped it): a file that
        // cannot be written there is the job's failure, reported like a program's.
        // Reported as the run stage, whatever stages the job has: nothing of it ran.
        Err(WriteError::Blocked(why)) => {
            let mut streamer = Streamer {
                chan,
                job: &job.id,
                stage: "run",
                enabled: job.stream,
                offsets: [0, 0],
            };
            streamer.event(|id| Event::StageStarted {
                id,
                stage: "run".into(),
            });
            let outcome = streamer.failed_before_start(1, &why);
            streamer.event(|id| finished(id, &outcome));
            return Ok((vec![outcome], None));
        }
        Err(WriteError::Internal(why)) => return Err(why),
    }

    // The `stdin` commands for the job's interactive stage, from whenever they arrive.
    let mut feed = StdinFeed {
        pending: Vec::new(),
        open: job.stages.iter().any(|s| s.interactive),
    };
    let mut outcomes = Vec::with_capacity(job.stages.len());
    let mut snapshot = None;
    for stage in &job.stages {
        let mut streamer = Streamer {
            chan: &mut *chan,
            job: &job.id,
            stage: &stage.name,
            enabled: job.stream,
            offsets: [0, 0],
        };
        let name = stage.name.clone();
        if !streamer.event(|id| Event::StageStarted { id, stage: name }) {
            return Err("the agent went away".to_string());
        }
        let outcome = run_stage(job, stage, ctx, &mut streamer, &mut feed)?;
        streamer.event(|id| finished(id, &outcome));
        if chan.is_closed() {
            return Err("the agent went away".to_string());
        }
        let failed = outcome.result.status != Status::Ok;
        outcomes.push(outcome);
        if failed {
            break;
        }
        // The stage's processes are all gone (`run_stage` reaps them): what the work dir holds
        // now is the compiler's doing alone.
        if stage.name == "compile" && job.snapshot_max_bytes > 0 {
            snapshot = crate::snapshot::take(job.uid, job.gid, job.snapshot_max_bytes);
        }
    }
    Ok((outcomes, snapshot))
}

/// A `stage_finished` event: the outcome without the output the stage streamed.
fn finished(id: String, outcome: &StageOutcome) -> Event {
    let mut outcome = outcome.clone();
    outcome.result.stdout.clear();
    outcome.result.stderr.clear();
    Event::StageFinished { id, outcome }
}

/// Why the job's files could not be written.
enum WriteError {
    /// Something in the work dir is in the way, or it is full: the job's doing.
    Blocked(String),
    /// The job message itself is broken: the agent's.
    Internal(String),
}

/// The name each file is first written under, beside its target, before it is renamed into
/// place. `~` is outside the characters a job's file names may use, so it never collides.
const PARTIAL: &str = ".codefleet~partial";

/// Writes the job's files below the work dir as the job user. The files a job sends win over
/// whatever an earlier execution of a session left at their paths: nothing is ever opened at a
/// target path (so a FIFO there cannot block the write and a symlink cannot redirect it); each
/// file is written to a new temporary file and renamed over the target, which replaces a
/// regular file, symlink, FIFO or socket there. A non-directory where a directory is needed is
/// replaced by the directory; a directory where a file must go is left alone and the job fails
/// with a message naming the file.
fn write_files(files: &[SandboxFile]) -> Result<(), WriteError> {
    for file in files {
        let content = base64::engine::general_purpose::STANDARD
            .decode(&file.content_b64)
            .map_err(|e| WriteError::Internal(format!("file {}: bad base64: {e}", file.name)))?;
        let mode = if file.executable { 0o755 } else { 0o644 };
        write_one(&file.name, &content, mode).map_err(|why| {
            WriteError::Blocked(format!("codefleet: cannot write {}: {why}\n", file.name))
        })?;
    }
    Ok(())
}

fn write_one(name: &str, content: &[u8], mode: u32) -> Result<(), String> {
    let mut segments: Vec<&str> = name.split('/').collect();
    let file_name = segments.pop().ok_or("an empty name")?;
    let mut dir = PathBuf::from(WORKDIR);
    for segment in segments {
        dir.push(segment);
        ensure_dir(&dir).map_err(|e| format!("{}: {e}", shown(&dir)))?;
    }
    let target = dir.join(file_name);
    if fs::symlink_metadata(&target).is_ok_and(|m| m.is_dir()) {
        return Err("a directory is in its place".to_string());
    }
    let partial = dir.join(PARTIAL);
    match fs::remove_file(&partial) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => {
            return Err(format!("{} is in the way: {e}", shown(&partial)))
        }
        _ => {}
    }
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&partial)
        .map_err(|e| e.to_string())?;
    let written = f.write_all(content).and_then(|()| {
        f.set_permissions(fs::Permissions::from_mode(mode))?;
        drop(f);
        fs::rename(&partial, &target)
    });
    if let Err(e) = written {
        let _ = fs::remove_file(&partial);
        return Err(e.to_string());
    }
    Ok(())
}

/// Makes `dir` a real directory: created when missing, replacing a file, symlink, FIFO or
/// socket in its place (never following a link).
fn ensure_dir(dir: &Path) -> io::Result<()> {
    match fs::symlink_metadata(dir) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => {
            fs::remove_file(dir)?;
            fs::create_dir(dir)
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => fs::create_dir(dir),
        Err(e) => Err(e),
    }
}

/// A work dir path as the job knows it (relative).
fn shown(path: &Path) -> String {
    path.strip_prefix(WORKDIR)
        .unwrap_or(path)
        .display()
        .to_string()
}

/// Finds `argv[0]` on the job's PATH, as execvp would.
fn resolve(program: &str, env: &[(String, String)]) -> Option<CString> {
    if program.contains('/') {
        return CString::new(program).ok();
    }
    let path = env
        .iter()
        .find(|(k, _)| k == "PATH")
        .map(|(_, v)| v.as_str())
        .unwrap_or(DEFAULT_PATH);
    path.split(':')
        .filter_map(|dir| CString::new(format!("{dir}/{program}")).ok())
        .find(|candidate| sys::is_executable(candidate))
}

const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

fn environment(job: &Job) -> Vec<CString> {
    let mut env: Vec<(String, String)> = job.env.clone();
    for (k, v) in [
        ("PATH", DEFAULT_PATH),
        ("HOME", WORKDIR),
        ("LANG", "C.UTF-8"),
    ] {
        if !env.iter().any(|(key, _)| key == k) {
            env.push((k.to_string(), v.to_string()));
        }
    }
    env.into_iter()
        .filter_map(|(k, v)| CString::new(format!("{k}={v}")).ok())
        .collect()
}

/// A captured stream, capped at `cap` bytes.
struct Capture {
    fd: Option<OwnedFd>,
    data: Vec<u8>,
    cap: usize,
    truncated: bool,
}

impl Capture {
    fn new(fd: OwnedFd, cap: u64) -> Capture {
        Capture {
            fd: Some(fd),
            data: Vec::new(),
            cap: cap as usize,
            truncated: false,
        }
    }

    /// Reads what is available, streaming what it keeps; returns true when the cap was
    /// exceeded (or the agent is gone: the stage must end either way).
    fn pump(&mut self, buf: &mut [u8], streamer: &mut Streamer, stream: OutputStream) -> bool {
        let before = self.data.len();
        let over = self.read_available(buf);
        let streamed = streamer.output(stream, &self.data[before..]);
        over || !streamed
    }

    fn read_available(&mut self, buf: &mut [u8]) -> bool {
        let Some(fd) = &self.fd else { return false };
        loop {
            match sys::read(fd, buf) {
                Ok(0) => {
                    self.fd = None;
                    return false;
                }
                Ok(n) => {
                    let room = self.cap.saturating_sub(self.data.len());
                    self.data.extend_from_slice(&buf[..n.min(room)]);
                    if n > room {
                        self.truncated = true;
                        self.fd = None;
                        return true;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return false,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => {
                    self.fd = None;
                    return false;
                }
            }
        }
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.data).into_owned()
    }
}

#[derive(PartialEq, Eq, Clone, Copy)]
enum Kill {
    Wall,
    Cpu,
    Output,
}

fn run_stage(
    job: &Job,
    stage: &Stage,
    ctx: &Context,
    streamer: &mut Streamer,
    feed: &mut StdinFeed,
) -> Result<StageOutcome, String> {
    let cgroup = &ctx.cgroup;
    let program = stage.argv.first().ok_or("a stage without a command")?;
    let env = environment(job);
    let path = match resolve(program, &job.env) {
        Some(p) => p,
        None => {
            let why = format!("{program}: command not found\n");
            return Ok(streamer.failed_before_start(127, &why));
        }
    };
    let Ok(argv) = stage
        .argv
        .iter()
        .map(|a| CString::new(a.as_str()))
        .collect::<Result<Vec<_>, _>>()
    else {
        let why = "codefleet: an argument holds a NUL byte\n";
        return Ok(streamer.failed_before_start(126, why));
    };
    let cpu_secs = stage.cpu_time_ms.div_ceil(1000) + 1;
    let exec = sys::Exec {
        path,
        argv,
        envp: env,
        workdir: CString::new(WORKDIR).expect("no NUL"),
        uid: job.uid,
        gid: job.gid,
        rlimits: vec![
            (libc::RLIMIT_CPU, cpu_secs),
            (libc::RLIMIT_FSIZE, stage.file_size_bytes),
            (libc::RLIMIT_NOFILE, stage.open_files),
            (libc::RLIMIT_CORE, 0),
            (libc::RLIMIT_NPROC, stage.processes),
        ],
        oom_score_adj_path: CString::new("/proc/self/oom_score_adj").expect("no NUL"),
    };

    let (in_r, in_w) = sys::pipe().map_err(|e| format!("pipe: {e}"))?;
    let (out_r, out_w) = sys::pipe().map_err(|e| format!("pipe: {e}"))?;
    let (err_r, err_w) = sys::pipe().map_err(|e| format!("pipe: {e}"))?;
    for fd in [&in_w, &out_r, &err_r] {
        sys::set_nonblocking(fd).map_err(|e| format!("fcntl: {e}"))?;
    }

    let cpu_before = cgroup.cpu_usage_us();
    let oom_before = cgroup.oom_kills();
    let started = Instant::now();
    let pid = match sys::spawn(&exec, &in_r, &out_w, &err_w) {
        Ok(pid) => pid,
        // The kernel refused the program as given (arguments too long, not executable): the
        // job's failure, reported as a shell would (126).
        Err(e) if e.step == sys::SpawnStep::Exec => {
            let why = format!("codefleet: cannot execute {program}: {}\n", e.error);
            return Ok(streamer.failed_before_start(126, &why));
        }
        Err(e) => return Err(format!("starting the stage: {e}")),
    };
    drop((in_r, out_w, err_w));
    let pidfd = sys::pidfd_open(pid).map_err(|e| format!("pidfd_open: {e}"))?;

    let wall_deadline = started + Duration::from_millis(stage.wall_time_ms);
    let cpu_budget_us = stage.cpu_time_ms * 1_000;
    let cpus = sys::online_cpus();
    // The interactive stage writes the job's feed (what came before it started included);
    // another writes its own stdin and leaves the commands to the feed.
    let mut own = StdinFeed {
        pending: stage.stdin.as_bytes().to_vec(),
        open: false,
    };
    if stage.interactive {
        feed.pending.splice(0..0, std::mem::take(&mut own.pending));
    }
    let has_stdin = if stage.interactive {
        feed.open || !feed.pending.is_empty()
    } else {
        !own.pending.is_empty()
    };
    let mut stdin_fd = has_stdin.then_some(in_w);
    let mut stdout = Capture::new(out_r, stage.output_bytes);
    let mut stderr = Capture::new(err_r, stage.output_bytes);
    let mut buf = vec![0u8; 64 * 1024];
    let mut killed: Option<Kill> = None;
    let mut overshoot_ms = None;
    let mut main_exit: Option<sys::Reaped> = None;

    while main_exit.is_none() {
        // How long until we must look again: the wall deadline, or the earliest moment the CPU
        // budget could run out with every core busy.
        let now = Instant::now();
        let mut wait = wall_deadline.saturating_duration_since(now);
        if let (Some(before), Some(now_us)) = (cpu_before, cgroup.cpu_usage_us()) {
            let used = now_us.saturating_sub(before);
            if used >= cpu_budget_us {
                killed = Some(Kill::Cpu);
                sys::kill_all();
                break;
            }
            let earliest =
                Duration::from_micros((cpu_budget_us - used) / cpus).max(Duration::from_millis(2));
            wait = wait.min(earliest);
        }
        if now >= wall_deadline {
            overshoot_ms = Some(now.duration_since(wall_deadline).as_secs_f64() * 1e3);
            killed = Some(Kill::Wall);
            sys::kill_all();
            break;
        }

        // Commands read together with an earlier one (the job's own line) are due now.
        for command in streamer.chan.buffered() {
            apply(command, job, feed, streamer.chan);
        }
        let mut fds = vec![
            (pidfd.as_raw_fd(), libc::POLLIN),
            (ctx.sigchld.as_raw_fd(), libc::POLLIN),
        ];
        let out_idx = stdout.fd.as_ref().map(|fd| {
            fds.push((fd.as_raw_fd(), libc::POLLIN));
            fds.len() - 1
        });
        let err_idx = stderr.fd.as_ref().map(|fd| {
            fds.push((fd.as_raw_fd(), libc::POLLIN));
            fds.len() - 1
        });
        let stdin = if stage.interactive { &*feed } else { &own };
        // With nothing to write, only a closed reader (POLLERR) is of interest.
        let in_idx = stdin_fd.as_ref().map(|fd| {
            let events = if stdin.pending.is_empty() {
                0
            } else {
                libc::POLLOUT
            };
            fds.push((fd.as_raw_fd(), events));
            fds.len() - 1
        });
        let chan_idx = streamer.chan.fd().map(|fd| {
            fds.push((fd, libc::POLLIN));
            fds.len() - 1
        });
        let revents = sys::poll(&fds, wait).map_err(|e| format!("poll: {e}"))?;

        if out_idx.is_some_and(|i| revents[i] != 0)
            && stdout.pump(&mut buf, streamer, OutputStream::Stdout)
        {
            killed = Some(Kill::Output);
        }
        if err_idx.is_some_and(|i| revents[i] != 0)
            && stderr.pump(&mut buf, streamer, OutputStream::Stderr)
        {
            killed = Some(Kill::Output);
        }
        if killed == Some(Kill::Output) {
            sys::kill_all();
            break;
        }
        let commands = if chan_idx.is_some_and(|i| revents[i] != 0) {
            streamer.chan.read_ready()
        } else {
            Vec::new()
        };
        for command in commands {
            apply(command, job, feed, streamer.chan);
        }
        if streamer.chan.is_closed() {
            // The agent is gone: nobody waits for this stage.
            sys::kill_all();
        }
        let stdin = if stage.interactive {
            &mut *feed
        } else {
            &mut own
        };
        if let Some(i) = in_idx {
            if revents[i] & (libc::POLLERR | libc::POLLHUP) != 0 {
                stdin_fd = None;
            } else if revents[i] & libc::POLLOUT != 0 {
                if let Some(fd) = &stdin_fd {
                    match sys::write(fd, &stdin.pending) {
                        Ok(n) => {
                            stdin.pending.drain(..n);
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                        Err(_) => stdin.pending.clear(),
                    }
                }
            }
            if stdin.pending.is_empty() && !stdin.open {
                stdin_fd = None; // closing it gives the program EOF
            }
        }
        // A child exited: the stage's process, or an orphan of the job that was reparented to
        // us. Reap them all now, so dead helpers never count against the job's process limit.
        if revents[0] != 0 || revents[1] != 0 {
            sys::drain_signals(&ctx.sigchld);
            if let Some(exit) = reap_exited(pid) {
                main_exit = Some(exit);
            }
        }
    }
    let wall = started.elapsed();
    drop(stdin_fd);

    // The main process is gone (or we killed everything): nothing of the stage may outlive it.
    sys::kill_all();
    if main_exit.is_none() {
        main_exit = reap_until(pid);
    }
    // Every writer is dead now, so the pipes reach EOF promptly.
    let drain_deadline = Instant::now() + Duration::from_millis(200);
    while (stdout.fd.is_some() || stderr.fd.is_some()) && Instant::now() < drain_deadline {
        let mut fds = Vec::new();
        for c in [&stdout, &stderr] {
            if let Some(fd) = &c.fd {
                fds.push((fd.as_raw_fd(), libc::POLLIN));
            }
        }
        let _ = sys::poll(&fds, Duration::from_millis(20));
        let out_over = stdout.pump(&mut buf, streamer, OutputStream::Stdout);
        let err_over = stderr.pump(&mut buf, streamer, OutputStream::Stderr);
        if out_over || err_over {
            killed = killed.or(Some(Kill::Output));
        }
    }
    kill_and_reap(Duration::from_secs(2))?;

    let exit = main_exit.ok_or("the stage's process vanished without a status")?;
    let cpu_us = match (cpu_before, cgroup.cpu_usage_us()) {
        (Some(a), Some(b)) => b.saturating_sub(a),
        _ => tv_us(exit.rusage.ru_utime) + tv_us(exit.rusage.ru_stime),
    };
    let memory_bytes = (exit.rusage.ru_maxrss.max(0) as u64) * 1024;
    let exit_code = sys::exit_code(exit.status);
    let signal = sys::term_signal(exit.status);
    let oom = match (oom_before, cgroup.oom_kills()) {
        (Some(a), Some(b)) => b > a,
        // Without the cgroup's word: an unexplained SIGKILL near the limit.
        _ => {
            signal == Some(libc::SIGKILL)
                && killed.is_none()
                && memory_bytes * 10 >= stage.memory_bytes * 9
        }
    };
    let status = match killed {
        Some(Kill::Output) => Status::OutputLimit,
        Some(Kill::Wall) | Some(Kill::Cpu) => Status::Timeout,
        None if oom => Status::MemoryLimit,
        None if signal == Some(libc::SIGXCPU) => Status::Timeout,
        None if signal == Some(libc::SIGXFSZ) => Status::OutputLimit,
        None if exit_code == Some(0) => Status::Ok,
        None => Status::RuntimeError,
    };
    // A signal we sent is not the program's own doing: report it only when it caused the end.
    let signal = match killed {
        Some(_) => Some(libc::SIGKILL),
        None => signal,
    };
    Ok(StageOutcome {
        name: stage.name.clone(),
        result: StageResult {
            status,
            exit_code: if killed.is_some() { None } else { exit_code },
            signal: signal.map(sys::signal_name),
            stdout: stdout.text(),
            stderr: stderr.text(),
            stdout_truncated: stdout.truncated,
            stderr_truncated: stderr.truncated,
            wall_time_ms: wall.as_millis() as u64,
            cpu_time_ms: cpu_us / 1_000,
            memory_bytes,
        },
        kill_overshoot_ms: if killed == Some(Kill::Wall) {
            overshoot_ms
        } else {
            None
        },
    })
}

/// Acts on a command that came while a stage of `job` ran.
fn apply(command: crate::channel::Incoming, job: &Job, feed: &mut StdinFeed, chan: &mut Channel) {
    match command {
        Ok(Command::Stdin { id, data_b64 }) if id == job.id => {
            let data = base64::engine::general_purpose::STANDARD
                .decode(data_b64)
                .unwrap_or_default();
            feed.feed(&data);
        }
        Ok(Command::CloseStdin { id }) if id == job.id => feed.open = false,
        Ok(Command::Signal { id, signal }) if id == job.id => {
            if SIGNALS.contains(&signal) {
                sys::signal_all(signal);
            }
        }
        // For a job that is over: nothing to do.
        Ok(Command::Stdin { .. } | Command::CloseStdin { .. } | Command::Signal { .. }) => {}
        other => chan.defer(other),
    }
}

/// The standard input still to write to a stage, and whether more may come (an interactive
/// stage until `close_stdin`).
struct StdinFeed {
    pending: Vec<u8>,
    open: bool,
}

impl StdinFeed {
    /// Queues bytes from a `stdin` command (dropped when stdin is already closed, or beyond
    /// `STDIN_PENDING_MAX` unread bytes).
    fn feed(&mut self, data: &[u8]) {
        if !self.open {
            return;
        }
        let room = STDIN_PENDING_MAX.saturating_sub(self.pending.len());
        self.pending
            .extend_from_slice(&data[..data.len().min(room)]);
    }
}

/// Reaps every child that has exited, without waiting; returns `pid`'s state if it was among
/// them. Other children (orphans that reparented to us) are forgotten.
fn reap_exited(pid: libc::pid_t) -> Option<sys::Reaped> {
    let mut main = None;
    while let Ok(Some(r)) = sys::wait_any() {
        if r.pid == pid {
            main = Some(r);
        }
    }
    main
}

/// Reaps children until `pid` is among them; other children (orphans that reparented to us)
/// are reaped and forgotten on the way.
fn reap_until(pid: libc::pid_t) -> Option<sys::Reaped> {
    loop {
        match sys::wait_any() {
            Ok(Some(r)) if r.pid == pid => return Some(r),
            Ok(Some(_)) => continue,
            Ok(None) => std::thread::sleep(Duration::from_micros(100)),
            Err(_) => return None,
        }
    }
}

fn tv_us(tv: libc::timeval) -> u64 {
    (tv.tv_sec.max(0) as u64) * 1_000_000 + tv.tv_usec.max(0) as u64
}

/// A stage that ended before its program ran, with `why` as its stderr.
fn failed_before_start(stage: &str, exit_code: i32, why: &str) -> StageOutcome {
    StageOutcome {
        name: stage.to_string(),
        result: StageResult {
            status: Status::RuntimeError,
            exit_code: Some(exit_code),
            signal: None,
            stdout: String::new(),
            stderr: why.to_string(),
            stdout_truncated: false,
            stderr_truncated: false,
            wall_time_ms: 0,
            cpu_time_ms: 0,
            memory_bytes: 0,
        },
        kill_overshoot_ms: None,
    }
}
