//! The seam between the agent and its container engine: the `Engine` trait names every call the
//! agent makes (containers, images, liveness), `EngineError` says what failed, and
//! `SandboxSpec` is everything the agent decides about one container. `docker` implements it on
//! bollard; `fake` (tests only) implements it in-process, with a fake supervisor speaking the
//! real sandbox protocol.
//!
//! The methods return boxed futures rather than `async fn`: the agent holds its engine as
//! `Arc<dyn Engine>` (one type for the agent, its reaper, pools and sessions, instead of a type
//! parameter on each), and `async fn` in a trait cannot be called through `dyn`. One allocation
//! per call is nothing beside an engine round trip, and no macro crate is needed for it.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use futures_util::Stream;
use tokio::io::AsyncWrite;

#[cfg(any(test, feature = "fake-engine"))]
pub mod fake;

/// Label carrying the id of the node that owns a container.
pub const LABEL_NODE: &str = "codefleet.node";
/// Label carrying the language a container serves.
pub const LABEL_LANGUAGE: &str = "codefleet.language";
/// Label saying what a container is for: `pool`, `session` or `probe`.
pub const LABEL_KIND: &str = "codefleet.kind";

/// Labels the agent puts on every runtime image it builds (the only images it ever removes):
/// the image's name (a recipe folder, or a pulled runtime's `image`), the hash its tag carries,
/// and the image cache it belongs to (`--image-cache`).
pub const LABEL_IMAGE: &str = "codefleet.image";
pub const LABEL_RECIPE: &str = "codefleet.recipe";
pub const LABEL_CACHE: &str = "codefleet.cache";
/// On an image made from a pulled one: the reference it was pulled as.
pub const LABEL_PULLED: &str = "codefleet.pulled";

/// Where the supervisor is mounted inside every sandbox.
pub const SUPERVISOR_IN_SANDBOX: &str = "/opt/codefleet/supervisor";

/// What the agent needs from a container engine. Every call is bounded in time by the
/// implementation (`EngineError::Timeout`).
pub trait Engine: Send + Sync {
    /// Whether the engine answers at all.
    fn ping(&self) -> BoxFuture<'_, Result<(), EngineError>>;

    /// Whether an image with this tag is present.
    fn image_exists<'a>(&'a self, tag: &'a str) -> BoxFuture<'a, Result<bool, EngineError>>;

    /// Pulls `reference` (`host:port/name:tag`) from its registry; `progress` gets a line per
    /// layer event (`<layer>: Downloading`, `Pull complete`, the digest).
    fn pull<'a>(
        &'a self,
        reference: &'a str,
        progress: &'a mut (dyn FnMut(&str) + Send),
    ) -> BoxFuture<'a, Result<(), EngineError>>;

    /// Gives the image `source` the further tag `target` (`name:tag`).
    fn tag<'a>(
        &'a self,
        source: &'a str,
        target: &'a str,
    ) -> BoxFuture<'a, Result<(), EngineError>>;

    /// Builds `tag` from a tar build context, with these labels on the image; `progress` gets
    /// each line of build output. A build that fails because a base image (`FROM`) is absent
    /// says so with `ImageMissing`.
    fn build<'a>(
        &'a self,
        tag: &'a str,
        context_tar: Vec<u8>,
        labels: &'a BTreeMap<String, String>,
        progress: &'a mut (dyn FnMut(&str) + Send),
    ) -> BoxFuture<'a, Result<(), EngineError>>;

    /// Every image the engine holds (tagged ones; dangling layers are not the agent's).
    fn images(&self) -> BoxFuture<'_, Result<Vec<ImageInfo>, EngineError>>;

    /// The image ids of every container, of any owner and in any state: the images that must
    /// not be removed.
    fn images_in_use(&self) -> BoxFuture<'_, Result<Vec<String>, EngineError>>;

    /// Removes one tag of an image, and the image with its last tag; never forced, so an image
    /// a container uses is refused (`Conflict`). An absent tag is `NotFound`.
    fn remove_image<'a>(&'a self, tag: &'a str) -> BoxFuture<'a, Result<(), EngineError>>;

    /// Creates a sandbox container (not started) with the hardened baseline; returns its id.
    fn create_sandbox<'a>(
        &'a self,
        spec: &'a SandboxSpec,
    ) -> BoxFuture<'a, Result<String, EngineError>>;

    /// Attaches to a created container's stdin and stdout (before it starts, so nothing is
    /// lost): the channel to its supervisor when no socket is used.
    fn attach<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Attached, EngineError>>;

    fn start<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<(), EngineError>>;

    /// Removes a container, killing it if it runs. A container already gone (or being removed)
    /// is not an error.
    fn remove<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<(), EngineError>>;

    /// Whether the engine recorded an out-of-memory kill in this container (read before it is
    /// removed, to tell a job that exhausted its memory from a sandbox that failed).
    fn oom_killed<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<bool, EngineError>>;

    /// Ids of every container (running or not) labelled with this node.
    fn list_owned<'a>(&'a self, node: &'a str) -> BoxFuture<'a, Result<Vec<String>, EngineError>>;
}

