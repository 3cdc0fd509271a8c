//! Private Redis and PostgreSQL servers for tests that stop and restart them, so such a
//! test never touches the shared instances on 6379 and 5432 that other tests use.
//!
//! Each server listens on a free port of 127.0.0.1 and keeps its files in a temporary
//! directory of its own, removed when the value is dropped; a running server is stopped
//! on drop too. Everything here blocks the calling thread (for up to a few seconds, the
//! time a server takes to start), so call it from a multi-thread tokio runtime, where
//! the other tasks of the test keep running meanwhile.
//!
//! - [`PrivateRedis::new`] runs `redis-server` (persistence off: a restart forgets every
//!   key, as with the shared instance); [`url`](PrivateRedis::url) is its
//!   `redis://127.0.0.1:<port>`; [`stop`](PrivateRedis::stop) kills the server (as a
//!   crash would) and [`start`](PrivateRedis::start) runs it again on the same port;
//!   [`pause`](PrivateRedis::pause) freezes it (SIGSTOP) until
//!   [`resume`](PrivateRedis::resume).
//! - [`PrivateRedis::with_tls`] runs one with a TLS port too, for `rediss://` tests:
//!   [`tls_url`](PrivateRedis::tls_url) is its `rediss://localhost:<tls port>`.
//! - [`TestCerts::new`] makes a certificate authority of the test's own and a server
//!   certificate it signed (for `localhost` and `127.0.0.1`), with `openssl`.
//! - [`PrivatePostgres::new`] runs `initdb` (trust authentication, user `postgres`), then
//!   the server through `pg_ctl`, and creates the database `test`;
//!   [`params`](PrivatePostgres::params) is its
//!   `host=127.0.0.1 port=<port> user=postgres dbname=test`;
//!   [`stop`](PrivatePostgres::stop) is `pg_ctl stop -m fast` (clients are disconnected);
//!   [`start`](PrivatePostgres::start) and [`restart`](PrivatePostgres::restart) keep the
//!   data. PostgreSQL refuses to run as root: as root, its programs run as the user
//!   `postgres` through `runuser`, in a directory that user owns.
//! - [`PrivatePostgres::with_tls`] runs one that takes TLS connections only (`ssl = on`,
//!   `hostssl` lines alone in `pg_hba.conf`), with a [`TestCerts`] server certificate.
//!
//! The programs (`openssl` included) are looked up on `PATH`, then (for PostgreSQL) in
//! `/usr/lib/postgresql/<version>/bin`, the newest first. A missing one panics with the
//! package to install.
//!
//! Another crate's tests use this file with
//! `#[path = "<relative path to>/middleware/tests/support/services.rs"] mod services;`;
//! it needs only the standard library.
#![allow(dead_code)] // each test binary uses its own part of it

use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Ports of the shared instances, never handed out here.
const SHARED_PORTS: [u16; 2] = [6379, 5432];

/// How long a server may take to start before the test panics.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// A free port on 127.0.0.1 (the system's choice, so never a shared instance's).
fn free_port() -> u16 {
    loop {
        let listener = TcpListener::bind("127.0.0.1:0").expect("binding 127.0.0.1:0");
        let port = listener.local_addr().expect("a bound address").port();
        if !SHARED_PORTS.contains(&port) {
            return port;
        }
    }
}

/// A new, empty directory under the system's temporary directory.
fn temp_dir(kind: &str) -> PathBuf {
    static COUNT: AtomicU32 = AtomicU32::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let dir = std::env::temp_dir().join(format!(
        "redrive-{kind}-{}-{}-{nanos}",
        std::process::id(),
        COUNT.fetch_add(1, Ordering::Relaxed)
    ));
    fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
    dir
}

/// `program`'s path: on `PATH`, or in one of `extra` (searched in order).
fn find_program(program: &str, extra: &[PathBuf]) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(extra.iter().cloned())
        .map(|dir| dir.join(program))
        .find(|p| p.is_file())
}

