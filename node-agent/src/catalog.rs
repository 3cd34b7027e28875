//! The language catalog: its runtimes (one language at one version in one image: names,
//! aliases, image recipes and command lines), parsed from TOML (deploy/languages.toml is built
//! in). A language has one runtime per `[[language]]` entry of its name.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;

/// The built-in catalog and image recipes, so the binary is self-contained.
pub const BUILTIN_CATALOG: &str = include_str!("../../deploy/languages.toml");

pub fn builtin_recipe(image: &str) -> Option<&'static str> {
    Some(match image {
        "python" => include_str!("../../deploy/images/python/Dockerfile"),
        "javascript" => include_str!("../../deploy/images/javascript/Dockerfile"),
        "go" => include_str!("../../deploy/images/go/Dockerfile"),
        "java" => include_str!("../../deploy/images/java/Dockerfile"),
        "cpp" => include_str!("../../deploy/images/cpp/Dockerfile"),
        "rust" => include_str!("../../deploy/images/rust/Dockerfile"),
        "c" => include_str!("../../deploy/images/c/Dockerfile"),
        "typescript" => include_str!("../../deploy/images/typescript/Dockerfile"),
        "bash" => include_str!("../../deploy/images/bash/Dockerfile"),
        "ruby" => include_str!("../../deploy/images/ruby/Dockerfile"),
        "php" => include_str!("../../deploy/images/php/Dockerfile"),
        "lua" => include_str!("../../deploy/images/lua/Dockerfile"),
        "perl" => include_str!("../../deploy/images/perl/Dockerfile"),
        "sqlite" => include_str!("../../deploy/images/sqlite/Dockerfile"),
        "csharp" => include_str!("../../deploy/images/csharp/Dockerfile"),
        "python-3.13" => include_str!("../../deploy/images/python-3.13/Dockerfile"),
        "node-20" => include_str!("../../deploy/images/node-20/Dockerfile"),
        "go-1.24" => include_str!("../../deploy/images/go-1.24/Dockerfile"),
        "java-21" => include_str!("../../deploy/images/java-21/Dockerfile"),
        "gcc-14" => include_str!("../../deploy/images/gcc-14/Dockerfile"),
        "rust-1.85" => include_str!("../../deploy/images/rust-1.85/Dockerfile"),
        _ => return None,
    })
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Language {
    pub name: String,
    #[serde(default)]
    pub aliases: Vec<String>,
    /// Recipe folder under deploy/images/ (for a runtime pulled from a registry, the name of
    /// its image here: `codefleet-<image>:<hash>`).
    pub image: String,
    /// An image to pull from `--registry` instead of building the recipe (`name:tag`, relative
    /// to the registry), when a registry is configured; it must have the layout
    /// deploy/images/README.md describes.
    #[serde(default)]
    pub pull: Option<String>,
    pub file_name: String,
    /// Command whose output carries the version, read when the image is prepared.
    pub version: Vec<String>,
    #[serde(default)]
    pub compile: Option<Vec<String>>,
    pub run: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// A program run once in every new pool sandbox (then reset) before a job gets it.
    #[serde(default)]
    pub warmup: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CatalogFile {
    language: Vec<Language>,
}

#[derive(Debug, Clone)]
pub struct Catalog {
    pub languages: Vec<Language>,
}

impl Catalog {
    pub fn parse(text: &str) -> Result<Catalog, String> {
        let file: CatalogFile = toml::from_str(text).map_err(|e| e.to_string())?;
        let mut owners: BTreeMap<&str, &str> = BTreeMap::new();
        let mut runtimes = std::collections::BTreeSet::new();
        for lang in &file.language {
            if lang.run.is_empty() || lang.version.is_empty() {
                return Err(format!(
                    "language {}: `run` and `version` must not be empty",
                    lang.name
                ));
            }
            if lang.compile.as_ref().is_some_and(|c| c.is_empty()) {
                return Err(format!(
                    "language {}: `compile` must not be empty",
                    lang.name
                ));
            }
            if !runtimes.insert(lang.runtime()) {
                return Err(format!(
                    "language {}: image {:?} is listed twice",
                    lang.name, lang.image
                ));
            }
            for alias in std::iter::once(&lang.name).chain(&lang.aliases) {
                let owner = owners.entry(alias).or_insert(&lang.name);
                if *owner != lang.name {
                    return Err(format!(
                        "{alias:?} names both language {owner} and language {}",
                        lang.name
                    ));
                }
            }
        }
        Ok(Catalog {
            languages: file.language,
        })
    }

    pub fn load(path: Option<&Path>) -> Result<Catalog, String> {
        match path {
            None => Catalog::parse(BUILTIN_CATALOG),
            Some(p) => {
                let text =
                    std::fs::read_to_string(p).map_err(|e| format!("{}: {e}", p.display()))?;
                Catalog::parse(&text)
            }
        }
    }

    /// Keeps only the runtimes the names (or aliases) name, all of a language's runtimes for its
    /// name (all runtimes when `names` is empty).
    pub fn restrict(mut self, names: &[String]) -> Result<Catalog, String> {
        if names.is_empty() {
            return Ok(self);
        }
        for n in names {
            if self.find(n).is_none() {
                return Err(format!("--enable names unknown language {n:?}"));
            }
        }
        self.languages.retain(|l| names.iter().any(|n| l.named(n)));
        Ok(self)
    }

    /// The first runtime a request's language names, by name or alias, case-insensitively.
    pub fn find(&self, name: &str) -> Option<&Language> {
        self.named(name).into_iter().next()
    }

    /// Every runtime `name` names (by the language's name, or an alias a runtime lists),
    /// case-insensitively, in catalog order.
    pub fn named(&self, name: &str) -> Vec<&Language> {
        self.languages.iter().filter(|l| l.named(name)).collect()
    }

    /// The runtime with this id ([`Language::runtime`]).
    pub fn runtime(&self, id: &str) -> Option<&Language> {
        self.languages.iter().find(|l| l.runtime() == id)
    }

    /// The language names, sorted, each once.
    pub fn names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.languages.iter().map(|l| l.name.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        names
    }
}

impl Language {
    /// This runtime's id, unique in a catalog: the language's name and its image's recipe
    /// (`python/python-3.13`). Pools and image states are keyed by it.
    pub fn runtime(&self) -> String {
        format!("{}/{}", self.name, self.image)
    }

    /// Whether `asked` (a name or an alias, any case) names this runtime.
    pub fn named(&self, asked: &str) -> bool {
        let asked = asked.trim().to_ascii_lowercase();
        self.name == asked || self.aliases.contains(&asked)
    }

    pub fn compiled(&self) -> bool {
        self.compile.is_some()
    }

    /// The compile and run command lines for a job whose entry file is `entry`.
    pub fn commands(&self, entry: &str, args: &[String]) -> (Option<Vec<String>>, Vec<String>) {
        let stem = entry.rsplit('/').next().unwrap_or(entry);
        let stem = stem.split_once('.').map_or(stem, |(s, _)| s);
        let expand = |argv: &[String]| -> Vec<String> {
            argv.iter()
                .map(|a| a.replace("{entry_stem}", stem).replace("{entry}", entry))
                .collect()
        };
        let compile = self.compile.as_deref().map(expand);
        let mut run = expand(&self.run);
        run.extend(args.iter().cloned());
        (compile, run)
    }
}

/// The first version-looking token (`3.11.2`, `1.19.8`, `17.0.19`) in a command's output.
pub fn parse_version(output: &str) -> Option<String> {
    output
        .split(|c: char| !(c.is_ascii_digit() || c == '.'))
        .map(|t| t.trim_matches('.'))
        .find(|t| t.contains('.') && t.split('.').all(|p| !p.is_empty()))
        .map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_catalog_has_fifteen_languages_with_recipes() {
        let c = Catalog::parse(BUILTIN_CATALOG).unwrap();
        assert_eq!(
            c.names(),
            [
                "bash",
                "c",
                "cpp",
                "csharp",
                "go",
                "java",
                "javascript",
                "lua",
                "perl",
                "php",
                "python",
                "ruby",
                "rust",
                "sqlite",
                "typescript"
            ]
        );
        for l in &c.languages {
            assert!(builtin_recipe(&l.image).is_some(), "{}", l.name);
        }
    }

    #[test]
    fn finds_by_alias_case_insensitively() {
        let c = Catalog::parse(BUILTIN_CATALOG).unwrap();
        for (asked, name) in [
            ("py", "python"),
            ("JS", "javascript"),
            ("node", "javascript"),
            ("c++", "cpp"),
            ("rust", "rust"),
            ("ts", "typescript"),
            ("sh", "bash"),
            ("rb", "ruby"),
            ("sqlite3", "sqlite"),
            ("C#", "csharp"),
            ("cs", "csharp"),
            ("mono", "csharp"),
            ("gcc", "c"),
            ("lua5.4", "lua"),
        ] {
            assert_eq!(c.find(asked).unwrap().name, name);
        }
        assert!(c.find("cobol").is_none());
    }

    #[test]
    fn the_trixie_catalog_parses_and_names_recipe_folders() {
        let text = include_str!("../../deploy/images/trixie.toml");
        let c = Catalog::parse(text).unwrap();
        assert_eq!(
            c.names(),
            ["c", "cpp", "go", "java", "javascript", "python", "rust"]
        );
        let images = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/images");
        for l in &c.languages {
            assert!(
                images.join(&l.image).join("Dockerfile").is_file(),
                "{}",
                l.image
            );
        }
    }

    #[test]
    fn no_name_or_alias_names_two_languages() {
        let c = Catalog::parse(BUILTIN_CATALOG).unwrap();
        let mut owner: BTreeMap<&str, &str> = BTreeMap::new();
        for l in &c.languages {
            for alias in std::iter::once(&l.name).chain(&l.aliases) {
                assert_eq!(*owner.entry(alias).or_insert(&l.name), l.name, "{alias}");
            }
        }
        let twice = "[[language]]\nname = \"a\"\naliases = [\"x\"]\nimage = \"a\"\nfile_name = \"a\"\nversion = [\"v\"]\nrun = [\"r\"]\n\n\
                     [[language]]\nname = \"b\"\naliases = [\"x\"]\nimage = \"b\"\nfile_name = \"b\"\nversion = [\"v\"]\nrun = [\"r\"]\n";
        assert!(Catalog::parse(twice)
            .unwrap_err()
            .contains("\"x\" names both"));
        let same_image = twice.replace("\"b\"", "\"a\"");
        assert!(Catalog::parse(&same_image)
            .unwrap_err()
            .contains("listed twice"));
    }

    #[test]
    fn the_builtin_catalog_serves_the_trixie_runtimes_beside_the_defaults() {
        let builtin = Catalog::parse(BUILTIN_CATALOG).unwrap();
        let trixie = Catalog::parse(include_str!("../../deploy/images/trixie.toml")).unwrap();
        for l in &trixie.languages {
            assert_eq!(builtin.runtime(&l.runtime()), Some(l), "{}", l.runtime());
            assert!(builtin_recipe(&l.image).is_some(), "{}", l.image);
            let runtimes = builtin.named(&l.name);
            assert_eq!(runtimes.len(), 2, "{}", l.name);
        }
        // An alias names the runtimes that list it; the name names them all.
        let java17: Vec<String> = builtin
            .named("JAVA17")
            .iter()
            .map(|l| l.runtime())
            .collect();
        assert_eq!(java17, ["java/java"]);
        assert_eq!(builtin.named("py").len(), 2);
        let enabled = builtin
            .clone()
            .restrict(&["python".into(), "java21".into()])
            .unwrap();
        let ids: Vec<String> = enabled.languages.iter().map(|l| l.runtime()).collect();
        assert_eq!(ids, ["python/python", "python/python-3.13", "java/java-21"]);
    }

    #[test]
    fn commands_expand_placeholders_and_append_args() {
        let c = Catalog::parse(BUILTIN_CATALOG).unwrap();
        let java = c.find("java").unwrap();
        let (compile, run) = java.commands("Main.java", &["a".into(), "{entry}".into()]);
        assert!(compile.unwrap().contains(&"Main.java".to_string()));
        assert_eq!(&run[run.len() - 3..], ["Main", "a", "{entry}"]);
    }

    #[test]
    fn versions_parse_from_tool_output() {
        let table = [
            ("Python 3.11.2", "3.11.2"),
            ("v18.19.0", "18.19.0"),
            ("go version go1.19.8 linux/amd64", "1.19.8"),
            ("openjdk version \"17.0.19\" 2026-04-21", "17.0.19"),
            ("g++ (Debian 12.2.0-14+deb12u1) 12.2.0", "12.2.0"),
            ("rustc 1.63.0", "1.63.0"),
            ("GNU bash, version 5.2.37(1)-release (x86_64-pc-linux-gnu)", "5.2.37"),
            ("Lua 5.4.7  Copyright (C) 1994-2024 Lua.org, PUC-Rio", "5.4.7"),
            ("v5.40.1", "5.40.1"),
            ("3.46.1 2024-08-13 09:16:08 c9c2ab54ba1f5f46360f1b4f35d849cd3f080e6fc2b6c60e91b16c63f69aalt1 (64-bit)", "3.46.1"),
            ("Mono JIT compiler version 6.12.0.199 (Debian 6.12.0.199+dfsg-6)", "6.12.0.199"),
            ("Version 4.9.5", "4.9.5"),
        ];
        for (out, v) in table {
            assert_eq!(parse_version(out).as_deref(), Some(v), "{out}");
        }
        assert_eq!(parse_version("no digits"), None);
    }
}
