//! A job's `outputs`: the files it names or matches below the work dir, read after its last
//! stage (when no process of it is left) as the job's user. Nothing is followed: every path is
//! looked at with `lstat`, a directory is descended only when it is a real one, and only
//! regular files are opened, with `O_NOFOLLOW | O_NONBLOCK`, then checked again on the open
//! descriptor. Links, directories and special files are reported, never opened.
//!
//! Wildcards are matched here, segment by segment: `*` is any run of characters and `?` any one,
//! neither matching a leading `.` (as in a shell), and a name only matches when it is one a
//! request's `files` could have used.

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

use base64::Engine as _;
use codefleet_shared::api::{Encoding, OutputFile, SkipReason, SkippedOutput, MAX_SKIPPED_OUTPUTS};
use codefleet_shared::sandbox::{Collected, Outputs};
use codefleet_shared::validate::is_valid_segment;

use crate::reset::as_user;
use crate::run::WORKDIR;

/// Collects `outputs` from the work dir as the job user `uid`/`gid`.
pub fn collect(outputs: &Outputs, uid: u32, gid: u32) -> Result<Collected, String> {
    as_user(uid, gid, || Ok(collect_in(Path::new(WORKDIR), outputs)))
}

/// Collects `outputs` below `root`.
pub fn collect_in(root: &Path, outputs: &Outputs) -> Collected {
    let max_files = usize::try_from(outputs.max_files).unwrap_or(usize::MAX);
    let mut walk = Walk {
        found: BTreeMap::new(),
        // The answer is a prefix of the names in order: at most this many of them.
        keep: max_files.saturating_add(MAX_SKIPPED_OUTPUTS),
    };
    for pattern in &outputs.patterns {
        let segments: Vec<&str> = pattern.split('/').collect();
        let recorded = walk.walk(root, "", &segments);
        if recorded == 0 && !has_wildcard(pattern) {
            walk.record(pattern.clone(), Found::Skipped(SkipReason::Missing));
        }
    }

    let mut budget = outputs.max_bytes;
    let mut collected = Collected::default();
    for (name, found) in walk.found {
        let skipped = match found {
            Found::File if collected.files.len() >= max_files => Some(SkipReason::CountLimit),
            Found::File => match read(&root.join(&name), budget) {
                Ok((size, content)) => {
                    budget -= content.len() as u64;
                    collected.files.push(OutputFile {
                        name,
                        size,
                        truncated: (content.len() as u64) < size,
                        content: base64::engine::general_purpose::STANDARD.encode(&content),
                        encoding: Encoding::Base64,
                    });
                    continue;
                }
                Err(reason) => Some(reason),
            },
            Found::Skipped(reason) => Some(reason),
        };
        if let Some(reason) = skipped {
            if collected.skipped.len() < MAX_SKIPPED_OUTPUTS {
                collected.skipped.push(SkippedOutput { name, reason });
            }
        }
    }
    collected
}

/// What a path below the work dir is.
enum Found {
    File,
    Skipped(SkipReason),
}

struct Walk {
    /// By name, relative to the work dir.
    found: BTreeMap<String, Found>,
    keep: usize,
}

impl Walk {
    /// Keeps `name`, and only the first `keep` names in order (nothing after them can be in
    /// the answer, however many a wildcard matches).
    fn record(&mut self, name: String, found: Found) {
        self.found.entry(name).or_insert(found);
        if self.found.len() > self.keep {
            self.found.pop_last();
        }
    }

    /// Matches `segments` below `dir` (named `shown` to the job); returns how many paths it
    /// recorded.
    fn walk(&mut self, dir: &Path, shown: &str, segments: &[&str]) -> usize {
        let Some((segment, rest)) = segments.split_first() else {
            return 0;
        };
        if !has_wildcard(segment) {
            return self.visit(dir, shown, segment, rest);
        }
        // An unreadable or missing directory matches nothing.
        let Ok(entries) = fs::read_dir(dir) else {
            return 0;
        };
        let mut recorded = 0;
        for entry in entries.flatten() {
            let Ok(name) = entry.file_name().into_string() else {
                continue;
            };
            if is_valid_segment(&name) && matches(segment.as_bytes(), name.as_bytes()) {
                recorded += self.visit(dir, shown, &name, rest);
            }
        }
        recorded
    }

