//! The only module that talks to Docker: the bollard implementation of `engine::Engine`, with
//! a timeout on every call and bollard's errors mapped to `EngineError` by what failed.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use bollard::container::LogOutput;
use bollard::errors::Error as BollardError;
use bollard::models::{ContainerCreateBody, HostConfig, HostConfigLogConfig, ResourcesUlimits};
use bollard::query_parameters::{
    AttachContainerOptionsBuilder, BuildImageOptionsBuilder, CreateImageOptionsBuilder,
    ListContainersOptionsBuilder, ListImagesOptionsBuilder, RemoveContainerOptionsBuilder,
    RemoveImageOptionsBuilder,
};
use bytes::Bytes;
use codefleet_shared::sandbox::{CHANNEL_DIR_IN_SANDBOX, CHANNEL_ENV, CHANNEL_SOCKET};
use futures_util::future::BoxFuture;
use futures_util::{FutureExt, StreamExt};

use crate::engine::{
    base_images, Attached, Engine, EngineError, ImageInfo, SandboxSpec, Timeouts, LABEL_KIND,
    LABEL_LANGUAGE, LABEL_NODE, SUPERVISOR_IN_SANDBOX,
};

/// What a bollard error says about the engine, for a call that names no particular object.
fn map(call: &'static str) -> impl FnOnce(BollardError) -> EngineError {
    move |e| match e {
        BollardError::DockerResponseServerError {
            status_code: 404,
            message,
        } => EngineError::NotFound { call, message },
        BollardError::DockerResponseServerError {
            status_code: 409,
            message,
        } => EngineError::Conflict { call, message },
        BollardError::DockerResponseServerError {
            status_code,
            message,
        } => EngineError::Rejected {
            call,
            status: status_code,
            message,
        },
        e @ (BollardError::IOError { .. }
        | BollardError::HyperResponseError { .. }
        | BollardError::HyperLegacyError { .. }
        | BollardError::SocketNotFoundError(_)
        | BollardError::UnsupportedURISchemeError { .. }) => EngineError::Unreachable {
            call,
            message: e.to_string(),
        },
        e => EngineError::Failed {
            call,
            message: e.to_string(),
        },
    }
}

async fn timed<T>(
    call: &'static str,
    after: Duration,
    fut: impl std::future::Future<Output = Result<T, BollardError>>,
) -> Result<T, EngineError> {
    match tokio::time::timeout(after, fut).await {
        Ok(Ok(v)) => Ok(v),
        // bollard's own client timeout (set to the longest of ours, see `connect`).
        Ok(Err(BollardError::RequestTimeoutError)) | Err(_) => {
            Err(EngineError::Timeout { call, after })
        }
        Ok(Err(e)) => Err(map(call)(e)),
    }
}

const CPU_PERIOD_US: i64 = 10_000;

/// The engine reached through bollard (`DOCKER_HOST`, or the local socket).
#[derive(Clone)]
pub struct Docker {
    inner: bollard::Docker,
    timeouts: Timeouts,
}

impl Docker {
    /// A client for the engine named by `DOCKER_HOST`, or the local socket; it connects on the
    /// first call.
    pub fn connect(timeouts: Timeouts) -> Result<Docker, EngineError> {
        let inner = bollard::Docker::connect_with_local_defaults().map_err(map("connect"))?;
        // The bounds that count are ours, per call; bollard's one client-wide timeout (120 s by
        // default, shorter than a build) must not end a call first.
        let longest = [
            timeouts.ping,
            timeouts.call,
            timeouts.container,
            timeouts.build,
        ];
        let inner = inner.with_timeout(longest.into_iter().max().unwrap_or_default());
        Ok(Docker { inner, timeouts })
    }

    async fn ping(&self) -> Result<(), EngineError> {
        timed("ping", self.timeouts.ping, self.inner.ping())
            .await
            .map(|_| ())
    }

