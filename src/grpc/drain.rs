//! gRPC streams end when the gateway drains. Subscribe and Health/Watch end themselves (after
//! their last word: the events read, NOT_SERVING) and are left alone here ([`ENDS_ITSELF`]); any
//! other response still streaming when draining starts (a `ServerReflectionInfo` a client keeps
//! open) is ended here with UNAVAILABLE,
//! so no client holds the shutdown for the whole grace period. A response that is done, or has a
//! frame ready, is never cut: only one waiting for its next message. Once a response is cut, the
//! request body of its call (a client stream the handler still reads) ends too, as if the client
//! had finished, so the handler lets go of the HTTP/2 stream; a request still arriving before its
//! answer (a unary call in flight) is left to finish within the grace period.

use std::future::Future;
use std::pin::Pin;
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

/// The streaming methods that end themselves at shutdown, after their last word: cutting them
/// here could pass over it (a NOT_SERVING still on its way from the watch's task).
const ENDS_ITSELF: [&str; 2] = [
    "/grpc.health.v1.Health/Watch",
    "/iqchannels.gateway.v1.EventGateway/Subscribe",
];

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
        if ENDS_ITSELF.contains(&request.uri().path()) {
            let response = self.inner.call(request);
            return Box::pin(async move {
                Ok(response.await?.map(|body| EndAtShutdown {
                    inner: body,
                    watch: Watch::Never,
                    kind: Kind::Response { cut: None },
                    ended: false,
                }))
            });
        }
        // Set when this call's response is cut; gone with the response otherwise.
        let (cut, response_cut) = watch::channel(false);
        let request = request.map(|body| {
            axum::body::Body::new(EndAtShutdown {
                inner: body,
                watch: Watch::Idle(response_cut),
                kind: Kind::Request,
                ended: false,
            })
        });
        let response = self.inner.call(request);
        let shutdown = self.shutdown.clone();
        Box::pin(async move {
            let response = response.await?;
            Ok(response.map(|body| EndAtShutdown {
                inner: body,
                watch: Watch::Idle(shutdown),
                kind: Kind::Response { cut: Some(cut) },
                ended: false,
            }))
        })
    }
}

/// Where a body is in watching for its end: the shutdown (a response), or the cut of its call's
/// response (a request).
enum Watch {
    /// Not waiting yet: a unary answer never waits, and a body allocates its future only when it
    /// first does.
    Idle(watch::Receiver<bool>),
    /// Resolves with `true` when the body is to end, `false` when it never will.
    Waiting(BoxFuture<bool>),
    /// To end now.
    Fired,
    /// Never to end early.
    Never,
}

enum Kind {
    /// Ends with UNAVAILABLE trailers at shutdown, and says so to its request (if it watches).
    Response { cut: Option<watch::Sender<bool>> },
    /// Ends as if complete once its call's response is cut.
    Request,
}

/// A body that ends early while it waits for its next frame: a response at shutdown, a request
/// when its response was cut.
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
                Watch::Idle(signal) => {
                    let mut signal = signal.clone();
                    // A response's shutdown sender gone (the gateway gone) counts as shutdown; a
                    // request's gone means its response ended without a cut.
                    let when_gone = matches!(this.kind, Kind::Response { .. });
                    this.watch = Watch::Waiting(Box::pin(async move {
                        while !*signal.borrow_and_update() {
                            if signal.changed().await.is_err() {
                                return when_gone;
                            }
                        }
                        true
                    }));
                }
                Watch::Waiting(signal) => match signal.as_mut().poll(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(true) => this.watch = Watch::Fired,
                    Poll::Ready(false) => this.watch = Watch::Never,
                },
                // The inner body wakes this task when more comes.
                Watch::Never => return Poll::Pending,
                Watch::Fired => break,
            }
        }
        this.ended = true;
        match &this.kind {
            Kind::Response { cut } => {
                if let Some(cut) = cut {
                    cut.send_replace(true);
                }
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
            Kind::Request => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ended || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