    /// Looks at `dir/name` without following it: the last segment is recorded whatever it is,
    /// a real directory on the way is descended, a link on the way is recorded (not followed).
    fn visit(&mut self, dir: &Path, shown: &str, name: &str, rest: &[&str]) -> usize {
        let path = dir.join(name);
        let Ok(meta) = fs::symlink_metadata(&path) else {
            return 0;
        };
        let shown = match shown {
            "" => name.to_string(),
            _ => format!("{shown}/{name}"),
        };
        let kind = meta.file_type();
        if rest.is_empty() {
            self.record(shown, classify(kind));
            1
        } else if kind.is_dir() {
            self.walk(&path, &shown, rest)
        } else if kind.is_symlink() {
            self.record(shown, Found::Skipped(SkipReason::Symlink));
            1
        } else {
            0
        }
    }
}

fn classify(kind: fs::FileType) -> Found {
    let reason = if kind.is_file() {
        return Found::File;
    } else if kind.is_symlink() {
        SkipReason::Symlink
    } else if kind.is_dir() {
        SkipReason::Directory
    } else if kind.is_fifo() {
        SkipReason::Fifo
    } else if kind.is_socket() {
        SkipReason::Socket
    } else {
        SkipReason::Device
    };
    Found::Skipped(reason)
}

/// Reads the regular file at `path`, at most `budget` bytes of it: its size and those bytes.
fn read(path: &Path, budget: u64) -> Result<(u64, Vec<u8>), SkipReason> {
    let file = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) => SkipReason::Symlink,
            Some(libc::ENOENT) => SkipReason::Missing,
            Some(libc::ENXIO) => SkipReason::Socket,
            _ => SkipReason::Unreadable,
        })?;
    let meta = file.metadata().map_err(|_| SkipReason::Unreadable)?;
    if let Found::Skipped(reason) = classify(meta.file_type()) {
        return Err(reason);
    }
    let size = meta.len();
    let mut content = Vec::with_capacity(size.min(budget) as usize);
    file.take(budget)
        .read_to_end(&mut content)
        .map_err(|_: io::Error| SkipReason::Unreadable)?;
    Ok((size.max(content.len() as u64), content))
}

fn has_wildcard(pattern: &str) -> bool {
    pattern.contains(['*', '?'])
}

