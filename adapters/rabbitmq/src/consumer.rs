//! The consumer: a queue consumed with a prefetch and manual acks, reconnecting on loss.

use std::collections::HashSet;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::stream::BoxStream;
use lapin::options::{BasicCancelOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection};
use redrive_core::delivery::SettleFuture;
use redrive_core::{Acker, Capabilities, Consumer, Delivery, OrderingScope};
use tokio::sync::{Notify, mpsc, watch};
use tokio::task::JoinHandle;

use crate::connection::{Reconnect, confirm_channel, connect, publish_confirmed};
use crate::error::{Error, Result, redact};
use crate::mapping::{self, AmqpDelivery};
use crate::settle::{Counters, Settlement, Settler, TagGap};
use crate::topology::{QueueKind, Topology};

/// Builds a [`RabbitConsumer`]; [`connect`](ConsumerBuilder::connect) checks the settings
/// and opens the first connection.
///
/// | setting | default |
/// |---|---|
/// | `prefetch` (`basic.qos`) | 32 |
/// | `connection_name` | `redrive:<queue>` |
/// | `declare` (the [`Topology`], idempotently) | on |
/// | `reconnect` | [`Reconnect::default`] (100 ms doubling to 30 s, jittered) |
/// | `publish_timeout` (a republish, from start to confirm) | 10 s |
/// | `close_timeout` (closing the connections) | 5 s |
#[derive(Clone)]
#[must_use]
pub struct ConsumerBuilder {
    url: String,
    topology: Topology,
    prefetch: u16,
    name: Option<String>,
    declare: bool,
    reconnect: Reconnect,
    publish_timeout: Duration,
    close_timeout: Duration,
}

impl fmt::Debug for ConsumerBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConsumerBuilder")
            .field("url", &redact(&self.url))
            .field("topology", &self.topology)
            .field("prefetch", &self.prefetch)
            .field("name", &self.name)
            .field("declare", &self.declare)
            .field("reconnect", &self.reconnect)
            .field("publish_timeout", &self.publish_timeout)
            .field("close_timeout", &self.close_timeout)
            .finish()
    }
}

impl ConsumerBuilder {
    /// The most unacked deliveries the broker sends this consumer (at least 1). After a
    /// message the client cannot parse broke the connection, the consumer uses 1 until
    /// that message is gone (see the [crate docs](crate)).
    pub fn prefetch(mut self, n: u16) -> Self {
        self.prefetch = n;
        self
    }

    /// The connection's name, shown by `rabbitmqctl list_connections name client_properties`
    /// and the management UI. Republishes (delayed retries, a classic queue's
    /// redeliveries) go on a second connection, `<name>:publish`, opened when first
    /// needed.
    pub fn connection_name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// Whether to declare the topology on every (re)connect. Off, the queues must exist:
    /// a missing queue is an error at connect, a missing delay queue fails the nack.
    pub fn declare(mut self, declare: bool) -> Self {
        self.declare = declare;
        self
    }

    /// The backoff between reconnect attempts.
    pub fn reconnect(mut self, reconnect: Reconnect) -> Self {
        self.reconnect = reconnect;
        self
    }

    /// How long a republish (a delayed retry, a classic queue's redelivery or hand-back)
    /// may take, from declaring its delay queue to the broker's confirm; at
    /// [`close`](Consumer::close), how long republishing all the deliveries the Worker
    /// never took may take. A broker that blocks publishing during a resource alarm
    /// would otherwise hold the nack, and a Worker's shutdown, until the alarm ends.
    /// Past it, the nack fails with [`Error::Timeout`] and hands the message back with
    /// `basic.nack(requeue)` (on a classic queue, that counts as one more attempt); the
    /// copy may still reach the queue once the broker reads it, so the message can come
    /// twice, never not at all. Above zero.
    pub fn publish_timeout(mut self, timeout: Duration) -> Self {
        self.publish_timeout = timeout;
        self
    }

    /// How long closing the consumer's connections may take, at
    /// [`close`](Consumer::close) and before a reconnect. Past it the connections are
    /// dropped (the broker closes a blocked one once it reads from it again) and `close`
    /// fails with [`Error::Timeout`]. On a classic queue, `close` first takes as long
    /// again at most to cancel the consumer and collect the deliveries the Worker never
    /// took, which it hands back with their attempt. Above zero.
    pub fn close_timeout(mut self, timeout: Duration) -> Self {
        self.close_timeout = timeout;
        self
    }

