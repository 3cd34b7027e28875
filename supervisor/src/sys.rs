//! Thin, checked wrappers over the Linux calls the supervisor needs. Every `unsafe` block of the
//! crate lives here, each with the reason it is sound.
#![allow(unsafe_code)]

use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Makes this process undumpable, so the job user cannot open `/proc/1/fd` or `/proc/1/mem`
/// even if uids were ever shared.
pub fn set_non_dumpable() {
    // SAFETY: prctl with PR_SET_DUMPABLE takes plain integers and touches no memory of ours.
    unsafe {
        libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0);
    }
}

/// A pipe whose both ends close on exec.
pub fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: `fds` is a valid array of two ints for pipe2 to fill.
    check(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) })?;
    // SAFETY: pipe2 succeeded, so both descriptors are open and owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

pub fn set_nonblocking(fd: &OwnedFd) -> io::Result<()> {
    let raw = fd.as_raw_fd();
    // SAFETY: fcntl on a descriptor we own, with integer arguments only.
    let flags = check(unsafe { libc::fcntl(raw, libc::F_GETFL) })?;
    // SAFETY: as above.
    check(unsafe { libc::fcntl(raw, libc::F_SETFL, flags | libc::O_NONBLOCK) })?;
    Ok(())
}

pub fn read(fd: &OwnedFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: `buf` is valid for writes of `buf.len()` bytes.
    let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

pub fn write(fd: &OwnedFd, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: `buf` is valid for reads of `buf.len()` bytes.
    let n = unsafe { libc::write(fd.as_raw_fd(), buf.as_ptr().cast(), buf.len()) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// A descriptor that becomes readable when process `pid` exits.
pub fn pidfd_open(pid: libc::pid_t) -> io::Result<OwnedFd> {
    // SAFETY: the pidfd_open syscall takes a pid and flags and returns a new descriptor.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the syscall succeeded, so `fd` is a fresh descriptor owned by us alone.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// Waits for readiness on `fds` (events per entry) for at most `timeout`. Returns revents.
pub fn poll(fds: &[(RawFd, i16)], timeout: Duration) -> io::Result<Vec<i16>> {
    let mut pfds: Vec<libc::pollfd> = fds
        .iter()
        .map(|&(fd, events)| libc::pollfd {
            fd,
            events,
            revents: 0,
        })
        .collect();
    let ms = timeout.as_millis().min(i32::MAX as u128) as libc::c_int;
    // SAFETY: `pfds` is a valid, properly sized array of pollfd structures.
    let ret = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, ms) };
    if ret < 0 {
        let err = io::Error::last_os_error();
        if err.kind() == io::ErrorKind::Interrupted {
            return Ok(vec![0; fds.len()]);
        }
        return Err(err);
    }
    Ok(pfds.iter().map(|p| p.revents).collect())
}

/// Sends SIGKILL to every process in this pid namespace but ourselves (we are PID 1).
pub fn kill_all() {
    // SAFETY: kill(-1, SIGKILL) has no memory effects; as PID 1 it spares us.
    unsafe {
        libc::kill(-1, libc::SIGKILL);
    }
}

/// Sends `signal` to every process in this pid namespace but ourselves: every process of the
/// running job (nothing else but the supervisor runs in a sandbox).
pub fn signal_all(signal: libc::c_int) {
    // SAFETY: kill(-1, sig) has no memory effects; as PID 1 it spares us.
    unsafe {
        libc::kill(-1, signal);
    }
}

/// Blocks SIGCHLD for the supervisor and returns a non-blocking descriptor that becomes readable
/// whenever a child (or an orphan reparented to PID 1) exits, so the main loop can reap at once.
/// Children get an empty signal mask back before they exec (see `child`).
pub fn sigchld_fd() -> io::Result<OwnedFd> {
    // SAFETY: a zeroed sigset_t is valid input for sigemptyset, which initialises it.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a live local; these calls only write into it and the signal mask.
    unsafe {
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGCHLD);
    }
    // SAFETY: as above; the old mask is not needed.
    check(unsafe { libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) })?;
    // SAFETY: signalfd with -1 creates a new descriptor for the signals in `set`.
    let fd = check(unsafe { libc::signalfd(-1, &set, libc::SFD_NONBLOCK | libc::SFD_CLOEXEC) })?;
    // SAFETY: signalfd succeeded, so `fd` is a fresh descriptor owned by us alone.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Empties a signalfd of the signals queued on it.
pub fn drain_signals(fd: &OwnedFd) {
    let mut buf = [0u8; 8 * 128];
    while matches!(read(fd, &mut buf), Ok(n) if n > 0) {}
}

/// The state of a child reaped by `wait_any`.
pub struct Reaped {
    pub pid: libc::pid_t,
    pub status: libc::c_int,
    pub rusage: libc::rusage,
}

/// Reaps one exited child without blocking, if any. `Ok(None)`: children exist, none exited;
/// `Err` with ECHILD: no children at all.
pub fn wait_any() -> io::Result<Option<Reaped>> {
    let mut status = 0;
    // SAFETY: a zeroed rusage is a valid value for wait4 to overwrite.
    let mut rusage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: both out-pointers point to live locals.
    let pid = unsafe { libc::wait4(-1, &mut status, libc::WNOHANG, &mut rusage) };
    match pid {
        p if p < 0 => Err(io::Error::last_os_error()),
        0 => Ok(None),
        pid => Ok(Some(Reaped {
            pid,
            status,
            rusage,
        })),
    }
}

pub fn exit_code(status: libc::c_int) -> Option<i32> {
    libc::WIFEXITED(status).then(|| libc::WEXITSTATUS(status))
}

pub fn term_signal(status: libc::c_int) -> Option<i32> {
    libc::WIFSIGNALED(status).then(|| libc::WTERMSIG(status))
}

pub fn signal_name(sig: i32) -> String {
    let name = match sig {
        libc::SIGHUP => "SIGHUP",
        libc::SIGINT => "SIGINT",
        libc::SIGQUIT => "SIGQUIT",
        libc::SIGILL => "SIGILL",
        libc::SIGTRAP => "SIGTRAP",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGFPE => "SIGFPE",
        libc::SIGKILL => "SIGKILL",
        libc::SIGUSR1 => "SIGUSR1",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGUSR2 => "SIGUSR2",
        libc::SIGPIPE => "SIGPIPE",
        libc::SIGALRM => "SIGALRM",
        libc::SIGTERM => "SIGTERM",
        libc::SIGXCPU => "SIGXCPU",
        libc::SIGXFSZ => "SIGXFSZ",
        libc::SIGSYS => "SIGSYS",
        _ => return format!("SIG{sig}"),
    };
    name.to_string()
}

/// Switches the effective user and group (and with them the filesystem ids) for writes done on
/// the job user's behalf; `restore_root` undoes it. The saved ids stay 0, so the switch back
/// needs no capability.
pub fn become_user(uid: u32, gid: u32) -> io::Result<()> {
    // SAFETY: plain id-changing syscalls with integer arguments.
    check(unsafe { libc::setegid(gid) })?;
    // SAFETY: as above.
    check(unsafe { libc::seteuid(uid) })?;
    Ok(())
}

pub fn restore_root() -> io::Result<()> {
    // SAFETY: plain id-changing syscalls with integer arguments.
    check(unsafe { libc::seteuid(0) })?;
    // SAFETY: as above.
    check(unsafe { libc::setegid(0) })?;
    Ok(())
}

/// Removes one System V IPC object of the given kind (`shm`, `msg` or `sem`) by id.
pub fn ipc_remove(kind: &str, id: i32) -> io::Result<()> {
    // SAFETY: IPC_RMID takes no buffer (a null pointer is allowed for shm and msg; sem takes
    // no fourth argument for IPC_RMID).
    let ret = unsafe {
        match kind {
            "shm" => libc::shmctl(id, libc::IPC_RMID, std::ptr::null_mut()),
            "msg" => libc::msgctl(id, libc::IPC_RMID, std::ptr::null_mut()),
            _ => libc::semctl(id, 0, libc::IPC_RMID),
        }
    };
    check(ret).map(|_| ())
}

pub fn online_cpus() -> u64 {
    // SAFETY: sysconf takes an integer and returns one.
    let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    n.max(1) as u64
}

/// Everything a forked child needs, prepared before the fork so the child allocates nothing.
pub struct Exec {
    pub path: CString,
    pub argv: Vec<CString>,
    pub envp: Vec<CString>,
    pub workdir: CString,
    pub uid: u32,
    pub gid: u32,
    pub rlimits: Vec<(libc::__rlimit_resource_t, u64)>,
    /// `/proc/self/oom_score_adj`, prepared before the fork.
    pub oom_score_adj_path: CString,
}

/// Which step of starting a stage's process failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpawnStep {
    Fork,
    Descriptors,
    Rlimits,
    Workdir,
    User,
    /// `execve` itself: the program cannot be run as given (too long arguments, not an
    /// executable, missing): the job's doing, not the sandbox's.
    Exec,
}

