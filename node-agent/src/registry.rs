//! The image registry: what state each catalog runtime's image is in on this node (preparing,
//! ready with its tag and version, failed), resolving a request's language and version to one
//! runtime, and the `/v1/languages` view (one entry per runtime).

use std::collections::HashMap;
use std::sync::RwLock;

use codefleet_shared::version::{compare_versions, version_matches};
use codefleet_shared::{ErrorCode, ImageState, LanguageInfo, Problem};

use crate::catalog::{Catalog, Language};

#[derive(Debug, Clone)]
pub enum ImageStatus {
    Preparing,
    Ready { tag: String, version: String },
    Failed(String),
}

impl ImageStatus {
    /// The state reports show: an image whose version is still being read is `preparing`, as
    /// the runtime does not serve until it is read.
    pub fn state(&self) -> ImageState {
        match self {
            ImageStatus::Preparing => ImageState::Preparing,
            ImageStatus::Ready { .. } if self.version().is_none() => ImageState::Preparing,
            ImageStatus::Ready { .. } => ImageState::Ready,
            ImageStatus::Failed(_) => ImageState::Failed,
        }
    }

    /// The version read from a ready image; `None` before it is read.
    fn version(&self) -> Option<&str> {
        match self {
            ImageStatus::Ready { version, .. } if !version.is_empty() => Some(version),
            _ => None,
        }
    }
}

/// Keyed by runtime id ([`Language::runtime`]).
pub struct Registry {
    catalog: Catalog,
    node: String,
    images: RwLock<HashMap<String, ImageStatus>>,
}

impl Registry {
    pub fn new(catalog: Catalog, node: &str) -> Registry {
        let images = catalog
            .languages
            .iter()
            .map(|l| (l.runtime(), ImageStatus::Preparing))
            .collect();
        Registry {
            catalog,
            node: node.to_string(),
            images: RwLock::new(images),
        }
    }

    pub fn catalog(&self) -> &Catalog {
        &self.catalog
    }

    /// The state of runtime `runtime`'s image.
    pub fn status(&self, runtime: &str) -> ImageStatus {
        self.images
            .read()
            .expect("images lock")
            .get(runtime)
            .cloned()
            .unwrap_or(ImageStatus::Failed("not in the catalog".into()))
    }

    pub fn set(&self, runtime: &str, status: ImageStatus) {
        self.images
            .write()
            .expect("images lock")
            .insert(runtime.to_string(), status);
    }

    /// The image tag of a runtime whose image is ready.
    pub fn ready_tag(&self, runtime: &str) -> Result<String, String> {
        match self.status(runtime) {
            ImageStatus::Ready { tag, .. } => Ok(tag),
            other => Err(format!("image not ready: {other:?}")),
        }
    }

    /// The runtimes ready to serve: image ready and version read.
    pub fn serving(&self) -> Vec<Language> {
        self.catalog
            .languages
            .iter()
            .filter(|l| self.status(&l.runtime()).version().is_some())
            .cloned()
            .collect()
    }

    /// The id of `language`'s default runtime: the newest ready one (what a request without
    /// `version` gets). `None` while a runtime of the language is still being prepared (it may
    /// be newer).
    pub fn default_runtime(&self, language: &str) -> Option<String> {
        let runtimes = || self.catalog.languages.iter().filter(|l| l.name == language);
        let preparing = runtimes().any(|l| {
            let status = self.status(&l.runtime());
            status.version().is_none() && !matches!(status, ImageStatus::Failed(_))
        });
        if preparing {
            return None;
        }
        runtimes()
            .filter_map(|l| {
                let status = self.status(&l.runtime());
                status.version().map(|v| (l.runtime(), v.to_string()))
            })
            .max_by(|a, b| compare_versions(&a.1, &b.1))
            .map(|(id, _)| id)
    }