    /// Checks the settings, connects, declares the topology (if asked) and starts consuming.
    ///
    /// # Errors
    /// [`Error::Config`] for settings that cannot work, [`Error::Connect`] when the
    /// broker cannot be reached, [`Error::TopologyMismatch`] when a queue exists with other
    /// arguments, [`Error::Amqp`] when the broker refuses to consume the queue.
    pub async fn connect(self) -> Result<RabbitConsumer> {
        self.topology.validate()?;
        self.reconnect.validate()?;
        if self.prefetch == 0 {
            return Err(Error::Config(
                "prefetch must be at least 1: with 0 the broker sends without limit".into(),
            ));
        }
        for (name, timeout) in [
            ("publish_timeout", self.publish_timeout),
            ("close_timeout", self.close_timeout),
        ] {
            if timeout.is_zero() {
                return Err(Error::Config(format!(
                    "{name} must be above zero: with zero nothing could finish"
                )));
            }
        }
        // Once per consumer, not per reconnect.
        if let Some(what) = self.topology.unguarded() {
            tracing::warn!(queue = %self.topology.queue(), "{what}");
        } else if self.prefetch > 1 {
            tracing::debug!(
                queue = %self.topology.queue(),
                prefetch = self.prefetch,
                "a message the client cannot parse returns the deliveries of its prefetch window with it once; the consumer then takes one message at a time until it is gone. One that kills the process takes its window with it on every delivery"
            );
        }
        let config = Arc::new(Config {
            name: self
                .name
                .unwrap_or_else(|| format!("redrive:{}", self.topology.queue())),
            url: self.url,
            topology: self.topology,
            prefetch: self.prefetch,
            declare: self.declare,
            reconnect: self.reconnect,
            publish_timeout: self.publish_timeout,
            close_timeout: self.close_timeout,
            tags: AtomicU64::new(0),
            settlement: Arc::default(),
        });
        let opened = Session::open(&config, false).await?;
        let shared = Arc::new(Shared {
            reconnects: AtomicU64::new(0),
            careful: AtomicU64::new(0),
            prefetch: AtomicU16::new(config.prefetch),
            connected: AtomicBool::new(true),
            stale: AtomicU64::new(0),
            settlement: config.settlement.clone(),
        });
        let caps = capabilities(&config.topology);
        let queue: Arc<str> = config.topology.queue().into();
        let first = Current {
            session: opened.session.clone(),
            stream: opened.stream.clone(),
        };
        let (tx, rx) = watch::channel(Some(first));
        let (lost_tx, lost_rx) = mpsc::unbounded_channel();
        let close_timeout = config.close_timeout;
        let task = tokio::spawn(run(config, shared.clone(), tx, lost_rx, opened));
        Ok(RabbitConsumer {
            current: Some(rx),
            cached: None,
            next: None,
            lost: lost_tx,
            queue,
            shared,
            caps,
            close_timeout,
            task: Some(task),
        })
    }
}

fn capabilities(topology: &Topology) -> Capabilities {
    Capabilities::new()
        .with_max_nack_delay(topology.max_delay())
        .with_delivery_count(topology.kind() == QueueKind::Quorum)
        // RabbitMQ keeps an unacked message for as long as its channel is open.
        .with_lease(None, false)
        .with_ordering(OrderingScope::Queue)
}

struct Config {
    url: String,
    topology: Topology,
    prefetch: u16,
    name: String,
    declare: bool,
    reconnect: Reconnect,
    publish_timeout: Duration,
    close_timeout: Duration,
    tags: AtomicU64,
    settlement: Arc<Counters>,
}

struct Shared {
    reconnects: AtomicU64,
    /// Times the consumer started consuming one message at a time (careful mode).
    careful: AtomicU64,
    /// The prefetch of the consumer now consuming.
    prefetch: AtomicU16,
    connected: AtomicBool,
    stale: AtomicU64,
    settlement: Arc<Counters>,
}

/// Reads a consumer's connection state after the consumer moved into a Worker.
#[derive(Clone)]
pub struct ConnectionMonitor {
    shared: Arc<Shared>,
}

impl ConnectionMonitor {
    /// How many times the consumer reconnected after losing its connection.
    pub fn reconnects(&self) -> u64 {
        self.shared.reconnects.load(Ordering::Relaxed)
    }

    /// How many times a frame the client could not parse broke the connection and the
    /// consumer started consuming one message at a time until that message was gone
    /// (see the [crate docs](crate)).
    pub fn careful_modes(&self) -> u64 {
        self.shared.careful.load(Ordering::Relaxed)
    }

    /// The prefetch the consumer consumes with now: the configured one, or 1 while it
    /// waits for a message that broke the connection to be gone.
    pub fn prefetch(&self) -> u16 {
        self.shared.prefetch.load(Ordering::Relaxed)
    }

    /// Whether the consumer is connected now.
    pub fn is_connected(&self) -> bool {
        self.shared.connected.load(Ordering::Relaxed)
    }

    /// Deliveries received on a connection that was lost before the Worker took them;
    /// they were dropped unsettled and the broker delivers them again.
    pub fn stale_dropped(&self) -> u64 {
        self.shared.stale.load(Ordering::Relaxed)
    }

    /// Deliveries settled by `basic.ack` and `basic.nack` frames on the consuming
    /// channels. Acks that end close together share one frame (see the
    /// [crate docs](crate)), so this is at least [`settle_frames`](Self::settle_frames).
    pub fn settled(&self) -> u64 {
        self.shared.settlement.settled.load(Ordering::Relaxed)
    }

    /// `basic.ack` and `basic.nack` frames written on the consuming channels.
    pub fn settle_frames(&self) -> u64 {
        self.shared.settlement.frames.load(Ordering::Relaxed)
    }
}

