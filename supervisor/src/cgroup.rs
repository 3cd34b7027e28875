//! Reads the sandbox container's own cgroup, v1 or v2: CPU time used by everything in the
//! container (to enforce the CPU limit across all of a job's processes) and the OOM-kill count
//! (to tell a memory-limit kill from any other SIGKILL).

use std::fs;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone)]
pub struct Cgroup {
    pub version: &'static str,
    cpu: Option<(PathBuf, CpuFormat)>,
    oom: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy)]
enum CpuFormat {
    /// v1 `cpuacct.usage`: nanoseconds.
    Nanos,
    /// v2 `cpu.stat`: a `usage_usec N` line.
    StatUsec,
}

impl Cgroup {
    pub fn detect() -> Cgroup {
        Cgroup::detect_at(Path::new("/sys/fs/cgroup"))
    }

    /// Detection below `root` (the container's cgroup mount; a test passes a folder of its own).
    pub fn detect_at(root: &Path) -> Cgroup {
        let root = root.to_path_buf();
        if root.join("cgroup.controllers").exists() {
            return Cgroup {
                version: "v2",
                cpu: Some((root.join("cpu.stat"), CpuFormat::StatUsec)),
                oom: Some(root.join("memory.events")),
            };
        }
        let cpu = ["cpuacct/cpuacct.usage", "cpu,cpuacct/cpuacct.usage"]
            .iter()
            .map(|p| root.join(p))
            .find(|p| p.exists());
        let oom = root.join("memory/memory.oom_control");
        if cpu.is_some() || oom.exists() {
            return Cgroup {
                version: "v1",
                cpu: cpu.map(|p| (p, CpuFormat::Nanos)),
                oom: oom.exists().then_some(oom),
            };
        }
        Cgroup {
            version: "none",
            cpu: None,
            oom: None,
        }
    }

    /// CPU time used by the whole container so far, in microseconds.
    pub fn cpu_usage_us(&self) -> Option<u64> {
        let (path, format) = self.cpu.as_ref()?;
        let text = fs::read_to_string(path).ok()?;
        match format {
            CpuFormat::Nanos => text.trim().parse::<u64>().ok().map(|ns| ns / 1_000),
            CpuFormat::StatUsec => field(&text, "usage_usec"),
        }
    }

    /// How many processes the kernel's OOM killer has killed in this container.
    pub fn oom_kills(&self) -> Option<u64> {
        let text = fs::read_to_string(self.oom.as_ref()?).ok()?;
        field(&text, "oom_kill")
    }
}

