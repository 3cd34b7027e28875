//! Edge protection: API keys and the admin key as Bearer tokens, per-key rate (token bucket) and
//! concurrency quotas, the cluster token on agent reports, and JSON request bodies read with
//! media type, size, time and depth limits. Everything here runs before a request touches routing.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{FromRequest, Request, State};
use axum::http::{header, HeaderMap};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use codefleet_http_edge::BodyError;
use codefleet_shared::api::object_only::Object;
use codefleet_shared::auth::secrets_equal;
use serde::de::DeserializeOwned;

use crate::config::Config;
use crate::error::GatewayError;
use crate::{metrics, Gateway};

/// A token bucket: `burst` tokens, refilled at `rate` per second; time is passed in.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    tokens: f64,
    updated: Instant,
    rate: f64,
    burst: f64,
}

impl TokenBucket {
    pub fn new(rate: f64, burst: u32, now: Instant) -> TokenBucket {
        TokenBucket {
            tokens: f64::from(burst),
            updated: now,
            rate,
            burst: f64::from(burst),
        }
    }

    /// Takes one token, or says how long until one is there.
    pub fn take(&mut self, now: Instant) -> Result<(), Duration> {
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.updated = self.updated.max(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - self.tokens) / self.rate))
        }
    }
}

/// One API key's quotas.
#[derive(Debug)]
pub struct KeyQuota {
    bucket: Mutex<TokenBucket>,
    inflight: AtomicU32,
    max_concurrent: u32,
}

impl KeyQuota {
    fn new(config: &Config, now: Instant) -> KeyQuota {
        KeyQuota {
            bucket: Mutex::new(TokenBucket::new(config.rate_per_s, config.burst, now)),
            inflight: AtomicU32::new(0),
            max_concurrent: config.max_concurrent_per_key,
        }
    }

    /// Admits one request: a token from the bucket and a concurrency slot until the permit drops.
    pub fn admit(self: &Arc<Self>, now: Instant) -> Result<QuotaPermit, GatewayError> {
        let inflight = self.inflight.fetch_add(1, Ordering::Relaxed);
        let permit = QuotaPermit(Arc::clone(self));
        if inflight >= self.max_concurrent {
            metrics::rejection("concurrency");
            return Err(GatewayError::RateLimited {
                reason: "too many requests in flight for this API key",
                retry_after: Duration::from_secs(1),
            });
        }
        self.take_token(now)?;
        Ok(permit)
    }

    /// Admits one job of a batch: a token from the bucket (none left: 429 for that job), and
    /// the job counted in flight until the permit drops. The batch bounds how many of its jobs
    /// run at once ([`KeyQuota::batch_width`]), so the count is not checked here.
    pub fn admit_batch_job(self: &Arc<Self>, now: Instant) -> Result<QuotaPermit, GatewayError> {
        self.inflight.fetch_add(1, Ordering::Relaxed);
        let permit = QuotaPermit(Arc::clone(self));
        self.take_token(now)?;
        Ok(permit)
    }

    /// One token from the key's bucket, or 429.
    fn take_token(&self, now: Instant) -> Result<(), GatewayError> {
        let taken = self.bucket.lock().expect("bucket lock").take(now);
        taken.map_err(|retry_after| {
            metrics::rejection("rate_limited");
            GatewayError::RateLimited {
                reason: "request rate above this API key's quota",
                retry_after,
            }
        })
    }

    /// How many jobs of a batch may run at once: the key's in-flight quota less the batch
    /// request itself, at least one.
    pub fn batch_width(&self) -> usize {
        self.max_concurrent.saturating_sub(1).max(1) as usize
    }
}

/// A request counted against its key's concurrency quota.
#[derive(Debug)]
pub struct QuotaPermit(Arc<KeyQuota>);