impl fmt::Debug for ConnectionMonitor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnectionMonitor")
            .field("connected", &self.is_connected())
            .field("reconnects", &self.reconnects())
            .field("careful_modes", &self.careful_modes())
            .field("prefetch", &self.prefetch())
            .field("settled", &self.settled())
            .field("settle_frames", &self.settle_frames())
            .finish()
    }
}

/// One connection with its consuming channel, and a connection of its own for
/// republishes.
struct Session {
    connection: Connection,
    /// Settles the consuming channel's deliveries.
    settler: Settler,
    /// The connection republishes (delayed retries, a classic queue's redeliveries) go
    /// on, with its confirm channel: opened when first needed, closed with the session.
    /// Not the consuming connection: RabbitMQ blocks a connection that publishes during
    /// a resource alarm, and acks on it would wait for the alarm to end too.
    publish: tokio::sync::Mutex<Option<(Connection, Channel)>>,
    declared: Mutex<HashSet<String>>,
    /// The tag of the consumer consuming on the channel; `None` once the session stopped
    /// consuming (see [`stop_consuming`](Session::stop_consuming)).
    consuming: tokio::sync::Mutex<Option<String>>,
    alive: AtomicBool,
    /// Set when the session consumes one message at a time.
    careful: Option<Careful>,
    config: Arc<Config>,
}

/// A session that consumes with prefetch 1 because a frame the client could not parse
/// broke the last connection: the deliveries in flight with the message that broke it
/// were returned with it, and counted toward the delivery limit with it. One at a time,
/// only that message breaks the connection again. Once the configured prefetch's worth
/// of deliveries is settled, the returned window is behind, and the session consumes
/// with the configured prefetch again.
struct Careful {
    /// The careful consumer's tag; its stream ends when the session leaves careful mode.
    tag: String,
    /// Deliveries to settle before leaving careful mode: the configured prefetch, the
    /// most the broker returned with the message that broke the connection.
    target: u64,
    /// Deliveries settled on this session.
    settled: AtomicU64,
    /// Woken when `settled` reaches `target`.
    reached: Notify,
    /// Set once the session cancels the careful consumer.
    over: AtomicBool,
}

impl Careful {
    /// Counts one settled delivery.
    fn settled(&self) {
        if self.settled.fetch_add(1, Ordering::AcqRel) + 1 == self.target {
            self.reached.notify_waiters();
        }
    }

    /// Returns once `target` deliveries were settled; never if the session left careful
    /// mode.
    async fn reached(&self) {
        loop {
            // Created before the check, so a settle in between still wakes it.
            let woken = self.reached.notified();
            if self.over.load(Ordering::Acquire) {
                return std::future::pending().await;
            }
            if self.settled.load(Ordering::Acquire) >= self.target {
                return;
            }
            woken.await;
        }
    }

    fn is_active(&self) -> bool {
        !self.over.load(Ordering::Acquire)
    }
}

/// A new session with its delivery stream and its connection's events.
struct Opened {
    session: Arc<Session>,
    stream: lapin::Consumer,
    events: BoxStream<'static, lapin::Event>,
}

impl Config {
    /// A consumer tag unique to this process.
    fn consumer_tag(&self) -> String {
        format!(
            "{}-{}-{}",
            self.name,
            std::process::id(),
            self.tags.fetch_add(1, Ordering::Relaxed)
        )
    }
}