    async fn image_exists(&self, tag: &str) -> Result<bool, EngineError> {
        let inspect = self.inner.inspect_image(tag);
        match timed("inspect_image", self.timeouts.call, inspect).await {
            Ok(_) => Ok(true),
            Err(EngineError::NotFound { .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    async fn pull(
        &self,
        reference: &str,
        progress: &mut (dyn FnMut(&str) + Send),
    ) -> Result<(), EngineError> {
        let opts = CreateImageOptionsBuilder::default()
            .from_image(reference)
            .build();
        let mut stream = self.inner.create_image(Some(opts), None, None);
        let after = self.timeouts.build;
        let missing = |message: String| EngineError::ImageMissing {
            image: reference.to_string(),
            message,
        };
        let pulled = tokio::time::timeout(after, async {
            while let Some(item) = stream.next().await {
                let info = item.map_err(|e| match map("pull")(e) {
                    EngineError::NotFound { message, .. } => missing(message),
                    other => other,
                })?;
                if let Some(message) = info.error_detail.and_then(|d| d.message) {
                    return Err(missing(message));
                }
                let line = match (info.id.as_deref(), info.status.as_deref()) {
                    (Some(id), Some(status)) => format!("{id}: {status}"),
                    (None, Some(status)) => status.to_string(),
                    _ => continue,
                };
                progress(&line);
            }
            Ok::<(), EngineError>(())
        })
        .await
        .map_err(|_| EngineError::Timeout {
            call: "pull",
            after,
        })?;
        pulled
    }

    async fn tag(&self, source: &str, target: &str) -> Result<(), EngineError> {
        let (repo, t) = target.rsplit_once(':').unwrap_or((target, "latest"));
        let opts = bollard::query_parameters::TagImageOptionsBuilder::default()
            .repo(repo)
            .tag(t)
            .build();
        let tagged = self.inner.tag_image(source, Some(opts));
        timed("tag_image", self.timeouts.call, tagged).await
    }

    async fn images(&self) -> Result<Vec<ImageInfo>, EngineError> {
        let opts = ListImagesOptionsBuilder::default().all(false).build();
        let list = self.inner.list_images(Some(opts));
        let list = timed("list_images", self.timeouts.call, list).await?;
        Ok(list
            .into_iter()
            .map(|i| ImageInfo {
                id: i.id,
                tags: i
                    .repo_tags
                    .into_iter()
                    .filter(|t| t != "<none>:<none>")
                    .collect(),
                labels: i.labels.into_iter().collect(),
                size: u64::try_from(i.size).unwrap_or(0),
            })
            .collect())
    }

    async fn images_in_use(&self) -> Result<Vec<String>, EngineError> {
        let opts = ListContainersOptionsBuilder::default().all(true).build();
        let list = self.inner.list_containers(Some(opts));
        let list = timed("list_containers", self.timeouts.call, list).await?;
        Ok(list.into_iter().filter_map(|c| c.image_id).collect())
    }

    async fn remove_image(&self, tag: &str) -> Result<(), EngineError> {
        let opts = RemoveImageOptionsBuilder::default()
            .force(false)
            .noprune(false)
            .build();
        let remove = self.inner.remove_image(tag, Some(opts), None);
        timed("remove_image", self.timeouts.container, remove)
            .await
            .map(|_| ())
    }

    async fn build(
        &self,
        tag: &str,
        context_tar: Vec<u8>,
        labels: &BTreeMap<String, String>,
        progress: &mut (dyn FnMut(&str) + Send),
    ) -> Result<(), EngineError> {
        let bases = dockerfile_of(&context_tar)
            .map(|d| base_images(&d))
            .unwrap_or_default();
        let opts = BuildImageOptionsBuilder::default()
            .dockerfile("Dockerfile")
            .t(tag)
            .rm(true)
            .forcerm(true)
            .labels(&labels.iter().collect::<HashMap<_, _>>())
            .build();
        let mut stream = self.inner.build_image(
            opts,
            None,
            Some(bollard::body_full(Bytes::from(context_tar))),
        );
        let after = self.timeouts.build;
        let built = tokio::time::timeout(after, async {
            while let Some(item) = stream.next().await {
                let info = item.map_err(map("build"))?;
                if let Some(detail) = info.error_detail.and_then(|d| d.message) {
                    return Err(EngineError::BuildFailed { message: detail });
                }
                if let Some(line) = info
                    .stream
                    .as_deref()
                    .map(str::trim)
                    .filter(|l| !l.is_empty())
                {
                    progress(line);
                }
            }
            Ok(())
        })
        .await
        .map_err(|_| EngineError::Timeout {
            call: "build",
            after,
        })?;
        match built {
            // Which step failed is in the message; whether a base image is absent the engine
            // can say for sure.
            Err(EngineError::BuildFailed { message }) => {
                for base in bases {
                    if !self.image_exists(&base).await.unwrap_or(true) {
                        return Err(EngineError::ImageMissing {
                            image: base,
                            message,
                        });
                    }
                }
                Err(EngineError::BuildFailed { message })
            }
            other => other,
        }
    }

    async fn create_sandbox(&self, spec: &SandboxSpec) -> Result<String, EngineError> {
        let labels = HashMap::from([
            (LABEL_NODE.to_string(), spec.node.clone()),
            (LABEL_LANGUAGE.to_string(), spec.language.clone()),
            (LABEL_KIND.to_string(), spec.kind.to_string()),
        ]);
        let scratch = |extra: &str| {
            format!(
                "rw,nosuid,nodev,exec,size={},mode=1777{extra}",
                spec.scratch_bytes
            )
        };
        let tmpfs = HashMap::from([
            ("/work".to_string(), scratch("")),
            ("/tmp".to_string(), scratch("")),
        ]);
        let ulimit = |name: &str, v: u64| ResourcesUlimits {
            name: Some(name.to_string()),
            soft: Some(v as i64),
            hard: Some(v as i64),
        };
        let mut binds = vec![format!("{}:{}:ro", spec.supervisor, SUPERVISOR_IN_SANDBOX)];
        let mut env =
            vec!["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_string()];
        if let Some(dir) = &spec.channel {
            binds.push(format!("{dir}:{CHANNEL_DIR_IN_SANDBOX}:rw"));
            env.push(format!(
                "{CHANNEL_ENV}={CHANNEL_DIR_IN_SANDBOX}/{CHANNEL_SOCKET}"
            ));
        }
        let host = HostConfig {
            privileged: Some(false),
            network_mode: Some("none".to_string()),
            cap_drop: Some(vec!["ALL".to_string()]),
            // PID 1 needs these to drop to the job user and to kill the job's processes.
            cap_add: Some(vec!["SETUID".into(), "SETGID".into(), "KILL".into()]),
            security_opt: Some(vec!["no-new-privileges".to_string()]),
            readonly_rootfs: Some(true),
            tmpfs: Some(tmpfs),
            shm_size: Some(16 << 20),
            memory: Some(spec.memory_bytes as i64),
            memory_swap: Some(spec.memory_bytes as i64),
            // A 10 ms CFS period (Docker's default is 100 ms): when a job exhausts the quota,
            // the supervisor in the same cgroup waits at most one short period to kill it.
            cpu_period: Some(CPU_PERIOD_US),
            cpu_quota: Some((spec.cpus * CPU_PERIOD_US as f64).round().max(1_000.0) as i64),
            pids_limit: Some(spec.pids),
            ulimits: Some(vec![
                ulimit("nofile", spec.open_files),
                ulimit("fsize", spec.file_size_bytes),
                ulimit("core", 0),
            ]),
            binds: Some(binds),
            log_config: Some(HostConfigLogConfig {
                typ: Some("none".to_string()),
                config: None,
            }),
            init: Some(false),
            ipc_mode: Some("private".to_string()),
            ..Default::default()
        };
        let body = ContainerCreateBody {
            image: Some(spec.image.clone()),
            entrypoint: Some(vec![SUPERVISOR_IN_SANDBOX.to_string()]),
            cmd: Some(vec![]),
            user: Some("0:0".to_string()),
            env: Some(env),
            labels: Some(labels),
            attach_stdin: Some(true),
            attach_stdout: Some(true),
            attach_stderr: Some(true),
            open_stdin: Some(true),
            stdin_once: Some(false),
            tty: Some(false),
            network_disabled: Some(true),
            host_config: Some(host),
            ..Default::default()
        };
        let create = self.inner.create_container(None, body);
        match timed("create_container", self.timeouts.container, create).await {
            Ok(created) => Ok(created.id),
            // The only object a create names is its image.
            Err(EngineError::NotFound { message, .. }) => Err(EngineError::ImageMissing {
                image: spec.image.clone(),
                message,
            }),
            Err(e) => Err(e),
        }
    }

    async fn attach(&self, id: &str) -> Result<Attached, EngineError> {
        let opts = AttachContainerOptionsBuilder::default()
            .stdin(true)
            .stdout(true)
            .stderr(true)
            .stream(true)
            .build();
        let results = timed(
            "attach_container",
            self.timeouts.call,
            self.inner.attach_container(id, Some(opts)),
        )
        .await?;
        let output = results.output.filter_map(|item| async move {
            match item {
                Ok(LogOutput::StdOut { message }) | Ok(LogOutput::Console { message }) => Some(Ok(message)),
                Ok(LogOutput::StdErr { message }) => {
                    tracing::debug!(stderr = %String::from_utf8_lossy(&message), "supervisor stderr");
                    None
                }
                Ok(LogOutput::StdIn { .. }) => None,
                Err(e) => Some(Err(map("attach_stream")(e))),
            }
        });
        Ok(Attached {
            output: Box::pin(output),
            input: results.input,
        })
    }

    async fn start(&self, id: &str) -> Result<(), EngineError> {
        let start = self.inner.start_container(id, None);
        timed("start_container", self.timeouts.container, start).await
    }

    async fn remove(&self, id: &str) -> Result<(), EngineError> {
        let opts = RemoveContainerOptionsBuilder::default()
            .force(true)
            .v(true)
            .build();
        let remove = self.inner.remove_container(id, Some(opts));
        match timed("remove_container", self.timeouts.container, remove).await {
            // Gone already, or its removal already in progress.
            Ok(()) | Err(EngineError::NotFound { .. } | EngineError::Conflict { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    async fn oom_killed(&self, id: &str) -> Result<bool, EngineError> {
        let inspect = self.inner.inspect_container(id, None);
        let info = timed("inspect_container", self.timeouts.call, inspect).await?;
        Ok(info.state.and_then(|s| s.oom_killed).unwrap_or(false))
    }

    async fn list_owned(&self, node: &str) -> Result<Vec<String>, EngineError> {
        let filters = HashMap::from([("label".to_string(), vec![format!("{LABEL_NODE}={node}")])]);
        let opts = ListContainersOptionsBuilder::default()
            .all(true)
            .filters(&filters)
            .build();
        let list = self.inner.list_containers(Some(opts));
        let list = timed("list_containers", self.timeouts.call, list).await?;
        Ok(list.into_iter().filter_map(|c| c.id).collect())
    }
}

impl Engine for Docker {
    fn ping(&self) -> BoxFuture<'_, Result<(), EngineError>> {
        Docker::ping(self).boxed()
    }

    fn image_exists<'a>(&'a self, tag: &'a str) -> BoxFuture<'a, Result<bool, EngineError>> {
        Docker::image_exists(self, tag).boxed()
    }

    fn pull<'a>(
        &'a self,
        reference: &'a str,
        progress: &'a mut (dyn FnMut(&str) + Send),
    ) -> BoxFuture<'a, Result<(), EngineError>> {
        Docker::pull(self, reference, progress).boxed()
    }

    fn tag<'a>(
        &'a self,
        source: &'a str,
        target: &'a str,
    ) -> BoxFuture<'a, Result<(), EngineError>> {
        Docker::tag(self, source, target).boxed()
    }

    fn build<'a>(
        &'a self,
        tag: &'a str,
        context_tar: Vec<u8>,
        labels: &'a BTreeMap<String, String>,
        progress: &'a mut (dyn FnMut(&str) + Send),
    ) -> BoxFuture<'a, Result<(), EngineError>> {
        Docker::build(self, tag, context_tar, labels, progress).boxed()
    }

    fn images(&self) -> BoxFuture<'_, Result<Vec<ImageInfo>, EngineError>> {
        Docker::images(self).boxed()
    }

    fn images_in_use(&self) -> BoxFuture<'_, Result<Vec<String>, EngineError>> {
        Docker::images_in_use(self).boxed()
    }

