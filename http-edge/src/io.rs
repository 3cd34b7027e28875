//! The connection's byte stream, with hyper's own answers to requests it cannot parse (a
//! malformed request line or header, a bad `Content-Length`, a URI or header section over its
//! limits) replaced by problem+json ones, as the contract wants for every non-2xx answer.
//!
//! hyper's HTTP/1 server writes those answers itself, before any service sees the request, and
//! offers no hook for their body. They have one exact shape — `HTTP/1.1 <status> <reason>`, then
//! `connection: close`, `content-length: 0` and `date`, and nothing after, as the connection
//! closes — which none of our own answers has (every error of ours has a problem+json body, see
//! `serve`). So the write side watches for that shape at the end of what hyper writes, holds it
//! back, and writes a problem of the same status in its place.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use codefleet_shared::{ErrorCode, Problem};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The heads hyper writes on a parse error, up to the date, and what we say instead.
const AUTOMATIC: [(&[u8], ErrorCode, &str); 3] = [
    (
        b"HTTP/1.1 400 Bad Request\r\nconnection: close\r\ncontent-length: 0\r\ndate: ",
        ErrorCode::InvalidRequest,
        "the request is not valid HTTP/1.1: a malformed request line or header field, or a bad \
         Content-Length or Transfer-Encoding",
    ),
    (
        b"HTTP/1.1 414 URI Too Long\r\nconnection: close\r\ncontent-length: 0\r\ndate: ",
        ErrorCode::UriTooLong,
        "the request target is longer than this server accepts",
    ),
    (
        b"HTTP/1.1 431 Request Header Fields Too Large\r\nconnection: close\r\ncontent-length: 0\r\ndate: ",
        ErrorCode::HeadersTooLarge,
        "the request's header section is larger than this server accepts (too many or too long \
         header fields)",
    ),
];

/// An IMF-fixdate (`Sun, 06 Nov 1994 08:49:37 GMT`) is always this long.
const DATE_LEN: usize = 29;
const END: &[u8] = b"\r\n\r\n";

/// Where hyper's automatic answer starts in `buf`, when `buf` ends with one, and ours for it.
fn automatic_answer(buf: &[u8]) -> Option<(usize, Vec<u8>)> {
    if !buf.ends_with(END) {
        return None;
    }
    AUTOMATIC.iter().find_map(|(head, code, detail)| {
        let start = buf.len().checked_sub(head.len() + DATE_LEN + END.len())?;
        let answer = &buf[start..];
        let date = answer.strip_prefix(*head)?.get(..DATE_LEN)?;
        Some((start, problem_answer(*code, detail, date)))
    })
}

