//! Piston's versions: every runtime's version as a full semver `major.minor.patch` (the catalog's
//! versions padded or cut to three numbers), and Piston's version selectors, read as npm's
//! `semver` package reads a range: `3.11.2`, `3.x`, `3`, `*`, `^3.11`, `~3.11.2`, `>=3.9 <3.13`,
//! `1.2 - 2.3`, and sets of those joined by `||`. Pure: no I/O.

/// A full version, `major.minor.patch`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Version(pub u64, pub u64, pub u64);

impl std::fmt::Display for Version {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.0, self.1, self.2)
    }
}

impl Version {
    /// A catalog version as semver: its leading numbers (a `v` before them, as Node prints its
    /// version, is dropped), the first three, padded with zeros (`17` → `17.0.0`; Mono's
    /// `6.8.0.105` → `6.8.0`). `None` when it does not start with a number.
    pub fn of_catalog(version: &str) -> Option<Version> {
        let version = version.strip_prefix('v').unwrap_or(version);
        let mut numbers = version
            .split('.')
            .map_while(|part| {
                let digits: String = part.chars().take_while(char::is_ascii_digit).collect();
                let whole = digits.len() == part.len();
                digits.parse::<u64>().ok().map(|n| (n, whole))
            })
            .scan(true, |go_on, (n, whole)| {
                // A part like `2rc1` still counts, and ends the version.
                let this = go_on.then_some(n);
                *go_on = whole;
                this
            });
        let major = numbers.next()?;
        Some(Version(
            major,
            numbers.next().unwrap_or(0),
            numbers.next().unwrap_or(0),
        ))
    }
}

/// One end of a range: a version and whether it belongs to the range.
type Bound = Option<(Version, bool)>;

/// `lo <= v <= hi`, each end open, closed or absent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Interval {
    lo: Bound,
    hi: Bound,
}

impl Interval {
    const ANY: Interval = Interval { lo: None, hi: None };

    fn holds(&self, v: Version) -> bool {
        let above = match self.lo {
            None => true,
            Some((lo, inclusive)) => v > lo || (inclusive && v == lo),
        };
        let below = match self.hi {
            None => true,
            Some((hi, inclusive)) => v < hi || (inclusive && v == hi),
        };
        above && below
    }
}

/// A partial version as a range part writes it: `1`, `1.2`, `1.2.3`, `1.x`, `*`, `v1.2`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Partial {
    parts: [Option<u64>; 3],
    /// How many leading parts are numbers (the rest are wildcards or missing).
    given: usize,
}

impl Partial {
    fn parse(text: &str) -> Option<Partial> {
        let text = text.trim().trim_start_matches(['v', '=']);
        if text.is_empty() {
            return Some(Partial {
                parts: [None; 3],
                given: 0,
            });
        }
        let mut parts = [None; 3];
        let mut given = 0;
        let mut wild = false;
        let mut count = 0;
        for (i, part) in text.split('.').enumerate() {
            if i >= 3 {
                return None;
            }
            count += 1;
            if matches!(part, "x" | "X" | "*") {
                wild = true;
                continue;
            }
            if wild || part.is_empty() || !part.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            parts[i] = Some(part.parse().ok()?);
            given += 1;
        }
        (count > 0).then_some(Partial { parts, given })
    }

    /// The lowest version it names (wildcards as zero).
    fn floor(&self) -> Version {
        let [a, b, c] = self.parts.map(|p| p.unwrap_or(0));
        Version(a, b, c)
    }

    /// The first version past everything it names (`1.2` → `1.3.0`); `None` for `*`.
    fn ceiling(&self) -> Option<Version> {
        let [a, b, _] = self.parts.map(|p| p.unwrap_or(0));
        match self.given {
            0 => None,
            1 => Some(Version(a + 1, 0, 0)),
            2 => Some(Version(a, b + 1, 0)),
            _ => None,
        }
    }

    /// Every version it names: `1.2` is `>=1.2.0 <1.3.0`, `1.2.3` only itself.
    fn as_interval(&self) -> Interval {
        match (self.given, self.ceiling()) {
            (0, _) => Interval::ANY,
            (3, _) => Interval {
                lo: Some((self.floor(), true)),
                hi: Some((self.floor(), true)),
            },
            (_, hi) => Interval {
                lo: Some((self.floor(), true)),
                hi: hi.map(|h| (h, false)),
            },
        }
    }
}

