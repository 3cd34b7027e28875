//! Language versions, the same way in the gateway and the agents: which versions a requested
//! `version` names (a prefix on dot boundaries) and which of two versions is newer (numeric
//! components, so `3.13` is newer than `3.9`).

use std::cmp::Ordering;

/// Whether `version` (what a node runs, `3.11.2`) is one `asked` names: `asked` itself or
/// `asked` followed by a dot, so `"3"`, `"3.11"` and `"3.11.2"` name `3.11.2` and `"3.1"` does
/// not. `None` or an empty `asked` names every version.
pub fn version_matches(asked: Option<&str>, version: &str) -> bool {
    match asked {
        None | Some("") => true,
        Some(asked) => version
            .strip_prefix(asked)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('.')),
    }
}

/// Orders versions oldest first: dot-separated components compared as numbers where both are
/// numbers (`3.9` < `3.13`), as text otherwise; a version is older than its own extensions
/// (`17` < `17.0.2`), and the empty version is the oldest.
pub fn compare_versions(a: &str, b: &str) -> Ordering {
    let (mut left, mut right) = (a.split('.'), b.split('.'));
    loop {
        let order = match (left.next(), right.next()) {
            (None, None) => return Ordering::Equal,
            (None, Some(_)) => Ordering::Less,
            (Some(_), None) => Ordering::Greater,
            (Some(x), Some(y)) => match (x.parse::<u64>(), y.parse::<u64>()) {
                (Ok(x), Ok(y)) => x.cmp(&y),
                _ => x.cmp(y),
            },
        };
        if order.is_ne() {
            return order;
        }
    }
}

/// The newest of `versions` by [`compare_versions`]; `None` when there is none.
pub fn newest<'a>(versions: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    versions.into_iter().max_by(|a, b| compare_versions(a, b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn asked_versions_match_on_dot_boundaries() {
        let table: &[(Option<&str>, &str, bool)] = &[
            (Some("3"), "3.11.2", true),
            (Some("3.11"), "3.11.2", true),
            (Some("3.11.2"), "3.11.2", true),
            (Some("3.1"), "3.11.2", false),
            (Some("3.11.2.1"), "3.11.2", false),
            (Some("3.11."), "3.11.2", false),
            (Some("2"), "3.11.2", false),
            (Some("11"), "3.11.2", false),
            (Some("17"), "17", true),
            (Some("1"), "17.0.2", false),
            (None, "3.11.2", true),
            (Some(""), "3.11.2", true),
            (None, "", true),
            (Some("3"), "", false),
        ];
        for (asked, version, ok) in table {
            assert_eq!(
                version_matches(*asked, version),
                *ok,
                "{asked:?} vs {version:?}"
            );
        }
    }

    #[test]
    fn versions_compare_numerically() {
        let table: &[(&str, &str, Ordering)] = &[
            ("3.13", "3.9", Ordering::Greater),
            ("3.11.2", "3.9", Ordering::Greater),
            ("3.9", "3.11.2", Ordering::Less),
            ("17.0.2", "17", Ordering::Greater),
            ("17", "17.0.2", Ordering::Less),
            ("1.19.8", "1.19.8", Ordering::Equal),
            ("", "1", Ordering::Less),
            ("1", "", Ordering::Greater),
            ("", "", Ordering::Equal),
            ("10", "9", Ordering::Greater),
            ("1.2b", "1.2a", Ordering::Greater),
        ];
        for (a, b, order) in table {
            assert_eq!(compare_versions(a, b), *order, "{a:?} vs {b:?}");
        }
    }

    #[test]
    fn newest_is_by_numeric_components() {
        let table: &[(&[&str], Option<&str>)] = &[
            (&["3.9", "3.13", "3.11.2"], Some("3.13")),
            (&["3.9.1", "3.9"], Some("3.9.1")),
            (&["", "1"], Some("1")),
            (&["21"], Some("21")),
            (&[], None),
        ];
        for (versions, want) in table {
            assert_eq!(newest(versions.iter().copied()), *want, "{versions:?}");
        }
    }
}