/// A whole HTTP/1.1 answer carrying `code`'s problem, closing the connection.
fn problem_answer(code: ErrorCode, detail: &str, date: &[u8]) -> Vec<u8> {
    let problem = Problem::new(code, detail);
    let body = serde_json::to_vec(&problem).expect("problems always serialize");
    let reason = match problem.status {
        414 => "URI Too Long",
        431 => "Request Header Fields Too Large",
        _ => "Bad Request",
    };
    let mut out = format!(
        "HTTP/1.1 {} {reason}\r\ncontent-type: application/problem+json\r\ncontent-length: {}\r\nconnection: close\r\ndate: ",
        problem.status,
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(date);
    out.extend_from_slice(END);
    out.extend_from_slice(&body);
    out
}

/// A connection's stream whose automatic parse-error answers become problems.
pub struct ProblemStream<S> {
    inner: S,
    /// Our answer in place of hyper's, and how much of it is written.
    replacement: Option<(Vec<u8>, usize)>,
}

impl<S> ProblemStream<S> {
    pub fn new(inner: S) -> ProblemStream<S> {
        ProblemStream {
            inner,
            replacement: None,
        }
    }
}

impl<S: AsyncWrite + Unpin> ProblemStream<S> {
    /// Writes out the replacement answer, if one is pending.
    fn poll_replacement(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while let Some((bytes, written)) = &mut self.replacement {
            if *written == bytes.len() {
                self.replacement = None;
                break;
            }
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &bytes[*written..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            *written += n;
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for ProblemStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for ProblemStream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        ready!(this.poll_replacement(cx))?;
        match automatic_answer(buf) {
            None => Pin::new(&mut this.inner).poll_write(cx, buf),
            // What came before it first; hyper hands the rest back on its next write.
            Some((start, _)) if start > 0 => {
                Pin::new(&mut this.inner).poll_write(cx, &buf[..start])
            }
            Some((_, ours)) => {
                tracing::debug!("answered a request the HTTP layer could not parse");
                this.replacement = Some((ours, 0));
                let _ = this.poll_replacement(cx)?;
                Poll::Ready(Ok(buf.len()))
            }
        }
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let Some(last) = bufs.iter().rposition(|b| !b.is_empty()) else {
            return Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        };
        if automatic_answer(&bufs[last]).is_none() {
            let this = &mut *self;
            ready!(this.poll_replacement(cx))?;
            return Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        }
        // Rare (the connection's last write): go slice by slice, so the answer is seen alone.
        let first = bufs.iter().position(|b| !b.is_empty()).unwrap_or(last);
        self.poll_write(cx, &bufs[first])
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        ready!(this.poll_replacement(cx))?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        ready!(this.poll_replacement(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const DATE: &str = "Tue, 01 Dec 2026 06:52:37 GMT";

    fn hyper_answer(status_line: &str) -> Vec<u8> {
        format!(
            "HTTP/1.1 {status_line}\r\nconnection: close\r\ncontent-length: 0\r\ndate: {DATE}\r\n\r\n"
        )
        .into_bytes()
    }

    /// Writes `chunks` through a `ProblemStream` (each as hyper would: retrying what was not
    /// taken) and returns what reached the other end.
    async fn through(chunks: &[Vec<u8>]) -> String {
        let (ours, mut theirs) = tokio::io::duplex(64 * 1024);
        let mut stream = ProblemStream::new(ours);
        for chunk in chunks {
            stream.write_all(chunk).await.unwrap();
        }
        stream.shutdown().await.unwrap();
        drop(stream);
        let mut out = String::new();
        theirs.read_to_string(&mut out).await.unwrap();
        out
    }

    fn body_of(answer: &str) -> serde_json::Value {
        let (_, body) = answer.split_once("\r\n\r\n").unwrap();
        serde_json::from_str(body).unwrap()
    }

    #[tokio::test]
    async fn hypers_automatic_answers_become_problems() {
        for (status_line, status, code) in [
            ("400 Bad Request", 400, "invalid_request"),
            ("414 URI Too Long", 414, "uri_too_long"),
            (
                "431 Request Header Fields Too Large",
                431,
                "headers_too_large",
            ),
        ] {
            let out = through(&[hyper_answer(status_line)]).await;
            assert!(
                out.starts_with(&format!("HTTP/1.1 {status_line}\r\n")),
                "{out}"
            );
            assert!(
                out.contains("content-type: application/problem+json\r\n"),
                "{out}"
            );
            assert!(out.contains("connection: close\r\n"), "{out}");
            assert!(out.contains(&format!("date: {DATE}\r\n")), "{out}");
            let body = body_of(&out);
            assert_eq!(
                (body["status"].as_u64(), body["code"].as_str()),
                (Some(status), Some(code))
            );
            let length = format!(
                "content-length: {}\r\n",
                serde_json::to_vec(&body).unwrap().len()
            );
            assert!(out.contains(&length), "{out}");
        }
    }

    #[tokio::test]
    async fn an_answer_before_it_in_the_same_write_goes_out_first_unchanged() {
        let ok = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}";
        let mut both = ok.as_bytes().to_vec();
        both.extend(hyper_answer("400 Bad Request"));
        let out = through(&[both]).await;
        let (first, second) = out.split_at(ok.len());
        assert_eq!(first, ok);
        assert_eq!(body_of(second)["code"], "invalid_request");
    }

    #[tokio::test]
    async fn everything_else_passes_unchanged() {
        let ours = "HTTP/1.1 400 Bad Request\r\ncontent-type: application/problem+json\r\ncontent-length: 2\r\n\r\n{}";
        let empty = format!("HTTP/1.1 204 No Content\r\ndate: {DATE}\r\n\r\n");
        let text = "stdout said HTTP/1.1 400 Bad Request\r\n";
        let chunks = [
            ours.as_bytes().to_vec(),
            empty.clone().into_bytes(),
            text.as_bytes().to_vec(),
        ];
        let out = through(&chunks).await;
        assert_eq!(out, format!("{ours}{empty}{text}"));
    }
}
