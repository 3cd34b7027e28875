//! Request ids: every request either brings one (`X-Request-Id`, kept when it is 1-128 visible
//! ASCII characters) or is given one (`req_` and 16 hex digits). The id is put back on the
//! request's headers (so a gateway forwards it to the agent unchanged), stored as a
//! [`RequestId`] extension for handlers (and as [`current`] for the task serving it), carried by
//! a `request` tracing span around everything
//! the request does (so every log line of a job carries it, on the gateway and on the agent),
//! and returned in the answer's `X-Request-Id`.
//!
//! tower-http has request-id layers; this is written out because the edge also validates a
//! client's id (anything else is replaced, never echoed) and opens the span in the same place.

use axum::http::{HeaderMap, HeaderValue};

/// The header a request id travels in.
pub const HEADER: &str = "x-request-id";

tokio::task_local! {
    /// The id of the request the current task serves (set by the edge around the app).
    static CURRENT: RequestId;
}

/// The id of the request this task serves, if it serves one: what a gateway forwards to an
/// agent with the job.
pub fn current() -> Option<RequestId> {
    CURRENT.try_with(RequestId::clone).ok()
}

/// Runs `f` as the serving of request `id`.
pub async fn scope<F: std::future::Future>(id: RequestId, f: F) -> F::Output {
    CURRENT.scope(id, f).await
}

/// Longest client-supplied id kept.
const MAX_LEN: usize = 128;

/// The request's id, as handlers find it among the request's extensions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestId(pub String);

impl RequestId {
    /// The id `headers` bring, when it is acceptable, or a new one.
    pub fn of(headers: &HeaderMap) -> RequestId {
        let given = headers
            .get(HEADER)
            .and_then(|v| v.to_str().ok())
            .filter(|v| acceptable(v));
        match given {
            Some(id) => RequestId(id.to_string()),
            None => RequestId(format!("req_{:016x}", rand::random::<u64>())),
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn header_value(&self) -> HeaderValue {
        HeaderValue::from_str(&self.0).expect("ids are visible ASCII")
    }
}

fn acceptable(id: &str) -> bool {
    (1..=MAX_LEN).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_graphic())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_good_id_is_kept_and_anything_else_replaced() {
        let with = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert(HEADER, HeaderValue::from_str(v).unwrap());
            RequestId::of(&h).0
        };
        assert_eq!(with("abc-123_X.y:z"), "abc-123_X.y:z");
        for bad in ["", "has space", &"x".repeat(129)] {
            let got = with(bad);
            assert!(
                got.starts_with("req_") && got.len() == 20,
                "{bad:?} -> {got}"
            );
        }
        let fresh = RequestId::of(&HeaderMap::new()).0;
        assert!(fresh.starts_with("req_") && fresh.len() == 20, "{fresh}");
        assert_ne!(fresh, RequestId::of(&HeaderMap::new()).0);
    }
}
