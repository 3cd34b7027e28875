//! Language images: find them, else pull them (when a registry is configured), else build them
//! from their recipe. A recipe's tag carries a hash of its content, so a changed recipe is
//! rebuilt and an unchanged one is reused; a pulled runtime's tag carries a hash of the
//! reference it is pulled as. Every image the agent makes is labelled with its name, that hash
//! and its image cache (`engine::LABEL_*`): the images housekeeping may remove.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use crate::catalog::{builtin_recipe, Language};
use crate::engine::{Engine, EngineError, LABEL_CACHE, LABEL_IMAGE, LABEL_PULLED, LABEL_RECIPE};

/// Where a runtime's image comes from, and the tag it has here.
#[derive(Debug, Clone)]
pub struct Plan {
    /// `codefleet-<image>:<hash>`.
    pub tag: String,
    /// The image's name (`Language::image`).
    pub image: String,
    /// The 12 hex digits the tag ends in.
    pub hash: String,
    pub source: Source,
}

#[derive(Debug, Clone)]
pub enum Source {
    /// Built from a recipe (or pulled as `<registry>/<tag>` when a registry has it).
    Recipe(Recipe),
    /// Pulled as this reference (`host:port/name:tag`), then labelled into `tag` by a build
    /// of one `FROM` line.
    Pull(String),
}

impl Plan {
    /// How `lang`'s image is had on an agent with these recipes and this registry: pulled when
    /// the runtime names an image to pull and a registry is configured, else from its recipe.
    pub fn of(
        lang: &Language,
        images_dir: Option<&Path>,
        registry: Option<&str>,
    ) -> Result<Plan, String> {
        if let (Some(pull), Some(registry)) = (&lang.pull, registry) {
            let reference = format!("{}/{pull}", registry.trim_end_matches('/'));
            let hash = short_hash(&[("pull".to_string(), reference.clone().into_bytes())]);
            return Ok(Plan {
                tag: format!("codefleet-{}:{hash}", lang.image),
                image: lang.image.clone(),
                hash,
                source: Source::Pull(reference),
            });
        }
        let recipe = Recipe::of(lang, images_dir).map_err(|e| match &lang.pull {
            Some(pull) => format!("{e} (the runtime pulls {pull:?}, but no --registry is set)"),
            None => e,
        })?;
        let hash = short_hash(&recipe.files);
        Ok(Plan {
            tag: format!("codefleet-{}:{hash}", lang.image),
            image: lang.image.clone(),
            hash,
            source: Source::Recipe(recipe),
        })
    }

    /// The labels of the image this plan makes, in image cache `cache`.
    pub fn labels(&self, cache: &str) -> BTreeMap<String, String> {
        let mut labels = BTreeMap::from([
            (LABEL_IMAGE.to_string(), self.image.clone()),
            (LABEL_RECIPE.to_string(), self.hash.clone()),
            (LABEL_CACHE.to_string(), cache.to_string()),
        ]);
        if let Source::Pull(reference) = &self.source {
            labels.insert(LABEL_PULLED.to_string(), reference.clone());
        }
        labels
    }
}

/// How an image came to be present.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Obtained {
    /// Its tag was there already.
    Found,
    /// Pulled from the registry.
    Pulled,
    /// Built from its recipe.
    Built,
}

impl Obtained {
    pub fn as_str(self) -> &'static str {
        match self {
            Obtained::Found => "found",
            Obtained::Pulled => "pulled",
            Obtained::Built => "built",
        }
    }
}