/// One comparator of a range: `>=1.2`, `^1.2.3`, `~1`, `1.x`.
fn comparator(text: &str) -> Option<Interval> {
    let (op, rest) = ["~>", ">=", "<=", ">", "<", "^", "~", "="]
        .iter()
        .find_map(|op| text.strip_prefix(op).map(|rest| (*op, rest)))
        .unwrap_or(("", text));
    let p = Partial::parse(rest)?;
    let floor = p.floor();
    let [a, b, c] = p.parts.map(|x| x.unwrap_or(0));
    Some(match op {
        "" | "=" => p.as_interval(),
        ">=" => match p.given {
            0 => Interval::ANY,
            _ => Interval {
                lo: Some((floor, true)),
                hi: None,
            },
        },
        ">" => match (p.given, p.ceiling()) {
            (0, _) => Interval {
                lo: Some((Version(u64::MAX, u64::MAX, u64::MAX), false)),
                hi: None,
            },
            (3, _) | (_, None) => Interval {
                lo: Some((floor, false)),
                hi: None,
            },
            (_, Some(past)) => Interval {
                lo: Some((past, true)),
                hi: None,
            },
        },
        "<" => match p.given {
            0 => Interval {
                lo: None,
                hi: Some((Version(0, 0, 0), false)),
            },
            _ => Interval {
                lo: None,
                hi: Some((floor, false)),
            },
        },
        "<=" => match (p.given, p.ceiling()) {
            (0, _) => Interval::ANY,
            (3, _) | (_, None) => Interval {
                lo: None,
                hi: Some((floor, true)),
            },
            (_, Some(past)) => Interval {
                lo: None,
                hi: Some((past, false)),
            },
        },
        "~" | "~>" => match p.given {
            0 => Interval::ANY,
            1 => p.as_interval(),
            _ => Interval {
                lo: Some((floor, true)),
                hi: Some((Version(a, b + 1, 0), false)),
            },
        },
        "^" => {
            let hi = match p.given {
                0 => None,
                1 => Some(Version(a + 1, 0, 0)),
                2 if a == 0 => Some(Version(0, b + 1, 0)),
                2 => Some(Version(a + 1, 0, 0)),
                _ if a > 0 => Some(Version(a + 1, 0, 0)),
                _ if b > 0 => Some(Version(0, b + 1, 0)),
                _ => Some(Version(0, 0, c + 1)),
            };
            Interval {
                lo: Some((floor, true)),
                hi: hi.map(|h| (h, false)),
            }
        }
        _ => return None,
    })
}

/// One `||`-separated part: a hyphen range or comparators that must all hold.
fn comparator_set(text: &str) -> Option<Vec<Interval>> {
    let text = text.trim();
    if let Some((from, to)) = text.split_once(" - ") {
        let (from, to) = (Partial::parse(from)?, Partial::parse(to)?);
        let lo = (from.given > 0).then(|| (from.floor(), true));
        let hi = match (to.given, to.ceiling()) {
            (0, _) => None,
            (3, _) | (_, None) => Some((to.floor(), true)),
            (_, Some(past)) => Some((past, false)),
        };
        return Some(vec![Interval { lo, hi }]);
    }
    // `>= 1.2` is `>=1.2`: an operator standing alone joins the version after it.
    let mut words: Vec<String> = Vec::new();
    let mut pending = String::new();
    for word in text.split_whitespace() {
        pending.push_str(word);
        if !word
            .chars()
            .all(|c| matches!(c, '<' | '>' | '=' | '~' | '^'))
        {
            words.push(std::mem::take(&mut pending));
        }
    }
    if !pending.is_empty() {
        return None;
    }
    if words.is_empty() {
        return Some(vec![Interval::ANY]);
    }
    words.iter().map(|w| comparator(w)).collect()
}

/// A parsed selector; `None` from [`Selector::parse`] names nothing (npm's `satisfies` is false
/// for a range it cannot read).
#[derive(Debug, Clone)]
pub struct Selector(Vec<Vec<Interval>>);

impl Selector {
    pub fn parse(text: &str) -> Option<Selector> {
        text.split("||")
            .map(comparator_set)
            .collect::<Option<Vec<_>>>()
            .map(Selector)
    }

