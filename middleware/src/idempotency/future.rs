//! [`ResponseFuture`] of [`Idempotency`](super::Idempotency).

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use redrive_core::delivery::BoxFuture;
use redrive_core::{BoxError, Outcome};

use super::layer::Shared;
use super::steps::{commit_retrying, committed, keep_reserved, release};
use super::{IdempotencyStore, Token};

pin_project_lite::pin_project! {
    /// The future of [`Idempotency`](super::Idempotency): the inner call, then the
    /// key's commit or release.
    ///
    /// With a store that answers at once (the in-memory store), the key is reserved
    /// before this future exists and committed as the inner call completes, so nothing
    /// is boxed. The store's own futures, and a release after a failure, are boxed.
    pub struct ResponseFuture<F, St>
    where
        St: ?Sized,
        St: IdempotencyStore,
    {
        #[pin]
        state: State<F, St>,
    }

    impl<F, St> PinnedDrop for ResponseFuture<F, St>
    where
        St: ?Sized,
        St: IdempotencyStore,
    {
        fn drop(this: Pin<&mut Self>) {
            // Dropped before the inner call completed (a shutdown deadline): free the
            // key now where the store can, so a redelivery need not wait out the lease.
            if let StateProj::Calling { reserved, .. } = this.project().state.project() {
                if let Some(Reserved { shared, key, token }) = reserved.take() {
                    match shared.store.release_now(&key, &token) {
                        Some(Err(e)) => tracing::debug!(
                            idempotency_key = %key, error = %e,
                            "call dropped; its idempotency key could not be released and stays reserved until its lease expires"
                        ),
                        Some(Ok(())) => tracing::debug!(idempotency_key = %key, "call dropped; its idempotency key was released"),
                        None => tracing::debug!(idempotency_key = %key, "call dropped; its idempotency key stays reserved until its lease expires"),
                    }
                }
            }
        }
    }
}

pin_project_lite::pin_project! {
    #[project = StateProj]
    enum State<F, St: ?Sized> {
        /// The inner call; `reserved` is `None` for a message without a key. `keep`
        /// renews the reservation once the call has had to wait.
        Calling {
            #[pin]
            fut: F,
            reserved: Option<Reserved<St>>,
            keep: Option<BoxFuture<'static, ()>>,
        },
        /// An answer known without running the inner service (a duplicate, a key held
        /// elsewhere), taken by the first poll.
        Ready { answer: Option<Result<Outcome, BoxError>> },
        /// A step that awaits the store.
        Boxed { fut: BoxFuture<'static, Result<Outcome, BoxError>> },
    }
}

/// A key this call reserved, to commit or release when the inner call ends.
pub(crate) struct Reserved<St: ?Sized> {
    pub(crate) shared: Arc<Shared<St>>,
    pub(crate) key: Arc<str>,
    pub(crate) token: Token,
}

impl<F, St: IdempotencyStore + ?Sized> ResponseFuture<F, St> {
    /// The inner call, finished by committing or releasing `reserved`.
    pub(crate) fn calling(fut: F, reserved: Option<Reserved<St>>) -> Self {
        ResponseFuture {
            state: State::Calling {
                fut,
                reserved,
                keep: None,
            },
        }
    }

    /// An answer given without calling the inner service.
    pub(crate) fn ready(answer: Result<Outcome, BoxError>) -> Self {
        ResponseFuture {
            state: State::Ready {
                answer: Some(answer),
            },
        }
    }

    /// Every step through the store's futures.
    pub(crate) fn boxed(
        fut: impl Future<Output = Result<Outcome, BoxError>> + Send + 'static,
    ) -> Self {
        ResponseFuture {
            state: State::Boxed { fut: Box::pin(fut) },
        }
    }
}

impl<F, T, E, St> Future for ResponseFuture<F, St>
where
    F: Future<Output = Result<T, E>>,
    T: Into<Outcome>,
    E: Into<BoxError>,
    St: IdempotencyStore + ?Sized,
{
    type Output = Result<Outcome, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut state = self.project().state;
        loop {
            let finish: BoxFuture<'static, Result<Outcome, BoxError>> =
                match state.as_mut().project() {
                    StateProj::Calling {
                        fut,
                        reserved,
                        keep,
                    } => {
                        let Poll::Ready(result) = fut.poll(cx) else {
                            // A call that waits may outlast its lease: renew it meanwhile
                            // (made only now, so calls that finish at once cost no timer).
                            if let Some(r) = reserved {
                                let keep = keep.get_or_insert_with(|| {
                                    Box::pin(keep_reserved(
                                        r.shared.clone(),
                                        r.key.clone(),
                                        r.token.clone(),
                                    ))
                                });
                                let _ = keep.as_mut().poll(cx);
                            }
                            return Poll::Pending;
                        };
                        *keep = None;
                        let result = result.map(Into::into).map_err(Into::into);
                        let Some(Reserved { shared, key, token }) = reserved.take() else {
                            return Poll::Ready(result);
                        };
                        match result {
                            Ok(outcome) => {
                                let ttl = shared.config.ttl;
                                if let Some(status) = shared.store.commit_now(&key, &token, ttl) {
                                    return Poll::Ready(committed(&shared, key, status, outcome));
                                }
                                // `commit_now` said no: straight to the store's future.
                                Box::pin(async move {
                                    let status =
                                        commit_retrying(&*shared.store, &key, &token, ttl).await;
                                    committed(&shared, key, status, outcome)
                                })
                            }
                            Err(err) => Box::pin(async move {
                                release(&shared, &key, &token).await;
                                Err(err)
                            }),
                        }
                    }
                    StateProj::Ready { answer } => {
                        return Poll::Ready(
                            answer
                                .take()
                                .expect("idempotency ResponseFuture polled after it completed"),
                        );
                    }
                    StateProj::Boxed { fut } => return fut.as_mut().poll(cx),
                };
            state.set(State::Boxed { fut: finish });
        }
    }
}

impl<F, St: IdempotencyStore + ?Sized> fmt::Debug for ResponseFuture<F, St> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}
