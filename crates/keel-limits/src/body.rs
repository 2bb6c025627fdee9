use std::future::Future as _;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Buf as _, Bytes};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};
use tonic::Status;

use crate::concurrency::Slot;
use crate::config::format_duration;
use crate::metrics::{Limit, Tally};

/// The status for a request body of at least `read` bytes when `limit` are allowed.
pub(crate) fn too_large(read: u64, limit: u64) -> Status {
    Status::resource_exhausted(format!(
        "request of at least {read} bytes exceeds the limit of {limit} bytes"
    ))
}

pin_project! {
    /// A request body that fails with RESOURCE_EXHAUSTED as soon as more than `limit` bytes
    /// have come in, without reading any further; tonic then answers the call with that status.
    #[derive(Debug)]
    pub(crate) struct LimitedRequest<B> {
        #[pin]
        inner: B,
        limit: u64,
        read: u64,
        exceeded: bool,
        tally: Tally,
    }
}

impl<B> LimitedRequest<B> {
    pub(crate) fn new(inner: B, limit: u64, tally: Tally) -> Self {
        Self {
            inner,
            limit,
            read: 0,
            exceeded: false,
            tally,
        }
    }
}

impl<B> Body for LimitedRequest<B>
where
    B: Body,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Data = B::Data;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        if *this.exceeded {
            return Poll::Ready(None);
        }
        let frame = match ready!(this.inner.poll_frame(cx)) {
            Some(Ok(frame)) => frame,
            Some(Err(error)) => return Poll::Ready(Some(Err(Status::from_error(error.into())))),
            None => return Poll::Ready(None),
        };
        if let Some(data) = frame.data_ref() {
            *this.read = this.read.saturating_add(data.remaining() as u64);
            if *this.read > *this.limit {
                *this.exceeded = true;
                this.tally.count(Limit::MessageSize);
                tracing::debug!(
                    tenant = this.tally.tenant(),
                    read = *this.read,
                    limit = *this.limit,
                    "request body over the limit"
                );
                return Poll::Ready(Some(Err(too_large(*this.read, *this.limit))));
            }
        }
        Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        self.exceeded || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A response body that ends the call with RESOURCE_EXHAUSTED in its trailers once it has
/// streamed for longer than allowed, and holds the caller's concurrency slot until it is
/// finished or dropped.
///
/// The clock starts when the response begins, not when the call came in: a slow unary handler
/// is not a long stream, and its ready answer must not be swapped for an error.
#[derive(Debug)]
pub(crate) struct LimitedResponse {
    inner: tonic::body::Body,
    /// Set once the inner body's trailers or end went out, so nothing is added after them.
    finished: bool,
    deadline: Instant,
    max_duration: Duration,
    /// Created only when the inner body first waits, so calls that answer at once (all unary
    /// calls) never arm a timer.
    sleep: Option<Pin<Box<Sleep>>>,
    tally: Tally,
    _slot: Slot,
}

impl LimitedResponse {
    pub(crate) fn new(
        inner: tonic::body::Body,
        max_duration: Duration,
        tally: Tally,
        slot: Slot,
    ) -> Self {
        Self {
            inner,
            finished: false,
            deadline: Instant::now() + max_duration,
            max_duration,
            sleep: None,
            tally,
            _slot: slot,
        }
    }

    /// Drops the inner stream (which stops its producer) and returns the trailers that end
    /// the call instead.
    fn expire(&mut self) -> Result<Frame<Bytes>, Status> {
        self.finished = true;
        self.inner = tonic::body::Body::empty();
        self.sleep = None;
        self.tally.count(Limit::StreamDuration);
        tracing::debug!(
            tenant = self.tally.tenant(),
            max_duration = ?self.max_duration,
            "stream ran past its maximum duration"
        );
        let status = Status::resource_exhausted(format!(
            "stream exceeded the maximum duration of {}; reconnect to continue",
            format_duration(self.max_duration)
        ));
        let mut trailers = http::HeaderMap::new();
        status.add_header(&mut trailers)?;
        Ok(Frame::trailers(trailers))
    }
}

impl Body for LimitedResponse {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = &mut *self;
        if this.finished || this.inner.is_end_stream() {
            return Poll::Ready(None);
        }
        // Checked before every frame too, so a stream that never waits is still cut off.
        if Instant::now() >= this.deadline {
            return Poll::Ready(Some(this.expire()));
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if frame.is_trailers() {
                    this.finished = true;
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(status))) => {
                this.finished = true;
                Poll::Ready(Some(Err(status)))
            }
            Poll::Ready(None) => {
                this.finished = true;
                Poll::Ready(None)
            }
            Poll::Pending => {
                let deadline = this.deadline;
                let sleep = this
                    .sleep
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
                match sleep.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Some(this.expire())),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.finished || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        // The stream may be cut short, so only the upper bound still holds.
        let mut hint = SizeHint::new();
        if let Some(upper) = self.inner.size_hint().upper() {
            hint.set_upper(upper);
        }
        hint
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::sync::Arc;