impl Session {
    /// Opens a session; `careful`, it consumes one message at a time (see [`Careful`]).
    async fn open(config: &Arc<Config>, careful: bool) -> Result<Opened> {
        let connection = connect(&config.url, &config.name).await?;
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
                careful: careful.then(|| Careful {
                    tag,
                    target: u64::from(config.prefetch),
                    settled: AtomicU64::new(0),
                    reached: Notify::new(),
                    over: AtomicBool::new(false),
                }),
                config: config.clone(),
            }),
            stream,
            events,
        })
    }

    /// Leaves careful mode: cancels the careful consumer and consumes again on the same
    /// channel with the configured prefetch, which RabbitMQ applies to consumers started
    /// after the `basic.qos` (`global` off). The channel stays open, so the deliveries
    /// the careful consumer received before its `basic.cancel-ok` are still settled on
    /// it; `receive` reads them before the new consumer's. `None` when the session
    /// stopped consuming.
    async fn leave_careful_mode(&self, careful: &Careful) -> Result<Option<lapin::Consumer>> {
        careful.over.store(true, Ordering::Release);
        let mut consuming = self.consuming.lock().await;
        if consuming.is_none() {
            return Ok(None);
        }
        let channel = self.settler.channel();
        channel
            .basic_cancel(&careful.tag, BasicCancelOptions::default())
            .await?;
        channel
            .basic_qos(self.config.prefetch, BasicQosOptions::default())
            .await?;
        // Delivery tags go on counting on this channel, now in a wider window.
        self.settler.widen(self.config.prefetch);
        let tag = self.config.consumer_tag();
        let stream = channel
            .basic_consume(
                self.config.topology.queue(),
                &tag,
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        *consuming = Some(tag);
        Ok(Some(stream))
    }

    /// Cancels the session's consumer, once: the broker sends it nothing more, and the
    /// deliveries it sent can still be settled. The Worker hands a RabbitMQ delivery
    /// back only when it stops (a delivery stays this consumer's while its channel is
    /// open), so what it hands back must not come back to this consumer, which would
    /// hold it unsettled until it closes and count one more delivery. If `receive` is
    /// called again, the ended stream is taken as a lost session and the consumer
    /// reconnects.
    async fn stop_consuming(&self) {
        let mut consuming = self.consuming.lock().await;
        if let Some(tag) = consuming.take() {
            let channel = self.settler.channel();
            let cancel = channel.basic_cancel(&tag, BasicCancelOptions::default());
            match tokio::time::timeout(self.config.close_timeout, cancel).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, "cancelling the consumer before a hand-back failed");
                }
                Err(_) => tracing::debug!(
                    timeout = ?self.config.close_timeout,
                    "cancelling the consumer before a hand-back did not finish in time"
                ),
            }
        }
    }

    /// Whether `stream` is the careful consumer this session cancelled: its end is no loss.
    fn retired(&self, stream: &lapin::Consumer) -> bool {
        self.careful
            .as_ref()
            .is_some_and(|c| !c.is_active() && stream.tag().as_str() == c.tag)
    }

    fn is_alive(&self) -> bool {
        self.alive.load(Ordering::Acquire) && self.connection.status().connected()
    }

    /// Whether RabbitMQ blocked the publishing connection (a resource alarm).
    fn publishing_blocked(&self) -> bool {
        self.publish.try_lock().is_ok_and(|slot| {
            slot.as_ref()
                .is_some_and(|(connection, _)| connection.status().blocked())
        })
    }

    /// The confirm channel of the publishing connection; the connection is opened when
    /// first needed or when it was lost, the channel when it closed.
    async fn publish_channel(&self) -> Result<Channel> {
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
        let connection = connect(&self.config.url, &name).await?;
        let channel = confirm_channel(&connection).await?;
        *slot = Some((connection, channel.clone()));
        Ok(channel)
    }

    /// The delay queue for `delay`, declared first unless this session declared it.
    async fn ensure_delay_queue(&self, delay: Duration) -> Result<String> {
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
    async fn shut(&self, why: &str) -> Result<()> {
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

/// Consumes one RabbitMQ queue. See the [crate docs](crate) for the guarantees.
///
/// [`receive`](Consumer::receive) reads the current channel's deliveries itself, so a
/// delivery crosses no task on its way to the Worker, and is cancel-safe. A background
/// task on the current tokio runtime watches the connection and reconnects, also while
/// the Worker is busy. [`close`](Consumer::close) hands back the deliveries the Worker
/// never took (on a classic queue, with the attempt they had: see the
/// [crate docs](crate)). Dropping the consumer closes its connection; unsettled messages
/// go back to the queue, marked redelivered (one attempt more).
pub struct RabbitConsumer {
    /// The channel being consumed, as the background task last opened it; `None` inside
    /// while it reconnects. Taken by `close`.
    current: Option<watch::Receiver<Option<Current>>>,
    /// `receive`'s copy of the current channel.
    cached: Option<Current>,
    /// The stream that follows `cached`'s on the same session (it left careful mode),
    /// read once `cached`'s ends.
    next: Option<lapin::Consumer>,
    /// Tells the background task that a session's delivery stream ended, and why.
    lost: mpsc::UnboundedSender<Loss>,
    /// Shared with every message's `source.destination`.
    queue: Arc<str>,
    shared: Arc<Shared>,
    caps: Capabilities,
    close_timeout: Duration,
    task: Option<JoinHandle<Result<()>>>,
}

/// A session and its delivery stream.
#[derive(Clone)]
struct Current {
    session: Arc<Session>,
    stream: lapin::Consumer,
}

/// Why a session is lost when its delivery stream ends.
const STREAM_ENDED: &str =
    "the delivery stream ended (the broker cancelled the consumer or closed the channel)";

/// Why a session was lost.
struct Loss {
    /// The session, by [`session_id`].
    session: usize,
    why: String,
    /// Whether the client could not parse a frame the broker sent: a delivery's
    /// properties it cannot read (see [`Careful`]).
    unparsable: bool,
}

impl Loss {
    fn new(session: usize, why: impl Into<String>) -> Self {
        Loss {
            session,
            why: why.into(),
            unparsable: false,
        }
    }

    fn lapin(session: usize, e: &lapin::Error) -> Self {
        Loss {
            session,
            why: e.to_string(),
            unparsable: matches!(e.kind(), lapin::ErrorKind::ParsingError(_)),
        }
    }
}

/// Identifies a session in loss reports.
fn session_id(session: &Arc<Session>) -> usize {
    Arc::as_ptr(session) as usize
}

impl fmt::Debug for RabbitConsumer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RabbitConsumer")
            .field("capabilities", &self.caps)
            .field("connected", &self.shared.connected.load(Ordering::Relaxed))
            .field(
                "reconnects",
                &self.shared.reconnects.load(Ordering::Relaxed),
            )
            .finish()
    }
}

