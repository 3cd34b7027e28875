//! Request bodies: a deadline on the whole body (a client that stops half-way gets 408 and its
//! connection closed, instead of holding it open), reading a body within a size limit, and the
//! `application/json` media type every JSON endpoint requires.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::http::{header, HeaderMap};
use bytes::Bytes;
use codefleet_shared::{ErrorCode, Problem};
use http_body::{Body, Frame, SizeHint};
use tokio::time::{Instant, Sleep};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The error a [`DeadlineBody`] yields once its deadline has passed.
#[derive(Debug, thiserror::Error)]
#[error("the request body did not arrive within {0:?}")]
pub struct BodyTimedOut(pub Duration);

/// A request body that must be complete by a deadline set when its head arrived. Past it, the
/// next poll yields [`BodyTimedOut`] and `timed_out` is raised, so the server closes the
/// connection after answering. The timer exists only once the body has to be waited for.
pub struct DeadlineBody<B> {
    inner: B,
    deadline: Instant,
    budget: Duration,
    sleep: Option<Pin<Box<Sleep>>>,
    timed_out: Arc<AtomicBool>,
    /// Raised once the whole body has been read (at once for a request without one).
    complete: Arc<AtomicBool>,
}

impl<B: Body> DeadlineBody<B> {
    pub fn new(inner: B, budget: Duration, timed_out: Arc<AtomicBool>) -> DeadlineBody<B> {
        let complete = Arc::new(AtomicBool::new(inner.is_end_stream()));
        DeadlineBody {
            inner,
            deadline: Instant::now() + budget,
            budget,
            sleep: None,
            timed_out,
            complete,
        }
    }

    /// Raised once the whole body has been read. An answer given before that (a request
    /// refused before its body was read: too large, not JSON, unauthorized) must close the
    /// connection, or the client could send its next request on a connection the server is
    /// about to drop.
    pub fn completion(&self) -> Arc<AtomicBool> {
        Arc::clone(&self.complete)
    }
}

impl<B> Body for DeadlineBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if this.timed_out.load(Ordering::Relaxed) {
            return Poll::Ready(Some(Err(BodyTimedOut(this.budget).into())));
        }
        if let Poll::Ready(frame) = Pin::new(&mut this.inner).poll_frame(cx) {
            if frame.is_none() || this.inner.is_end_stream() {
                this.complete.store(true, Ordering::Relaxed);
            }
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        let deadline = this.deadline;
        let sleep = this
            .sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        match sleep.as_mut().poll(cx) {
            Poll::Ready(()) => {
                this.timed_out.store(true, Ordering::Relaxed);
                Poll::Ready(Some(Err(BodyTimedOut(this.budget).into())))
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Why a request body could not be read.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("the request body is larger than {limit} bytes")]
    TooLarge { limit: usize },
    #[error("{0}")]
    TimedOut(BodyTimedOut),
    #[error("could not read the request body: {0}")]
    Broken(String),
}

impl BodyError {
    /// The answer: 413 `payload_too_large`, 408 `request_timeout` or 400 `invalid_request`.
    pub fn problem(&self) -> Problem {
        let code = match self {
            BodyError::TooLarge { .. } => ErrorCode::PayloadTooLarge,
            BodyError::TimedOut(_) => ErrorCode::RequestTimeout,
            BodyError::Broken(_) => ErrorCode::InvalidRequest,
        };
        Problem::new(code, self.to_string())
    }
}

/// Reads a whole body of at most `limit` bytes. A declared `Content-Length` above the limit is
/// refused before a byte is read.
pub async fn read_body(
    headers: &HeaderMap,
    body: axum::body::Body,
    limit: usize,
) -> Result<Bytes, BodyError> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|len| len > limit as u64) {
        return Err(BodyError::TooLarge { limit });
    }
    axum::body::to_bytes(body, limit)
        .await
        .map_err(|e| classify(e.into_inner().as_ref(), limit))
}