    /// Resolves `language` and `version` to a ready runtime (with its version and image tag):
    /// among the runtimes the language names, the newest ready one whose version `version`
    /// names; or the right problem: `unknown_language` for no such language, or for a version
    /// no runtime has when every runtime of the language is ready (the detail lists theirs);
    /// `language_unavailable` while a runtime that might match is still being prepared or failed.
    pub fn resolve(
        &self,
        language: Option<&str>,
        version: Option<&str>,
    ) -> Result<(Language, String, String), Problem> {
        let name = language
            .filter(|l| !l.trim().is_empty())
            .ok_or_else(|| Problem::new(ErrorCode::InvalidRequest, "`language` is required"))?;
        let runtimes = self.catalog.named(name);
        let Some(first) = runtimes.first() else {
            return Err(Problem::new(
                ErrorCode::UnknownLanguage,
                format!(
                    "no language {name:?}; available: {}",
                    self.catalog.names().join(", ")
                ),
            ));
        };
        let statuses: Vec<(&Language, ImageStatus)> = runtimes
            .iter()
            .map(|l| (*l, self.status(&l.runtime())))
            .collect();
        let chosen = statuses
            .iter()
            .filter_map(|(l, status)| match status {
                ImageStatus::Ready { tag, version: v } if !v.is_empty() => Some((*l, tag, v)),
                _ => None,
            })
            .filter(|(_, _, v)| version_matches(version, v))
            .max_by(|a, b| compare_versions(a.2, b.2));
        if let Some((lang, tag, v)) = chosen {
            return Ok((lang.clone(), v.clone(), tag.clone()));
        }
        let lang = &first.name;
        if statuses
            .iter()
            .any(|(_, s)| s.version().is_none() && !matches!(s, ImageStatus::Failed(_)))
        {
            return Err(Problem::new(
                ErrorCode::LanguageUnavailable,
                format!("{lang} is still being prepared on node {}", self.node),
            ));
        }
        if let Some(why) = statuses.iter().find_map(|(_, s)| match s {
            ImageStatus::Failed(why) => Some(why),
            _ => None,
        }) {
            return Err(Problem::new(
                ErrorCode::LanguageUnavailable,
                format!("{lang} is unavailable on node {}: {why}", self.node),
            )
            .with_retry_after(30));
        }
        let mut have: Vec<&str> = statuses.iter().filter_map(|(_, s)| s.version()).collect();
        have.sort_by(|a, b| compare_versions(b, a));
        let asked = version.unwrap_or_default();
        Err(Problem::new(
            ErrorCode::UnknownLanguage,
            format!(
                "no version {asked:?} of {lang}; available: {}",
                have.join(", ")
            ),
        ))
    }

    /// One entry per runtime, by name, the newest version first (a runtime whose version is not
    /// read yet last): a language's first entry is the runtime a request without `version` gets.
    pub fn languages(&self) -> Vec<LanguageInfo> {
        self.runtimes().into_iter().map(|(_, info)| info).collect()
    }