impl Drop for QuotaPermit {
    fn drop(&mut self) {
        self.0.inflight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Who may call what: client keys (each with its quotas), the admin key, the cluster token.
#[derive(Debug)]
pub struct Keys {
    /// Empty when no API key is configured: `/v1/*` is then open.
    clients: HashMap<String, Arc<KeyQuota>>,
    admin: Option<String>,
    cluster_token: Option<String>,
}

impl Keys {
    /// With no `--api-key`, the public routes are open (an admin key alone guards only
    /// `/v1/nodes*`); with some, the admin key is a client key too.
    pub fn new(config: &Config, now: Instant) -> Keys {
        let mut clients = HashMap::new();
        if !config.api_keys.is_empty() {
            for key in config.api_keys.iter().chain(&config.admin_key) {
                clients.insert(key.clone(), Arc::new(KeyQuota::new(config, now)));
            }
        }
        Keys {
            clients,
            admin: config.admin_key.clone(),
            cluster_token: config.cluster_token.clone(),
        }
    }

    /// A client request: any configured key (the admin key too), within its quotas.
    pub fn admit_client(
        &self,
        token: Option<&str>,
        now: Instant,
    ) -> Result<Option<QuotaPermit>, GatewayError> {
        if self.clients.is_empty() {
            return Ok(None);
        }
        let quota = token.and_then(|t| self.clients.get(t)).ok_or_else(|| {
            metrics::rejection("unauthorized");
            GatewayError::Unauthorized("a valid API key is required (Authorization: Bearer <key>)")
        })?;
        quota.admit(now).map(Some)
    }

    /// An operations request: the admin key; open only when no key of any kind is configured.
    pub fn check_admin(&self, token: Option<&str>) -> Result<(), GatewayError> {
        let ok = match &self.admin {
            Some(admin) => token.is_some_and(|t| secrets_equal(t, admin)),
            None => self.clients.is_empty(),
        };
        ok.then_some(()).ok_or_else(|| {
            metrics::rejection("unauthorized");
            GatewayError::Unauthorized(
                "this route needs the admin key (Authorization: Bearer <key>)",
            )
        })
    }

    /// A report from an agent: the cluster token, when one is configured.
    pub fn check_cluster(&self, token: Option<&str>) -> Result<(), GatewayError> {
        let ok = match &self.cluster_token {
            Some(expected) => token.is_some_and(|t| secrets_equal(t, expected)),
            None => true,
        };
        ok.then_some(()).ok_or(GatewayError::Unauthorized(
            "a valid cluster token is required",
        ))
    }
}

/// The token of `Authorization: Bearer <token>`.
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    codefleet_shared::auth::bearer_token(value)
}

/// A client request's quota permit, among its extensions, for what outlives the handler (a
/// streamed answer, a socket): holding a clone keeps the request counted against its key's
/// concurrency until the stream ends.
#[derive(Debug, Clone)]
pub struct Held(Arc<QuotaPermit>);

impl Held {
    /// The quota of the key the request came with.
    pub fn quota(&self) -> &Arc<KeyQuota> {
        &(self.0).0
    }
}

/// Middleware for the public `/v1/*` routes.
pub async fn client_auth(State(gw): State<Arc<Gateway>>, request: Request, next: Next) -> Response {
    match gw
        .keys
        .admit_client(bearer(request.headers()), Instant::now())
    {
        Ok(permit) => admitted(permit, request, next).await,
        Err(error) => error.into_response(),
    }
}

/// Runs an admitted client request, its quota permit (if any) among its extensions as [`Held`]
/// and held until the answer is made.
pub(crate) async fn admitted(
    permit: Option<QuotaPermit>,
    mut request: Request,
    next: Next,
) -> Response {
    let held = permit.map(|permit| Held(Arc::new(permit)));
    if let Some(held) = &held {
        request.extensions_mut().insert(held.clone());
    }
    let response = next.run(request).await;
    drop(held);
    response
}

/// Middleware for `/v1/nodes*`.
pub async fn admin_auth(State(gw): State<Arc<Gateway>>, request: Request, next: Next) -> Response {
    match gw.keys.check_admin(bearer(request.headers())) {
        Ok(()) => next.run(request).await,
        Err(error) => error.into_response(),
    }
}

/// Middleware for `/v1/internal/*` (agents).
pub async fn cluster_auth(
    State(gw): State<Arc<Gateway>>,
    request: Request,
    next: Next,
) -> Response {
    match gw.keys.check_cluster(bearer(request.headers())) {
        Ok(()) => next.run(request).await,
        Err(error) => error.into_response(),
    }
}

/// A JSON body decoded at the edge: declared `application/json` (415 otherwise), at most
/// `--max-body-bytes` (413 above), complete within `--body-timeout-ms` (408 after), nested at
/// most `--max-json-depth` deep, of the right shape (400 `invalid_request` otherwise). Keeps the
/// raw bytes too, so they can be forwarded to an agent as they came.
pub struct JsonBody<T> {
    pub value: T,
    pub raw: Bytes,
}

impl<T: DeserializeOwned> FromRequest<Arc<Gateway>> for JsonBody<T> {
    type Rejection = GatewayError;