    pub fn matches(&self, version: Version) -> bool {
        self.0
            .iter()
            .any(|set| set.iter().all(|interval| interval.holds(version)))
    }
}

/// The newest of `candidates` (each with its version) that `selector` names.
pub fn newest_matching<T>(
    selector: &str,
    candidates: impl IntoIterator<Item = (Version, T)>,
) -> Option<T> {
    let selector = Selector::parse(selector)?;
    candidates
        .into_iter()
        .filter(|(v, _)| selector.matches(*v))
        .max_by_key(|(v, _)| *v)
        .map(|(_, t)| t)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(text: &str) -> Version {
        Version::of_catalog(text).unwrap()
    }

    #[test]
    fn catalog_versions_become_full_semver() {
        let table: &[(&str, Option<&str>)] = &[
            ("3.11.2", Some("3.11.2")),
            ("v18.19.0", Some("18.19.0")),
            ("17", Some("17.0.0")),
            ("1.85", Some("1.85.0")),
            ("6.8.0.105", Some("6.8.0")),
            ("3.13.5rc1", Some("3.13.5")),
            ("5.2rc1.7", Some("5.2.0")),
            ("", None),
            ("unknown", None),
        ];
        for (catalog, semver) in table {
            let got = Version::of_catalog(catalog).map(|v| v.to_string());
            assert_eq!(got.as_deref(), *semver, "{catalog:?}");
        }
    }

    #[test]
    fn selectors_as_npm_semver_reads_them() {
        let table: &[(&str, &str, bool)] = &[
            ("*", "3.11.2", true),
            ("", "3.11.2", true),
            ("x", "0.0.1", true),
            ("3.11.2", "3.11.2", true),
            ("3.11.2", "3.11.3", false),
            ("=3.11.2", "3.11.2", true),
            ("v3.11.2", "3.11.2", true),
            ("3.x", "3.13.5", true),
            ("3.x", "4.0.0", false),
            ("3.11.x", "3.11.9", true),
            ("3.11.x", "3.12.0", false),
            ("3", "3.0.0", true),
            ("3", "2.9.9", false),
            ("3.11", "3.11.2", true),
            ("3.1", "3.11.2", false),
            ("3.x.x", "3.1.0", true),
            ("^3.11", "3.13.5", true),
            ("^3.11", "4.0.0", false),
            ("^3.11", "3.10.0", false),
            ("^0.2.3", "0.2.9", true),
            ("^0.2.3", "0.3.0", false),
            ("^0.0.3", "0.0.4", false),
            ("~3.11.1", "3.11.9", true),
            ("~3.11.1", "3.12.0", false),
            ("~3", "3.99.0", true),
            (">=3.9 <3.13", "3.11.2", true),
            (">=3.9 <3.13", "3.13.0", false),
            (">= 3.9", "3.11.2", true),
            (">3.11", "3.11.9", false),
            (">3.11", "3.12.0", true),
            (">3.11.2", "3.11.3", true),
            ("<=3.11", "3.11.9", true),
            ("<=3.11", "3.12.0", false),
            ("<3", "2.7.18", true),
            ("1.2 - 2.3", "2.3.9", true),
            ("1.2 - 2.3", "2.4.0", false),
            ("1.2 - 2.3.4", "1.1.9", false),
            ("2.x || 3.11.x", "3.11.2", true),
            ("2.x || 3.13.x", "3.11.2", false),
            ("3.11.2.1", "3.11.2", false),
            ("latest", "3.11.2", false),
            ("3.x.1", "3.0.1", false),
            (">=", "3.11.2", false),
        ];
        for (selector, version, ok) in table {
            let matched = Selector::parse(selector).is_some_and(|s| s.matches(v(version)));
            assert_eq!(matched, *ok, "{selector:?} vs {version}");
        }
    }

    #[test]
    fn the_newest_match_wins() {
        let runtimes = [(v("3.11.2"), "a"), (v("3.13.5"), "b"), (v("2.7.18"), "c")];
        assert_eq!(newest_matching("*", runtimes), Some("b"));
        assert_eq!(newest_matching("3.11.x", runtimes), Some("a"));
        assert_eq!(newest_matching("<3", runtimes), Some("c"));
        assert_eq!(newest_matching("4", runtimes), None);
        assert_eq!(newest_matching("not a range", runtimes), None);
    }
}