    /// [`Registry::languages`] with each entry's runtime id.
    pub fn runtimes(&self) -> Vec<(String, LanguageInfo)> {
        let mut out: Vec<(String, LanguageInfo)> = self
            .catalog
            .languages
            .iter()
            .map(|l| {
                let status = self.status(&l.runtime());
                let (version, error) = match &status {
                    ImageStatus::Ready { version, .. } => (version.clone(), None),
                    ImageStatus::Failed(why) => (String::new(), Some(why.clone())),
                    ImageStatus::Preparing => (String::new(), None),
                };
                let info = LanguageInfo {
                    name: l.name.clone(),
                    aliases: l.aliases.clone(),
                    version,
                    compiled: l.compiled(),
                    file_name: l.file_name.clone(),
                    nodes_ready: u32::from(status.version().is_some()),
                    image: Some(status.state()),
                    error,
                };
                (l.runtime(), info)
            })
            .collect();
        out.sort_by(|(_, a), (_, b)| {
            a.name
                .cmp(&b.name)
                .then_with(|| compare_versions(&b.version, &a.version))
        });
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CATALOG: &str = "\
        [[language]]\nname = \"python\"\naliases = [\"py\", \"python311\"]\nimage = \"python\"\nfile_name = \"main.py\"\nversion = [\"v\"]\nrun = [\"r\"]\n\n\
        [[language]]\nname = \"python\"\naliases = [\"py\"]\nimage = \"python-3.13\"\nfile_name = \"main.py\"\nversion = [\"v\"]\nrun = [\"r\"]\n";

    fn ready(version: &str) -> ImageStatus {
        ImageStatus::Ready {
            tag: format!("tag-{version}"),
            version: version.into(),
        }
    }

    fn registry(old: ImageStatus, new: ImageStatus) -> Registry {
        let r = Registry::new(Catalog::parse(CATALOG).unwrap(), "n1");
        r.set("python/python", old);
        r.set("python/python-3.13", new);
        r
    }

    #[test]
    fn versions_resolve_by_prefix_to_the_newest_matching_runtime() {
        let r = registry(ready("3.11.2"), ready("3.13.5"));
        let table: &[(&str, Option<&str>, Result<&str, ErrorCode>)] = &[
            ("python", Some("3.13"), Ok("3.13.5")),
            ("python", Some("3.11"), Ok("3.11.2")),
            ("python", Some("3.11.2"), Ok("3.11.2")),
            ("python", Some("3"), Ok("3.13.5")),
            ("python", None, Ok("3.13.5")),
            ("python", Some(""), Ok("3.13.5")),
            ("PY", Some("3.11"), Ok("3.11.2")),
            ("python311", None, Ok("3.11.2")),
            ("python311", Some("3.13"), Err(ErrorCode::UnknownLanguage)),
            ("python", Some("3.1"), Err(ErrorCode::UnknownLanguage)),
            ("python", Some("2"), Err(ErrorCode::UnknownLanguage)),
            ("cobol", None, Err(ErrorCode::UnknownLanguage)),
        ];
        for (name, version, want) in table {
            let got = r
                .resolve(Some(name), *version)
                .map(|(_, v, _)| v)
                .map_err(|p| p.code);
            assert_eq!(got.as_deref().map_err(|c| *c), *want, "{name} {version:?}");
        }
        let (lang, _, tag) = r.resolve(Some("python"), Some("3.11")).unwrap();
        assert_eq!(
            (lang.image.as_str(), tag.as_str()),
            ("python", "tag-3.11.2")
        );
        let problem = r.resolve(Some("python"), Some("3.1")).unwrap_err();
        assert!(
            problem.detail.contains("available: 3.13.5, 3.11.2"),
            "{}",
            problem.detail
        );
    }

    #[test]
    fn a_runtime_not_ready_is_skipped_and_makes_a_miss_unavailable() {
        let r = registry(ready("3.11.2"), ImageStatus::Preparing);
        assert_eq!(r.resolve(Some("python"), None).unwrap().1, "3.11.2");
        let problem = r.resolve(Some("python"), Some("3.13")).unwrap_err();
        assert_eq!(problem.code, ErrorCode::LanguageUnavailable);
        let r = registry(ImageStatus::Failed("no base".into()), ready("3.13.5"));
        assert_eq!(r.resolve(Some("python"), Some("3")).unwrap().1, "3.13.5");
        let problem = r.resolve(Some("python"), Some("3.11")).unwrap_err();
        assert_eq!(problem.code, ErrorCode::LanguageUnavailable);
        assert!(problem.detail.contains("no base"), "{}", problem.detail);
    }

    #[test]
    fn languages_list_every_runtime_newest_first() {
        let r = registry(ready("3.11.2"), ready("3.13.5"));
        let listed: Vec<(String, String)> = r
            .runtimes()
            .into_iter()
            .map(|(id, l)| (id, l.version))
            .collect();
        assert_eq!(
            listed,
            [
                ("python/python-3.13".to_string(), "3.13.5".to_string()),
                ("python/python".to_string(), "3.11.2".to_string())
            ]
        );
        assert_eq!(r.serving().len(), 2);
        assert_eq!(
            r.default_runtime("python").as_deref(),
            Some("python/python-3.13")
        );
        let r = registry(ready("3.11.2"), ImageStatus::Preparing);
        assert_eq!(r.default_runtime("python"), None);
        let r = registry(ready("3.11.2"), ImageStatus::Failed("no base".into()));
        assert_eq!(
            r.default_runtime("python").as_deref(),
            Some("python/python")
        );
        assert_eq!(r.languages()[0].version, "3.11.2");
        assert_eq!(r.serving().len(), 1);
    }
}