    fn remove_image<'a>(&'a self, tag: &'a str) -> BoxFuture<'a, Result<(), EngineError>> {
        Docker::remove_image(self, tag).boxed()
    }

    fn create_sandbox<'a>(
        &'a self,
        spec: &'a SandboxSpec,
    ) -> BoxFuture<'a, Result<String, EngineError>> {
        Docker::create_sandbox(self, spec).boxed()
    }

    fn attach<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Attached, EngineError>> {
        Docker::attach(self, id).boxed()
    }

    fn start<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<(), EngineError>> {
        Docker::start(self, id).boxed()
    }

    fn remove<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<(), EngineError>> {
        Docker::remove(self, id).boxed()
    }

    fn oom_killed<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<bool, EngineError>> {
        Docker::oom_killed(self, id).boxed()
    }

    fn list_owned<'a>(&'a self, node: &'a str) -> BoxFuture<'a, Result<Vec<String>, EngineError>> {
        Docker::list_owned(self, node).boxed()
    }
}

/// The `Dockerfile` of a build context.
fn dockerfile_of(context_tar: &[u8]) -> Option<String> {
    let mut archive = tar::Archive::new(context_tar);
    for entry in archive.entries().ok()? {
        let mut entry = entry.ok()?;
        if entry.path().ok()?.as_os_str() == "Dockerfile" {
            let mut text = String::new();
            std::io::Read::read_to_string(&mut entry, &mut text).ok()?;
            return Some(text);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// bollard's errors become what failed: the engine's answer by status, a transport that
    /// failed as unreachable, anything else as failed.
    #[test]
    fn bollard_errors_map_to_what_failed() {
        let server = |status_code: u16| BollardError::DockerResponseServerError {
            status_code,
            message: "m".into(),
        };
        let io = || BollardError::IOError {
            err: std::io::Error::from(std::io::ErrorKind::ConnectionRefused),
        };
        let kind = |e: &EngineError| match e {
            EngineError::NotFound { .. } => "not found",
            EngineError::Conflict { .. } => "conflict",
            EngineError::Rejected { status: 500, .. } => "rejected 500",
            EngineError::Unreachable { .. } => "unreachable",
            EngineError::Failed { .. } => "failed",
            _ => "other",
        };
        let table = [
            (server(404), "not found"),
            (server(409), "conflict"),
            (server(500), "rejected 500"),
            (io(), "unreachable"),
            (
                BollardError::SocketNotFoundError("/x".into()),
                "unreachable",
            ),
            (BollardError::APIVersionParseError {}, "failed"),
        ];
        for (bollard, want) in table {
            let text = bollard.to_string();
            assert_eq!(kind(&map("call")(bollard)), want, "{text}");
        }
    }

    #[test]
    fn a_build_context_yields_its_dockerfile() {
        let recipe = crate::images::Recipe {
            files: vec![
                ("Dockerfile".into(), b"FROM debian:12\n".to_vec()),
                ("setup.sh".into(), b"true\n".to_vec()),
            ],
        };
        let dockerfile = dockerfile_of(&recipe.context_tar());
        assert_eq!(dockerfile.as_deref(), Some("FROM debian:12\n"));
    }
}
