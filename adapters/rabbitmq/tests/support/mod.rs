//! A TLS listener in front of a local broker for the TLS tests (`amqps://` here, and
//! the Kafka adapter's, which include this file): a test certificate authority with a
//! server certificate (openssl), and stunnel terminating TLS on a free loopback port
//! and forwarding to the broker's plaintext port.
#![allow(dead_code, unreachable_pub)]

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A directory of its own under the system's temporary directory, removed on drop.
#[derive(Debug)]
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(prefix: &str) -> Self {
        let dir = std::env::temp_dir().join(redrive_core::testkit::unique_name(prefix));
        std::fs::create_dir_all(&dir)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
        TempDir(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A certificate authority of its own (its name unique, so another test's CA is an
/// unknown issuer, not a namesake) and a server certificate it signed, valid for
/// `DNS:localhost` and `IP:127.0.0.1` for one day.
#[derive(Debug)]
pub struct TestCerts {
    dir: TempDir,
}

impl TestCerts {
    /// Makes the CA and the server certificate with openssl (about 60 ms).
    pub fn new() -> Self {
        let dir = TempDir::new("redrive-tls");
        let d = dir.path();
        std::fs::write(
            d.join("ext.cnf"),
            "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n\
             keyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n",
        )
        .expect("write ext.cnf");
        let ca = d
            .file_name()
            .and_then(|n| n.to_str())
            .expect("a UTF-8 name");
        let key = "-newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes";
        openssl(
            d,
            &format!("req -x509 {key} -days 1 -subj /CN={ca} -keyout ca.key -out ca.crt"),
        );
        openssl(
            d,
            &format!("req {key} -subj /CN=localhost -keyout server.key -out server.csr"),
        );
        openssl(
            d,
            "x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 1 \
             -extfile ext.cnf -out server.crt",
        );
        TestCerts { dir }
    }

    /// The CA's certificate (PEM): the file a client trusts.
    pub fn ca_file(&self) -> PathBuf {
        self.dir.path().join("ca.crt")
    }

    pub fn server_cert(&self) -> PathBuf {
        self.dir.path().join("server.crt")
    }

    pub fn server_key(&self) -> PathBuf {
        self.dir.path().join("server.key")
    }
}

/// Runs openssl in `dir` with `args` (split at whitespace).
fn openssl(dir: &Path, args: &str) {
    let out = Command::new("openssl")
        .args(args.split_whitespace())
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run openssl ({e}); install it: `apt-get install openssl`")
        });
    assert!(
        out.status.success(),
        "openssl {args} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// stunnel in front of a plaintext port: it takes TLS on a free loopback port with the
/// test server certificate and forwards the decrypted bytes. Stopped on drop.
#[derive(Debug)]
pub struct Stunnel {
    child: Child,
    port: u16,
    log: PathBuf,
    _dir: TempDir,
}

impl Stunnel {
    /// Starts stunnel forwarding TLS on a free port of 127.0.0.1 to `target`
    /// (`host:port`), and waits until it accepts connections.
    pub fn start(certs: &TestCerts, target: &str) -> Self {
        let binary = ["stunnel4", "stunnel"]
            .into_iter()
            .find(|b| {
                Command::new(b)
                    .arg("-version")
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .is_ok()
            })
            .unwrap_or_else(|| {
                panic!(
                    "stunnel is not installed; the TLS tests put it in front of the broker: \
                     `apt-get install stunnel4` (scripts/test installs it)"
                )
            });
        let dir = TempDir::new("redrive-stunnel");
        let port = free_port();
        let log = dir.path().join("stunnel.log");
        let config = dir.path().join("stunnel.conf");
        std::fs::write(
            &config,
            format!(
                "foreground = yes\npid =\noutput = {log}\ndebug = info\n\
                 [amqps]\naccept = 127.0.0.1:{port}\nconnect = {target}\n\
                 cert = {cert}\nkey = {key}\n",
                log = log.display(),
                cert = certs.server_cert().display(),
                key = certs.server_key().display(),
            ),
        )
        .expect("write stunnel.conf");
        let mut child = Command::new(binary)
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {binary}: {e}"));
        let start = Instant::now();
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "{binary} exited ({status}) before listening on 127.0.0.1:{port}: {}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "{binary} did not listen on 127.0.0.1:{port} within 10 s"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        // The readiness probes were plain TCP connections: stunnel logs no TLS session.
        Stunnel {
            child,
            port,
            log,
            _dir: dir,
        }
    }

    /// The TLS port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// How many TLS sessions stunnel has accepted so far (its log's `TLS accepted` lines).
    pub fn tls_sessions(&self) -> usize {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .matches("TLS accepted")
            .count()
    }

    /// stunnel's log, for failure messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Stunnel {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A port of 127.0.0.1 no one listens on (the OS picks it; it is free again once the
/// probe listener is dropped).
fn free_port() -> u16 {
    TcpListener::bind(("127.0.0.1", 0))
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port()
}
