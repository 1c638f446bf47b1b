//! Bounds how many large requests are decoded and handled at once. A gRPC message's size says
//! little about its decoded size: an empty repeated entry is 2 bytes on the wire and a whole
//! struct in memory, so a 4 MB message can decode into ~260 MiB. tonic decodes before any
//! handler (and its admission limit) runs, so this tower layer, inside authentication, reads
//! the 5-byte gRPC prefix of each request body first. A message of `LARGE_MESSAGE_BYTES` or
//! more is read whole (raw bytes, within the size limit) and then waits for one of
//! `LARGE_REQUESTS_MAX` permits, held until its response is ready. Small requests (nearly all)
//! pass straight through; the prefix they wait for is already there.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use http_body::{Body as _, Frame};
use tokio::sync::Semaphore;
use tonic::body::Body;

/// Messages this large or larger need a permit.
pub const LARGE_MESSAGE_BYTES: usize = 256 * 1024;
/// Large requests decoded or handled at once: one. A 4 MB message may decode into ~260 MiB, so
/// even two at once would pass half a gigabyte; bulk loads send their batches one after another.
pub const LARGE_REQUESTS_MAX: usize = 1;

#[derive(Clone)]
pub struct LargeRequestLayer {
    permits: Arc<Semaphore>,
    /// `limits.message_bytes_max`: larger messages pass through, for tonic to refuse unread.
    message_bytes_max: usize,
}

impl LargeRequestLayer {
    pub fn new(message_bytes_max: usize) -> Self {
        Self { permits: Arc::new(Semaphore::new(LARGE_REQUESTS_MAX)), message_bytes_max }
    }
}

impl<S> tower::Layer<S> for LargeRequestLayer {
    type Service = LargeRequestService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        LargeRequestService {
            inner,
            permits: self.permits.clone(),
            message_bytes_max: self.message_bytes_max,
        }
    }
}

#[derive(Clone)]
pub struct LargeRequestService<S> {
    inner: S,
    permits: Arc<Semaphore>,
    message_bytes_max: usize,
}

type BoxFuture<T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send>>;

impl<S> tower::Service<http::Request<Body>> for LargeRequestService<S>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, context: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(context)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        // The clone is not ready yet; the ready one goes into the future (tower's usual swap).
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let permits = self.permits.clone();
        let message_bytes_max = self.message_bytes_max;
        Box::pin(async move {
            let (parts, mut body) = request.into_parts();
            let mut prefix = Prefixed { buffered: VecDeque::new(), rest: None };
            let mut seen = 0usize;
            let mut ended = false;
            while seen < 5 {
                match std::future::poll_fn(|context| Pin::new(&mut body).poll_frame(context)).await {
                    None => {
                        ended = true;
                        break;
                    }
                    // A broken body: let tonic read it and answer as it does.
                    Some(Err(error)) => {
                        prefix.buffered.push_back(Err(error));
                        ended = true;
                        break;
                    }
                    Some(Ok(frame)) => {
                        if let Some(data) = frame.data_ref() {
                            seen += data.len();
                        } else {
                            ended = true;
                        }
                        prefix.buffered.push_back(Ok(frame));
                        if ended {
                            break;
                        }
                    }
                }
            }
            let _permit = match message_len(&prefix.buffered) {
                Some(len) if (LARGE_MESSAGE_BYTES..=message_bytes_max).contains(&len) => {
                    metrics::counter!("allot_large_requests_total").increment(1);
                    // The whole message first (raw bytes, at most the size limit), then the
                    // permit: a client that sends slowly never holds the permit while it sends.
                    while !ended && seen < len + 5 {
                        match std::future::poll_fn(|context| Pin::new(&mut body).poll_frame(context)).await {
                            None => ended = true,
                            Some(Err(error)) => {
                                prefix.buffered.push_back(Err(error));
                                ended = true;
                            }
                            Some(Ok(frame)) => {
                                match frame.data_ref() {
                                    Some(data) => seen += data.len(),
                                    None => ended = true,
                                }
                                prefix.buffered.push_back(Ok(frame));
                            }
                        }
                    }
                    permits.acquire_owned().await.ok()
                }
                _ => None,
            };
            if !ended {
                prefix.rest = Some(body);
            }
            let response = inner.call(http::Request::from_parts(parts, Body::new(prefix))).await;
            if _permit.is_some() {
                // The decoded request is dropped by now. Hand its memory back before the next
                // large request decodes: the allocator otherwise keeps a freed block of
                // hundreds of MiB for a while, and the next decode's doubling vectors came on
                // top of it (a peak of 470-520 MiB under 16 concurrent 4 MB requests).
                // SAFETY: mi_collect only walks mimalloc's own heaps and arenas; any thread may
                // call it at any time (without mimalloc as the allocator it finds them empty).
                unsafe { libmimalloc_sys::mi_collect(true) };
            }
            response
        })
    }
}

/// The length in the gRPC prefix (compressed flag, then 4 bytes big-endian) of the buffered data.
fn message_len(frames: &VecDeque<Result<Frame<Bytes>, tonic::Status>>) -> Option<usize> {
    let mut header = [0u8; 5];
    let mut filled = 0;
    for frame in frames {
        let Ok(frame) = frame else { break };
        let Some(data) = frame.data_ref() else { break };
        let mut data = data.clone();
        while filled < 5 && data.has_remaining() {
            header[filled] = data.get_u8();
            filled += 1;
        }
        if filled == 5 {
            return Some(u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize);
        }
    }
    None
}

/// The frames read ahead, then the rest of the original body.
struct Prefixed {
    buffered: VecDeque<Result<Frame<Bytes>, tonic::Status>>,
    rest: Option<Body>,
}

impl http_body::Body for Prefixed {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        context: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, tonic::Status>>> {
        if let Some(frame) = self.buffered.pop_front() {
            return Poll::Ready(Some(frame));
        }
        match self.rest.as_mut() {
            Some(rest) => Pin::new(rest).poll_frame(context),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.buffered.is_empty() && self.rest.as_ref().is_none_or(|rest| rest.is_end_stream())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_length_across_frames() {
        // Goal: the prefix may arrive split over frames. Method: 2 + 3 bytes, then 5 at once.
        let split: VecDeque<_> = [Bytes::from_static(&[0, 0]), Bytes::from_static(&[4, 0, 1])]
            .into_iter()
            .map(|data| Ok(Frame::data(data)))
            .collect();
        assert_eq!(message_len(&split), Some(262_145));
        let whole: VecDeque<_> = [Ok(Frame::data(Bytes::from_static(&[0, 0, 0, 0, 7, 42])))].into();
        assert_eq!(message_len(&whole), Some(7));
        let short: VecDeque<_> = [Ok(Frame::data(Bytes::from_static(&[0, 0])))].into();
        assert_eq!(message_len(&short), None);
    }
}