/// What failed in a call to the engine.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EngineError {
    /// The engine could not be reached (no socket, connection refused or cut).
    #[error("the container engine is unreachable (`{call}`): {message}")]
    Unreachable { call: &'static str, message: String },
    #[error("container engine call `{call}` timed out after {after:?}")]
    Timeout { call: &'static str, after: Duration },
    /// The container (or image) named in the call does not exist.
    #[error("`{call}`: not found: {message}")]
    NotFound { call: &'static str, message: String },
    /// The object is in a state that forbids the call (e.g. a removal already under way).
    #[error("`{call}`: conflict: {message}")]
    Conflict { call: &'static str, message: String },
    /// An image a container or a build needs is not present.
    #[error("image {image} is not present: {message}")]
    ImageMissing { image: String, message: String },
    /// The engine answered the call with an error status.
    #[error("`{call}` was refused ({status}): {message}")]
    Rejected {
        call: &'static str,
        status: u16,
        message: String,
    },
    /// An image build ran and failed (a step of the recipe).
    #[error("image build failed: {message}")]
    BuildFailed { message: String },
    /// Anything else: an answer that could not be read, an error in the middle of a stream.
    #[error("`{call}` failed: {message}")]
    Failed { call: &'static str, message: String },
}

impl EngineError {
    /// Whether the engine itself is away (unreachable or not answering), as opposed to
    /// refusing one call.
    pub fn engine_away(&self) -> bool {
        matches!(
            self,
            EngineError::Unreachable { .. } | EngineError::Timeout { .. }
        )
    }
}

/// How long each kind of engine call may take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// `ping`: short, since readiness follows it.
    pub ping: Duration,
    /// Inspecting, listing, attaching, tagging.
    pub call: Duration,
    /// Creating, starting and removing containers (the engine does real work for these).
    pub container: Duration,
    /// Building or pulling an image.
    pub build: Duration,
}

impl Default for Timeouts {
    fn default() -> Timeouts {
        Timeouts {
            ping: Duration::from_secs(3),
            call: Duration::from_secs(10),
            container: Duration::from_secs(30),
            build: Duration::from_secs(1_800),
        }
    }
}

/// Everything the agent decides about one sandbox container.
#[derive(Debug, Clone)]
pub struct SandboxSpec {
    pub image: String,
    pub node: String,
    pub language: String,
    pub kind: &'static str,
    pub supervisor: String,
    pub memory_bytes: u64,
    pub cpus: f64,
    pub pids: i64,
    pub scratch_bytes: u64,
    pub file_size_bytes: u64,
    pub open_files: u64,
    /// Host directory holding the agent's socket for this sandbox (mounted at
    /// `/run/codefleet`); `None` for the attach stream.
    pub channel: Option<String>,
    /// The longest answer line the agent accepts from this sandbox's supervisor (not the
    /// engine's business; carried here with the rest of what is decided per sandbox).
    pub max_answer_bytes: usize,
}

/// One image as the engine lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageInfo {
    /// The engine's id (`sha256:…`).
    pub id: String,
    /// Its tags (`name:tag`), possibly none.
    pub tags: Vec<String>,
    pub labels: BTreeMap<String, String>,
    /// Bytes on disk, layers shared with other images included.
    pub size: u64,
}

/// The bytes a supervisor writes, as the engine or a socket delivers them.
pub type Output = Pin<Box<dyn Stream<Item = Result<Bytes, EngineError>> + Send>>;

/// The byte streams of an attached container: what it writes, and its stdin.
pub struct Attached {
    pub output: Output,
    pub input: Pin<Box<dyn AsyncWrite + Send>>,
}

/// The images a Dockerfile starts from (`FROM` lines), leaving out earlier stages named with
/// `AS` and `scratch`.
pub fn base_images(dockerfile: &str) -> Vec<String> {
    let mut stages: Vec<String> = Vec::new();
    let mut images = Vec::new();
    for line in dockerfile.lines() {
        let mut words = line.split_whitespace();
        if !words.next().is_some_and(|w| w.eq_ignore_ascii_case("from")) {
            continue;
        }
        let mut words = words.skip_while(|w| w.starts_with("--"));
        let Some(image) = words.next() else { continue };
        let earlier_stage = stages.iter().any(|s| s.eq_ignore_ascii_case(image));
        if image != "scratch" && !earlier_stage && !images.iter().any(|i| i == image) {
            images.push(image.to_string());
        }
        if let (Some(as_), Some(name)) = (words.next(), words.next()) {
            if as_.eq_ignore_ascii_case("as") {
                stages.push(name.to_string());
            }
        }
    }
    images
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_images_are_the_from_lines_that_are_not_stages() {
        let table: [(&str, &[&str]); 5] = [
            (
                "FROM debian:bookworm-slim\nRUN true\n",
                &["debian:bookworm-slim"],
            ),
            (
                "from --platform=linux/amd64 alpine:3 AS build\n",
                &["alpine:3"],
            ),
            (
                "FROM golang:1 AS build\nFROM debian:12\nCOPY --from=build /a /a\nFROM build\n",
                &["golang:1", "debian:12"],
            ),
            ("FROM scratch\n", &[]),
            ("# FROM commented\nRUN echo FROM x\n", &[]),
        ];
        for (dockerfile, want) in table {
            assert_eq!(base_images(dockerfile), want, "{dockerfile:?}");
        }
    }

    /// The flags' defaults are the documented ones, `Timeouts::default()`.
    #[test]
    fn flag_defaults_are_the_default_timeouts() {
        let config = crate::Config::for_node("n", "127.0.0.1:1".parse().unwrap());
        assert_eq!(config.engine_timeouts(), Timeouts::default());
    }

    #[test]
    fn only_unreachable_and_timeout_mean_the_engine_is_away() {
        let table = [
            (
                EngineError::Unreachable {
                    call: "ping",
                    message: String::new(),
                },
                true,
            ),
            (
                EngineError::Timeout {
                    call: "ping",
                    after: Duration::from_secs(1),
                },
                true,
            ),
            (
                EngineError::Rejected {
                    call: "start_container",
                    status: 500,
                    message: String::new(),
                },
                false,
            ),
            (
                EngineError::ImageMissing {
                    image: "x".into(),
                    message: String::new(),
                },
                false,
            ),
        ];
        for (e, away) in table {
            assert_eq!(e.engine_away(), away, "{e}");
        }
    }
}
