//! Judge0's language ids, both sets in use: the open-source seed's (Judge0 CE 1.13.1, ids 43-89)
//! and the hosted instance's newer ones (90 and up). Each id names a language at a version; it
//! runs on the runtime of that language whose version is closest (same major version first,
//! then the nearest minor, the newer on a tie), and is listed with that runtime's real version.
//! Ids of languages codefleet does not serve (Python 2, Haskell, ...) are not listed.

use codefleet_shared::version::compare_versions;
use codefleet_shared::LanguageInfo;
use serde_json::{json, Value};

use crate::membership::Snapshot;

/// One Judge0 language id: the codefleet language it runs as and the version Judge0 ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Judge0Language {
    pub id: u32,
    /// A codefleet language name (`deploy/languages.toml`).
    pub language: &'static str,
    /// The version Judge0's own entry had, to pick the closest runtime.
    pub judge0_version: &'static str,
}

const fn id(id: u32, language: &'static str, judge0_version: &'static str) -> Judge0Language {
    Judge0Language {
        id,
        language,
        judge0_version,
    }
}

/// Every id served, in id order.
pub const LANGUAGES: &[Judge0Language] = &[
    // The open-source seed (db/languages/active.rb of Judge0 1.13.1).
    id(46, "bash", "5.0.0"),
    id(48, "c", "7.4.0"),
    id(49, "c", "8.3.0"),
    id(50, "c", "9.2.0"),
    id(51, "csharp", "6.6.0.161"),
    id(52, "cpp", "7.4.0"),
    id(53, "cpp", "8.3.0"),
    id(54, "cpp", "9.2.0"),
    id(60, "go", "1.13.5"),
    id(62, "java", "13.0.1"),
    id(63, "javascript", "12.14.0"),
    id(64, "lua", "5.3.5"),
    id(68, "php", "7.4.1"),
    id(71, "python", "3.8.1"),
    id(72, "ruby", "2.7.0"),
    id(73, "rust", "1.40.0"),
    id(74, "typescript", "3.7.4"),
    // Clang's C and C++ run as GCC's: the closest runtime codefleet has.
    id(75, "c", "7.0.1"),
    id(76, "cpp", "7.0.1"),
    id(82, "sqlite", "3.27.2"),
    id(85, "perl", "5.28.1"),
    // The hosted instance's newer ids.
    id(91, "java", "17.0.6"),
    id(92, "python", "3.11.2"),
    id(94, "typescript", "5.0.3"),
    id(97, "javascript", "20.17.0"),
    id(98, "php", "8.3.11"),
    id(100, "python", "3.12.5"),
    id(101, "typescript", "5.6.2"),
    id(102, "javascript", "22.08.0"),
    id(103, "c", "14.1.0"),
    id(105, "cpp", "14.1.0"),
    id(107, "go", "1.23.5"),
    id(108, "rust", "1.85.0"),
    id(109, "python", "3.13.2"),
    id(110, "c", "19.1.7"),
    id(113, "python", "3.14.0"),
];

/// The entry for `id`, if it is served.
pub fn by_id(id: u32) -> Option<&'static Judge0Language> {
    LANGUAGES.iter().find(|l| l.id == id)
}

/// Judge0's display name for a codefleet language at `version`: "Python (3.11.2)".
pub fn display_name(language: &str, version: &str) -> String {
    let (label, tool) = match language {
        "python" => ("Python", ""),
        "javascript" => ("JavaScript", "Node.js "),
        "go" => ("Go", ""),
        "java" => ("Java", "OpenJDK "),
        "cpp" => ("C++", "GCC "),
        "c" => ("C", "GCC "),
        "rust" => ("Rust", ""),
        "csharp" => ("C#", "Mono "),
        "bash" => ("Bash", ""),
        "ruby" => ("Ruby", ""),
        "php" => ("PHP", ""),
        "lua" => ("Lua", ""),
        "perl" => ("Perl", ""),
        "sqlite" => ("SQL", "SQLite "),
        "typescript" => ("TypeScript", ""),
        other => (other, ""),
    };
    format!("{label} ({tool}{version})")
}

/// The leading numbers of a version: "3.11.2" → [3, 11, 2]; "v18.19.0" → [18, 19, 0].
fn numbers(version: &str) -> Vec<u64> {
    version
        .trim_start_matches(|c: char| !c.is_ascii_digit())
        .split(['.', '-', '+', ' '])
        .map_while(|part| part.parse().ok())
        .collect()
}

/// How far `version` is from `wanted`: the major versions' distance, then the minors'.
fn distance(wanted: &[u64], version: &[u64]) -> (u64, u64) {
    let at = |v: &[u64], i: usize| v.get(i).copied().unwrap_or(0);
    (
        at(wanted, 0).abs_diff(at(version, 0)),
        at(wanted, 1).abs_diff(at(version, 1)),
    )
}