/// Makes `plan`'s image present on `engine`, in image cache `cache`: found by its tag, else
/// pulled (a pulled runtime's reference, then labelled by a one-line build; a recipe's tag from
/// the registry when there is one), else built from the recipe. `runtime` names the runtime in
/// the progress lines logged on the way.
pub async fn obtain(
    engine: &dyn Engine,
    plan: &Plan,
    cache: &str,
    registry: Option<&str>,
    runtime: &str,
) -> Result<Obtained, String> {
    if engine
        .image_exists(&plan.tag)
        .await
        .map_err(|e| e.to_string())?
    {
        return Ok(Obtained::Found);
    }
    let labels = plan.labels(cache);
    match &plan.source {
        Source::Pull(reference) => {
            let present = engine
                .image_exists(reference)
                .await
                .map_err(|e| e.to_string())?;
            if !present {
                tracing::info!(%runtime, %reference, "pulling image");
                engine
                    .pull(reference, &mut progress(runtime, "pulling image"))
                    .await
                    .map_err(|e| format!("pulling {reference}: {e}"))?;
            }
            engine
                .build(
                    &plan.tag,
                    from_only_context(reference),
                    &labels,
                    &mut progress(runtime, "labelling image"),
                )
                .await
                .map_err(|e| format!("labelling {reference} as {}: {e}", plan.tag))?;
            Ok(Obtained::Pulled)
        }
        Source::Recipe(recipe) => {
            if let Some(registry) = registry {
                let reference = format!("{}/{}", registry.trim_end_matches('/'), plan.tag);
                tracing::info!(%runtime, %reference, "pulling image");
                let pulled = engine
                    .pull(&reference, &mut progress(runtime, "pulling image"))
                    .await;
                match pulled {
                    Ok(()) => {
                        engine
                            .tag(&reference, &plan.tag)
                            .await
                            .map_err(|e| e.to_string())?;
                        return Ok(Obtained::Pulled);
                    }
                    Err(e) => tracing::info!(%runtime, error = %e, "pull failed; building"),
                }
            }
            tracing::info!(%runtime, tag = %plan.tag, "building image from its recipe");
            engine
                .build(
                    &plan.tag,
                    recipe.context_tar(),
                    &labels,
                    &mut progress(runtime, "building image"),
                )
                .await
                .map_err(|e| match e {
                    EngineError::ImageMissing { .. } => format!(
                        "{e} (no base image and no registry: run deploy/images/bootstrap-base.sh)"
                    ),
                    e => e.to_string(),
                })?;
            Ok(Obtained::Built)
        }
    }
}

/// A progress callback that logs the engine's lines as `what`: each build step and finished
/// layer, and any other line at most every 10 s (a download's own progress lines repeat).
fn progress(runtime: &str, what: &'static str) -> impl FnMut(&str) + Send {
    let runtime = runtime.to_string();
    let mut last = Instant::now();
    move |line: &str| {
        let milestone = line.starts_with("Step ")
            || line.ends_with("Pull complete")
            || line.starts_with("Digest:")
            || line.starts_with("Status:");
        if milestone || last.elapsed() > Duration::from_secs(10) {
            last = Instant::now();
            tracing::info!(%runtime, progress = %line, "{what}");
        }
    }
}

/// The build context that labels a pulled image: one `FROM` line.
pub fn from_only_context(reference: &str) -> Vec<u8> {
    Recipe {
        files: vec![(
            "Dockerfile".to_string(),
            format!("FROM {reference}\n").into_bytes(),
        )],
    }
    .context_tar()
}

