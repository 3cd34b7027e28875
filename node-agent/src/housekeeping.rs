//! Image housekeeping: the disk the node's images take (`/v1/capacity`'s `image_bytes`, the
//! `codefleet_image_bytes` gauge), and the removal of stale images. An image is stale when the
//! agent labelled it as a runtime image of its own image cache (`engine::LABEL_*`, see
//! `images::Plan::labels`) and no runtime of the catalog has it now: its runtime left the
//! catalog, or its recipe (or pulled reference) changed and so did the hash in its tag. A stale
//! image is removed once it has been seen stale for the grace period, and never while a
//! container (anyone's) uses it. Nothing unlabelled, nothing of another cache is ever removed.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::catalog::Catalog;
use crate::engine::{
    Engine, EngineError, ImageInfo, LABEL_CACHE, LABEL_IMAGE, LABEL_PULLED, LABEL_RECIPE,
};
use crate::images::Plan;

/// The image hashes the catalog wants, by image name. `None`: a runtime of that name whose
/// hash is unknown here (its recipe could not be read), so every image of the name is kept.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Wanted {
    hashes: BTreeMap<String, Option<BTreeSet<String>>>,
}

impl Wanted {
    /// What the runtimes of these catalogs want, with these recipes and this registry.
    pub fn of(
        catalogs: &[&Catalog],
        images_dir: Option<&std::path::Path>,
        registry: Option<&str>,
    ) -> Wanted {
        let mut wanted = Wanted::default();
        for lang in catalogs.iter().flat_map(|c| &c.languages) {
            let hash = Plan::of(lang, images_dir, registry).ok().map(|p| p.hash);
            wanted.want(&lang.image, hash);
        }
        wanted
    }

    /// Adds a wanted image name, with its hash when it is known.
    pub fn want(&mut self, image: &str, hash: Option<String>) {
        let entry = self
            .hashes
            .entry(image.to_string())
            .or_insert_with(|| Some(BTreeSet::new()));
        match (entry.as_mut(), hash) {
            (Some(hashes), Some(hash)) => {
                hashes.insert(hash);
            }
            _ => *entry = None,
        }
    }

    fn keeps(&self, image: &str, hash: &str) -> bool {
        match self.hashes.get(image) {
            None => false,
            Some(None) => true,
            Some(Some(hashes)) => hashes.contains(hash),
        }
    }
}

/// The images of cache `cache` that no runtime wants: labelled by an agent with that cache
/// (name and hash), and not the name and hash of a wanted runtime.
pub fn stale<'a>(images: &'a [ImageInfo], wanted: &Wanted, cache: &str) -> Vec<&'a ImageInfo> {
    images
        .iter()
        .filter(|i| i.labels.get(LABEL_CACHE).is_some_and(|c| c == cache))
        .filter(
            |i| match (i.labels.get(LABEL_IMAGE), i.labels.get(LABEL_RECIPE)) {
                (Some(image), Some(hash)) => !wanted.keeps(image, hash),
                _ => false,
            },
        )
        .collect()
}

/// What one pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Pass {
    /// Bytes of the node's images: its runtimes' images and every image of its cache.
    pub image_bytes: u64,
    /// Stale images seen, removed or not.
    pub stale: usize,
    /// The tags removed.
    pub removed: Vec<String>,
}

/// The housekeeping state of one agent: when each stale image was first seen stale, and the
/// last measured disk use.
pub struct Housekeeper {
    wanted: Wanted,
    cache: String,
    grace: Duration,
    first_stale: Mutex<HashMap<String, Instant>>,
    /// `u64::MAX` until measured.
    image_bytes: AtomicU64,
}

impl Housekeeper {
    pub fn new(wanted: Wanted, cache: &str, grace: Duration) -> Housekeeper {
        Housekeeper {
            wanted,
            cache: cache.to_string(),
            grace,
            first_stale: Mutex::new(HashMap::new()),
            image_bytes: AtomicU64::new(u64::MAX),
        }
    }

    /// The disk use the last pass measured; `None` before one did.
    pub fn image_bytes(&self) -> Option<u64> {
        match self.image_bytes.load(Ordering::Relaxed) {
            u64::MAX => None,
            n => Some(n),
        }
    }