/// The version, among `versions` (those of one language's ready runtimes), that an entry
/// Judge0 ran at `judge0_version` runs on: the closest, the newer of two as close.
pub fn closest<'v>(judge0_version: &str, versions: &[&'v str]) -> Option<&'v str> {
    let wanted = numbers(judge0_version);
    versions.iter().copied().min_by(|a, b| {
        let by_distance = distance(&wanted, &numbers(a)).cmp(&distance(&wanted, &numbers(b)));
        by_distance.then_with(|| compare_versions(b, a))
    })
}

/// A Judge0 id resolved against the fleet: the runtime it runs on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    pub entry: Judge0Language,
    /// The runtime's exact version, passed as the native request's `version`.
    pub version: String,
    pub file_name: String,
    pub compiled: bool,
}

impl Resolved {
    pub fn name(&self) -> String {
        display_name(self.entry.language, &self.version)
    }
}

/// `entry` on the runtimes the fleet has now; `None` when no runtime of its language has a
/// version yet (no node has reported it ready).
pub fn resolve(snapshot: &Snapshot, entry: &Judge0Language) -> Option<Resolved> {
    let runtimes: Vec<&LanguageInfo> = snapshot
        .catalog
        .languages()
        .filter(|l| l.name == entry.language && !l.version.is_empty())
        .collect();
    let versions: Vec<&str> = runtimes.iter().map(|l| l.version.as_str()).collect();
    let version = closest(entry.judge0_version, &versions)?;
    let info = runtimes.iter().find(|l| l.version == version)?;
    Some(Resolved {
        entry: *entry,
        version: version.to_string(),
        file_name: info.file_name.clone(),
        compiled: info.compiled,
    })
}

/// `GET /languages`: every id the fleet can run now, as `{id, name}`.
pub fn list(snapshot: &Snapshot) -> Value {
    let entries: Vec<Value> = LANGUAGES
        .iter()
        .filter_map(|entry| resolve(snapshot, entry))
        .map(|r| json!({"id": r.entry.id, "name": r.name()}))
        .collect();
    Value::Array(entries)
}

/// `GET /languages/{id}`: Judge0's full entry. The commands are codefleet's runtime's, which
/// the gateway does not know in detail: `compile_cmd` says whether it compiles.
pub fn show(resolved: &Resolved) -> Value {
    let language = resolved.entry.language;
    let compile_cmd = resolved
        .compiled
        .then(|| format!("codefleet {language} runtime: compile"));
    json!({
        "id": resolved.entry.id,
        "name": resolved.name(),
        "is_archived": false,
        "source_file": resolved.file_name,
        "compile_cmd": compile_cmd,
        "run_cmd": format!("codefleet {language} runtime: run"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn closest_runtime_prefers_the_same_major_then_the_nearest_minor() {
        let cases: &[(&str, &[&str], &str)] = &[
            ("3.8.1", &["3.13.5", "3.11.2"], "3.11.2"),
            ("3.12.5", &["3.13.5", "3.11.2"], "3.13.5"),
            ("3.14.0", &["3.13.5", "3.11.2"], "3.13.5"),
            ("12.14.0", &["20.19.2", "18.19.0"], "18.19.0"),
            ("22.08.0", &["20.19.2", "18.19.0"], "20.19.2"),
            ("1.13.5", &["1.24.4", "1.19.8"], "1.19.8"),
            ("1.23.5", &["1.24.4", "1.19.8"], "1.24.4"),
            ("13.0.1", &["21.0.8", "17.0.16"], "17.0.16"),
            ("9.2.0", &["14.2.0", "12.2.0"], "12.2.0"),
            ("14.1.0", &["14.2.0", "12.2.0"], "14.2.0"),
            ("1.40.0", &["1.85.0", "1.63.0"], "1.63.0"),
            ("5.0.0", &["5.2.15"], "5.2.15"),
        ];
        for (wanted, versions, expected) in cases {
            assert_eq!(closest(wanted, versions), Some(*expected), "{wanted}");
        }
        assert_eq!(closest("3.8.1", &[]), None);
    }

    #[test]
    fn names_read_like_judge0s() {
        assert_eq!(display_name("python", "3.11.2"), "Python (3.11.2)");
        assert_eq!(display_name("cpp", "12.2.0"), "C++ (GCC 12.2.0)");
        assert_eq!(
            display_name("javascript", "18.19.0"),
            "JavaScript (Node.js 18.19.0)"
        );
        assert_eq!(display_name("sqlite", "3.40.1"), "SQL (SQLite 3.40.1)");
    }

    #[test]
    fn ids_are_unique_sorted_and_name_known_languages() {
        let ids: Vec<u32> = LANGUAGES.iter().map(|l| l.id).collect();
        let mut sorted = ids.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(ids, sorted);
        for seed in [71, 63, 60, 62, 54, 73, 50, 51, 46, 72, 68, 64, 85, 82, 74] {
            assert!(by_id(seed).is_some(), "seed id {seed}");
        }
        assert_eq!(by_id(71).unwrap().language, "python");
        assert_eq!(by_id(105).unwrap().language, "cpp");
        assert!(by_id(70).is_none(), "Python 2 is not served");
    }
}