impl SpawnStep {
    fn from_code(code: i32) -> SpawnStep {
        match code {
            1 => SpawnStep::Descriptors,
            2 => SpawnStep::Rlimits,
            3 => SpawnStep::Workdir,
            4 | 5 => SpawnStep::User,
            _ => SpawnStep::Exec,
        }
    }
}

/// Starting a stage's process failed at `step` with `error`.
#[derive(Debug)]
pub struct SpawnError {
    pub step: SpawnStep,
    pub error: io::Error,
}

impl std::fmt::Display for SpawnError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}: {}", self.step, self.error)
    }
}

/// Forks and execs `exec` with the given descriptors as stdin, stdout and stderr. A failure
/// between fork and exec is reported through a close-on-exec pipe as the failed step and its
/// errno.
pub fn spawn(
    exec: &Exec,
    stdin: &OwnedFd,
    stdout: &OwnedFd,
    stderr: &OwnedFd,
) -> Result<libc::pid_t, SpawnError> {
    let fork_failed = |error| SpawnError {
        step: SpawnStep::Fork,
        error,
    };
    let (err_r, err_w) = pipe().map_err(fork_failed)?;
    let argv: Vec<*const libc::c_char> = exec
        .argv
        .iter()
        .map(|a| a.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect();
    let envp: Vec<*const libc::c_char> = exec
        .envp
        .iter()
        .map(|a| a.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect();
    let (fd0, fd1, fd2) = (stdin.as_raw_fd(), stdout.as_raw_fd(), stderr.as_raw_fd());
    // SAFETY: the supervisor is single-threaded, so the child may run any code; still, the
    // child only makes raw syscalls on data prepared above and ends in execve or _exit.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(fork_failed(io::Error::last_os_error()));
    }
    if pid == 0 {
        // SAFETY: in the child; every pointer refers to memory prepared before the fork.
        unsafe { child(exec, fd0, fd1, fd2, err_w.as_raw_fd(), &argv, &envp) }
    }
    drop(err_w);
    let mut buf = [0u8; 8];
    let n = loop {
        match read(&err_r, &mut buf) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => break other.map_err(fork_failed)?,
        }
    };
    if n == 8 {
        let step = i32::from_ne_bytes(buf[..4].try_into().expect("four bytes"));
        let errno = i32::from_ne_bytes(buf[4..].try_into().expect("four bytes"));
        // The child is gone (it called _exit); reap it so it is no zombie.
        // SAFETY: waitpid on our own child with a null status pointer.
        unsafe { libc::waitpid(pid, std::ptr::null_mut(), 0) };
        return Err(SpawnError {
            step: SpawnStep::from_code(step),
            error: io::Error::from_raw_os_error(errno),
        });
    }
    Ok(pid)
}