impl RabbitConsumer {
    /// Starts building a consumer of `topology`'s queue at `url`
    /// (`amqp://user:pass@host:5672/vhost`, or `amqps://` with the `tls` feature).
    pub fn builder(url: impl Into<String>, topology: Topology) -> ConsumerBuilder {
        ConsumerBuilder {
            url: url.into(),
            topology,
            prefetch: 32,
            name: None,
            declare: true,
            reconnect: Reconnect::default(),
            publish_timeout: Duration::from_secs(10),
            close_timeout: Duration::from_secs(5),
        }
    }

    /// How many times this consumer reconnected after losing its connection.
    pub fn reconnects(&self) -> u64 {
        self.shared.reconnects.load(Ordering::Relaxed)
    }

    /// A handle that reads the connection state after the consumer moved into a Worker.
    pub fn monitor(&self) -> ConnectionMonitor {
        ConnectionMonitor {
            shared: self.shared.clone(),
        }
    }
}

impl RabbitConsumer {
    /// Hands back, untried, the deliveries the broker sent into the prefetch window that
    /// `receive` never returned, before the connection closes. Closing it would return
    /// them marked redelivered, which a classic queue's attempt counts as one more,
    /// although no handler saw them. So on a classic queue the session cancels its
    /// consumer, takes what is buffered and what arrives before the `basic.cancel-ok`
    /// (within the close timeout), and republishes each with the attempt it had, one
    /// after the other so their order holds, within the publish timeout in all. What is
    /// not republished by then (or after a republish failed) goes back with the
    /// connection, counted. A quorum queue counts a return however it is made, so its
    /// deliveries are left to the close.
    async fn hand_back_buffered(&mut self) {
        if let Some(current) = self.current.as_mut() {
            match current.has_changed() {
                Ok(true) => {
                    let next = current.borrow_and_update().clone();
                    self.adopt(next);
                }
                Ok(false) if self.cached.is_none() => {
                    self.cached = current.borrow_and_update().clone();
                }
                _ => {}
            }
        }
        let Some(Current { session, stream }) = self.cached.take() else {
            return;
        };
        let next = self.next.take();
        if session.config.topology.kind() != QueueKind::Classic || !session.is_alive() {
            return;
        }
        let close_timeout = session.config.close_timeout;
        let deadline = tokio::time::Instant::now() + close_timeout;
        // After the `basic.cancel-ok`, a stream ends once its buffered deliveries are read.
        let _ = tokio::time::timeout_at(deadline, session.stop_consuming()).await;
        let mut buffered = Vec::new();
        let mut complete = true;
        'streams: for mut stream in std::iter::once(stream).chain(next) {
            loop {
                match tokio::time::timeout_at(deadline, stream.next()).await {
                    Ok(Some(Ok(d))) => match accept(&session, d) {
                        Ok((acker, _)) => buffered.push(acker),
                        Err(gap) => {
                            // As in `receive`: nothing on this channel is settled any
                            // more; its deliveries go back with it.
                            tracing::error!(queue = %self.queue, error = %gap, "RabbitMQ broke the delivery-tag sequence");
                            session.alive.store(false, Ordering::Release);
                            return;
                        }
                    },
                    Ok(Some(Err(_)) | None) => break,
                    Err(_) => {
                        complete = false;
                        break 'streams;
                    }
                }
            }
        }
        if !complete {
            tracing::debug!(
                queue = %self.queue,
                timeout = ?close_timeout,
                "the consumer was not cancelled within the close timeout; deliveries still on their way go back with the connection, counted"
            );
        }
        if buffered.is_empty() {
            return;
        }
        let publish_timeout = session.config.publish_timeout;
        let deadline = tokio::time::Instant::now() + publish_timeout;
        let total = buffered.len();
        let mut handed_back = 0usize;
        for acker in &buffered {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                break;
            }
            // A failed republish has handed its message back with `basic.nack`; the
            // next would most likely fail the same way.
            if acker
                .republish(&session, Duration::ZERO, acker.attempt, left)
                .await
                .is_err()
            {
                break;
            }
            handed_back += 1;
        }
        if handed_back < total {
            tracing::warn!(
                queue = %self.queue,
                handed_back,
                returned = total - handed_back,
                timeout = ?publish_timeout,
                "not every delivery the Worker never took could be republished with its attempt; the rest go back with the connection, one attempt more"
            );
        } else {
            tracing::debug!(queue = %self.queue, handed_back, "deliveries the Worker never took handed back with their attempt");
        }
    }

    /// Takes the channel the background task published: a new session, none while it
    /// reconnects, or the current session consuming again with its full prefetch, whose
    /// stream is read once the careful consumer's ends, so none of the deliveries already
    /// on their way to it are left unsettled.
    fn adopt(&mut self, next: Option<Current>) {
        match (self.cached.as_ref(), next) {
            (Some(cached), Some(next))
                if Arc::ptr_eq(&cached.session, &next.session)
                    && cached.stream.tag() != next.stream.tag() =>
            {
                self.next = Some(next.stream);
            }
            (_, next) => {
                self.cached = next;
                self.next = None;
            }
        }
    }
}

