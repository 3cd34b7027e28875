//! The only module that talks to Docker: a narrow wrapper over bollard with an explicit timeout
//! on every call and bollard's errors mapped to our own.

use std::collections::HashMap;
use std::pin::Pin;
use std::time::Duration;

use bollard::container::LogOutput;
use bollard::models::{ContainerCreateBody, HostConfig, HostConfigLogConfig, ResourcesUlimits};
use bollard::query_parameters::{
    AttachContainerOptionsBuilder, BuildImageOptionsBuilder, CreateImageOptionsBuilder,
    ListContainersOptionsBuilder, RemoveContainerOptionsBuilder,
};
use bytes::Bytes;
use codefleet_shared::sandbox::{CHANNEL_DIR_IN_SANDBOX, CHANNEL_ENV, CHANNEL_SOCKET};
use futures_util::{Stream, StreamExt};
use tokio::io::AsyncWrite;

/// Label carrying the id of the node that owns a container.
pub const LABEL_NODE: &str = "codefleet.node";
/// Label carrying the language a container serves.
pub const LABEL_LANGUAGE: &str = "codefleet.language";
/// Label saying what a container is for: `pool`, `session` or `probe`.
pub const LABEL_KIND: &str = "codefleet.kind";

/// Where the supervisor is mounted inside every sandbox.
pub const SUPERVISOR_IN_SANDBOX: &str = "/opt/codefleet/supervisor";

#[derive(Debug, thiserror::Error)]
pub enum DockerError {
    #[error("docker call `{call}` timed out after {after:?}")]
    Timeout { call: &'static str, after: Duration },
    #[error("docker call `{call}` failed: {message}")]
    Call { call: &'static str, message: String },
    #[error("image build failed: {0}")]
    Build(String),
}

fn err(call: &'static str) -> impl FnOnce(bollard::errors::Error) -> DockerError {
    move |e| DockerError::Call {
        call,
        message: e.to_string(),
    }
}

async fn timed<T>(
    call: &'static str,
    after: Duration,
    fut: impl std::future::Future<Output = Result<T, bollard::errors::Error>>,
) -> Result<T, DockerError> {
    match tokio::time::timeout(after, fut).await {
        Ok(r) => r.map_err(err(call)),
        Err(_) => Err(DockerError::Timeout { call, after }),
    }
}

const CPU_PERIOD_US: i64 = 10_000;
const SHORT: Duration = Duration::from_secs(10);
const START: Duration = Duration::from_secs(30);
const BUILD: Duration = Duration::from_secs(1_800);

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
    /// The longest answer line the agent accepts from this sandbox's supervisor (not Docker's
    /// business; carried here with the rest of what is decided per sandbox).
    pub max_answer_bytes: usize,
}

/// The byte streams of an attached container: what it writes, and its stdin.
pub struct Attached {
    pub output: Pin<Box<dyn Stream<Item = Result<Bytes, DockerError>> + Send>>,
    pub input: Pin<Box<dyn AsyncWrite + Send>>,
}

#[derive(Clone)]
pub struct Docker {
    inner: bollard::Docker,
}

impl Docker {
    /// Connects to the engine named by `DOCKER_HOST`, or the local socket.
    pub fn connect() -> Result<Docker, DockerError> {
        let inner = bollard::Docker::connect_with_local_defaults().map_err(err("connect"))?;
        Ok(Docker { inner })
    }

    pub async fn ping(&self) -> Result<(), DockerError> {
        timed("ping", Duration::from_secs(3), self.inner.ping())
            .await
            .map(|_| ())
    }