/// The last lines of a log file, for a panic message.
fn log_tail(log: &Path) -> String {
    let text = fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

/// Runs `cmd` to its end; panics with its output when it fails.
fn run(cmd: &mut Command, what: &str) -> Output {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot run {cmd:?}: {e}"));
    if !out.status.success() {
        panic!(
            "{what}: {cmd:?} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    out
}

/// A certificate authority of the test's own, and a server certificate it signed for
/// `localhost` and `127.0.0.1`, as PEM files in a temporary directory removed on drop.
///
/// Made with the `openssl` program (four commands, well under a second); the keys are
/// P-256, the certificates valid for a day.
pub(crate) struct TestCerts {
    dir: PathBuf,
}

impl TestCerts {
    /// A new authority and server certificate.
    ///
    /// # Panics
    /// When `openssl` is not installed or fails.
    pub(crate) fn new() -> Self {
        let openssl = find_program("openssl", &[]).unwrap_or_else(|| {
            panic!("TestCerts needs `openssl` on PATH; install it with `apt-get install openssl`")
        });
        let certs = TestCerts {
            dir: temp_dir("certs"),
        };
        let openssl = || {
            let mut cmd = Command::new(&openssl);
            cmd.current_dir(&certs.dir);
            cmd
        };
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
        ];
        run(
            openssl()
                .args(["req", "-x509"])
                .args(ec)
                .args(["-days", "1", "-subj", "/CN=redrive test CA"])
                .args(["-keyout", "ca.key", "-out", "ca.crt"]),
            "making the test CA",
        );
        run(
            openssl()
                .arg("req")
                .args(ec)
                .args(["-subj", "/CN=localhost"])
                .args(["-keyout", "server.key", "-out", "server.csr"]),
            "making the server's key",
        );
        fs::write(
            certs.dir.join("server.ext"),
            "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n\
             keyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n",
        )
        .expect("writing server.ext");
        run(
            openssl()
                .args(["x509", "-req", "-in", "server.csr", "-days", "1"])
                .args(["-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial"])
                .args(["-extfile", "server.ext", "-out", "server.crt"]),
            "signing the server's certificate",
        );
        certs
    }

    /// The authority's certificate (`ca.crt`), for a client to trust.
    pub(crate) fn ca(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }

    /// The server's certificate (`server.crt`).
    pub(crate) fn cert(&self) -> PathBuf {
        self.dir.join("server.crt")
    }

    /// The server's private key (`server.key`).
    pub(crate) fn key(&self) -> PathBuf {
        self.dir.join("server.key")
    }
}

impl Drop for TestCerts {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// A `redis-server` of the test's own on a free port of 127.0.0.1.
pub(crate) struct PrivateRedis {
    program: PathBuf,
    port: u16,
    /// The TLS port, when the server has one ([`with_tls`](Self::with_tls)).
    tls_port: Option<u16>,
    dir: PathBuf,
    server: Option<Child>,
}

impl PrivateRedis {
    /// Runs `redis-server` on a free port, with persistence off, and waits until it
    /// answers `PING`.
    ///
    /// # Panics
    /// When `redis-server` is not installed or does not answer within 30 s.
    pub(crate) fn new() -> Self {
        let mut redis = Self::unstarted();
        redis.start();
        redis
    }

    /// Runs `redis-server` as [`new`](Self::new) does, plus a TLS port on another free
    /// port with `certs`' server certificate (copied, so `certs` may be dropped); clients
    /// need no certificate of their own. The plaintext port stays, for the readiness
    /// check and for a test's own look at the server.
    ///
    /// # Panics
    /// As [`new`](Self::new) does, and when `redis-server` was built without TLS.
    pub(crate) fn with_tls(certs: &TestCerts) -> Self {
        let mut redis = Self::unstarted();
        for (from, to) in [
            (certs.ca(), "ca.crt"),
            (certs.cert(), "server.crt"),
            (certs.key(), "server.key"),
        ] {
            fs::copy(&from, redis.dir.join(to))
                .unwrap_or_else(|e| panic!("copying {}: {e}", from.display()));
        }
        let tls_port = std::iter::repeat_with(free_port)
            .find(|&p| p != redis.port)
            .expect("a second free port");
        redis.tls_port = Some(tls_port);
        redis.start();
        redis
    }

    fn unstarted() -> Self {
        let program = find_program("redis-server", &[]).unwrap_or_else(|| {
            panic!(
                "PrivateRedis needs `redis-server` on PATH; install it with \
                 `apt-get install redis-server`"
            )
        });
        PrivateRedis {
            program,
            port: free_port(),
            tls_port: None,
            dir: temp_dir("redis"),
            server: None,
        }
    }

    /// `redis://127.0.0.1:<port>`.
    pub(crate) fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// The server's port.
    pub(crate) fn port(&self) -> u16 {
        self.port
    }

    /// `rediss://localhost:<tls port>` (`localhost`, a name the certificate holds).
    ///
    /// # Panics
    /// When the server was made without [`with_tls`](Self::with_tls).
    pub(crate) fn tls_url(&self) -> String {
        format!("rediss://localhost:{}", self.tls_port())
    }

    /// The server's TLS port.
    ///
    /// # Panics
    /// When the server was made without [`with_tls`](Self::with_tls).
    pub(crate) fn tls_port(&self) -> u16 {
        self.tls_port
            .expect("PrivateRedis::with_tls makes a server with a TLS port")
    }

    /// Starts the server again on its port (after [`stop`](Self::stop)), and waits until
    /// it answers `PING`. Does nothing while it runs.
    ///
    /// # Panics
    /// When it does not answer within 30 s.
    pub(crate) fn start(&mut self) {
        if self.server.is_some() {
            return;
        }
        let log = self.dir.join("redis.log");
        let port = self.port.to_string();
        let dir = self.dir.to_str().expect("a UTF-8 temporary directory");
        let mut cmd = Command::new(&self.program);
        cmd.args([
            "--port",
            &port,
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
        ])
        .args([
            "no",
            "--dir",
            dir,
            "--logfile",
            "redis.log",
            "--daemonize",
            "no",
        ]);
        if let Some(tls_port) = self.tls_port {
            // The files were copied into the server's directory, its working one.
            cmd.args(["--tls-port", &tls_port.to_string()])
                .args([
                    "--tls-cert-file",
                    "server.crt",
                    "--tls-key-file",
                    "server.key",
                ])
                .args(["--tls-ca-cert-file", "ca.crt", "--tls-auth-clients", "no"]);
        }
        let child = cmd
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", self.program.display()));
        self.server = Some(child);
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        let deadline = Instant::now() + START_TIMEOUT;
        while !pong(addr) {
            if let Some(status) = self
                .server
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.server = None;
                panic!(
                    "redis-server on port {port} exited ({status}):\n{}",
                    log_tail(&log)
                );
            }
            if Instant::now() > deadline {
                panic!(
                    "redis-server on port {port} did not answer PING within {START_TIMEOUT:?}:\n{}",
                    log_tail(&log)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the server (SIGKILL, as a crash would) and waits for it to exit; clients'
    /// connections break. Does nothing when it is stopped.
    pub(crate) fn stop(&mut self) {
        if let Some(mut child) = self.server.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Whether a Redis server on `addr` answers `PING`.
fn pong(addr: SocketAddr) -> bool {
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
    let mut reply = [0u8; 7];
    stream.write_all(b"PING\r\n").is_ok()
        && stream.read_exact(&mut reply).is_ok()
        && &reply == b"+PONG\r\n"
}

impl PrivateRedis {
    /// Freezes the server (SIGSTOP): it keeps its port and its clients' connections but
    /// answers nothing, as a hung server or a half-open connection does.
    /// [`resume`](Self::resume) undoes it.
    ///
    /// # Panics
    /// When the server is stopped.
    pub(crate) fn pause(&mut self) {
        self.signal("-STOP");
    }

    /// Lets a [paused](Self::pause) server run again (SIGCONT).
    ///
    /// # Panics
    /// When the server is stopped.
    pub(crate) fn resume(&mut self) {
        self.signal("-CONT");
    }

    fn signal(&self, signal: &str) {
        let server = self.server.as_ref().expect("redis-server is stopped");
        run(
            Command::new("kill").args([signal, &server.id().to_string()]),
            "signalling redis-server",
        );
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.stop();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// A PostgreSQL server of the test's own on a free port of 127.0.0.1, with trust
/// authentication and a database `test`.
pub(crate) struct PrivatePostgres {
    bin: PathBuf,
    /// The user the server runs as when the test runs as root (PostgreSQL refuses root).
    run_as: Option<&'static str>,
    port: u16,
    /// The temporary directory: `data/`, the server's log and its socket.
    dir: PathBuf,
    running: bool,
}

impl PrivatePostgres {
    /// Creates a cluster in a temporary directory (`initdb`), starts it on a free port
    /// and creates the database `test`.
    ///
    /// # Panics
    /// When PostgreSQL's server programs are not installed, when the test runs as root
    /// and there is no user `postgres`, or when the server does not start within 30 s.
    pub(crate) fn new() -> Self {
        Self::create(None)
    }

    /// Creates and starts a cluster as [`new`](Self::new) does, which takes TLS
    /// connections only, with `certs`' server certificate (copied, so `certs` may be
    /// dropped); clients need no certificate of their own. A plaintext connection over
    /// TCP is refused with `no pg_hba.conf entry for host …, no encryption`.
    ///
    /// # Panics
    /// As [`new`](Self::new) does.
    pub(crate) fn with_tls(certs: &TestCerts) -> Self {
        Self::create(Some(certs))
    }

    fn create(tls: Option<&TestCerts>) -> Self {
        let versions = fs::read_dir("/usr/lib/postgresql")
            .map(|dirs| {
                let mut dirs: Vec<PathBuf> = dirs
                    .filter_map(|d| d.ok().map(|d| d.path().join("bin")))
                    .collect();
                // Newest first: "16" before "15", "10" before "9".
                dirs.sort_by_key(|d| {
                    let version = d.parent().and_then(|v| v.file_name());
                    let version = version.and_then(|v| v.to_str()).unwrap_or("");
                    std::cmp::Reverse(version.parse::<u32>().unwrap_or(0))
                });
                dirs
            })
            .unwrap_or_default();
        let initdb = find_program("initdb", &versions).unwrap_or_else(|| {
            panic!(
                "PrivatePostgres needs PostgreSQL's server programs (initdb, pg_ctl, createdb) \
                 on PATH or in /usr/lib/postgresql/<version>/bin; install them with \
                 `apt-get install postgresql`"
            )
        });
        let bin = fs::canonicalize(&initdb)
            .ok()
            .and_then(|p| p.parent().map(Path::to_path_buf))
            .expect("initdb's directory");
        for program in ["pg_ctl", "createdb"] {
            assert!(
                bin.join(program).is_file(),
                "PrivatePostgres needs `{program}` beside {}; install PostgreSQL's server \
                 programs with `apt-get install postgresql`",
                initdb.display()
            );
        }
        let dir = temp_dir("postgres");
        let owner = as_root().then(|| {
            let ids = user_ids("postgres").unwrap_or_else(|| {
                panic!(
                    "PrivatePostgres runs as root here, and PostgreSQL refuses root: it needs \
                     a user `postgres` to run the server as (create it with `useradd \
                     --system postgres`, or install `postgresql`, which does)"
                )
            });
            give_to(&dir, ids);
            ids
        });
        let run_as = owner.map(|_| "postgres");
        let mut pg = PrivatePostgres {
            bin,
            run_as,
            port: free_port(),
            dir,
            running: false,
        };
        run(
            pg.program("initdb").args([
                "--pgdata=data",
                "--username=postgres",
                "--auth=trust",
                "--encoding=UTF8",
                "--no-locale",
                "--no-sync",
            ]),
            "initdb",
        );
        let mut settings = format!(
            "\n# PrivatePostgres\nport = {}\nlisten_addresses = '127.0.0.1'\n\
             unix_socket_directories = '{}'\nfsync = off\nsynchronous_commit = off\n\
             full_page_writes = off\n",
            pg.port,
            pg.dir.display()
        );
        if let Some(certs) = tls {
            let data = pg.dir.join("data");
            for (from, to) in [(certs.cert(), "server.crt"), (certs.key(), "server.key")] {
                let to = data.join(to);
                fs::copy(&from, &to).unwrap_or_else(|e| panic!("copying {}: {e}", from.display()));
                if let Some(ids) = owner {
                    give_to(&to, ids);
                }
            }
            // The server refuses a key that others may read.
            fs::set_permissions(
                data.join("server.key"),
                std::os::unix::fs::PermissionsExt::from_mode(0o600),
            )
            .expect("chmod 600 server.key");
            // Paths relative to the data directory.
            settings
                .push_str("ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n");
            // TCP takes TLS only; the socket stays open to the test's own tools.
            fs::write(
                data.join("pg_hba.conf"),
                "# PrivatePostgres::with_tls\nlocal all all trust\n\
                 hostssl all all 127.0.0.1/32 trust\nhostssl all all ::1/128 trust\n",
            )
            .expect("writing pg_hba.conf");
        }
        fs::OpenOptions::new()
            .append(true)
            .open(pg.dir.join("data/postgresql.conf"))
            .and_then(|mut f| f.write_all(settings.as_bytes()))
            .expect("writing postgresql.conf");
        pg.start();
        run(
            pg.program("createdb").args([
                "--host=127.0.0.1",
                &format!("--port={}", pg.port),
                "--username=postgres",
                "test",
            ]),
            "createdb test",
        );
        pg
    }

    /// `host=127.0.0.1 port=<port> user=postgres dbname=test`, for
    /// `tokio_postgres::connect` and the like.
    pub(crate) fn params(&self) -> String {
        format!(
            "host=127.0.0.1 port={} user=postgres dbname=test",
            self.port
        )
    }

    /// `postgresql://postgres@127.0.0.1:<port>/test`.
    pub(crate) fn url(&self) -> String {
        format!("postgresql://postgres@127.0.0.1:{}/test", self.port)
    }

    /// The server's port.
    pub(crate) fn port(&self) -> u16 {
        self.port
    }

    /// Starts the server (after [`stop`](Self::stop)), keeping the data, and waits until
    /// it accepts connections. Does nothing while it runs.
    ///
    /// # Panics
    /// When it does not start within 30 s.
    pub(crate) fn start(&mut self) {
        if self.running {
            return;
        }
        let timeout = START_TIMEOUT.as_secs().to_string();
        let out = self
            .program("pg_ctl")
            .args(["--pgdata=data", "--log=postgres.log", "--wait", "--timeout"])
            .args([timeout.as_str(), "start"])
            .stdin(Stdio::null())
            .output()
            .expect("running pg_ctl start");
        if !out.status.success() {
            panic!(
                "PostgreSQL on port {} did not start ({}):\n{}{}\n{}",
                self.port,
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                log_tail(&self.dir.join("postgres.log"))
            );
        }
        self.running = true;
    }

    /// Stops the server (`pg_ctl stop -m fast`: open transactions roll back, clients are
    /// disconnected) and waits until it has exited. Does nothing when it is stopped.
    pub(crate) fn stop(&mut self) {
        if !self.running {
            return;
        }
        run(
            self.program("pg_ctl")
                .args(["--pgdata=data", "--wait", "--mode=fast", "stop"]),
            "pg_ctl stop",
        );
        self.running = false;
    }

    /// [`stop`](Self::stop), then [`start`](Self::start).
    pub(crate) fn restart(&mut self) {
        self.stop();
        self.start();
    }

    /// A command running `program` of PostgreSQL's in the temporary directory, as the
    /// server's user.
    fn program(&self, program: &str) -> Command {
        let path = self.bin.join(program);
        let mut cmd = match self.run_as {
            Some(user) => {
                let mut cmd = Command::new("runuser");
                cmd.args(["-u", user, "--"]).arg(path);
                cmd
            }
            None => Command::new(path),
        };
        cmd.current_dir(&self.dir);
        cmd
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        if self.running {
            // Immediate: the data is thrown away next.
            let _ = self
                .program("pg_ctl")
                .args(["--pgdata=data", "--wait", "--mode=immediate", "stop"])
                .stdin(Stdio::null())
                .output();
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Gives `path` to the user and group `ids`.
fn give_to(path: &Path, (uid, gid): (u32, u32)) {
    std::os::unix::fs::chown(path, Some(uid), Some(gid))
        .unwrap_or_else(|e| panic!("giving {} to postgres: {e}", path.display()));
}

/// Whether this process runs as root (`id -u` is 0).
fn as_root() -> bool {
    let out = Command::new("id")
        .arg("-u")
        .output()
        .expect("running `id -u`");
    String::from_utf8_lossy(&out.stdout).trim() == "0"
}

/// `user`'s uid and gid, from `/etc/passwd`.
fn user_ids(user: &str) -> Option<(u32, u32)> {
    let passwd = fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        if fields.len() > 3 && fields[0] == user {
            Some((fields[2].parse().ok()?, fields[3].parse().ok()?))
        } else {
            None
        }
    })
}