/// Whether `name` matches the one-segment glob `pattern`: `*` any run of bytes, `?` any one
/// byte (names are ASCII), a leading `.` only matched by a `.` in the pattern.
fn matches(pattern: &[u8], name: &[u8]) -> bool {
    if name.first() == Some(&b'.') && pattern.first() != Some(&b'.') {
        return false;
    }
    // The classic greedy match: on a mismatch, let the last `*` take one byte more.
    let (mut p, mut n) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while n < name.len() {
        match pattern.get(p) {
            Some(b'*') => {
                star = Some((p, n));
                p += 1;
            }
            Some(&c) if c == b'?' || c == name[n] => {
                p += 1;
                n += 1;
            }
            _ => match star {
                Some((sp, sn)) => {
                    p = sp + 1;
                    n = sn + 1;
                    star = Some((sp, sn + 1));
                }
                None => return false,
            },
        }
    }
    pattern[p..].iter().all(|&c| c == b'*')
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;
    use std::path::PathBuf;

    #[test]
    fn globs_match_within_a_segment() {
        let table: &[(&str, &str, bool)] = &[
            ("*", "plot.png", true),
            ("*.png", "plot.png", true),
            ("*.png", "plot.png.txt", false),
            ("p?ot.*", "plot.png", true),
            ("p?ot.*", "pot.png", false),
            ("*o*o*", "foo", true),
            ("*a*b", "aXbXb", true),
            ("*a*b", "aXbXc", false),
            ("a*", "a", true),
            ("?", "", false),
            ("", "", true),
            ("*", ".hidden", false),
            ("?hidden", ".hidden", false),
            (".*", ".hidden", true),
            ("exact", "exact", true),
            ("exact", "exactly", false),
        ];
        for (pattern, name, want) in table {
            assert_eq!(
                matches(pattern.as_bytes(), name.as_bytes()),
                *want,
                "{pattern:?} against {name:?}"
            );
        }
    }

    /// A fresh directory of this test's own.
    fn scratch(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("codefleet-outputs-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn outputs(patterns: &[&str], max_files: u64, max_bytes: u64) -> Outputs {
        Outputs {
            patterns: patterns.iter().map(|p| p.to_string()).collect(),
            max_files,
            max_bytes,
        }
    }

    fn content(file: &OutputFile) -> Vec<u8> {
        base64::engine::general_purpose::STANDARD
            .decode(&file.content)
            .unwrap()
    }

    fn skipped(c: &Collected) -> Vec<(&str, SkipReason)> {
        c.skipped
            .iter()
            .map(|s| (s.name.as_str(), s.reason))
            .collect()
    }

    #[test]
    fn links_and_special_files_are_reported_never_read() {
        let root = scratch("special");
        let outside = root.with_extension("outside");
        fs::create_dir_all(&outside).unwrap();
        fs::write(outside.join("secret"), "secret").unwrap();
        fs::write(root.join("a.txt"), "a").unwrap();
        symlink("/etc/passwd", root.join("passwd")).unwrap();
        symlink(&outside, root.join("linkdir")).unwrap();
        fs::create_dir(root.join("dir")).unwrap();
        let made = std::process::Command::new("mkfifo")
            .arg(root.join("fifo"))
            .status()
            .unwrap();
        assert!(made.success());
        let _socket = std::os::unix::net::UnixListener::bind(root.join("sock")).unwrap();

        let c = collect_in(
            &root,
            &outputs(&["*", "linkdir/secret", "nothing.txt", "dir/*"], 10, 1000),
        );
        assert_eq!(c.files.len(), 1, "{c:?}");
        assert_eq!(c.files[0].name, "a.txt");
        assert_eq!(content(&c.files[0]), b"a");
        assert_eq!(
            skipped(&c),
            [
                ("dir", SkipReason::Directory),
                ("fifo", SkipReason::Fifo),
                ("linkdir", SkipReason::Symlink),
                ("nothing.txt", SkipReason::Missing),
                ("passwd", SkipReason::Symlink),
                ("sock", SkipReason::Socket),
            ]
        );
        // A device (none can be made in a sandbox; /dev has them).
        let c = collect_in(Path::new("/dev"), &outputs(&["null"], 1, 1));
        assert_eq!(skipped(&c), [("null", SkipReason::Device)]);
        fs::remove_dir_all(&root).unwrap();
        fs::remove_dir_all(&outside).unwrap();
    }

    #[test]
    fn globs_caps_and_truncation() {
        let root = scratch("caps");
        fs::create_dir_all(root.join("out/deep")).unwrap();
        for (name, text) in [
            ("out/1.csv", "11111"),
            ("out/2.csv", "22222"),
            ("out/3.csv", "33333"),
            ("out/4.csv", "44444"),
            ("out/note.txt", "n"),
            ("out/deep/5.csv", "5"),
            ("out/.hidden.csv", "h"),
            ("out/bad name.csv", "b"),
        ] {
            fs::write(root.join(name), text).unwrap();
        }
        // Four match (not the hidden one, not the one no request could name, not below
        // `deep`); three are returned, and 12 bytes of content fill up in the third file.
        let c = collect_in(&root, &outputs(&["out/*.csv", "out/1.csv"], 3, 12));
        let got: Vec<(&str, u64, Vec<u8>, bool)> = c
            .files
            .iter()
            .map(|f| (f.name.as_str(), f.size, content(f), f.truncated))
            .collect();
        assert_eq!(
            got,
            [
                ("out/1.csv", 5, b"11111".to_vec(), false),
                ("out/2.csv", 5, b"22222".to_vec(), false),
                ("out/3.csv", 5, b"33".to_vec(), true),
            ]
        );
        assert_eq!(skipped(&c), [("out/4.csv", SkipReason::CountLimit)]);
        // Once the bytes are spent, a file still comes with its size, and no content.
        let c = collect_in(&root, &outputs(&["out/?.csv"], 10, 5));
        assert_eq!(c.files.len(), 4);
        assert!(c.files[1..]
            .iter()
            .all(|f| f.truncated && f.content.is_empty()));
        assert_eq!(c.files[3].size, 5);
        // Many matches keep only what the answer can hold.
        for i in 0..200 {
            fs::write(root.join(format!("out/deep/m{i:03}")), "").unwrap();
        }
        let c = collect_in(&root, &outputs(&["out/deep/m*"], 2, 10));
        assert_eq!(c.files.len(), 2);
        assert_eq!(c.files[0].name, "out/deep/m000");
        assert_eq!(c.skipped.len(), MAX_SKIPPED_OUTPUTS);
        assert_eq!(c.skipped[0].name, "out/deep/m002");
        fs::remove_dir_all(&root).unwrap();
    }
}
