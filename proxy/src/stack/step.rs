//! The shape most layers of the stack share: look at the request, learn or decide something,
//! write it into the request (headers, extensions, the [`Observation`]) or fail with a
//! [`ProxyError`], then hand the request on. A [`Step`] is that decision; [`StepLayer`] makes
//! it a tower layer, so each concern stays a small type in its own file, tested on its own.
//!
//! [`Observation`]: super::observe::Observation

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use http::{Request, Response};

use super::error::ProxyError;
use crate::server::Body;

/// One decision on the way in.
pub trait Step: Clone + Send + Sync + 'static {
    fn prepare(&self, req: &mut Request<Body>) -> Result<(), ProxyError>;
}

#[derive(Debug, Clone)]
pub struct StepLayer<T>(pub T);

impl<T: Step, S> tower::Layer<S> for StepLayer<T> {
    type Service = StepService<T, S>;

    fn layer(&self, inner: S) -> StepService<T, S> {
        StepService {
            step: self.0.clone(),
            inner,
        }
    }
}

#[derive(Debug, Clone)]
pub struct StepService<T, S> {
    step: T,
    inner: S,
}

/// What a layer answers with: the rest of the stack's answer, or its own.
pub type BoxFuture = Pin<Box<dyn Future<Output = Result<Response<Body>, ProxyError>> + Send>>;

impl<T, S> tower::Service<Request<Body>> for StepService<T, S>
where
    T: Step,
    S: tower::Service<Request<Body>, Response = Response<Body>, Error = ProxyError>,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = ProxyError;
    type Future =
        futures::future::Either<S::Future, std::future::Ready<Result<Response<Body>, ProxyError>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<Body>) -> Self::Future {
        match self.step.prepare(&mut req) {
            Ok(()) => futures::future::Either::Left(self.inner.call(req)),
            Err(e) => futures::future::Either::Right(std::future::ready(Err(e))),
        }
    }
}

/// What an [`Around`] layer answers with: the rest of the stack's own future when the layer
/// only passes the request on (no allocation on the request path), else its own.
pub type AroundFuture<F> = futures::future::Either<F, BoxFuture>;

/// Passes `req` on to the rest of the stack.
pub fn pass<S>(inner: &mut S, req: Request<Body>) -> AroundFuture<S::Future>
where
    S: tower::Service<Request<Body>, Response = Response<Body>, Error = ProxyError>,
{
    futures::future::Either::Left(inner.call(req))
}

/// The layer's own answer (or its own wait around the rest of the stack).
pub fn own<F>(
    answer: impl Future<Output = Result<Response<Body>, ProxyError>> + Send + 'static,
) -> AroundFuture<F> {
    futures::future::Either::Right(Box::pin(answer))
}

/// The other shape: a layer that stands around the rest of the stack, answering itself,
/// waiting before it, or looking at what comes back (faults, redirects, header changes on the
/// response, circuit breakers, outlier detection). [`AroundLayer`] makes it a tower layer.
/// `inner` was made ready for this call; a layer that calls it later takes a clone's place.
pub trait Around: Clone + Send + Sync + 'static {
    fn around<S>(&self, req: Request<Body>, inner: &mut S) -> AroundFuture<S::Future>
    where
        S: tower::Service<Request<Body>, Response = Response<Body>, Error = ProxyError>
            + Clone
            + Send
            + 'static,
        S::Future: Send + 'static;
}

#[derive(Debug, Clone, Default)]
pub struct AroundLayer<T>(pub T);

impl<T: Around, S> tower::Layer<S> for AroundLayer<T> {
    type Service = AroundService<T, S>;

    fn layer(&self, inner: S) -> AroundService<T, S> {
        AroundService {
            around: self.0.clone(),
            inner,
        }
    }
}

#[derive(Debug, Clone)]
pub struct AroundService<T, S> {
    around: T,
    inner: S,
}

impl<T, S> tower::Service<Request<Body>> for AroundService<T, S>
where
    T: Around,
    S: tower::Service<Request<Body>, Response = Response<Body>, Error = ProxyError>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = ProxyError;
    type Future = AroundFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        self.around.around(req, &mut self.inner)
    }
}
