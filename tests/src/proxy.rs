//! A TCP proxy the fault run owns on 127.0.0.1, so it can cut a client's connections
//! to a broker (the SQS emulator over HTTP, a Kafka broker) in the middle of traffic.
//!
//! The client is pointed at [`Proxy::addr`] instead of the broker; each connection it
//! opens is forwarded to a fresh connection to the upstream address. [`Proxy::cut`]
//! then closes every connection open at that moment, on both sides, while the proxy
//! keeps accepting new ones: the client sees its broker connection fail mid-stream and
//! has to reconnect, which is the fault the run wants to provoke.
//!
//! ```no_run
//! # async fn run() -> std::io::Result<()> {
//! use redrive_fault_run::proxy::Proxy;
//!
//! let proxy = Proxy::start("127.0.0.1:9324").await?;
//! let endpoint = format!("http://{}", proxy.addr()); // give this to the SQS client
//! // ... traffic ...
//! let cut = proxy.cut().await;
//! println!("cut {cut} connections to {endpoint}");
//! # Ok(())
//! # }
//! ```
//!
//! # Guarantees
//! - A cut is abrupt: both sockets of a connection are closed with `SO_LINGER` set to
//!   zero, so each peer gets a TCP reset (not an orderly FIN), even in the middle of a
//!   request or a response. [`Proxy::cut`] returns once every connection it cut is closed.
//! - An upstream that refuses or does not answer within 5 s only closes (with a reset)
//!   the client connection that needed it; the proxy goes on accepting.
//! - Dropping the [`Proxy`] stops accepting and closes every connection it carries.

use std::collections::HashMap;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// How long a connection waits for the upstream to accept before it gives up.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long the accept loop pauses after a failed `accept` (out of file descriptors, say).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// A TCP proxy on 127.0.0.1 that forwards to one upstream address and can cut every
/// connection it carries.
///
/// It must be started inside a tokio runtime; its tasks run on that runtime.
#[derive(Debug)]
pub struct Proxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: JoinHandle<()>,
}

/// What the proxy, its accept loop and its connection tasks share.
#[derive(Debug, Default)]
struct Shared {
    /// The connections open now, by id (the order they were accepted in).
    conns: Mutex<HashMap<u64, Conn>>,
    /// Connections accepted so far.
    accepted: AtomicU64,
}

impl Shared {
    /// The open connections. A poisoned lock still holds a consistent map (every
    /// critical section is one insert, remove or drain), so it is used as it is.
    fn conns(&self) -> MutexGuard<'_, HashMap<u64, Conn>> {
        self.conns
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// One open connection, as the proxy sees it.
#[derive(Debug)]
struct Conn {
    /// Sending (or dropping) this tells the connection's task to close both sockets.
    cut: oneshot::Sender<()>,
    /// The connection's task, which ends once both sockets are closed.
    task: JoinHandle<()>,
}

impl Proxy {
    /// Listens on 127.0.0.1 on a free port (port 0) and forwards each accepted
    /// connection to `upstream` (such as `"127.0.0.1:9324"`).
    ///
    /// The upstream is not contacted here: each client connection opens its own
    /// upstream connection when it is accepted.
    pub async fn start(upstream: impl Into<String>) -> io::Result<Proxy> {
        Self::start_on(0, upstream).await
    }

    /// Listens on 127.0.0.1 on `port` and forwards each accepted connection to
    /// `upstream`.
    ///
    /// For a client that must reach the broker on a known port, as a Kafka client does:
    /// the broker advertises its listener's port, and the client connects to that.
    /// Fails if the port is taken.
    pub async fn start_on(port: u16, upstream: impl Into<String>) -> io::Result<Proxy> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, port)).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared::default());
        let accept = tokio::spawn(accept_loop(listener, upstream.into(), Arc::clone(&shared)));
        Ok(Proxy {
            addr,
            shared,
            accept,
        })
    }

    /// The address the proxy listens on: the one to give the client.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Closes every connection open now, both sides (the client sees a reset or EOF
    /// mid-stream); new connections are accepted as before. Returns how many it cut,
    /// once they are all closed.
    pub async fn cut(&self) -> usize {
        let conns: Vec<Conn> = self.shared.conns().drain().map(|(_, conn)| conn).collect();
        let mut cut = 0;
        let mut tasks = Vec::with_capacity(conns.len());
        for conn in conns {
            // A failed send means the connection had already ended on its own.
            if conn.cut.send(()).is_ok() {
                cut += 1;
            }
            tasks.push(conn.task);
        }
        for task in tasks {
            if let Err(error) = task.await {
                tracing::warn!(%error, "proxy connection task failed");
            }
        }
        cut
    }

    /// Connections accepted so far, including those already closed or cut.
    pub fn accepted(&self) -> u64 {
        self.shared.accepted.load(Ordering::Relaxed)
    }
}