impl Consumer for RabbitConsumer {
    async fn receive(&mut self) -> redrive_core::Result<Option<Delivery>> {
        loop {
            let Some(current) = self.current.as_mut() else {
                return Ok(None);
            };
            match current.has_changed() {
                Err(_) => return Ok(None),
                Ok(true) => {
                    let next = current.borrow_and_update().clone();
                    self.adopt(next);
                }
                Ok(false) if self.cached.is_none() => {
                    self.cached = current.borrow_and_update().clone();
                }
                Ok(false) => {}
            }
            let Some(current) = self.current.as_mut() else {
                return Ok(None);
            };
            let Some(Current { session, stream }) = self.cached.as_mut() else {
                // Reconnecting: wait for the next session (or the end).
                if current.changed().await.is_err() {
                    return Ok(None);
                }
                continue;
            };
            // Both branches are cancel-safe: a stream hands out a delivery only when it
            // returns it.
            tokio::select! {
                biased;
                item = stream.next() => match item {
                    Some(Ok(d)) if session.is_alive() => match delivery(session, &self.queue, d) {
                        Ok(d) => return Ok(Some(d)),
                        Err(gap) => {
                            // Nothing on this channel can be settled safely any more: its
                            // deliveries go back to the queue when it closes.
                            tracing::error!(queue = %self.queue, error = %gap, "RabbitMQ broke the delivery-tag sequence");
                            session.alive.store(false, Ordering::Release);
                            let _ = self.lost.send(Loss::new(session_id(session), gap.to_string()));
                            self.cached = None;
                            self.next = None;
                            if current.changed().await.is_err() {
                                return Ok(None);
                            }
                        }
                    },
                    Some(Ok(_)) => {
                        // Its channel is gone: it cannot be settled, and the broker
                        // redelivers it.
                        self.shared.stale.fetch_add(1, Ordering::Relaxed);
                    }
                    ended => {
                        if ended.is_none() {
                            if let Some(next) = self.next.take() {
                                // The session left careful mode: its new consumer's
                                // deliveries follow the old one's.
                                *stream = next;
                                continue;
                            }
                        }
                        let loss = match ended {
                            Some(Err(e)) => Some(Loss::lapin(session_id(session), &e)),
                            // A careful consumer the session cancelled ends too; its
                            // successor comes through `current`.
                            _ if session.retired(stream) => None,
                            _ => Some(Loss::new(session_id(session), STREAM_ENDED)),
                        };
                        if let Some(loss) = loss {
                            let _ = self.lost.send(loss);
                        }
                        self.cached = None;
                        self.next = None;
                        if current.changed().await.is_err() {
                            return Ok(None);
                        }
                    }
                },
                changed = current.changed() => {
                    if changed.is_err() {
                        return Ok(None);
                    }
                    let next = current.borrow_and_update().clone();
                    self.adopt(next);
                }
            }
        }
    }

    fn capabilities(&self) -> Capabilities {
        self.caps
    }

    /// Hands back the deliveries the broker sent that `receive` never returned (on a
    /// classic queue, with the attempt they had: see the [crate docs](crate)), then
    /// closes the connections, within the builder's `close_timeout`; past it they
    /// are dropped and this fails with [`Error::Timeout`].
    async fn close(&mut self) -> redrive_core::Result<()> {
        self.hand_back_buffered().await;
        // Dropping the receiver tells the background task to close the connections; it
        // does so within the close timeout. Twice that is a backstop for a task stuck
        // elsewhere.
        self.cached = None;
        self.next = None;
        self.current = None;
        let Some(mut task) = self.task.take() else {
            return Ok(());
        };
        let backstop = self.close_timeout * 2;
        match tokio::time::timeout(backstop, &mut task).await {
            Ok(Ok(closed)) => closed.map_err(Into::into),
            // The task panicked or was cancelled: nothing is left to close.
            Ok(Err(_)) => Ok(()),
            Err(_) => {
                task.abort();
                Err(Error::Timeout {
                    what: "stopping the consumer's connection task".into(),
                    after: backstop,
                    blocked: false,
                }
                .into())
            }
        }
    }
}

