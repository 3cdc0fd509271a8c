//! The one inner service the layer tests drive: it answers each call from a script
//! (or a switchable [`Answer`]) and logs when each call came, with what, and when
//! readiness was asked; and a waker that counts its wakes, for polling by hand.
#![allow(dead_code, reason = "each test file uses part of it")]

use std::future::{Ready, ready};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use redrive_core::{BoxError, Message, classify};
use tokio::time::Instant;
use tower::Service;

/// What the mock answers while no script is set.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Answer {
    Ok,
    Transient,
    Permanent,
}

/// One call the mock saw.
#[derive(Clone, Debug)]
pub(crate) struct Call {
    /// When it began.
    pub(crate) at: Instant,
    /// The message's payload, as text.
    pub(crate) payload: String,
    /// The retry layer's try number, if the message carried one.
    pub(crate) try_number: Option<u32>,
}

#[derive(Default)]
struct Log {
    calls: Vec<Call>,
    readies: Vec<Instant>,
}

type Script = dyn Fn(usize, &Message) -> Result<(), BoxError> + Send + Sync;

/// An inner service whose answers the test sets; clones share the log and the answer.
#[derive(Clone)]
pub(crate) struct Mock {
    log: Arc<Mutex<Log>>,
    answer: Arc<Mutex<Answer>>,
    script: Option<Arc<Script>>,
}

impl Mock {
    /// Answers [`Answer::Ok`] until told otherwise with [`answer`](Mock::answer).
    pub(crate) fn new() -> Self {
        Mock {
            log: Arc::default(),
            answer: Arc::new(Mutex::new(Answer::Ok)),
            script: None,
        }
    }

    /// Answers call `i` (from 0) with `script(i, message)`.
    pub(crate) fn scripted(
        script: impl Fn(usize, &Message) -> Result<(), BoxError> + Send + Sync + 'static,
    ) -> Self {
        Mock {
            script: Some(Arc::new(script)),
            ..Mock::new()
        }
    }

    /// Fails every call with a transient error.
    pub(crate) fn failing() -> Self {
        Self::scripted(|_, _| Err("downstream unavailable".into()))
    }

    /// Answers the calls from now on with `answer`.
    pub(crate) fn answer(&self, answer: Answer) {
        *self.answer.lock().unwrap() = answer;
    }

    /// Every call so far.
    pub(crate) fn calls(&self) -> Vec<Call> {
        self.log.lock().unwrap().calls.clone()
    }

    /// How many calls so far.
    pub(crate) fn count(&self) -> usize {
        self.log.lock().unwrap().calls.len()
    }

    /// When each call began, relative to `t0`.
    pub(crate) fn offsets(&self, t0: Instant) -> Vec<Duration> {
        self.calls().iter().map(|c| c.at - t0).collect()
    }

    /// When the calls of `payload` began, relative to `t0`.
    pub(crate) fn offsets_of(&self, payload: &str, t0: Instant) -> Vec<Duration> {
        self.calls()
            .iter()
            .filter(|c| c.payload == payload)
            .map(|c| c.at - t0)
            .collect()
    }

    /// The try number each call saw.
    pub(crate) fn tries(&self) -> Vec<Option<u32>> {
        self.calls().iter().map(|c| c.try_number).collect()
    }

    /// When readiness was asked.
    pub(crate) fn readies(&self) -> Vec<Instant> {
        self.log.lock().unwrap().readies.clone()
    }
}

impl Service<Message> for Mock {
    type Response = ();
    type Error = BoxError;
    type Future = Ready<Result<(), BoxError>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.log.lock().unwrap().readies.push(Instant::now());
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, msg: Message) -> Self::Future {
        let mut log = self.log.lock().unwrap();
        let index = log.calls.len();
        log.calls.push(Call {
            at: Instant::now(),
            payload: String::from_utf8_lossy(&msg.payload).into_owned(),
            try_number: try_number(&msg),
        });
        drop(log);
        ready(match &self.script {
            Some(script) => script(index, &msg),
            None => match *self.answer.lock().unwrap() {
                Answer::Ok => Ok(()),
                Answer::Transient => Err("connection refused".into()),
                Answer::Permanent => Err(classify::permanent("bad payload")),
            },
        })
    }
}

/// The retry layer's try number on `msg`, if any.
#[cfg(feature = "retry")]
fn try_number(msg: &Message) -> Option<u32> {
    msg.extensions
        .get::<redrive_middleware::retry::Try>()
        .map(|t| t.number)
}

#[cfg(not(feature = "retry"))]
fn try_number(_: &Message) -> Option<u32> {
    None
}

/// A waker that counts its wakes.
#[derive(Default)]
pub(crate) struct Counter(AtomicUsize);

impl Wake for Counter {
    fn wake(self: Arc<Self>) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

/// A counting waker and its count.
pub(crate) fn counter() -> (Arc<Counter>, Waker) {
    let c = Arc::new(Counter::default());
    (c.clone(), Waker::from(c))
}

/// How many times the waker of `c` was woken.
pub(crate) fn wakes(c: &Counter) -> usize {
    c.0.load(Ordering::SeqCst)
}