    pub async fn image_exists(&self, tag: &str) -> Result<bool, DockerError> {
        match tokio::time::timeout(SHORT, self.inner.inspect_image(tag)).await {
            Err(_) => Err(DockerError::Timeout {
                call: "inspect_image",
                after: SHORT,
            }),
            Ok(Ok(_)) => Ok(true),
            Ok(Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            })) => Ok(false),
            Ok(Err(e)) => Err(err("inspect_image")(e)),
        }
    }

    /// Pulls `reference` and tags it as `tag`.
    pub async fn pull(&self, reference: &str, tag: &str) -> Result<(), DockerError> {
        let opts = CreateImageOptionsBuilder::default()
            .from_image(reference)
            .build();
        let mut stream = self.inner.create_image(Some(opts), None, None);
        let pulled = tokio::time::timeout(BUILD, async {
            while let Some(item) = stream.next().await {
                item.map_err(err("pull"))?;
            }
            Ok::<(), DockerError>(())
        })
        .await
        .map_err(|_| DockerError::Timeout {
            call: "pull",
            after: BUILD,
        })?;
        pulled?;
        let (repo, t) = tag.rsplit_once(':').unwrap_or((tag, "latest"));
        let opts = bollard::query_parameters::TagImageOptionsBuilder::default()
            .repo(repo)
            .tag(t)
            .build();
        timed(
            "tag_image",
            SHORT,
            self.inner.tag_image(reference, Some(opts)),
        )
        .await
    }

    /// Builds `tag` from a tar build context; `progress` gets each line of build output.
    pub async fn build(
        &self,
        tag: &str,
        context_tar: Vec<u8>,
        mut progress: impl FnMut(&str) + Send,
    ) -> Result<(), DockerError> {
        let opts = BuildImageOptionsBuilder::default()
            .dockerfile("Dockerfile")
            .t(tag)
            .rm(true)
            .forcerm(true)
            .build();
        let mut stream = self.inner.build_image(
            opts,
            None,
            Some(bollard::body_full(Bytes::from(context_tar))),
        );
        let built = tokio::time::timeout(BUILD, async {
            while let Some(item) = stream.next().await {
                let info = item.map_err(|e| DockerError::Build(e.to_string()))?;
                if let Some(detail) = info.error_detail.and_then(|d| d.message) {
                    return Err(DockerError::Build(detail));
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
        .await;
        built.map_err(|_| DockerError::Timeout {
            call: "build",
            after: BUILD,
        })?
    }

    /// Creates a sandbox container with the hardened baseline of design.md; returns its id.
    pub async fn create_sandbox(&self, spec: &SandboxSpec) -> Result<String, DockerError> {
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
        let created = timed(
            "create_container",
            START,
            self.inner.create_container(None, body),
        )
        .await?;
        Ok(created.id)
    }

    /// Attaches to a created container's stdin and stdout (before it starts, so nothing is lost).
    pub async fn attach(&self, id: &str) -> Result<Attached, DockerError> {
        let opts = AttachContainerOptionsBuilder::default()
            .stdin(true)
            .stdout(true)
            .stderr(true)
            .stream(true)
            .build();
        let results = timed(
            "attach_container",
            SHORT,
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
                Err(e) => Some(Err(err("attach_stream")(e))),
            }
        });
        Ok(Attached {
            output: Box::pin(output),
            input: results.input,
        })
    }

    pub async fn start(&self, id: &str) -> Result<(), DockerError> {
        timed(
            "start_container",
            START,
            self.inner.start_container(id, None),
        )
        .await
    }

    /// Removes a container, killing it if it runs. A container already gone is not an error.
    pub async fn remove(&self, id: &str) -> Result<(), DockerError> {
        let opts = RemoveContainerOptionsBuilder::default()
            .force(true)
            .v(true)
            .build();
        match tokio::time::timeout(START, self.inner.remove_container(id, Some(opts))).await {
            Err(_) => Err(DockerError::Timeout {
                call: "remove_container",
                after: START,
            }),
            Ok(Ok(())) => Ok(()),
            Ok(Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            })) => Ok(()),
            // 409: removal already in progress.
            Ok(Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 409, ..
            })) => Ok(()),
            Ok(Err(e)) => Err(err("remove_container")(e)),
        }
    }

    /// Whether the engine recorded an out-of-memory kill in this container (read before it is
    /// removed, to tell a job that exhausted its memory from a sandbox that failed).
    pub async fn oom_killed(&self, id: &str) -> Result<bool, DockerError> {
        let info = timed(
            "inspect_container",
            SHORT,
            self.inner.inspect_container(id, None),
        )
        .await?;
        Ok(info.state.and_then(|s| s.oom_killed).unwrap_or(false))
    }

    /// Ids of every container (running or not) labelled with this node.
    pub async fn list_owned(&self, node: &str) -> Result<Vec<String>, DockerError> {
        let filters = HashMap::from([("label".to_string(), vec![format!("{LABEL_NODE}={node}")])]);
        let opts = ListContainersOptionsBuilder::default()
            .all(true)
            .filters(&filters)
            .build();
        let list = timed(
            "list_containers",
            SHORT,
            self.inner.list_containers(Some(opts)),
        )
        .await?;
        Ok(list.into_iter().filter_map(|c| c.id).collect())
    }
}
