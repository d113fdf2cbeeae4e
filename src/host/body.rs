//! Reading a forwarded request's body (`enableForwardingHttpRequest`): at most a limit, and
//! the rest read and discarded rather than left unread.
//!
//! Why: an answer sent while the caller is still sending, followed by closing the connection
//! with unread bytes in it, makes the kernel reset the connection; the caller (the Functions
//! host, or devhost) may then see the reset instead of the answer (issue 19: a 5 MB body got a
//! `500` about one time in two). So a body over the limit is drained to its end (up to
//! [`DRAIN_MAX_BYTES`], within [`DRAIN_TIMEOUT`]) before the `400` goes out. Draining costs no
//! memory: the chunks are dropped as they come. Beyond those bounds the connection is given
//! up (the Azure host itself refuses bodies over 100 MB).

use std::time::Duration;

use axum::body::{Body, Bytes};
use futures::StreamExt;

/// The most a too-large body is read to discard it: above the Functions host's own limit
/// (100 MB).
pub const DRAIN_MAX_BYTES: usize = 128 * 1024 * 1024;
/// How long discarding a too-large body may take.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(60);

/// Why a body could not be had.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyError {
    /// More than the limit (the rest was discarded, within the bounds above).
    TooLarge,
    /// The connection failed while reading.
    Unreadable,
}

/// The body, if it is at most `limit` bytes; otherwise [`BodyError::TooLarge`] once the rest
/// has been read and dropped (module doc).
pub async fn read_forwarded_body(body: Body, limit: usize) -> Result<Bytes, BodyError> {
    let mut stream = body.into_data_stream();
    let mut kept: Vec<u8> = Vec::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|_| BodyError::Unreadable)?;
        if kept.len() + chunk.len() > limit {
            let mut seen = kept.len() + chunk.len();
            drop(kept);
            let drain = async {
                while let Some(Ok(chunk)) = stream.next().await {
                    seen += chunk.len();
                    if seen > DRAIN_MAX_BYTES {
                        break;
                    }
                }
            };
            let _ = tokio::time::timeout(DRAIN_TIMEOUT, drain).await;
            return Err(BodyError::TooLarge);
        }
        kept.extend_from_slice(&chunk);
    }
    Ok(Bytes::from(kept))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunked(chunks: Vec<&'static [u8]>) -> Body {
        let stream = futures::stream::iter(
            chunks
                .into_iter()
                .map(|c| Ok::<_, std::io::Error>(Bytes::from_static(c))),
        );
        Body::from_stream(stream)
    }

    #[tokio::test]
    async fn a_body_within_the_limit_is_returned_whole() {
        let body = read_forwarded_body(chunked(vec![b"ab", b"cd"]), 4).await;
        assert_eq!(body.unwrap(), Bytes::from_static(b"abcd"));
    }

    #[tokio::test]
    async fn a_body_over_the_limit_is_too_large_after_it_was_read_to_its_end() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use std::sync::Arc;
        let read = Arc::new(AtomicUsize::new(0));
        let counter = read.clone();
        let stream = futures::stream::iter(0..100).map(move |_| {
            counter.fetch_add(1, Ordering::SeqCst);
            Ok::<_, std::io::Error>(Bytes::from_static(&[0u8; 1000]))
        });

        let body = read_forwarded_body(Body::from_stream(stream), 1024).await;

        assert_eq!(body, Err(BodyError::TooLarge));
        assert_eq!(read.load(Ordering::SeqCst), 100, "every chunk was read");
    }
}