/// The first 12 hex digits of the hash of these named contents.
fn short_hash(files: &[(String, Vec<u8>)]) -> String {
    let mut h = Sha256::new();
    for (name, content) in files {
        h.update((name.len() as u64).to_le_bytes());
        h.update(name.as_bytes());
        h.update((content.len() as u64).to_le_bytes());
        h.update(content);
    }
    h.finalize()
        .iter()
        .take(6)
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The files of a build context, by name.
#[derive(Debug, Clone)]
pub struct Recipe {
    pub files: Vec<(String, Vec<u8>)>,
}

impl Recipe {
    /// The recipe of `lang`: from `images_dir/<image>/` when given, else the built-in one.
    pub fn of(lang: &Language, images_dir: Option<&Path>) -> Result<Recipe, String> {
        match images_dir {
            None => builtin_recipe(&lang.image)
                .map(|text| Recipe {
                    files: vec![("Dockerfile".to_string(), text.as_bytes().to_vec())],
                })
                .ok_or_else(|| format!("no built-in recipe named {:?}", lang.image)),
            Some(dir) => {
                let dir = dir.join(&lang.image);
                let mut files = Vec::new();
                let entries =
                    std::fs::read_dir(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
                for entry in entries {
                    let entry = entry.map_err(|e| e.to_string())?;
                    if entry.file_type().map_err(|e| e.to_string())?.is_file() {
                        let name = entry.file_name().to_string_lossy().into_owned();
                        let content = std::fs::read(entry.path()).map_err(|e| e.to_string())?;
                        files.push((name, content));
                    }
                }
                files.sort();
                if !files.iter().any(|(n, _)| n == "Dockerfile") {
                    return Err(format!("{} has no Dockerfile", dir.display()));
                }
                Ok(Recipe { files })
            }
        }
    }

    /// `codefleet-<image>:<first 12 hex of the recipe's hash>`.
    pub fn tag(&self, image: &str) -> String {
        format!("codefleet-{image}:{}", short_hash(&self.files))
    }

    /// The build context as a tar archive.
    pub fn context_tar(&self) -> Vec<u8> {
        let mut builder = tar::Builder::new(Vec::new());
        for (name, content) in &self.files {
            let mut header = tar::Header::new_gnu();
            header.set_size(content.len() as u64);
            header.set_mode(0o644);
            header.set_mtime(0);
            header.set_cksum();
            builder
                .append_data(&mut header, name, content.as_slice())
                .expect("writing a tar into memory cannot fail");
        }
        builder
            .into_inner()
            .expect("writing a tar into memory cannot fail")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::{Catalog, BUILTIN_CATALOG};
    use crate::engine::fake::FakeEngine;

    fn pulled_lua() -> Language {
        let mut lua = Catalog::parse(BUILTIN_CATALOG)
            .unwrap()
            .find("lua")
            .unwrap()
            .clone();
        lua.image = "lua-pulled".into();
        lua.pull = Some("team/lua:5.4".into());
        lua
    }

    #[tokio::test]
    async fn a_pulled_runtime_is_pulled_once_then_labelled_as_the_agents_own() {
        let fake = FakeEngine::new();
        fake.add_to_registry("127.0.0.1:5000/team/lua:5.4", 7);
        let plan = Plan::of(&pulled_lua(), None, Some("127.0.0.1:5000/")).unwrap();
        assert!(
            plan.tag.starts_with("codefleet-lua-pulled:"),
            "{}",
            plan.tag
        );
        let how = obtain(fake.as_ref(), &plan, "c1", Some("127.0.0.1:5000"), "lua/x").await;
        assert_eq!(how, Ok(Obtained::Pulled));
        assert_eq!(fake.pulls(), ["127.0.0.1:5000/team/lua:5.4"]);
        let labels = fake.image_labels(&plan.tag).unwrap();
        assert_eq!(labels[LABEL_PULLED], "127.0.0.1:5000/team/lua:5.4");
        assert_eq!(labels[LABEL_CACHE], "c1");
        assert_eq!(labels[LABEL_RECIPE], plan.hash);
        // Present now: found, not pulled again.
        let again = obtain(fake.as_ref(), &plan, "c1", None, "lua/x").await;
        assert_eq!(again, Ok(Obtained::Found));
        assert_eq!(fake.pulls().len(), 1);
        // Another reference is another tag.
        let mut other = pulled_lua();
        other.pull = Some("team/lua:5.5".into());
        let other = Plan::of(&other, None, Some("127.0.0.1:5000")).unwrap();
        assert_ne!(other.tag, plan.tag);
        let missing = obtain(fake.as_ref(), &other, "c1", None, "lua/y").await;
        assert!(missing.unwrap_err().contains("team/lua:5.5"));
    }

    #[tokio::test]
    async fn without_a_registry_a_pulled_runtime_uses_its_recipe_or_says_why_not() {
        let lua = pulled_lua();
        let why = Plan::of(&lua, None, None).unwrap_err();
        assert!(why.contains("no --registry"), "{why}");
        let mut with_recipe = lua.clone();
        with_recipe.image = "lua".into();
        let plan = Plan::of(&with_recipe, None, None).unwrap();
        assert!(matches!(plan.source, Source::Recipe(_)));
        // A recipe missing from the registry is built, labelled.
        let fake = FakeEngine::new();
        let how = obtain(
            fake.as_ref(),
            &plan,
            "c1",
            Some("127.0.0.1:5000"),
            "lua/lua",
        )
        .await;
        assert_eq!(how, Ok(Obtained::Built));
        assert_eq!(fake.pulls(), [format!("127.0.0.1:5000/{}", plan.tag)]);
        assert_eq!(fake.builds(), std::slice::from_ref(&plan.tag));
        assert_eq!(fake.image_labels(&plan.tag).unwrap()[LABEL_IMAGE], "lua");
    }

    #[test]
    fn tags_change_with_the_recipe_and_only_then() {
        let c = Catalog::parse(BUILTIN_CATALOG).unwrap();
        let py = Recipe::of(c.find("python").unwrap(), None).unwrap();
        let tag = py.tag("python");
        assert!(tag.starts_with("codefleet-python:"), "{tag}");
        assert_eq!(tag, py.tag("python"));
        let mut changed = py.clone();
        changed.files[0].1.extend_from_slice(b"\n# changed");
        assert_ne!(changed.tag("python"), tag);
    }

    #[test]
    fn context_is_a_tar_holding_the_dockerfile() {
        let c = Catalog::parse(BUILTIN_CATALOG).unwrap();
        let tar_bytes = Recipe::of(c.find("go").unwrap(), None)
            .unwrap()
            .context_tar();
        let mut archive = tar::Archive::new(tar_bytes.as_slice());
        let names: Vec<String> = archive
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["Dockerfile"]);
    }
}