/// The child half of `spawn`. Never returns.
///
/// # Safety
/// Must be called only in a freshly forked child, with pointers valid for the whole call.
unsafe fn child(
    exec: &Exec,
    fd0: RawFd,
    fd1: RawFd,
    fd2: RawFd,
    err_w: RawFd,
    argv: &[*const libc::c_char],
    envp: &[*const libc::c_char],
) -> ! {
    let fail = |step: libc::c_int| -> ! {
        let errno = *libc::__errno_location();
        let mut bytes = [0u8; 8];
        bytes[..4].copy_from_slice(&step.to_ne_bytes());
        bytes[4..].copy_from_slice(&errno.to_ne_bytes());
        libc::write(err_w, bytes.as_ptr().cast(), 8);
        libc::_exit(127)
    };
    // A fresh session, so nothing of the job shares our process group.
    libc::setsid();
    // Default dispositions and an empty mask: Rust ignores SIGPIPE in the supervisor, and an
    // ignored signal would stay ignored across exec.
    for sig in 1..32 {
        if sig != libc::SIGKILL && sig != libc::SIGSTOP {
            libc::signal(sig, libc::SIG_DFL);
        }
    }
    let mut set: libc::sigset_t = std::mem::zeroed();
    libc::sigemptyset(&mut set);
    libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
    if libc::dup2(fd0, 0) < 0 || libc::dup2(fd1, 1) < 0 || libc::dup2(fd2, 2) < 0 {
        fail(1);
    }
    // The job's processes are the memory cgroup's first choice when it runs out, never the
    // supervisor (raising one's own score needs no privilege; best effort).
    let adj = libc::open(
        exec.oom_score_adj_path.as_ptr(),
        libc::O_WRONLY | libc::O_CLOEXEC,
    );
    if adj >= 0 {
        libc::write(adj, b"1000".as_ptr().cast(), 4);
        libc::close(adj);
    }
    for &(resource, value) in &exec.rlimits {
        let lim = libc::rlimit {
            rlim_cur: value,
            rlim_max: value,
        };
        if libc::setrlimit(resource, &lim) < 0 {
            fail(2);
        }
    }
    // Below the supervisor's priority, so PID 1 gets the CPU it needs to enforce limits even
    // when the job saturates the container's quota. Only a privileged process could undo it.
    libc::setpriority(libc::PRIO_PROCESS, 0, 5);
    if libc::chdir(exec.workdir.as_ptr()) < 0 {
        fail(3);
    }
    if libc::setgroups(0, std::ptr::null()) < 0
        || libc::setresgid(exec.gid, exec.gid, exec.gid) < 0
        || libc::setresuid(exec.uid, exec.uid, exec.uid) < 0
    {
        fail(4);
    }
    // Paranoia: the switch must be irreversible.
    if libc::setuid(0) == 0 {
        fail(5);
    }
    libc::execve(exec.path.as_ptr(), argv.as_ptr(), envp.as_ptr());
    fail(6)
}

/// Whether `path` names a regular file with any execute bit.
pub fn is_executable(path: &CStr) -> bool {
    // SAFETY: a zeroed stat is a valid value for stat to overwrite; `path` is NUL-terminated.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let ok = unsafe { libc::stat(path.as_ptr(), &mut st) } == 0;
    ok && (st.st_mode & libc::S_IFMT) == libc::S_IFREG && st.st_mode & 0o111 != 0
}
