//! Persistent sandboxes: one dedicated container per session, kept between executions (files
//! stay; processes do not outlive an execution) until `DELETE` or the idle TTL. This module
//! holds the sessions; creating one and running in one are the agent's and the runner's.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use codefleet_shared::{ErrorCode, Problem, ResolvedLimits};

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
        metrics::gauge!("codefleet_sessions").set(map.len() as f64);
        Ok(())
    }

    /// The session `id`, or 404.
    pub fn get(&self, id: &str) -> Result<Arc<Session>, Problem> {
        let map = self.map.lock().expect("sessions lock");
        map.get(id).cloned().ok_or_else(|| Sessions::not_found(id))
    }

    pub fn remove(&self, id: &str) -> Option<Arc<Session>> {
        let mut map = self.map.lock().expect("sessions lock");
        let removed = map.remove(id);
        metrics::gauge!("codefleet_sessions").set(map.len() as f64);
        removed
    }

    /// Removes session `id` and its container, after an execution under way in it.
    pub async fn close(&self, id: &str) -> Result<(), Problem> {
        let session = self.remove(id).ok_or_else(|| Sessions::not_found(id))?;
        session.sandbox.lock().await.take();
        Ok(())
    }

    /// Removes idle sessions; runs until aborted.
    pub async fn expire_loop(self: Arc<Self>) {
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            for session in self.take_expired(Instant::now()) {
                tracing::info!(session = %session.id, "session expired");
                session.sandbox.lock().await.take();
            }
        }
    }

    pub fn not_found(id: &str) -> Problem {
        Problem::new(ErrorCode::NotFound, format!("no session {id:?}"))
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
    let (year, month, day) = codefleet_shared::time::civil_from_days(days);
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
