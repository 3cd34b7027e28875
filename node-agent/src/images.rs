//! Language images: find them, else pull them (when a registry is configured), else build them
//! from their recipe. A recipe's tag carries a hash of its content, so a changed recipe is
//! rebuilt and an unchanged one is reused.

use std::path::Path;

use sha2::{Digest, Sha256};

use crate::catalog::{builtin_recipe, Language};

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
        let mut h = Sha256::new();
        for (name, content) in &self.files {
            h.update((name.len() as u64).to_le_bytes());
            h.update(name.as_bytes());
            h.update((content.len() as u64).to_le_bytes());
            h.update(content);
        }
        let digest = h.finalize();
        let hex: String = digest.iter().take(6).map(|b| format!("{b:02x}")).collect();
        format!("codefleet-{image}:{hex}")
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
