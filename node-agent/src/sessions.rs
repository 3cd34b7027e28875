//! Persistent sandboxes: one dedicated container per session, kept between executions (files
//! stay; processes do not outlive an execution) until `DELETE` or the idle TTL.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use codefleet_shared::ResolvedLimits;

use crate::catalog::Language;
use crate::sandbox::Sandbox;

pub struct Session {
    pub id: String,
    pub language: Language,
    pub version: String,
    /// The memory limit the session's container was created with.
    pub limits: ResolvedLimits,
    pub ttl: Duration,
    /// `None` once the sandbox was lost or removed.
    pub sandbox: tokio::sync::Mutex<Option<Sandbox>>,
    expires: Mutex<(Instant, SystemTime)>,
}

impl Session {
    pub fn new(
        id: String,
        language: Language,
        version: String,
        limits: ResolvedLimits,
        ttl: Duration,
        sandbox: Sandbox,
    ) -> Session {
        Session {
            id,
            language,
            version,
            limits,
            ttl,
            sandbox: tokio::sync::Mutex::new(Some(sandbox)),
            expires: Mutex::new((Instant::now() + ttl, SystemTime::now() + ttl)),
        }
    }

    /// Pushes the expiry `ttl` past now.
    pub fn touch(&self) {
        *self.expires.lock().expect("session lock") =
            (Instant::now() + self.ttl, SystemTime::now() + self.ttl);
    }

    pub fn expires_at(&self) -> SystemTime {
        self.expires.lock().expect("session lock").1
    }

    fn expired(&self, now: Instant) -> bool {
        self.expires.lock().expect("session lock").0 <= now
    }
}

pub struct Sessions {
    max: u32,
    map: Mutex<HashMap<String, Arc<Session>>>,
}

impl Sessions {
    pub fn new(max: u32) -> Sessions {
        Sessions {
            max,
            map: Mutex::new(HashMap::new()),
        }
    }

    pub fn len(&self) -> usize {
        self.map.lock().expect("sessions lock").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn has_room(&self) -> bool {
        (self.len() as u32) < self.max
    }

    /// Adds a session unless the node is full; gives it back when full.
    pub fn insert(&self, session: Arc<Session>) -> Result<(), Arc<Session>> {
        let mut map = self.map.lock().expect("sessions lock");
        if map.len() as u32 >= self.max {
            return Err(session);
        }
        map.insert(session.id.clone(), session);
        Ok(())
    }

    pub fn get(&self, id: &str) -> Option<Arc<Session>> {
        self.map.lock().expect("sessions lock").get(id).cloned()
    }

    pub fn remove(&self, id: &str) -> Option<Arc<Session>> {
        self.map.lock().expect("sessions lock").remove(id)
    }

    /// Takes out the sessions idle past their TTL (dropping them removes their containers).
    pub fn take_expired(&self, now: Instant) -> Vec<Arc<Session>> {
        let mut map = self.map.lock().expect("sessions lock");
        let ids: Vec<String> = map
            .values()
            .filter(|s| s.expired(now))
            .map(|s| s.id.clone())
            .collect();
        ids.iter().filter_map(|id| map.remove(id)).collect()
    }

    pub fn drain(&self) -> Vec<Arc<Session>> {
        self.map
            .lock()
            .expect("sessions lock")
            .drain()
            .map(|(_, s)| s)
            .collect()
    }
}

/// RFC 3339 in UTC with second precision, e.g. `2026-11-28T17:00:00Z`.
pub fn rfc3339(t: SystemTime) -> String {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3_600,
        rem % 3_600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_rfc3339() {
        let table = [
            (0, "1970-01-01T00:00:00Z"),
            (951_782_400, "2000-02-29T00:00:00Z"),
            (1_795_885_200, "2026-11-28T17:00:00Z"),
        ];
        for (secs, want) in table {
            assert_eq!(
                rfc3339(SystemTime::UNIX_EPOCH + Duration::from_secs(secs)),
                want
            );
        }
    }
}

mod ops {
    //! The session operations of the agent.
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use codefleet_shared::ids::{NodeId, SessionId};
    use codefleet_shared::validate::resolve_limits;
    use codefleet_shared::{
        CreateSession, ErrorCode, ExecuteRequest, ExecuteResponse, LanguageRef, Problem,
        SessionInfo,
    };

    use super::{rfc3339, Session};
    use crate::agent::{job_deadline, respond, Agent};