/// Watches the connection and reconnects whenever it or the consumer is lost,
/// publishing each new session to `receive` through `tx`.
async fn run(
    config: Arc<Config>,
    shared: Arc<Shared>,
    tx: watch::Sender<Option<Current>>,
    mut lost: mpsc::UnboundedReceiver<Loss>,
    mut opened: Opened,
) -> Result<()> {
    let queue: Arc<str> = config.topology.queue().into();
    loop {
        let Opened {
            session,
            stream,
            mut events,
        } = opened;
        let id = session_id(&session);
        tx.send_replace(Some(Current {
            session: session.clone(),
            stream,
        }));
        let loss = loop {
            tokio::select! {
                biased;
                () = tx.closed() => {
                    return session.shut("consumer closed").await;
                }
                Some(event) = events.next() => match event {
                    lapin::Event::Error(e) => break Loss::lapin(id, &e),
                    lapin::Event::ConnectionBlocked(why) => {
                        tracing::warn!(queue = %queue, reason = %why, "RabbitMQ blocked the connection (resource alarm)");
                    }
                    lapin::Event::ConnectionUnblocked => {
                        tracing::info!(queue = %queue, "RabbitMQ unblocked the connection");
                    }
                    _ => {}
                },
                Some(loss) = lost.recv() => {
                    // A report about an earlier session is stale.
                    if loss.session == id {
                        break loss;
                    }
                }
                () = careful_reached(&session) => {
                    let Some(careful) = session.careful.as_ref() else { continue };
                    match session.leave_careful_mode(careful).await {
                        Ok(None) => {}
                        Ok(Some(stream)) => {
                            shared.prefetch.store(config.prefetch, Ordering::Relaxed);
                            tracing::info!(
                                queue = %queue,
                                prefetch = config.prefetch,
                                settled = careful.target,
                                "the message that broke the connection is gone; consuming with the full prefetch again"
                            );
                            tx.send_replace(Some(Current {
                                session: session.clone(),
                                stream,
                            }));
                        }
                        Err(e) => {
                            break Loss::new(id, format!("consuming with the full prefetch again failed: {e}"));
                        }
                    }
                }
            }
        };
        tx.send_replace(None);
        shared.connected.store(false, Ordering::Relaxed);
        tracing::warn!(queue = %queue, reason = %loss.why, "RabbitMQ consumer lost its connection; reconnecting");
        // One at a time after a frame the client could not parse, until the message that
        // broke the connection is gone (see `Careful`).
        let was_careful = session.careful.as_ref().is_some_and(Careful::is_active);
        let careful = config.prefetch > 1 && (loss.unparsable || was_careful);
        if careful && !was_careful {
            let total = shared.careful.fetch_add(1, Ordering::Relaxed) + 1;
            tracing::warn!(
                queue = %queue,
                cause = %loss.why,
                prefetch = config.prefetch,
                careful_modes = total,
                "a frame the client could not parse broke the connection; consuming one message at a time until the message that broke it is gone, so the deliveries of its prefetch window are not returned with it again"
            );
        }
        let _ = session.shut("reconnecting").await;
        drop((events, session));
        let mut n = 0u32;
        opened = loop {
            let wait = config.reconnect.delay(n);
            tokio::select! {
                () = tx.closed() => return Ok(()),
                () = tokio::time::sleep(wait) => {}
            }
            let open = tokio::select! {
                () = tx.closed() => return Ok(()),
                open = Session::open(&config, careful) => open,
            };
            match open {
                Ok(s) => break s,
                Err(e) => {
                    n = n.saturating_add(1);
                    tracing::warn!(queue = %queue, attempt = n, error = %e, "RabbitMQ reconnect failed");
                }
            }
        };
        let total = shared.reconnects.fetch_add(1, Ordering::Relaxed) + 1;
        let prefetch = if careful { 1 } else { config.prefetch };
        shared.prefetch.store(prefetch, Ordering::Relaxed);
        shared.connected.store(true, Ordering::Relaxed);
        tracing::info!(queue = %queue, reconnects = total, prefetch, "RabbitMQ consumer reconnected and consuming again");
    }
}

/// Returns once a careful session settled enough deliveries to leave careful mode; never
/// for any other session.
async fn careful_reached(session: &Session) {
    match session.careful.as_ref() {
        Some(careful) => careful.reached().await,
        None => std::future::pending().await,
    }
}

/// The Worker's delivery of `d`, or the tag gap that breaks its channel.
fn delivery(
    session: &Arc<Session>,
    queue: &Arc<str>,
    d: lapin::message::Delivery,
) -> std::result::Result<Delivery, TagGap> {
    let (acker, received) = accept(session, d)?;
    let message = mapping::message(queue, acker.payload.clone(), received, acker.amqp.clone());
    Ok(Delivery::new(message, acker))
}

/// Records `d` with its channel's settler and gives its acker, with what the message is
/// built from; or the tag gap that breaks its channel.
fn accept(
    session: &Arc<Session>,
    d: lapin::message::Delivery,
) -> std::result::Result<(RabbitAcker, mapping::Received), TagGap> {
    let lapin::message::Delivery {
        exchange,
        routing_key,
        redelivered,
        properties,
        data,
        delivery_tag,
        ..
    } = d;
    session.settler.deliver(delivery_tag)?;
    let received = mapping::receive(&properties, redelivered);
    let attempt = received.attempt;
    let amqp = AmqpDelivery::new(
        properties,
        exchange.to_string(),
        routing_key.to_string(),
        redelivered,
    );
    let acker = RabbitAcker {
        session: Arc::downgrade(session),
        tag: delivery_tag,
        settling: AtomicBool::new(false),
        amqp,
        payload: Bytes::from(data),
        attempt,
    };
    Ok((acker, received))
}

/// Settles one delivery on the channel it came on.
struct RabbitAcker {
    session: Weak<Session>,
    /// The delivery tag on the session's consuming channel.
    tag: u64,
    /// Set once an ack or a requeue reached the settler: dropping the acker after that
    /// has nothing to hand back, and takes no lock to find that out.
    settling: AtomicBool,
    amqp: AmqpDelivery,
    payload: Bytes,
    attempt: u32,
}

impl RabbitAcker {
    /// The delivery's session, if its connection is still the one it came on.
    fn session(&self) -> Result<Arc<Session>> {
        self.session
            .upgrade()
            .filter(|s| s.is_alive())
            .ok_or(Error::ChannelClosed)
    }

