//! The image registry: what state each catalog language's image is in on this node (preparing,
//! ready with its tag and version, failed), resolving a request's language and version against
//! it, and the `/v1/languages` view.

use std::collections::HashMap;
use std::sync::RwLock;

use codefleet_shared::version::version_matches;
use codefleet_shared::{ErrorCode, ImageState, LanguageInfo, Problem};

use crate::catalog::{Catalog, Language};

#[derive(Debug, Clone)]
pub enum ImageStatus {
    Preparing,
    Ready { tag: String, version: String },
    Failed(String),
}

impl ImageStatus {
    pub fn state(&self) -> ImageState {
        match self {
            ImageStatus::Preparing => ImageState::Preparing,
            ImageStatus::Ready { .. } => ImageState::Ready,
            ImageStatus::Failed(_) => ImageState::Failed,
        }
    }
}

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
            .map(|l| (l.name.clone(), ImageStatus::Preparing))
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

    pub fn status(&self, language: &str) -> ImageStatus {
        self.images
            .read()
            .expect("images lock")
            .get(language)
            .cloned()
            .unwrap_or(ImageStatus::Failed("not in the catalog".into()))
    }

    pub fn set(&self, language: &str, status: ImageStatus) {
        self.images
            .write()
            .expect("images lock")
            .insert(language.to_string(), status);
    }

    /// The image tag of a language whose image is ready.
    pub fn ready_tag(&self, language: &str) -> Result<String, String> {
        match self.status(language) {
            ImageStatus::Ready { tag, .. } => Ok(tag),
            other => Err(format!("image not ready: {other:?}")),
        }
    }

    /// The languages ready to serve: image ready and version read.
    pub fn serving(&self) -> Vec<String> {
        self.catalog
            .languages
            .iter()
            .filter(|l| matches!(self.status(&l.name), ImageStatus::Ready { ref version, .. } if !version.is_empty()))
            .map(|l| l.name.clone())
            .collect()
    }

    /// Resolves `language` and `version` to a ready language (with its version and image tag),
    /// or the right problem.
    pub fn resolve(
        &self,
        language: Option<&str>,
        version: Option<&str>,
    ) -> Result<(Language, String, String), Problem> {
        let name = language
            .filter(|l| !l.trim().is_empty())
            .ok_or_else(|| Problem::new(ErrorCode::InvalidRequest, "`language` is required"))?;
        let lang = self.catalog.find(name).ok_or_else(|| {
            Problem::new(
                ErrorCode::UnknownLanguage,
                format!(
                    "no language {name:?}; available: {}",
                    self.catalog.names().join(", ")
                ),
            )
        })?;
        match self.status(&lang.name) {
            ImageStatus::Ready { tag, version: v } => {
                if !version_matches(version, &v) {
                    let asked = version.unwrap_or_default();
                    return Err(Problem::new(
                        ErrorCode::UnknownLanguage,
                        format!("no version {asked:?} of {}; available: {v}", lang.name),
                    ));
                }
                Ok((lang.clone(), v, tag))
            }
            ImageStatus::Preparing => Err(Problem::new(
                ErrorCode::LanguageUnavailable,
                format!(
                    "{} is still being prepared on node {}",
                    lang.name, self.node
                ),
            )),
            ImageStatus::Failed(why) => Err(Problem::new(
                ErrorCode::LanguageUnavailable,
                format!("{} is unavailable on node {}: {why}", lang.name, self.node),
            )
            .with_retry_after(30)),
        }
    }

    pub fn languages(&self) -> Vec<LanguageInfo> {
        let mut out: Vec<LanguageInfo> = self
            .catalog
            .languages
            .iter()
            .map(|l| {
                let status = self.status(&l.name);
                let (version, error) = match &status {
                    ImageStatus::Ready { version, .. } => (version.clone(), None),
                    ImageStatus::Failed(why) => (String::new(), Some(why.clone())),
                    ImageStatus::Preparing => (String::new(), None),
                };
                LanguageInfo {
                    name: l.name.clone(),
                    aliases: l.aliases.clone(),
                    version,
                    compiled: l.compiled(),
                    file_name: l.file_name.clone(),
                    nodes_ready: u32::from(matches!(status, ImageStatus::Ready { .. })),
                    image: Some(status.state()),
                    error,
                }
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }
}
