//! The compile cache: programs compiled on this node, kept so that the same program sent again
//! skips its compile stage.
//!
//! An entry is the work dir as the compiler left it (the sources and everything the compile
//! stage made: a binary, class files, a `.js`), read back by the supervisor once the compile
//! stage ended and before any run (`Job::snapshot_max_bytes`), and the compile stage's result.
//! Its key is a SHA-256 over everything that decides what the compiler makes: the runtime (id
//! and version), the compile command, the language's environment and every file's name and
//! content. Limits are not in it: only compiles that succeeded are kept, and a limit does not
//! change what a successful compile makes.
//!
//! Entries live in the agent's memory, outside every container, bounded by
//! `--compile-cache-bytes` (least recently used dropped first). A job never writes to an entry:
//! a hit's files travel to the sandbox inside the job message, like any job's, and are written
//! there afresh (a judge then freezes them, read-only to its runs), so what a run does to its
//! copy dies with the run.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use sha2::{Digest, Sha256};

use codefleet_shared::sandbox::SandboxFile;
use codefleet_shared::StageResult;

use crate::job::Prepared;

/// A program's key: the SHA-256 of what its compile depends on.
pub type Key = [u8; 32];

/// A compiled program, as the cache hands it out.
#[derive(Debug)]
pub struct Program {
    /// The work dir after the compile stage.
    pub files: Vec<SandboxFile>,
    /// The compile stage as it ran when the entry was made.
    pub compile: StageResult,
}

/// What a job does with the cache.
#[derive(Clone)]
pub enum Use {
    /// Nothing: the language does not compile, the cache is off, or the job is not one it
    /// serves.
    Off,
    /// Compile, and keep the result under `Key`.
    Miss(Key),
    /// Skip the compile stage: the program is here.
    Hit(Arc<Program>),
}

impl Use {
    pub fn is_hit(&self) -> bool {
        matches!(self, Use::Hit(_))
    }
}

pub struct CompileCache {
    capacity: u64,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    entries: HashMap<Key, Entry>,
    /// Last use → key: the first is the least recently used.
    order: BTreeMap<u64, Key>,
    used: u64,
    clock: u64,
}

struct Entry {
    program: Arc<Program>,
    size: u64,
    last_used: u64,
}

impl CompileCache {
    /// A cache of at most `capacity` bytes (0: off).
    pub fn new(capacity: u64) -> CompileCache {
        CompileCache {
            capacity,
            inner: Mutex::new(Inner::default()),
        }
    }

    /// The most bytes one program may hold (an eighth of the cache): what a job asks the
    /// supervisor to send back at most. 0 when the cache is off.
    pub fn entry_limit(&self) -> u64 {
        self.capacity / 8
    }

    /// Looks up `prepared`'s program, counting a hit or a miss; `Use::Off` for a language
    /// without a compile stage or with the cache off.
    pub fn lookup(&self, prepared: &Prepared) -> Use {
        if self.capacity == 0 {
            return Use::Off;
        }
        let Some(key) = key(prepared) else {
            return Use::Off;
        };
        let language = prepared.language.name.clone();
        match self.get(&key) {
            Some(program) => {
                metrics::counter!("codefleet_compile_cache_hits_total", "language" => language)
                    .increment(1);
                Use::Hit(program)
            }
            None => {
                metrics::counter!("codefleet_compile_cache_misses_total", "language" => language)
                    .increment(1);
                Use::Miss(key)
            }
        }
    }

    /// The program under `key`, now the most recently used.
    fn get(&self, key: &Key) -> Option<Arc<Program>> {
        let mut inner = self.inner.lock().expect("compile cache lock");
        inner.clock += 1;
        let now = inner.clock;
        let entry = inner.entries.get_mut(key)?;
        let before = std::mem::replace(&mut entry.last_used, now);
        let program = Arc::clone(&entry.program);
        inner.order.remove(&before);
        inner.order.insert(now, *key);
        Some(program)
    }

    /// Keeps a program compiled under `key`, dropping the least recently used ones to make
    /// room; one larger than `entry_limit` is not kept.
    pub fn insert(&self, key: Key, files: Vec<SandboxFile>, compile: StageResult) {
        let size: u64 = files
            .iter()
            .map(|f| (f.name.len() + f.content_b64.len()) as u64)
            .sum::<u64>()
            + (compile.stdout.len() + compile.stderr.len()) as u64;
        if size > self.entry_limit() {
            return;
        }
        let mut inner = self.inner.lock().expect("compile cache lock");
        if inner.entries.contains_key(&key) {
            return;
        }
        while inner.used + size > self.capacity {
            let Some((_, oldest)) = inner.order.pop_first() else {
                break;
            };
            if let Some(gone) = inner.entries.remove(&oldest) {
                inner.used -= gone.size;
                metrics::counter!("codefleet_compile_cache_evictions_total").increment(1);
            }
        }
        inner.clock += 1;
        let now = inner.clock;
        let program = Arc::new(Program { files, compile });
        inner.entries.insert(
            key,
            Entry {
                program,
                size,
                last_used: now,
            },
        );
        inner.order.insert(now, key);
        inner.used += size;
        metrics::gauge!("codefleet_compile_cache_bytes").set(inner.used as f64);
        metrics::gauge!("codefleet_compile_cache_entries").set(inner.entries.len() as f64);
    }

