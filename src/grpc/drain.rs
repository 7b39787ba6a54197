//! gRPC streams end when the gateway drains. Subscribe and Health/Watch end themselves (after
//! their last word: the events read, NOT_SERVING); any other response still streaming when
//! draining starts (a `ServerReflectionInfo` a client keeps open) is ended here with UNAVAILABLE,
//! so no client holds the shutdown for the whole grace period. A response that is done, or has a
//! frame ready, is never cut: only one waiting for its next message. The request body of such a
//! call (a client stream the handler still reads) ends too, as if the client had finished, so the
//! handler lets go of the HTTP/2 stream; a request still arriving before its answer (a unary call
//! in flight) is left to finish within the grace period.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::sync::watch;

/// The layer for the gRPC routes.
#[derive(Clone)]
pub struct DrainLayer {
    shutdown: watch::Receiver<bool>,
}

impl DrainLayer {
    /// Ends calls' streams once `shutdown` turns true (or its sender is gone).
    pub fn new(shutdown: watch::Receiver<bool>) -> Self {
        Self { shutdown }
    }
}

impl<S> tower::Layer<S> for DrainLayer {
    type Service = Drain<S>;

    fn layer(&self, inner: S) -> Drain<S> {
        Drain {
            inner,
            shutdown: self.shutdown.clone(),
        }
    }
}

/// See [`DrainLayer`].
#[derive(Clone)]
pub struct Drain<S> {
    inner: S,
    shutdown: watch::Receiver<bool>,
}

type Request = http::Request<axum::body::Body>;
type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, B> tower::Service<Request> for Drain<S>
where
    S: tower::Service<Request, Response = http::Response<B>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<EndAtShutdown<B>>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request) -> Self::Future {
        let answered = Arc::new(AtomicBool::new(false));
        let shutdown = self.shutdown.clone();
        let request = request.map(|body| {
            axum::body::Body::new(EndAtShutdown {
                inner: body,
                watch: Watch::Idle(shutdown.clone()),
                kind: Kind::Request {
                    answered: answered.clone(),
                },
                ended: false,
            })
        });
        let response = self.inner.call(request);
        Box::pin(async move {
            let response = response.await?;
            answered.store(true, Ordering::Release);
            Ok(response.map(|body| EndAtShutdown {
                inner: body,
                watch: Watch::Idle(shutdown),
                kind: Kind::Response,
                ended: false,
            }))
        })
    }
}

/// Where a body is in watching for the shutdown.
enum Watch {
    /// Not waiting yet: most bodies (unary calls) never do, and never allocate a future.
    Idle(watch::Receiver<bool>),
    /// Resolves when draining starts.
    Waiting(BoxFuture<()>),
    /// Draining.
    Stopped,
}

enum Kind {
    /// Ends with UNAVAILABLE trailers.
    Response,
    /// Ends as if complete, once the call has been answered.
    Request { answered: Arc<AtomicBool> },
}

/// A body that ends once the gateway drains while it waits for its next frame.
pub struct EndAtShutdown<B> {
    inner: B,
    watch: Watch,
    kind: Kind,
    ended: bool,
}

impl<B> Body for EndAtShutdown<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        if this.ended {
            return Poll::Ready(None);
        }
        if let Poll::Ready(frame) = Pin::new(&mut this.inner).poll_frame(cx) {
            return Poll::Ready(frame);
        }
        loop {
            match &mut this.watch {
                Watch::Idle(shutdown) => {
                    let mut shutdown = shutdown.clone();
                    this.watch = Watch::Waiting(Box::pin(async move {
                        // The gateway gone counts as shutdown too.
                        while !*shutdown.borrow_and_update() {
                            if shutdown.changed().await.is_err() {
                                return;
                            }
                        }
                    }));
                }
                Watch::Waiting(stopping) => match stopping.as_mut().poll(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(()) => this.watch = Watch::Stopped,
                },
                Watch::Stopped => break,
            }
        }
        match &this.kind {
            Kind::Response => {
                this.ended = true;
                let mut trailers = http::HeaderMap::new();
                let code = tonic::Code::Unavailable as i32;
                trailers.insert("grpc-status", http::HeaderValue::from(code));
                // Printable ASCII without `%`: no percent-encoding needed.
                trailers.insert(
                    "grpc-message",
                    http::HeaderValue::from_static("the gateway is shutting down; reconnect"),
                );
                Poll::Ready(Some(Ok(Frame::trailers(trailers))))
            }
            Kind::Request { answered } if answered.load(Ordering::Acquire) => {
                this.ended = true;
                Poll::Ready(None)
            }
            // Still arriving before its answer: it has the grace period to finish (the inner
            // body wakes this task when more comes).
            Kind::Request { .. } => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ended || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