    /// Settles the delivery through its channel's [`Settler`].
    async fn settle(&self, how: Settlement) -> Result<()> {
        let session = self.session()?;
        self.settling.store(true, Ordering::Relaxed);
        if session.settler.settle(self.tag, how).await {
            if let Some(careful) = session.careful.as_ref() {
                careful.settled();
            }
            Ok(())
        } else {
            Err(Error::ChannelClosed)
        }
    }

    async fn do_ack(&self) -> Result<()> {
        self.settle(Settlement::Ack).await
    }

    async fn requeue(&self) -> Result<()> {
        self.settle(Settlement::Requeue).await
    }

    async fn do_nack(&self, delay: Duration) -> Result<()> {
        let session = self.session()?;
        let topology = &session.config.topology;
        if delay.is_zero() && topology.kind() == QueueKind::Quorum {
            // The quorum queue counts this redelivery itself.
            return self.requeue().await;
        }
        let delay = if delay > topology.max_delay() {
            tracing::warn!(requested = ?delay, max = ?topology.max_delay(), "nack delay above the topology's largest; using the largest");
            topology.max_delay()
        } else {
            delay
        };
        let timeout = session.config.publish_timeout;
        self.republish(&session, delay, self.attempt.saturating_add(1), timeout)
            .await
    }

    /// Gives the message back untried: the session stops consuming first (see
    /// [`Session::stop_consuming`]). A quorum queue takes it back with
    /// `basic.nack(requeue)`, and counts that as a delivery; a classic queue gets a copy
    /// with the attempt the message had, so the next consumer sees the same attempt.
    async fn do_hand_back(&self) -> Result<()> {
        let session = self.session()?;
        session.stop_consuming().await;
        match session.config.topology.kind() {
            QueueKind::Quorum => self.requeue().await,
            QueueKind::Classic => {
                let timeout = session.config.publish_timeout;
                self.republish(&session, Duration::ZERO, self.attempt, timeout)
                    .await
            }
        }
    }

    /// Publishes a copy with `attempt` to the queue (`delay` zero) or to its delay
    /// queue, and acks the original once the broker confirmed the copy. If the copy
    /// fails or takes longer than `timeout`, the original is handed back with
    /// `basic.nack(requeue)`.
    async fn republish(
        &self,
        session: &Session,
        delay: Duration,
        attempt: u32,
        timeout: Duration,
    ) -> Result<()> {
        let mut routing_key = session.config.topology.queue().to_owned();
        let copy = async {
            if !delay.is_zero() {
                routing_key = session.ensure_delay_queue(delay).await?;
            }
            let properties = mapping::republish_properties(
                self.amqp.properties(),
                attempt,
                (!delay.is_zero()).then_some(delay),
            );
            let channel = session.publish_channel().await?;
            publish_confirmed(&channel, "", &routing_key, &self.payload, properties).await
        };
        let republished = match tokio::time::timeout(timeout, copy).await {
            Ok(republished) => republished,
            Err(_) => Err(Error::Timeout {
                what: format!("republishing to `{routing_key}` (until the broker's confirm)"),
                after: timeout,
                blocked: session.publishing_blocked(),
            }),
        };
        match republished {
            // The copy is confirmed: only now may the original go.
            Ok(()) => match self.do_ack().await {
                Ok(()) => Ok(()),
                Err(e) => {
                    tracing::warn!(error = %e, "the retry copy was published but the original could not be acked; it will be delivered twice");
                    Err(e)
                }
            },
            Err(e) => {
                tracing::warn!(error = %e, queue = %routing_key, "republishing for redelivery failed; handing the message back with basic.nack");
                if let Err(e2) = self.requeue().await {
                    tracing::warn!(error = %e2, "basic.nack failed too; the broker redelivers the message when the channel closes");
                }
                Err(e)
            }
        }
    }
}

impl Drop for RabbitAcker {
    fn drop(&mut self) {
        // Settled: nothing happens. Unsettled (its call ended without settling it): it is
        // handed back, so it cannot stop later acks from sharing frames.
        if *self.settling.get_mut() {
            return;
        }
        if let Some(session) = self.session.upgrade() {
            session.settler.abandon(self.tag);
        }
    }
}

impl Acker for RabbitAcker {
    fn ack(&self) -> SettleFuture<'_> {
        SettleFuture::new(async { self.do_ack().await.map_err(Into::into) })
    }

    fn nack(&self, delay: Duration) -> SettleFuture<'_> {
        SettleFuture::new(async move { self.do_nack(delay).await.map_err(Into::into) })
    }

    fn hand_back(&self) -> SettleFuture<'_> {
        SettleFuture::new(async { self.do_hand_back().await.map_err(Into::into) })
    }

    fn extend(&self, _lease: Duration) -> SettleFuture<'_> {
        // RabbitMQ holds an unacked message until its channel closes: nothing to extend.
        SettleFuture::ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_builder_debug_hides_the_password() {
        for url in [
            "amqp://guest:secret@localhost:5672/%2f",
            "amqp:guest:secret@localhost",
        ] {
            let b = RabbitConsumer::builder(url, Topology::new("q"));
            let text = format!("{b:?}");
            assert!(!text.contains("secret"), "{text}");
            assert!(text.contains("q"), "{text}");
        }
    }
}