    /// Bytes held now.
    #[cfg(test)]
    fn used(&self) -> u64 {
        self.inner.lock().expect("compile cache lock").used
    }
}

/// The key of `prepared`'s program; `None` when its language has no compile stage.
pub fn key(prepared: &Prepared) -> Option<Key> {
    let entry = &prepared.job_files.first()?.name;
    let (compile, _) = prepared.language.commands(entry, &[]);
    let compile = compile?;
    let mut hash = Sha256::new();
    let mut part = |bytes: &[u8]| {
        hash.update((bytes.len() as u64).to_le_bytes());
        hash.update(bytes);
    };
    part(b"codefleet compile cache 1");
    part(prepared.language.runtime().as_bytes());
    part(prepared.version.as_bytes());
    part(&(compile.len() as u64).to_le_bytes());
    for arg in &compile {
        part(arg.as_bytes());
    }
    part(&(prepared.language.env.len() as u64).to_le_bytes());
    for (name, value) in &prepared.language.env {
        part(name.as_bytes());
        part(value.as_bytes());
    }
    part(&(prepared.job_files.len() as u64).to_le_bytes());
    for file in &prepared.job_files {
        part(file.name.as_bytes());
        part(&file.content);
    }
    Some(hash.finalize().into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use codefleet_shared::Status;

    fn stage() -> StageResult {
        StageResult {
            status: Status::Ok,
            exit_code: Some(0),
            signal: None,
            stdout: String::new(),
            stderr: String::new(),
            stdout_truncated: false,
            stderr_truncated: false,
            wall_time_ms: 1,
            cpu_time_ms: 1,
            memory_bytes: 1,
        }
    }

    fn files(bytes: usize) -> Vec<SandboxFile> {
        vec![SandboxFile {
            name: "m".into(),
            content_b64: "x".repeat(bytes - 1),
            executable: true,
        }]
    }

    #[test]
    fn the_least_recently_used_goes_first_and_size_stays_bounded() {
        let cache = CompileCache::new(800); // entries of at most 100 bytes
        for k in 0..8u8 {
            cache.insert([k; 32], files(100), stage());
        }
        assert_eq!(cache.used(), 800);
        assert!(
            cache.get(&[0; 32]).is_some(),
            "0 is now the most recently used"
        );
        cache.insert([8; 32], files(100), stage());
        assert!(cache.get(&[0; 32]).is_some());
        assert!(
            cache.get(&[1; 32]).is_none(),
            "1 was the least recently used"
        );
        assert!(cache.get(&[8; 32]).is_some());
        assert_eq!(cache.used(), 800);
        // Too large for one entry: not kept, nothing dropped for it.
        cache.insert([9; 32], files(101), stage());
        assert!(cache.get(&[9; 32]).is_none());
        assert_eq!(cache.used(), 800);
        // A program kept twice counts once.
        cache.insert([8; 32], files(100), stage());
        assert_eq!(cache.used(), 800);
    }

    #[test]
    fn an_off_cache_keeps_nothing() {
        let cache = CompileCache::new(0);
        assert_eq!(cache.entry_limit(), 0);
        cache.insert([1; 32], files(1), stage());
        assert!(cache.get(&[1; 32]).is_none());
    }

    fn prepared(language: &str, files: &[(&str, &str)]) -> Prepared {
        let catalog = crate::catalog::Catalog::parse(crate::catalog::BUILTIN_CATALOG).unwrap();
        let lang = catalog
            .languages
            .iter()
            .find(|l| l.name == language)
            .unwrap();
        Prepared {
            language: lang.clone(),
            version: "1.0".into(),
            limits: codefleet_shared::ResolvedLimits::DEFAULT,
            job_files: files
                .iter()
                .map(|(name, content)| codefleet_shared::validate::JobFile {
                    name: name.to_string(),
                    content: content.as_bytes().to_vec(),
                })
                .collect(),
            stdin: String::new(),
            args: vec![],
            isolation: Default::default(),
            interactive: false,
            outputs: None,
        }
    }

    #[test]
    fn the_key_is_the_program_and_nothing_else() {
        let a = prepared("cpp", &[("main.cpp", "int main(){}")]);
        let base = key(&a).expect("C++ compiles");
        let mut other_stdin = a.clone();
        other_stdin.stdin = "input".into();
        other_stdin.args = vec!["x".into()];
        other_stdin.limits.wall_time_ms = 1;
        assert_eq!(
            key(&other_stdin),
            Some(base),
            "stdin, args and limits do not count"
        );
        for changed in [
            prepared("cpp", &[("main.cpp", "int main(){ }")]),
            prepared("cpp", &[("other.cpp", "int main(){}")]),
            prepared("cpp", &[("main.cpp", "int main(){}"), ("a.h", "")]),
            prepared("c", &[("main.cpp", "int main(){}")]),
        ] {
            assert_ne!(key(&changed), Some(base));
        }
        let mut newer = a.clone();
        newer.version = "2.0".into();
        assert_ne!(key(&newer), Some(base), "another compiler version");
        // Name and content boundaries cannot be shifted into one another.
        assert_ne!(
            key(&prepared("cpp", &[("ab", "c")])),
            key(&prepared("cpp", &[("a", "bc")]))
        );
        assert_eq!(key(&prepared("python", &[("main.py", "print(1)")])), None);
    }
}
