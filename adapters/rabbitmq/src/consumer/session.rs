//! A session: one connection with its consuming channel, and a connection of its own
//! for republishes. Opening it, the publishing connection and its delay queues, and
//! closing it within the close timeout.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::stream::BoxStream;
use lapin::options::{BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection};

use crate::connection::{confirm_channel, open};
use crate::error::{Error, Result};
use crate::settle::Settler;

use super::builder::Config;
use super::careful::Careful;

/// One connection with its consuming channel, and a connection of its own for
/// republishes.
pub(super) struct Session {
    connection: Connection,
    /// Settles the consuming channel's deliveries.
    pub(super) settler: Settler,
    /// The connection republishes (delayed retries, a classic queue's redeliveries) go
    /// on, with its confirm channel: opened when first needed, closed with the session.
    /// Not the consuming connection: RabbitMQ blocks a connection that publishes during
    /// a resource alarm, and acks on it would wait for the alarm to end too.
    publish: tokio::sync::Mutex<Option<(Connection, Channel)>>,
    declared: Mutex<HashSet<String>>,
    /// The tag of the consumer consuming on the channel; `None` once the session stopped
    /// consuming (see [`stop_consuming`](Session::stop_consuming)).
    pub(super) consuming: tokio::sync::Mutex<Option<String>>,
    pub(super) alive: AtomicBool,
    /// Set when the session consumes one message at a time.
    pub(super) careful: Option<Careful>,
    pub(super) config: Arc<Config>,
}

/// A new session with its delivery stream and its connection's events.
pub(super) struct Opened {
    pub(super) session: Arc<Session>,
    pub(super) stream: lapin::Consumer,
    pub(super) events: BoxStream<'static, lapin::Event>,
}

impl Session {
    /// Opens a session; `careful`, it consumes one message at a time (see [`Careful`]).
    pub(super) async fn open(config: &Arc<Config>, careful: bool) -> Result<Opened> {
        let connection = open(&config.url, &config.name, config.ca.as_ref()).await?;
        if config.declare {
            config.topology.declare(&connection).await?;
        }
        let events = connection.events_listener().boxed();
        // Everything the session needs is opened before consuming: a delivery that
        // breaks the connection (a frame lapin cannot parse) may come right after
        // `basic.consume-ok`, and must find the session open, so it is lost and
        // reconnected like any other, not a failed open.
        let channel = connection.create_channel().await?;
        let prefetch = if careful { 1 } else { config.prefetch };
        channel
            .basic_qos(prefetch, BasicQosOptions::default())
            .await?;
        let tag = config.consumer_tag();
        let stream = channel
            .basic_consume(
                config.topology.queue(),
                &tag,
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        Ok(Opened {
            session: Arc::new(Session {
                connection,
                settler: Settler::new(channel, prefetch, config.settlement.clone()),
                publish: tokio::sync::Mutex::new(None),
                declared: Mutex::new(HashSet::new()),
                consuming: tokio::sync::Mutex::new(Some(tag.clone())),
                alive: AtomicBool::new(true),
                careful: careful.then(|| Careful::new(tag, u64::from(config.prefetch))),
                config: config.clone(),
            }),
            stream,
            events,
        })
    }

    pub(super) fn is_alive(&self) -> bool {
        self.alive.load(Ordering::Acquire) && self.connection.status().connected()
    }

    /// Whether RabbitMQ blocked the publishing connection (a resource alarm).
    pub(super) fn publishing_blocked(&self) -> bool {
        self.publish.try_lock().is_ok_and(|slot| {
            slot.as_ref()
                .is_some_and(|(connection, _)| connection.status().blocked())
        })
    }

    /// The confirm channel of the publishing connection; the connection is opened when
    /// first needed or when it was lost, the channel when it closed.
    pub(super) async fn publish_channel(&self) -> Result<Channel> {
        let mut slot = self.publish.lock().await;
        if let Some((connection, channel)) = slot.as_ref() {
            if channel.status().connected() {
                return Ok(channel.clone());
            }
            if connection.status().connected() {
                let channel = confirm_channel(connection).await?;
                if let Some((_, old)) = slot.as_mut() {
                    *old = channel.clone();
                }
                return Ok(channel);
            }
        }
        // `shut` marks the session dead before it takes the lock: a session being shut
        // opens no connection it would leave open.
        if !self.is_alive() {
            return Err(Error::ChannelClosed);
        }
        let name = format!("{}:publish", self.config.name);
        let connection = open(&self.config.url, &name, self.config.ca.as_ref()).await?;
        let channel = confirm_channel(&connection).await?;
        *slot = Some((connection, channel.clone()));
        Ok(channel)
    }

    /// The delay queue for `delay`, declared first unless this session declared it.
    pub(super) async fn ensure_delay_queue(&self, delay: Duration) -> Result<String> {
        let topology = &self.config.topology;
        let name = topology.delay_queue(delay);
        if !self.config.declare || self.declared_contains(&name) {
            return Ok(name);
        }
        topology
            .declare_delay_queue(&self.connection, delay)
            .await?;
        self.declared
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.clone());
        Ok(name)
    }

    fn declared_contains(&self, name: &str) -> bool {
        self.declared
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(name)
    }

    /// Closes the session's connections, within the close timeout; past it they are
    /// dropped, and closed by lapin once the broker reads from them again.
    pub(super) async fn shut(&self, why: &str) -> Result<()> {
        self.alive.store(false, Ordering::Release);
        let timeout = self.config.close_timeout;
        let deadline = tokio::time::Instant::now() + timeout;
        let publishing = match tokio::time::timeout_at(deadline, self.publish.lock()).await {
            Ok(mut slot) => slot.take(),
            Err(_) => None,
        };
        let (consuming, publishing) =
            futures_util::future::join(close_by(&self.connection, why, deadline), async {
                match &publishing {
                    Some((connection, _)) => close_by(connection, why, deadline).await,
                    None => Ok(()),
                }
            })
            .await;
        if consuming.is_ok() && publishing.is_ok() {
            return Ok(());
        }
        let e = Error::Timeout {
            what: format!("closing the connections of consumer `{}`", self.config.name),
            after: timeout,
            blocked: consuming.err() == Some(true) || publishing.err() == Some(true),
        };
        tracing::warn!(error = %e, "RabbitMQ connections dropped unclosed");
        Err(e)
    }
}

/// Closes `connection` unless it is closed already; `Err(blocked)` when the broker has
/// not answered by `deadline`, with whether it had blocked the connection.
async fn close_by(
    connection: &Connection,
    why: &str,
    deadline: tokio::time::Instant,
) -> std::result::Result<(), bool> {
    if !connection.status().connected() {
        return Ok(());
    }
    match tokio::time::timeout_at(deadline, connection.close(200, why)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "closing the RabbitMQ connection failed");
            Ok(())
        }
        Err(_) => Err(connection.status().blocked()),
    }
}