    use http_body_util::BodyExt as _;

    use super::*;
    use crate::concurrency::InFlight;
    use crate::metrics::LimitMetrics;

    /// A body handing out `chunks` one poll at a time, so a test can see how many were taken.
    struct Chunks {
        chunks: VecDeque<Bytes>,
    }

    impl Body for Chunks {
        type Data = Bytes;
        type Error = std::convert::Infallible;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            Poll::Ready(self.chunks.pop_front().map(|chunk| Ok(Frame::data(chunk))))
        }
    }

    fn tally() -> (keel_server::Metrics, Tally) {
        let metrics = keel_server::Metrics::default();
        let tally = Tally::new(LimitMetrics::register(&metrics), "acme");
        (metrics, tally)
    }

    #[tokio::test]
    async fn request_body_fails_after_the_limit_without_reading_the_rest() {
        let (metrics, tally) = tally();
        let chunks = (0..10).map(|_| Bytes::from(vec![0u8; 400])).collect();
        let mut body = LimitedRequest::new(Chunks { chunks }, 1024, tally);

        for _ in 0..2 {
            let frame = body
                .frame()
                .await
                .expect("a frame")
                .expect("under the limit");
            assert_eq!(frame.into_data().expect("data").len(), 400);
        }
        let status = body
            .frame()
            .await
            .expect("a frame")
            .expect_err("third chunk crosses 1024 bytes");
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
        assert_eq!(
            status.message(),
            "request of at least 1200 bytes exceeds the limit of 1024 bytes"
        );
        assert!(body.is_end_stream());
        assert!(body.frame().await.is_none(), "nothing more after the error");
        // Three chunks read, seven never touched.
        assert_eq!(body.inner.chunks.len(), 7);

        let text = metrics.encode().expect("encode");
        assert!(
            text.contains(r#"keel_limit_exceeded_total{tenant="acme",limit="message_size"} 1"#),
            "{text}"
        );
    }

    #[tokio::test]
    async fn request_body_within_the_limit_passes_unchanged() {
        let (_metrics, tally) = tally();
        let chunks = [Bytes::from_static(b"hello"), Bytes::from_static(b"world")].into();
        let body = LimitedRequest::new(Chunks { chunks }, 10, tally);
        let collected = body.collect().await.expect("within the limit").to_bytes();
        assert_eq!(collected, Bytes::from_static(b"helloworld"));
    }

    /// One data frame, then nothing, forever.
    struct Stalled {
        sent: bool,
    }

    impl Body for Stalled {
        type Data = Bytes;
        type Error = Status;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
            if self.sent {
                Poll::Pending
            } else {
                self.sent = true;
                Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(b"first")))))
            }
        }
    }

    #[tokio::test]
    async fn response_ends_with_resource_exhausted_at_the_deadline_and_frees_its_slot() {
        let (metrics, tally) = tally();
        let in_flight = Arc::new(InFlight::new(1));
        let key = uuid::Uuid::now_v7();
        let slot = in_flight.try_acquire(key).expect("slot");
        let started = Instant::now();
        let mut body = LimitedResponse::new(
            tonic::body::Body::new(Stalled { sent: false }),
            Duration::from_millis(100),
            tally,
            slot,
        );

        let first = body.frame().await.expect("frame").expect("data");
        assert_eq!(
            first.into_data().expect("data"),
            Bytes::from_static(b"first")
        );
        let trailers = body
            .frame()
            .await
            .expect("frame")
            .expect("trailers")
            .into_trailers()
            .expect("trailers frame");
        assert!(started.elapsed() >= Duration::from_millis(100));
        let status = Status::from_header_map(&trailers).expect("status in trailers");
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
        assert_eq!(
            status.message(),
            "stream exceeded the maximum duration of 100ms; reconnect to continue"
        );
        assert!(body.is_end_stream());
        assert!(body.frame().await.is_none());

        assert!(
            in_flight.try_acquire(key).is_none(),
            "slot held by the body"
        );
        drop(body);
        assert!(
            in_flight.try_acquire(key).is_some(),
            "slot freed with the body"
        );
        let text = metrics.encode().expect("encode");
        assert!(
            text.contains(r#"keel_limit_exceeded_total{tenant="acme",limit="stream_duration"} 1"#),
            "{text}"
        );
    }
}