    impl Agent {
        pub async fn create_session(
            self: &Arc<Self>,
            req: CreateSession,
        ) -> Result<SessionInfo, Problem> {
            if self.draining.load(std::sync::atomic::Ordering::SeqCst) {
                return Err(Problem::new(
                    ErrorCode::NoCapacity,
                    format!("node {} is draining", self.node()),
                ));
            }
            let (language, version, _) =
                self.resolve_language(req.language.as_deref(), req.version.as_deref())?;
            let limits = resolve_limits(
                req.limits.as_ref(),
                &self.config.default_limits(),
                &self.config.max_limits(),
            )?;
            let ttl_s = req.ttl_s.unwrap_or(self.config.session_ttl_s);
            if ttl_s == 0 || ttl_s > self.config.session_max_ttl_s {
                return Err(Problem::new(
                    if ttl_s == 0 {
                        ErrorCode::InvalidRequest
                    } else {
                        ErrorCode::LimitExceedsMax
                    },
                    format!(
                        "ttl_s must be between 1 and {}",
                        self.config.session_max_ttl_s
                    ),
                ));
            }
            if !self.sessions.has_room() {
                return Err(Problem::new(
                    ErrorCode::NoCapacity,
                    format!("node {} holds its maximum of sessions", self.node()),
                ));
            }
            let key = self.pool_key(&language.name, limits.memory_bytes);
            let sandbox = self.start_sandbox(&key, "session").await.map_err(|e| {
                tracing::error!(error = %e, "starting a session sandbox failed");
                Problem::new(
                    ErrorCode::Internal,
                    format!("could not start the session's sandbox: {e}"),
                )
            })?;
            let node = NodeId::parse(self.node())
                .map_err(|e| Problem::new(ErrorCode::Internal, format!("this node's id: {e}")))?;
            let id = SessionId::new(node, rand::random()).to_string();
            let session = Arc::new(Session::new(
                id.clone(),
                language,
                version,
                limits,
                Duration::from_secs(ttl_s),
                sandbox,
            ));
            let info = SessionInfo {
                id,
                language: LanguageRef {
                    name: session.language.name.clone(),
                    version: session.version.clone(),
                },
                node: self.node().to_string(),
                expires_at: rfc3339(session.expires_at()),
            };
            self.sessions.insert(session).map_err(|_| {
                Problem::new(
                    ErrorCode::NoCapacity,
                    format!("node {} holds its maximum of sessions", self.node()),
                )
            })?;
            metrics::gauge!("codefleet_sessions").set(self.sessions.len() as f64);
            Ok(info)
        }

        pub async fn session_execute(
            self: &Arc<Self>,
            id: &str,
            req: ExecuteRequest,
            received: Instant,
            wait: Option<Duration>,
        ) -> Result<ExecuteResponse, Problem> {
            let session = self.sessions.get(id).ok_or_else(|| not_found(id))?;
            let prepared = self.prepare(&req, Some((&session.language, &session.version)))?;
            if prepared.limits.memory_bytes > session.limits.memory_bytes {
                return Err(Problem::new(
                    ErrorCode::LimitExceedsMax,
                    format!(
                        "limits.memory_bytes is above this session's {}",
                        session.limits.memory_bytes
                    ),
                ));
            }
            let slot = self.take_slot(wait).await?;
            let queued = received.elapsed();
            let mut guard = session.sandbox.lock().await;
            let Some(sandbox) = guard.as_mut() else {
                return Err(not_found(id));
            };
            let job = self.job(&prepared, sandbox.uid);
            let job_id = job.id.clone();
            let outcome = sandbox.run(job, job_deadline(&prepared.limits)).await;
            drop(slot);
            session.touch();
            Ok(match outcome {
                Ok(stages) => respond(
                    self,
                    job_id,
                    &prepared,
                    stages,
                    (received, queued),
                    "session",
                ),
                Err(e) => {
                    // The session's sandbox is gone; so is the session.
                    let sandbox = guard.take().expect("checked above");
                    self.sessions.remove(id);
                    metrics::gauge!("codefleet_sessions").set(self.sessions.len() as f64);
                    let timing = (received, queued);
                    self.sandbox_failed(sandbox, job_id, &prepared, timing, &e)
                        .await
                }
            })
        }

        pub async fn delete_session(&self, id: &str) -> Result<(), Problem> {
            let session = self.sessions.remove(id).ok_or_else(|| not_found(id))?;
            // Dropping the sandbox removes the container; wait for a running execution first.
            session.sandbox.lock().await.take();
            metrics::gauge!("codefleet_sessions").set(self.sessions.len() as f64);
            Ok(())
        }

        /// Removes idle sessions; runs until aborted.
        pub async fn expire_sessions_loop(self: Arc<Self>) {
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                for session in self.sessions.take_expired(Instant::now()) {
                    tracing::info!(session = %session.id, "session expired");
                    session.sandbox.lock().await.take();
                }
            }
        }
    }

    fn not_found(id: &str) -> Problem {
        Problem::new(ErrorCode::NotFound, format!("no session {id:?}"))
    }
}