/// Finds what went wrong anywhere in an error's chain (axum and `Limited` each wrap it).
fn classify(error: &(dyn std::error::Error + 'static), limit: usize) -> BodyError {
    let mut cause = Some(error);
    while let Some(e) = cause {
        if e.is::<http_body_util::LengthLimitError>() {
            return BodyError::TooLarge { limit };
        }
        if let Some(timed_out) = e.downcast_ref::<BodyTimedOut>() {
            return BodyError::TimedOut(BodyTimedOut(timed_out.0));
        }
        cause = e.source();
    }
    BodyError::Broken(error.to_string())
}

/// Checks that a request declares a JSON body: `application/json` or any `application/*+json`,
/// with or without parameters (`; charset=utf-8`). Anything else, or no `Content-Type` at all, is
/// 415 `unsupported_media_type`: a browser page can send `text/plain` or a form across origins
/// without a CORS pre-check, but not `application/json`.
pub fn require_json(headers: &HeaderMap) -> Result<(), Problem> {
    let refuse = |what: String| {
        Err(Problem::new(
            ErrorCode::UnsupportedMediaType,
            format!("{what}; this endpoint takes `Content-Type: application/json`"),
        ))
    };
    let Some(value) = headers.get(header::CONTENT_TYPE) else {
        return refuse("the request has no Content-Type".to_string());
    };
    let Ok(value) = value.to_str() else {
        return refuse("the Content-Type is not readable text".to_string());
    };
    let essence = value.split(';').next().unwrap_or_default().trim();
    let json = essence.split_once('/').is_some_and(|(kind, subtype)| {
        let subtype = subtype.to_ascii_lowercase();
        kind.eq_ignore_ascii_case("application")
            && (subtype == "json" || (subtype.ends_with("+json") && subtype.len() > 5))
    });
    if json {
        Ok(())
    } else {
        refuse(format!("Content-Type {value:?} is not JSON"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn with_type(value: Option<&str>) -> HeaderMap {
        let mut headers = HeaderMap::new();
        if let Some(v) = value {
            headers.insert(header::CONTENT_TYPE, HeaderValue::from_str(v).unwrap());
        }
        headers
    }

    #[test]
    fn json_media_types() {
        for (value, ok) in [
            (Some("application/json"), true),
            (Some("application/json; charset=utf-8"), true),
            (Some("Application/JSON"), true),
            (Some("application/problem+json"), true),
            (Some("application/vnd.api+json ; x=y"), true),
            (None, false),
            (Some(""), false),
            (Some("text/plain"), false),
            (Some("text/plain; a=application/json"), false),
            (Some("application/x-www-form-urlencoded"), false),
            (Some("multipart/form-data; boundary=x"), false),
            (Some("application/+json"), false),
            (Some("application/jsonx"), false),
            (Some("text/json"), false),
        ] {
            let result = require_json(&with_type(value));
            assert_eq!(result.is_ok(), ok, "{value:?}");
            if let Err(problem) = result {
                assert_eq!(problem.code, ErrorCode::UnsupportedMediaType);
                assert_eq!(problem.status, 415);
            }
        }
    }

    /// A body whose frames come from a channel: it stalls while the sender is quiet.
    struct ChannelBody(tokio::sync::mpsc::Receiver<Bytes>);

    impl Body for ChannelBody {
        type Data = Bytes;
        type Error = std::convert::Infallible;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            self.0.poll_recv(cx).map(|b| b.map(|b| Ok(Frame::data(b))))
        }
    }

    #[tokio::test]
    async fn a_stalled_body_times_out_and_says_so() {
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        let flag = Arc::new(AtomicBool::new(false));
        let budget = Duration::from_millis(200);
        let body = DeadlineBody::new(ChannelBody(rx), budget, Arc::clone(&flag));
        tx.send(Bytes::from_static(b"{\"half\":")).await.unwrap();
        let started = Instant::now();
        let read = read_body(&HeaderMap::new(), axum::body::Body::new(body), 1024).await;
        assert!(matches!(read, Err(BodyError::TimedOut(_))), "{read:?}");
        assert!(started.elapsed() >= budget, "{:?}", started.elapsed());
        assert!(flag.load(Ordering::Relaxed));
        assert_eq!(read.unwrap_err().problem().status, 408);
        drop(tx);
    }

    #[tokio::test]
    async fn a_body_in_time_and_in_size_is_read_whole() {
        let flag = Arc::new(AtomicBool::new(false));
        let inner = http_body_util::Full::new(Bytes::from_static(b"{}"));
        let body = DeadlineBody::new(inner, Duration::from_secs(3), Arc::clone(&flag));
        let read = read_body(&HeaderMap::new(), axum::body::Body::new(body), 2).await;
        assert_eq!(read.unwrap(), Bytes::from_static(b"{}"));
        let inner = http_body_util::Full::new(Bytes::from_static(b"{\"a\":1}"));
        let body = DeadlineBody::new(inner, Duration::from_secs(3), Arc::clone(&flag));
        let read = read_body(&HeaderMap::new(), axum::body::Body::new(body), 2).await;
        assert!(
            matches!(read, Err(BodyError::TooLarge { limit: 2 })),
            "{read:?}"
        );
        assert!(!flag.load(Ordering::Relaxed));
        let mut declared = HeaderMap::new();
        declared.insert(header::CONTENT_LENGTH, HeaderValue::from_static("3"));
        let read = read_body(&declared, axum::body::Body::empty(), 2).await;
        assert!(
            matches!(read, Err(BodyError::TooLarge { limit: 2 })),
            "{read:?}"
        );
    }
}