/// The number after `key` on a `key value` line.
fn field(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let (k, v) = line.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok()).flatten()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_root(name: &str, files: &[(&str, &str)]) -> PathBuf {
        let root =
            std::env::temp_dir().join(format!("codefleet-cgroup-{name}-{}", std::process::id()));
        for (path, content) in files {
            let p = root.join(path);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(p, content).unwrap();
        }
        root
    }

    #[test]
    fn reads_a_v2_hierarchy() {
        let root = fake_root(
            "v2",
            &[
                ("cgroup.controllers", "cpu memory pids\n"),
                (
                    "cpu.stat",
                    "usage_usec 2500\nuser_usec 2000\nsystem_usec 500\n",
                ),
                ("memory.events", "low 0\nhigh 0\nmax 4\noom 1\noom_kill 1\n"),
            ],
        );
        let cg = Cgroup::detect_at(&root);
        assert_eq!(cg.version, "v2");
        assert_eq!(cg.cpu_usage_us(), Some(2500));
        assert_eq!(cg.oom_kills(), Some(1));
        fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn reads_a_v1_hierarchy() {
        let root = fake_root(
            "v1",
            &[
                ("cpu,cpuacct/cpuacct.usage", "7000000\n"),
                (
                    "memory/memory.oom_control",
                    "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n",
                ),
            ],
        );
        let cg = Cgroup::detect_at(&root);
        assert_eq!(cg.version, "v1");
        assert_eq!(cg.cpu_usage_us(), Some(7000));
        assert_eq!(cg.oom_kills(), Some(2));
        fs::remove_dir_all(root).unwrap();
        assert_eq!(Cgroup::detect_at(Path::new("/nonexistent")).version, "none");
    }

    /// A cgroup2 hierarchy mounted for one test, with one new group in it; everything is
    /// undone on drop, a failed assertion included.
    struct Cgroup2Mount {
        mount: PathBuf,
        group: PathBuf,
        child: Option<std::process::Child>,
    }

    impl Drop for Cgroup2Mount {
        fn drop(&mut self) {
            if let Some(mut child) = self.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
            let _ = fs::remove_dir(&self.group);
            let _ = std::process::Command::new("umount")
                .arg(&self.mount)
                .status();
            let _ = fs::remove_dir(&self.mount);
        }
    }

    /// The v2 reader against the real kernel, not a fake folder: a cgroup2 hierarchy mounted
    /// here (this machine's Docker runs cgroup v1, where every controller is bound to v1, so the
    /// mount offers only the core files; `cpu.stat` is one of them). A busy process moved into
    /// a new cgroup must show up in `cpu_usage_us`; `oom_kills` reads `memory.events` when the
    /// group has the memory controller and is `None` otherwise (the supervisor then falls back
    /// to its SIGKILL-near-the-limit rule). Needs root, like the rest of the suite.
    #[test]
    fn reads_a_real_cgroup2_hierarchy() {
        use std::io::Write;
        use std::process::{Command, Stdio};

        // Every cgroup2 mount shows the same hierarchy: the group's name is this run's own.
        let unique = format!(
            "{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        );
        let mount = std::env::temp_dir().join(format!("codefleet-cgroup2-{unique}"));
        fs::create_dir_all(&mount).unwrap();
        let mut cg2 = Cgroup2Mount {
            group: mount.join(format!("codefleet-test-{unique}")),
            mount,
            child: None,
        };
        let mounted = Command::new("mount")
            .args(["-t", "cgroup2", "none"])
            .arg(&cg2.mount)
            .status()
            .expect("running mount");
        assert!(
            mounted.success(),
            "mounting cgroup2 at {:?} (needs root)",
            cg2.mount
        );
        fs::create_dir(&cg2.group).unwrap();
        let cg = Cgroup::detect_at(&cg2.group);
        assert_eq!(cg.version, "v2");
        assert_eq!(cg.cpu_usage_us(), Some(0), "a new cgroup has used no CPU");

        // A shell that waits for a line, then spins: moved into the group before it starts.
        let child = Command::new("sh")
            .args([
                "-c",
                "read go; i=0; while [ $i -lt 300000 ]; do i=$((i+1)); done",
            ])
            .stdin(Stdio::piped())
            .spawn()
            .unwrap();
        let child = cg2.child.insert(child);
        fs::write(cg2.group.join("cgroup.procs"), child.id().to_string()).unwrap();
        let started = std::time::Instant::now();
        writeln!(child.stdin.take().unwrap(), "go").unwrap();
        assert!(child.wait().unwrap().success());
        cg2.child = None;
        let wall_us = started.elapsed().as_micros() as u64;
        let used = cg.cpu_usage_us().expect("cpu.stat readable");
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get() as u64);
        assert!(
            used >= 20_000,
            "the spin used {used} us of CPU in the group"
        );
        assert!(
            used <= wall_us * cpus,
            "{used} us of CPU in {wall_us} us of wall time"
        );

        let controllers = fs::read_to_string(cg2.group.join("cgroup.controllers")).unwrap();
        if controllers.split_whitespace().any(|c| c == "memory") {
            assert_eq!(cg.oom_kills(), Some(0));
        } else {
            assert_eq!(
                cg.oom_kills(),
                None,
                "no memory controller, no memory.events"
            );
        }
    }

    #[test]
    fn reads_key_value_files() {
        let v1 = "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n";
        assert_eq!(super::field(v1, "oom_kill"), Some(3));
        let v2 = "usage_usec 1234\nuser_usec 1000\nsystem_usec 234\n";
        assert_eq!(super::field(v2, "usage_usec"), Some(1234));
        assert_eq!(super::field(v2, "nope"), None);
    }
}