    async fn from_request(request: Request, gw: &Arc<Gateway>) -> Result<Self, GatewayError> {
        codefleet_http_edge::require_json(request.headers()).map_err(|problem| {
            metrics::rejection("unsupported_media_type");
            GatewayError::Invalid(problem)
        })?;
        let limit = gw.config.max_body_bytes;
        let (parts, body) = request.into_parts();
        let raw = codefleet_http_edge::read_body(&parts.headers, body, limit)
            .await
            .map_err(|error| match error {
                BodyError::TooLarge { limit } => {
                    metrics::rejection("payload_too_large");
                    GatewayError::PayloadTooLarge { limit }
                }
                other => GatewayError::Invalid(other.problem()),
            })?;
        let depth = codefleet_shared::validate::json_depth(&raw);
        if depth > gw.config.max_json_depth {
            return Err(GatewayError::invalid(format!(
                "JSON nested {depth} deep; at most {} is accepted",
                gw.config.max_json_depth
            )));
        }
        let Object(value) = serde_json::from_slice(&raw)
            .map_err(|e| GatewayError::invalid(format!("malformed JSON body: {e}")))?;
        Ok(JsonBody { value, raw })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn token_bucket_allows_burst_then_rate() {
        let t0 = Instant::now();
        let mut bucket = TokenBucket::new(10.0, 3, t0);
        for _ in 0..3 {
            assert!(bucket.take(t0).is_ok());
        }
        let wait = bucket.take(t0).unwrap_err();
        assert!(wait <= 100 * MS && wait > 99 * MS, "{wait:?}");
        assert!(bucket.take(t0 + 50 * MS).is_err());
        assert!(bucket.take(t0 + 100 * MS).is_ok());
        // Idle time refills up to the burst, not beyond.
        let later = t0 + Duration::from_secs(60);
        for _ in 0..3 {
            assert!(bucket.take(later).is_ok());
        }
        assert!(bucket.take(later).is_err());
    }

    fn config(args: &[&str]) -> Config {
        let argv = std::iter::once("codefleet-gateway").chain(args.iter().copied());
        <Config as clap::Parser>::parse_from(argv)
            .validate()
            .unwrap()
    }

    #[test]
    fn keys_and_quotas() {
        let t0 = Instant::now();
        let keys = Keys::new(
            &config(&[
                "--api-key=k1",
                "--admin-key=adm",
                "--rate-per-s=1",
                "--burst=2",
                "--max-concurrent-per-key=1",
            ]),
            t0,
        );
        let code = |r: Result<Option<QuotaPermit>, GatewayError>| {
            r.map(|_| ()).map_err(|e| e.problem().code)
        };
        use codefleet_shared::ErrorCode::{RateLimited, Unauthorized};
        assert_eq!(code(keys.admit_client(None, t0)), Err(Unauthorized));
        assert_eq!(code(keys.admit_client(Some("nope"), t0)), Err(Unauthorized));
        let held = keys.admit_client(Some("k1"), t0).unwrap();
        assert_eq!(
            code(keys.admit_client(Some("k1"), t0)),
            Err(RateLimited),
            "concurrency"
        );
        drop(held);
        assert_eq!(code(keys.admit_client(Some("k1"), t0)), Ok(()));
        let limited = keys.admit_client(Some("k1"), t0).unwrap_err();
        assert_eq!(limited.problem().retry_after_s, Some(1));
        assert_eq!(code(keys.admit_client(Some("k1"), t0 + 1_000 * MS)), Ok(()));
        assert_eq!(
            code(keys.admit_client(Some("adm"), t0)),
            Ok(()),
            "admin is a client too"
        );
        assert!(keys.check_admin(Some("adm")).is_ok());
        assert!(keys.check_admin(Some("k1")).is_err());
        assert!(keys.check_admin(None).is_err());
    }

    #[test]
    fn open_when_nothing_is_configured() {
        let keys = Keys::new(&config(&[]), Instant::now());
        assert!(keys.admit_client(None, Instant::now()).unwrap().is_none());
        assert!(keys.check_admin(None).is_ok());
        assert!(keys.check_cluster(None).is_ok());
        let keys = Keys::new(
            &config(&["--api-key=k", "--cluster-token=t"]),
            Instant::now(),
        );
        assert!(
            keys.check_admin(Some("k")).is_err(),
            "no admin key: operations closed"
        );
        assert!(keys.check_cluster(Some("t")).is_ok());
        assert!(keys.check_cluster(Some("k")).is_err());
    }

    #[test]
    fn bearer_parsing() {
        let mut headers = HeaderMap::new();
        for (value, token) in [
            ("Bearer abc", Some("abc")),
            ("bearer  abc ", Some("abc")),
            ("Basic abc", None),
            ("Bearer ", None),
            ("abc", None),
        ] {
            headers.insert(header::AUTHORIZATION, value.parse().unwrap());
            assert_eq!(bearer(&headers), token, "{value:?}");
        }
    }
}