impl Drop for Proxy {
    /// Stops accepting and closes every connection the proxy carries (with a reset), without
    /// waiting: the port is free again once the runtime has dropped the accept task.
    fn drop(&mut self) {
        self.accept.abort();
        // Dropping each `cut` sender tells its connection to close, as a cut does.
        self.shared.conns().clear();
    }
}

/// Accepts connections until the proxy is dropped, one task per connection.
async fn accept_loop(listener: TcpListener, upstream: String, shared: Arc<Shared>) {
    loop {
        let client = match listener.accept().await {
            Ok((client, _)) => client,
            Err(error) => {
                tracing::warn!(%error, "proxy accept failed; retrying");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        let id = shared.accepted.fetch_add(1, Ordering::Relaxed);
        let (cut, cut_rx) = oneshot::channel();
        // The lock is held across the spawn so the task, which removes its own entry
        // when it ends, cannot do so before the entry is there.
        let mut conns = shared.conns();
        let task = tokio::spawn(connection(
            id,
            client,
            upstream.clone(),
            cut_rx,
            Arc::clone(&shared),
        ));
        conns.insert(id, Conn { cut, task });
    }
}

/// Carries one client connection to a fresh upstream connection until either side
/// closes or the proxy cuts it.
async fn connection(
    id: u64,
    mut client: TcpStream,
    upstream: String,
    mut cut: oneshot::Receiver<()>,
    shared: Arc<Shared>,
) {
    let connect = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(&upstream));
    let upstream_stream = tokio::select! {
        connected = connect => match connected {
            Ok(Ok(stream)) => Some(stream),
            Ok(Err(error)) => {
                tracing::debug!(%error, %upstream, "proxy could not reach upstream; closing client");
                None
            }
            Err(_) => {
                tracing::debug!(%upstream, "proxy timed out reaching upstream; closing client");
                None
            }
        },
        _ = &mut cut => None,
    };
    match upstream_stream {
        Some(mut upstream_stream) => tokio::select! {
            copied = tokio::io::copy_bidirectional(&mut client, &mut upstream_stream) => {
                // Both sides closed their writing half (or one failed): close gently, as
                // a reset now could discard bytes not yet acknowledged.
                if let Err(error) = copied {
                    tracing::debug!(%error, "proxy connection ended with an error");
                }
            }
            _ = &mut cut => {
                reset(&upstream_stream);
                reset(&client);
            }
        },
        None => reset(&client),
    }
    shared.conns().remove(&id);
}

/// Makes closing `stream` abrupt: with `SO_LINGER` at zero, the drop sends a reset.
fn reset(stream: &TcpStream) {
    if let Err(error) = stream.set_zero_linger() {
        tracing::debug!(%error, "proxy could not set SO_LINGER to zero; closing gently");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::future::Future;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// The bound on every step of a test.
    const STEP: Duration = Duration::from_secs(1);

    /// Runs one test step, failing the test if it takes longer than [`STEP`].
    async fn step<T>(what: &str, fut: impl Future<Output = T>) -> T {
        tokio::time::timeout(STEP, fut)
            .await
            .unwrap_or_else(|_| panic!("{what} took longer than {STEP:?}"))
    }

    /// An upstream on 127.0.0.1 that echoes every byte back on each connection.
    async fn echo_server() -> SocketAddr {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (mut stream, _) = listener.accept().await.unwrap();
                tokio::spawn(async move {
                    let (mut read, mut write) = stream.split();
                    let _ = tokio::io::copy(&mut read, &mut write).await;
                });
            }
        });
        addr
    }

    /// Connects to `proxy` and checks that `msg` comes back through it.
    async fn connect_and_echo(proxy: &Proxy, msg: &[u8]) -> TcpStream {
        let mut stream = step("connect", TcpStream::connect(proxy.addr()))
            .await
            .unwrap();
        round_trip(&mut stream, msg).await;
        stream
    }

    /// Writes `msg` and checks that it is read back.
    async fn round_trip(stream: &mut TcpStream, msg: &[u8]) {
        step("write", stream.write_all(msg)).await.unwrap();
        let mut back = vec![0; msg.len()];
        step("read", stream.read_exact(&mut back)).await.unwrap();
        assert_eq!(back, msg);
    }

    /// Reads from `stream` once, within [`STEP`].
    async fn read_once(stream: &mut TcpStream) -> io::Result<usize> {
        let mut buf = [0; 16];
        step("read after the close", stream.read(&mut buf)).await
    }

    /// Reads from `stream`, expecting it closed: an error or EOF.
    async fn expect_closed(stream: &mut TcpStream) {
        let read = read_once(stream).await;
        assert!(
            matches!(read, Ok(0) | Err(_)),
            "the connection should be closed, read {read:?}"
        );
    }

    #[tokio::test]
    async fn bytes_round_trip_through_the_proxy() {
        let proxy = Proxy::start(echo_server().await.to_string()).await.unwrap();
        assert!(proxy.addr().ip().is_loopback());
        assert_ne!(proxy.addr().port(), 0);

        let mut stream = connect_and_echo(&proxy, b"hello").await;
        let big: Vec<u8> = (0..200_000_u32).map(|i| (i % 251) as u8).collect();
        let (mut read, mut write) = stream.split();
        let writer = async {
            write.write_all(&big).await.unwrap();
        };
        let mut back = vec![0; big.len()];
        let reader = async {
            read.read_exact(&mut back).await.unwrap();
        };
        step("a 200 kB round trip", async {
            tokio::join!(writer, reader)
        })
        .await;
        assert_eq!(back, big);
    }

    #[tokio::test]
    async fn cut_closes_the_open_connection_with_a_reset() {
        let proxy = Proxy::start(echo_server().await.to_string()).await.unwrap();
        let mut stream = connect_and_echo(&proxy, b"before").await;

        assert_eq!(step("cut", proxy.cut()).await, 1);

        let read = read_once(&mut stream).await;
        assert_eq!(
            read.map_err(|e| e.kind()),
            Err(io::ErrorKind::ConnectionReset),
            "the cut should be abrupt: a reset, not an EOF"
        );
    }

    #[tokio::test]
    async fn new_connections_work_after_a_cut() {
        let proxy = Proxy::start(echo_server().await.to_string()).await.unwrap();
        let mut first = connect_and_echo(&proxy, b"one").await;
        assert_eq!(step("cut", proxy.cut()).await, 1);
        expect_closed(&mut first).await;

        let mut second = connect_and_echo(&proxy, b"two").await;
        round_trip(&mut second, b"still two").await;
        assert_eq!(proxy.accepted(), 2);
    }

    #[tokio::test]
    async fn cut_counts_only_the_connections_open_now() {
        let proxy = Proxy::start(echo_server().await.to_string()).await.unwrap();
        assert_eq!(step("cut with none open", proxy.cut()).await, 0);

        let _a = connect_and_echo(&proxy, b"a").await;
        let _b = connect_and_echo(&proxy, b"b").await;
        let mut closed = connect_and_echo(&proxy, b"c").await;
        step("shutdown", closed.shutdown()).await.unwrap();
        expect_closed(&mut closed).await; // the echo server closed its side in turn
        drop(closed);
        // The proxy notices the close on its own; wait until it has forgotten it.
        step("the closed connection to be forgotten", async {
            while proxy.shared.conns().len() > 2 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await;

        assert_eq!(step("cut", proxy.cut()).await, 2);
        assert_eq!(step("cut again", proxy.cut()).await, 0);
        assert_eq!(proxy.accepted(), 3);
    }

    #[tokio::test]
    async fn accepted_counts_every_connection() {
        let proxy = Proxy::start(echo_server().await.to_string()).await.unwrap();
        assert_eq!(proxy.accepted(), 0);
        for i in 0..3_u8 {
            let stream = connect_and_echo(&proxy, &[i]).await;
            drop(stream);
        }
        assert_eq!(proxy.accepted(), 3);
    }

    #[tokio::test]
    async fn an_unreachable_upstream_closes_the_client_but_not_the_proxy() {
        // A port that was free a moment ago: nothing listens there.
        let down = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let down_addr = down.local_addr().unwrap();
        drop(down);
        let proxy = Proxy::start(down_addr.to_string()).await.unwrap();

        for _ in 0..2 {
            let mut stream = step("connect", TcpStream::connect(proxy.addr()))
                .await
                .unwrap();
            expect_closed(&mut stream).await;
        }
        assert_eq!(proxy.accepted(), 2);
    }

    #[tokio::test]
    async fn start_on_listens_on_the_given_port() {
        let free = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let port = free.local_addr().unwrap().port();
        drop(free);

        let proxy = Proxy::start_on(port, echo_server().await.to_string())
            .await
            .unwrap();
        assert_eq!(proxy.addr(), SocketAddr::from((Ipv4Addr::LOCALHOST, port)));
        connect_and_echo(&proxy, b"on a known port").await;
    }

    #[tokio::test]
    async fn dropping_the_proxy_closes_its_connections() {
        let proxy = Proxy::start(echo_server().await.to_string()).await.unwrap();
        let mut stream = connect_and_echo(&proxy, b"x").await;
        drop(proxy);
        expect_closed(&mut stream).await;
    }
}