    /// One pass at `now`: measures the disk use of the images of the tags in `serving` (the
    /// node's ready runtimes) and of this cache, and removes the stale images seen stale for the
    /// grace period that no container uses.
    pub async fn pass(
        &self,
        engine: &dyn Engine,
        serving: &[String],
        now: Instant,
    ) -> Result<Pass, EngineError> {
        let images = engine.images().await?;
        let ours = |i: &ImageInfo| {
            i.labels.get(LABEL_CACHE).is_some_and(|c| *c == self.cache)
                || i.tags.iter().any(|t| serving.contains(t))
        };
        let stale = stale(&images, &self.wanted, &self.cache);
        let due: Vec<&ImageInfo> = {
            let mut first = self.first_stale.lock().expect("first_stale lock");
            // An image wanted again (or gone) is forgotten.
            first.retain(|id, _| stale.iter().any(|i| i.id == *id));
            stale
                .iter()
                .copied()
                .filter(|i| {
                    let since = *first.entry(i.id.clone()).or_insert(now);
                    now.saturating_duration_since(since) >= self.grace
                })
                .collect()
        };
        let mut pass = Pass {
            image_bytes: 0,
            stale: stale.len(),
            removed: vec![],
        };
        let in_use = if due.is_empty() {
            vec![]
        } else {
            engine.images_in_use().await?
        };
        for image in due.iter().filter(|i| !in_use.contains(&i.id)) {
            // A dangling image (its tag taken by a newer build) is removed by its id.
            let names = if image.tags.is_empty() {
                std::slice::from_ref(&image.id)
            } else {
                image.tags.as_slice()
            };
            for tag in names {
                match engine.remove_image(tag).await {
                    Ok(()) => pass.removed.push(tag.clone()),
                    // Used by a container created since the list, or gone: left for now.
                    Err(EngineError::Conflict { .. } | EngineError::NotFound { .. }) => {}
                    Err(e) => return Err(e),
                }
            }
            // The reference a removed image was pulled as goes too, unless an image that
            // stays was made from it.
            if let Some(reference) = image.labels.get(LABEL_PULLED) {
                let still_used = images.iter().any(|i| {
                    i.labels.get(LABEL_PULLED) == Some(reference)
                        && !due.iter().any(|d| d.id == i.id)
                });
                if !still_used {
                    match engine.remove_image(reference).await {
                        Ok(()) => pass.removed.push(reference.clone()),
                        Err(EngineError::Conflict { .. } | EngineError::NotFound { .. }) => {}
                        Err(e) => return Err(e),
                    }
                }
            }
        }
        // What is left: the images of which a tag remains.
        pass.image_bytes = images
            .iter()
            .filter(|i| ours(i) && !pass.removed.contains(&i.id))
            .filter(|i| i.tags.is_empty() || !i.tags.iter().all(|t| pass.removed.contains(t)))
            .map(|i| i.size)
            .sum();
        self.image_bytes.store(pass.image_bytes, Ordering::Relaxed);
        metrics::gauge!("codefleet_image_bytes").set(pass.image_bytes as f64);
        if !pass.removed.is_empty() {
            metrics::counter!("codefleet_images_removed_total")
                .increment(pass.removed.len() as u64);
            tracing::info!(removed = ?pass.removed, "removed stale runtime images");
        }
        Ok(pass)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::fake::FakeEngine;

    fn labels(image: &str, hash: &str, cache: &str) -> BTreeMap<String, String> {
        BTreeMap::from([
            (LABEL_IMAGE.to_string(), image.to_string()),
            (LABEL_RECIPE.to_string(), hash.to_string()),
            (LABEL_CACHE.to_string(), cache.to_string()),
        ])
    }

    fn wanted() -> Wanted {
        let mut w = Wanted::default();
        w.want("lua", Some("aaaaaaaaaaaa".into()));
        w.want("python", Some("cccccccccccc".into()));
        w.want("unreadable", None);
        w
    }

    /// The engine as a test of housekeeping finds it: every kind of image beside the stale
    /// ones of this cache.
    fn engine() -> std::sync::Arc<FakeEngine> {
        let fake = FakeEngine::new();
        let images = [
            // Wanted, in this cache.
            (
                "codefleet-lua:aaaaaaaaaaaa",
                ("lua", "aaaaaaaaaaaa", "c1"),
                10,
            ),
            // Stale in this cache: an older recipe of a wanted name, a name no longer wanted.
            (
                "codefleet-lua:bbbbbbbbbbbb",
                ("lua", "bbbbbbbbbbbb", "c1"),
                20,
            ),
            (
                "codefleet-gone:dddddddddddd",
                ("gone", "dddddddddddd", "c1"),
                40,
            ),
            // A name whose hash is unknown here: kept whatever its hash.
            (
                "codefleet-unreadable:eeeeeeeeeeee",
                ("unreadable", "eeeeeeeeeeee", "c1"),
                1,
            ),
            // Stale by name and hash, but of another cache: never ours.
            (
                "codefleet-lua:ffffffffffff",
                ("lua", "ffffffffffff", "c2"),
                80,
            ),
        ];
        for (tag, (image, hash, cache), size) in images {
            fake.add_labelled_image(tag, labels(image, hash, cache), size);
        }
        // Unlabelled: an image the agent did not make (an older agent's, anyone's).
        fake.add_labelled_image("codefleet-python:999999999999", BTreeMap::new(), 160);
        fake.add_image("debian:trixie-slim");
        fake
    }

    #[tokio::test]
    async fn only_stale_images_of_its_own_cache_are_selected() {
        let fake = engine();
        let images = fake.images().await.unwrap();
        let mut tags: Vec<&str> = stale(&images, &wanted(), "c1")
            .iter()
            .flat_map(|i| i.tags.iter().map(String::as_str))
            .collect();
        tags.sort_unstable();
        assert_eq!(
            tags,
            ["codefleet-gone:dddddddddddd", "codefleet-lua:bbbbbbbbbbbb"]
        );
        assert!(stale(&images, &wanted(), "c3").is_empty());
    }

    #[tokio::test]
    async fn stale_images_go_after_the_grace_period_and_never_while_used() {
        let fake = engine();
        let keeper = Housekeeper::new(wanted(), "c1", Duration::from_secs(60));
        let serving = vec!["codefleet-python:999999999999".to_string()];
        let t0 = Instant::now();

        // Disk use: this cache's images and the serving runtime's unlabelled one.
        let first = keeper.pass(fake.as_ref(), &serving, t0).await.unwrap();
        assert_eq!(first.image_bytes, 10 + 20 + 40 + 1 + 160);
        assert_eq!(keeper.image_bytes(), Some(first.image_bytes));
        assert_eq!((first.stale, first.removed.len()), (2, 0), "{first:?}");

        // A container uses one stale image (whoever made it).
        let spec = crate::engine::SandboxSpec {
            image: "codefleet-gone:dddddddddddd".into(),
            node: "hk-test".into(),
            language: "gone".into(),
            kind: "pool",
            supervisor: "/fake/supervisor".into(),
            memory_bytes: 1 << 28,
            cpus: 1.0,
            pids: 64,
            scratch_bytes: 1 << 20,
            file_size_bytes: 1 << 20,
            open_files: 64,
            channel: None,
            max_answer_bytes: 1 << 20,
        };
        let used = fake.create_sandbox(&spec).await.unwrap();

        let later = t0 + Duration::from_secs(59);
        let second = keeper.pass(fake.as_ref(), &serving, later).await.unwrap();
        assert!(second.removed.is_empty(), "within the grace: {second:?}");

        let after = t0 + Duration::from_secs(61);
        let third = keeper.pass(fake.as_ref(), &serving, after).await.unwrap();
        assert_eq!(third.removed, ["codefleet-lua:bbbbbbbbbbbb"]);
        assert_eq!(fake.images_removed(), ["codefleet-lua:bbbbbbbbbbbb"]);

        // Once its container is gone, the used one goes at the next pass.
        fake.remove(&used).await.unwrap();
        let fourth = keeper.pass(fake.as_ref(), &serving, after).await.unwrap();
        assert_eq!(fourth.removed, ["codefleet-gone:dddddddddddd"]);
        let left: Vec<String> = fake
            .images()
            .await
            .unwrap()
            .into_iter()
            .flat_map(|i| i.tags)
            .collect();
        assert_eq!(left.len(), 5, "{left:?}");
        assert_eq!(fourth.image_bytes, 10 + 1 + 160);
    }

    #[tokio::test]
    async fn a_pulled_reference_goes_with_the_last_image_made_from_it() {
        let fake = FakeEngine::new();
        let pulled = |image: &str, hash: &str| {
            let mut l = labels(image, hash, "c1");
            l.insert(
                LABEL_PULLED.into(),
                "127.0.0.1:5000/python:3.11-slim".into(),
            );
            l
        };
        fake.add_labelled_image(
            "codefleet-py311:111111111111",
            pulled("py311", "111111111111"),
            5,
        );
        fake.add_labelled_image("codefleet-py:222222222222", pulled("py", "222222222222"), 5);
        fake.add_labelled_image("127.0.0.1:5000/python:3.11-slim", BTreeMap::new(), 5);
        let t0 = Instant::now();
        let mut wanted = Wanted::default();
        wanted.want("py", Some("222222222222".into()));
        let keeper = Housekeeper::new(wanted, "c1", Duration::ZERO);
        let pass = keeper.pass(fake.as_ref(), &[], t0).await.unwrap();
        assert_eq!(pass.removed, ["codefleet-py311:111111111111"]);

        let keeper = Housekeeper::new(Wanted::default(), "c1", Duration::ZERO);
        let pass = keeper.pass(fake.as_ref(), &[], t0).await.unwrap();
        assert_eq!(
            pass.removed,
            [
                "codefleet-py:222222222222",
                "127.0.0.1:5000/python:3.11-slim"
            ]
        );
    }
}
