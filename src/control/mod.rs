//! The control thread: `vfio-multifd serve`, the seam between a VMM and the data plane.
//!
//! - **Socket.** `--socket-path PATH` creates a unix socket with mode 0600 and serves one VMM
//!   at a time; `--fd N` takes an inherited unix socket, listening (the same) or already
//!   connected (that VMM only: the helper exits when it leaves). Every connection's peer must
//!   run as the helper's uid or as root (SO_PEERCRED); others, and a second VMM while one is
//!   connected, get one error line and are closed, and the helper keeps serving.
//! - **Protocol.** QMP-style JSON lines ([`schema`]; the reference is
//!   `docs/control-protocol.md`). A command's fds travel with SCM_RIGHTS in the same
//!   `sendmsg` as its line and are named, in order, by its `arguments.fds` ([`lines`]).
//!   Nothing a VMM sends crashes or stalls the helper: malformed JSON, unknown commands, bad
//!   arguments, missing, extra or wrong fds and commands in the wrong state each get an error
//!   reply, and every fd of a refused command is closed.
//! - **Migration.** [`migration`]: the status every command is checked against, the migration
//!   thread that runs a [`crate::session`] over the registered devices, and the events.
//!
//! ```mermaid
//! sequenceDiagram
//!     participant V as VMM (source)
//!     participant S as source helper
//!     participant D as destination helper
//!     participant W as VMM (destination)
//!     W->>D: add-device (data_fd RESUMING) x N, migrate-incoming (sockets)
//!     V->>S: add-device (data_fd PRE_COPY, config) x N, migrate-outgoing (sockets)
//!     S->>D: main: QEVM, setup; multifd: init packets
//!     S-->>V: MIGRATION precopy
//!     D-->>W: MIGRATION precopy
//!     S->>D: main: SECTION_PART precopy data, DEV_INIT_DATA_SENT
//!     D-->>W: INITIAL_DATA_LOADED
//!     D->>S: return path: SWITCHOVER_ACK
//!     S-->>V: SWITCHOVER_ACK
//!     Note over V: stop the VM, devices to STOP_COPY
//!     V->>S: update-device (data_fd, config), switchover-start
//!     S->>D: main: SWITCHOVER_START; multifd: device state
//!     D-->>W: DEVICE_LOADED (config) x N
//!     D->>S: return path: result, SHUT 0
//!     S-->>V: MIGRATION completed
//!     D-->>W: MIGRATION completed
//! ```

pub mod capabilities;
pub mod client;
pub mod lines;
pub mod migration;
mod outbox;
pub mod schema;

use std::collections::HashSet;
use std::io;
use std::net::{TcpListener, ToSocketAddrs};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde_json::{json, Value};
use vfio::{DataDirection, Owner, VfioDevice, VfioError};

use crate::cli::ServeArgs;
use crate::config::{MigrationConfig, MAX_DEVICES};
use crate::error::{error_chain, ConfigError};
use crate::session::link::{DeviceUpdate, PassedChannels, VmmCommand};
use crate::session::stream::Conn;
use crate::wire::{parse_uuid, DeviceId};

use lines::{Line, LineReader, Received};
use migration::{Migration, Plan, Registered, Role, Shared, Status, Transport};
use schema::{
    base64_decode, AddDevice, DeviceMode, ErrorBody, ErrorClass, Greeting, GreetingBody,
    LoadConfigReady, MigrateIncoming, MigrateOutgoing, NoArguments, OnOffAuto, OwnerArg, Query,
    RemoveDevice, Reply, Request, SetLimits, UpdateDevice, MAX_ID_BYTES, PROTOCOL_VERSION,
};

/// How long the control thread sleeps in poll between looks at the migration thread.
const TICK: Duration = Duration::from_millis(100);
/// How long the goodbye to a turned-away connection, or a leaving VMM's last replies, may wait
/// for it to read.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// Where the control socket comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// Create it (mode 0600) at this path.
    Path(PathBuf),
    /// An inherited unix socket, listening or connected.
    Fd(RawFd),
}

/// `serve`, validated.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub endpoint: Option<Endpoint>,
    pub print_capabilities: bool,
    /// Engine, chunk, pool, workers, forbidden io_uring features and the step timeout; a
    /// migration's channel count and uuid come from the VMM.
    pub base: MigrationConfig,
}

impl TryFrom<&ServeArgs> for ServeConfig {
    type Error = ConfigError;

    fn try_from(args: &ServeArgs) -> Result<Self, ConfigError> {
        // The engine settings are checked by the same code as `demo`'s (through clap, so new
        // migration flags keep their defaults here).
        #[derive(clap::Parser)]
        struct Engine {
            #[command(flatten)]
            migration: crate::cli::MigrationArgs,
        }
        let mut argv = vec![
            "serve".to_string(),
            "--chunk".into(),
            args.chunk.clone(),
            "--engine".into(),
            args.engine.name().into(),
            "--pool-buffers".into(),
            args.pool_buffers.clone(),
            "--timeout".into(),
            args.timeout.clone(),
        ];
        if let Some(workers) = &args.workers {
            argv.extend(["--workers".into(), workers.clone()]);
        }
        if let Some(forbid) = &args.forbid {
            argv.extend(["--forbid".into(), forbid.clone()]);
        }
        let migration_args = <Engine as clap::Parser>::try_parse_from(&argv)
            .map_err(|e| ConfigError::Invalid {
                flag: "chunk",
                value: argv.join(" "),
                why: e.to_string(),
            })?
            .migration;
        let base = MigrationConfig::from_args(
            &migration_args,
            std::env::var(crate::config::FORBID_ENV).ok(),
        )?;
        let endpoint = match (&args.socket_path, args.fd) {
            (Some(path), None) => Some(Endpoint::Path(path.clone())),
            (None, Some(fd)) if fd >= 0 => Some(Endpoint::Fd(fd)),
            (None, Some(fd)) => {
                return Err(ConfigError::Invalid {
                    flag: "fd",
                    value: fd.to_string(),
                    why: "a descriptor number is 0 or more".into(),
                })
            }
            (None, None) if args.print_capabilities => None,
            (None, None) => {
                return Err(ConfigError::Invalid {
                    flag: "socket-path",
                    value: String::new(),
                    why: "serve needs --socket-path PATH or --fd N".into(),
                })
            }
            (Some(_), Some(_)) => {
                return Err(ConfigError::Invalid {
                    flag: "fd",
                    value: String::new(),
                    why: "--socket-path and --fd exclude each other".into(),
                })
            }
        };
        Ok(Self {
            endpoint,
            print_capabilities: args.print_capabilities,
            base,
        })
    }
}

/// Setting up or running the control socket.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("the control socket path {path} exists and is not a socket")]
    NotASocket { path: PathBuf },
    #[error("another helper is serving on {path}")]
    Serving { path: PathBuf },
    #[error("checking whether a helper still serves the control socket {path}")]
    Probe {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "the control socket path {path} is {len} bytes; a unix socket path holds at most {} bytes (sun_path is {SUN_PATH} with the NUL)",
        SUN_PATH - 1
    )]
    PathTooLong { path: PathBuf, len: usize },
    #[error("removing the stale control socket {path}")]
    RemoveStale {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("creating the control socket {path}")]
    Bind {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("setting mode 0600 on the control socket {path}")]
    Chmod {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("adopting --fd {fd} as the control socket")]
    Adopt {
        fd: RawFd,
        #[source]
        source: VfioError,
    },
    #[error("adopting --fd {fd} as the control connection")]
    AdoptStream {
        fd: RawFd,
        #[source]
        source: io::Error,
    },
    #[error("--fd {fd} is a TCP socket; the control socket must be a unix socket (SCM_RIGHTS)")]
    NotUnix { fd: RawFd },
    #[error("waiting on the control socket")]
    Poll {
        #[source]
        source: io::Error,
    },
    #[error("starting the {what} thread")]
    Thread {
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("the control thread panicked")]
    Panicked,
}

/// `serve --print-capabilities`: one JSON object on stdout.
pub fn print_capabilities(config: &ServeConfig) {
    println!("{}", capabilities::capabilities(&config.base));
}

/// Runs the control thread until `quit`, or (with a connected `--fd`) until the VMM leaves.
pub fn serve(config: &ServeConfig) -> Result<(), ControlError> {
    let Some(endpoint) = config.endpoint.clone() else {
        print_capabilities(config);
        return Ok(());
    };
    let base = config.base.clone();
    let handle = std::thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            let mut server = Server::open(&endpoint, base)?;
            let result = server.serve();
            server.shutdown();
            result
        })
        .map_err(|source| ControlError::Thread {
            what: "control",
            source,
        })?;
    handle.join().map_err(|_| ControlError::Panicked)?
}

/// The socket path, removed when the server ends unless it is no longer this helper's socket
/// (a later helper took the path over after this one's was deleted): that one must keep it.
struct SocketFile {
    path: PathBuf,
    /// Device and inode of the socket this helper bound.
    inode: (u64, u64),
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        match std::fs::symlink_metadata(&self.path) {
            Ok(meta) if (meta.dev(), meta.ino()) == self.inode => {
                if let Err(e) = std::fs::remove_file(&self.path) {
                    log::debug!("removing {}: {e}", self.path.display());
                }
            }
            Ok(_) => log::info!(
                "{} is no longer this helper's socket; left in place",
                self.path.display()
            ),
            Err(e) => log::debug!("{}: {e}", self.path.display()),
        }
    }
}

/// One connected VMM.
struct Connection {
    stream: UnixStream,
    reader: LineReader,
    /// False once the VMM closed its side: its last lines are answered, then it is gone.
    open: bool,
    /// The last recvmsg in which a line that names fds came without any.
    fds_missing_in: Option<u64>,
}

struct Server {
    base: MigrationConfig,
    listener: Option<UnixListener>,
    _file: Option<SocketFile>,
    conn: Option<Connection>,
    /// `--fd` was a connected socket: serve it only.
    single: bool,
    shared: Arc<Shared>,
    registry: Vec<Registered>,
    /// The queued-bytes limit a device added without its own gets: what `set-limits` without
    /// a device said last (unlimited before).
    default_limit: u64,
    migration: Option<Migration>,
    quit: bool,
}

/// An error reply's class and text.
struct Refusal {
    class: ErrorClass,
    desc: String,
}

impl Refusal {
    fn new(desc: impl Into<String>) -> Self {
        Self {
            class: ErrorClass::GenericError,
            desc: desc.into(),
        }
    }
}

type Outcome = Result<Value, Refusal>;

/// A migrate command's checked settings and the devices it moves.
struct Prepared {
    role: Role,
    devices: Vec<Registered>,
    channels: u8,
    uuid: [u8; 16],
    timeout: Duration,
    /// Devices left to the VMM's own main channel (multifd-transfer off, or auto and
    /// unsupported).
    not_moved: Vec<String>,
}

/// The size of sun_path, the terminating NUL included.
const SUN_PATH: usize = 108;

fn bind(path: &Path) -> Result<(UnixListener, SocketFile), ControlError> {
    let len = path.as_os_str().len();
    if len >= SUN_PATH {
        return Err(ControlError::PathTooLong {
            path: path.into(),
            len,
        });
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            let live = served(path).map_err(|source| ControlError::Probe {
                path: path.into(),
                source,
            })?;
            if live {
                return Err(ControlError::Serving { path: path.into() });
            }
            match std::fs::remove_file(path) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => {
                    return Err(ControlError::RemoveStale {
                        path: path.into(),
                        source: e,
                    })
                }
                _ => {}
            }
        }
        Ok(_) => return Err(ControlError::NotASocket { path: path.into() }),
        Err(_) => {}
    }
    // Bound and made 0600 under a temporary name, then linked into place: the path appears
    // only once it is listening with its final mode, so a VMM that waits for it to exist can
    // connect at once, and nobody else ever sees a looser socket. A link, unlike a rename,
    // fails if a helper started at the same time placed its socket first.
    let (listener, staging) = bind_staging(path)?;
    let placed = std::fs::set_permissions(&staging, std::fs::Permissions::from_mode(0o600))
        .map_err(|source| ControlError::Chmod {
            path: staging.clone(),
            source,
        })
        .and_then(|()| {
            let meta =
                std::fs::symlink_metadata(&staging).map_err(|source| ControlError::Bind {
                    path: staging.clone(),
                    source,
                })?;
            std::fs::hard_link(&staging, path).map_err(|source| ControlError::Bind {
                path: path.into(),
                source,
            })?;
            Ok((meta.dev(), meta.ino()))
        });
    let _ = std::fs::remove_file(&staging);
    let file = SocketFile {
        path: path.into(),
        inode: placed?,
    };
    Ok((listener, file))
}

/// Whether something listens on the socket at `path`: only a refused connection (or no
/// socket any more) says nobody does. Non-blocking, so that a listener that does not accept
/// cannot stall this start (a full backlog answers EAGAIN: someone listens).
fn served(path: &Path) -> io::Result<bool> {
    use nix::errno::Errno;
    use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, UnixAddr};
    let probe = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    match connect(probe.as_raw_fd(), &UnixAddr::new(path)?) {
        Ok(()) | Err(Errno::EAGAIN | Errno::EINPROGRESS) => Ok(true),
        Err(Errno::ECONNREFUSED | Errno::ENOENT) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// Binds a socket beside `path` under a short name that fits sun_path whenever `path` does
/// (`PATH.PID.tmp` would not when `path` nearly fills it). Names taken by others are skipped,
/// never removed.
fn bind_staging(path: &Path) -> Result<(UnixListener, PathBuf), ControlError> {
    let name_len = path.file_name().map_or(0, |n| n.len());
    let room = SUN_PATH - 1 - (path.as_os_str().len() - name_len);
    let pid = std::process::id();
    let mut attempt = 0u32;
    loop {
        let mut name = format!(".{attempt:x}{pid:x}");
        name.truncate(room);
        let staging = path.with_file_name(name);
        match UnixListener::bind(&staging) {
            Ok(listener) => return Ok((listener, staging)),
            Err(e) if e.kind() == io::ErrorKind::AddrInUse && attempt < 15 => attempt += 1,
            Err(source) => {
                return Err(ControlError::Bind {
                    path: staging,
                    source,
                })
            }
        }
    }
}

/// The peer must run as this helper's uid or as root.
fn check_peer(stream: &UnixStream) -> Result<(), String> {
    let cred = nix::sys::socket::getsockopt(stream, nix::sys::socket::sockopt::PeerCredentials)
        .map_err(|e| format!("reading the peer's credentials (SO_PEERCRED): {e}"))?;
    let me = nix::unistd::geteuid().as_raw();
    if cred.uid() == me || cred.uid() == 0 {
        Ok(())
    } else {
        Err(format!(
            "peer uid {} (pid {}) is neither this helper's uid {me} nor root",
            cred.uid(),
            cred.pid()
        ))
    }
}

/// Sends one error line to a connection that will not be served, then closes it.
fn turn_away(stream: UnixStream, desc: &str) {
    log::warn!("control socket: refusing a connection: {desc}");
    let _ = stream.set_write_timeout(Some(WRITE_TIMEOUT));
    let reply = Reply::Error {
        error: ErrorBody {
            class: ErrorClass::GenericError,
            desc: desc.into(),
        },
        id: None,
    };
    if let Ok(text) = serde_json::to_string(&reply) {
        let _ = lines::write_line(&stream, &text);
    }
}

impl Server {
    fn open(endpoint: &Endpoint, base: MigrationConfig) -> Result<Server, ControlError> {
        let mut server = Server {
            default_limit: base.engine_config.max_queued_bytes,
            base,
            listener: None,
            _file: None,
            conn: None,
            single: false,
            shared: Shared::new(),
            registry: Vec::new(),
            migration: None,
            quit: false,
        };
        match endpoint {
            Endpoint::Path(path) => {
                let (listener, file) = bind(path)?;
                server.listener = Some(listener);
                server._file = Some(file);
                log::info!("control socket {}", path.display());
            }
            Endpoint::Fd(fd) => match vfio::fd::adopt_unix_listener(*fd) {
                Ok(owned) => server.listener = Some(UnixListener::from(owned)),
                Err(VfioError::BadFd { .. }) => {
                    let owned = vfio::fd::adopt_stream_socket(*fd)
                        .map_err(|source| ControlError::Adopt { fd: *fd, source })?;
                    let stream = Conn::from_fd(owned)
                        .map_err(|source| ControlError::AdoptStream { fd: *fd, source })?;
                    let Conn::Unix(stream) = stream else {
                        return Err(ControlError::NotUnix { fd: *fd });
                    };
                    server.single = true;
                    server.welcome(stream);
                }
                Err(source) => return Err(ControlError::Adopt { fd: *fd, source }),
            },
        }
        Ok(server)
    }

    /// A new connection: credentials, one VMM at a time, greeting.
    fn welcome(&mut self, stream: UnixStream) {
        if let Err(why) = check_peer(&stream) {
            return turn_away(stream, &why);
        }
        if self.conn.is_some() {
            return turn_away(
                stream,
                "another VMM is connected: this helper serves one VMM at a time",
            );
        }
        // An inherited fd may be non-blocking; the outbox's writer blocks until the VMM reads.
        if let Err(e) = stream
            .set_nonblocking(false)
            .and_then(|()| stream.try_clone())
            .and_then(|writer| self.shared.events.attach(writer))
        {
            return turn_away(stream, &format!("setting the connection up: {e}"));
        }
        let greeting = Greeting {
            vfio_multifd: GreetingBody {
                version: env!("CARGO_PKG_VERSION").into(),
                protocol: PROTOCOL_VERSION,
            },
        };
        match serde_json::to_value(&greeting) {
            Ok(value) => self.shared.events.reply(&Reply::Return {
                ret: value,
                id: None,
            }),
            Err(e) => log::error!("encoding the greeting: {e}"),
        }
        log::info!("a VMM connected");
        self.conn = Some(Connection {
            stream,
            reader: LineReader::new(),
            open: true,
            fds_missing_in: None,
        });
    }

    fn serve(&mut self) -> Result<(), ControlError> {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        while !self.quit {
            let (listener_ready, conn_ready) = {
                let mut fds = Vec::with_capacity(2);
                if let Some(listener) = &self.listener {
                    fds.push(PollFd::new(listener.as_fd(), PollFlags::POLLIN));
                }
                // Backpressure: nothing more is read while earlier lines wait for an answer or
                // answers wait for the VMM to read them; the next tick looks again.
                let conn = self.conn.as_ref().filter(|conn| {
                    conn.open
                        && !conn.reader.has_ready()
                        && self.shared.events.backlog() < outbox::BACKLOG_LIMIT
                });
                if let Some(conn) = conn {
                    fds.push(PollFd::new(conn.stream.as_fd(), PollFlags::POLLIN));
                }
                match poll(&mut fds, PollTimeout::from(TICK.as_millis() as u16)) {
                    Ok(_) => {}
                    Err(nix::errno::Errno::EINTR) => continue,
                    Err(e) => {
                        return Err(ControlError::Poll {
                            source: io::Error::from(e),
                        })
                    }
                }
                let ready = |fd: &PollFd<'_>| fd.revents().is_some_and(|r| !r.is_empty());
                let mut it = fds.iter();
                let listener_ready = self.listener.is_some() && it.next().is_some_and(ready);
                let conn_ready = conn.is_some() && it.next().is_some_and(ready);
                (listener_ready, conn_ready)
            };
            // The connected VMM first: if it just left, the next one is welcome.
            if conn_ready {
                self.read_commands();
            }
            self.answer_commands();
            if self.conn.is_some() && !self.shared.events.attached() {
                // Replies and events no longer reach it: treat it as gone.
                self.vmm_gone();
            }
            if listener_ready && !self.quit {
                if let Some(listener) = &self.listener {
                    match listener.accept() {
                        Ok((stream, _)) => self.welcome(stream),
                        Err(e) => log::warn!("accepting on the control socket: {e}"),
                    }
                }
            }
            self.reap();
            if self.single && self.conn.is_none() {
                break;
            }
        }
        Ok(())
    }

    /// Reads what the VMM sent once.
    fn read_commands(&mut self) {
        let Some(conn) = self.conn.as_mut() else {
            return;
        };
        match conn.reader.fill(conn.stream.as_fd()) {
            Ok(open) => conn.open = open,
            Err(e) => {
                log::warn!("reading the control socket: {e}");
                conn.open = false;
            }
        }
    }

    /// Answers complete lines in order while the VMM keeps up with reading the answers.
    fn answer_commands(&mut self) {
        loop {
            let Some(conn) = self.conn.as_mut() else {
                return;
            };
            if self.shared.events.backlog() >= outbox::BACKLOG_LIMIT {
                return;
            }
            let Some(line) = conn.reader.next_line() else {
                if !conn.open {
                    self.vmm_gone();
                }
                return;
            };
            let reply = match line {
                Line::TooLong => Reply::Error {
                    error: ErrorBody {
                        class: ErrorClass::GenericError,
                        desc: format!(
                            "a command line is longer than {} bytes; it was dropped with its fds",
                            lines::MAX_LINE
                        ),
                    },
                    id: None,
                },
                Line::Text(line) => self.handle(line),
            };
            self.shared.events.reply(&reply);
            if self.quit {
                return;
            }
        }
    }

    /// The VMM closed its connection: an unfinished migration is cancelled (no one is left to
    /// drive it), registered devices are let go.
    fn vmm_gone(&mut self) {
        log::info!("the VMM disconnected");
        self.conn = None;
        self.shared.events.detach();
        if let Some(migration) = self.migration.as_mut() {
            if !self.shared.lock().status.idle() {
                log::warn!("the VMM left during a migration: cancelling it");
                migration.cancel();
                migration.join(migration.cancel_grace);
            }
        }
        self.registry.clear();
    }

    /// Joins a migration thread that ended.
    fn reap(&mut self) {
        if self.migration.as_ref().is_some_and(|m| m.finished()) {
            if let Some(mut migration) = self.migration.take() {
                migration.join(Duration::ZERO);
            }
        }
    }

    /// `quit`, the single VMM leaving, or an error: cancel and let go of everything.
    fn shutdown(&mut self) {
        if let Some(migration) = self.migration.as_mut() {
            if !migration.finished() {
                migration.cancel();
            }
            if !migration.join(migration.cancel_grace) {
                log::error!(
                    "the migration thread did not stop within {:?}",
                    migration.cancel_grace
                );
            }
        }
        self.migration = None;
        self.registry.clear();
        self.shared.events.flush_and_detach(WRITE_TIMEOUT);
        self.conn = None;
    }

    /// One command line: parsed, checked, executed. Every fd that came with it is either taken
    /// by the command or closed when this returns.
    fn handle(&mut self, line: Received) -> Reply {
        let value: Value = match serde_json::from_slice(&line.text) {
            Ok(value) => value,
            Err(e) => {
                return error_reply(Refusal::new(format!("malformed JSON: {e}")), None);
            }
        };
        let id = value.get("id").cloned();
        let names_fds = value
            .get("arguments")
            .and_then(|a| a.get("fds"))
            .and_then(Value::as_array)
            .is_some_and(|names| !names.is_empty());
        let fds_missing_in = self.conn.as_mut().and_then(|conn| {
            if names_fds && line.fds.is_empty() {
                conn.fds_missing_in = Some(line.end_read);
            }
            conn.fds_missing_in
        });
        if line.fds_dropped {
            return error_reply(
                Refusal::new(format!(
                    "more than {} fds came with this line, or the helper's fd table is full: \
                     they were closed",
                    lines::MAX_FDS
                )),
                id,
            );
        }
        if line.fds_read.is_some() && line.fds_read == fds_missing_in {
            // A read's fds go to the last line they came with (`lines`): these were sent for
            // the earlier line of that read that names fds and got none, not for this one.
            return error_reply(
                Refusal::new(
                    "these fds came in one message with an earlier line that names fds: send \
                     each command that carries fds in a sendmsg of its own (they were closed)",
                ),
                id,
            );
        }
        let fds = line.fds;
        let request: Request = match serde_json::from_value(value) {
            Ok(request) => request,
            Err(e) => {
                return error_reply(
                    Refusal::new(format!(
                        "not a command (expected {{\"execute\", \"arguments\", \"id\"}}): {e}"
                    )),
                    id,
                )
            }
        };
        log::debug!("command {}", request.execute);
        let arguments = request.arguments.unwrap_or_else(|| json!({}));
        let outcome = self.dispatch(&request.execute, arguments, fds);
        match outcome {
            Ok(ret) => Reply::Return { ret, id },
            Err(refusal) => {
                log::info!("{}: refused: {}", request.execute, refusal.desc);
                error_reply(refusal, id)
            }
        }
    }

    fn dispatch(&mut self, command: &str, arguments: Value, fds: Vec<OwnedFd>) -> Outcome {
        match command {
            "query-capabilities" => {
                no_fds(fds)?;
                args::<NoArguments>(command, arguments)?;
                Ok(capabilities::capabilities(&self.base))
            }
            "add-device" => self.add_device(args(command, arguments)?, fds),
            "update-device" => self.update_device(args(command, arguments)?, fds),
            "remove-device" => {
                no_fds(fds)?;
                self.remove_device(args(command, arguments)?)
            }
            "set-limits" => {
                no_fds(fds)?;
                self.set_limits(args(command, arguments)?)
            }
            "migrate-outgoing" => self.migrate_outgoing(args(command, arguments)?, fds),
            "migrate-incoming" => self.migrate_incoming(args(command, arguments)?, fds),
            "switchover-start" => {
                no_fds(fds)?;
                args::<NoArguments>(command, arguments)?;
                self.switchover_start()
            }
            "load-config-ready" => {
                no_fds(fds)?;
                self.load_config_ready(args(command, arguments)?)
            }
            "query" => {
                no_fds(fds)?;
                let q: Query = args(command, arguments)?;
                Ok(migration::query(&self.shared.lock(), q.timestamps))
            }
            "cancel" => {
                no_fds(fds)?;
                args::<NoArguments>(command, arguments)?;
                self.cancel()
            }
            "quit" => {
                no_fds(fds)?;
                args::<NoArguments>(command, arguments)?;
                self.quit = true;
                Ok(json!({}))
            }
            other => Err(Refusal {
                class: ErrorClass::CommandNotFound,
                desc: format!("the command {other:?} has not been found"),
            }),
        }
    }

    fn status(&self) -> Status {
        self.shared.lock().status
    }

    /// Commands that set a migration up need no migration running.
    fn require_idle(&mut self, command: &str) -> Result<(), Refusal> {
        self.reap();
        let status = self.status();
        if !status.idle() {
            return Err(Refusal::new(format!(
                "{command}: a migration is in progress (status {})",
                status.name()
            )));
        }
        Ok(())
    }

    fn find_registered(&self, handle: &str) -> Result<usize, Refusal> {
        self.registry
            .iter()
            .position(|d| d.handle == handle)
            .ok_or_else(|| Refusal {
                class: ErrorClass::DeviceNotFound,
                desc: format!("no registered device {handle:?}"),
            })
    }

    fn add_device(&mut self, a: AddDevice, fds: Vec<OwnedFd>) -> Outcome {
        let mut fds = named_fds(&a.fds, fds, &["device", "data-fd"])?;
        self.require_idle("add-device")?;
        if self.registry.len() >= MAX_DEVICES as usize {
            return Err(Refusal::new(format!(
                "add-device: at most {MAX_DEVICES} devices per migration"
            )));
        }
        let id = DeviceId::new(a.idstr.clone(), a.instance_id).map_err(|e| {
            Refusal::new(format!(
                "add-device: idstr {:?}: {}",
                a.idstr,
                error_chain(&e)
            ))
        })?;
        let handle = a.id.clone().unwrap_or_else(|| id.to_string());
        if handle.is_empty() {
            return Err(Refusal::new("add-device: id must not be empty"));
        }
        if a.id.as_ref().is_some_and(|id| id.len() > MAX_ID_BYTES) {
            return Err(Refusal::new(format!(
                "add-device: id is {} bytes, above the {MAX_ID_BYTES}-byte limit",
                handle.len()
            )));
        }
        if self.registry.iter().any(|d| d.handle == handle) {
            return Err(Refusal::new(format!(
                "add-device: a device {handle:?} is already registered"
            )));
        }
        if self.registry.iter().any(|d| d.id == id) {
            return Err(Refusal::new(format!(
                "add-device: idstr {} instance {} is already registered",
                id.idstr, id.instance_id
            )));
        }
        let config = self.decode_config("add-device", &handle, a.config.as_deref())?;
        let (device, data_fd) = match a.mode {
            DeviceMode::Device => {
                let fd = fds.remove("device").ok_or_else(|| {
                    Refusal::new(
                        "add-device: mode device needs the VFIO device fd, named \"device\" in fds",
                    )
                })?;
                if !fds.is_empty() {
                    return Err(Refusal::new(
                        "add-device: mode device takes only the fd \"device\"",
                    ));
                }
                vfio::fd::check_device_fd(fd.as_fd()).map_err(|e| {
                    Refusal::new(format!("add-device {handle}: {}", error_chain(&e)))
                })?;
                let owner = match a.owner.unwrap_or_default() {
                    OwnerArg::Helper => Owner::Helper,
                    OwnerArg::Vmm => Owner::Vmm,
                };
                let device = VfioDevice::from_fd(handle.clone(), fd, owner).map_err(|e| {
                    Refusal::new(format!(
                        "add-device {handle}: not a VFIO device with migration support: {}",
                        error_chain(&e)
                    ))
                })?;
                if a.precopy {
                    use vfio::MigrationDevice;
                    let flags = device.migration_flags().map_err(|e| {
                        Refusal::new(format!("add-device {handle}: {}", error_chain(&e)))
                    })?;
                    if !flags.contains(vfio::MigrationFlags::PRE_COPY) {
                        return Err(Refusal::new(format!(
                            "add-device {handle}: precopy asked, but the device has no PRE_COPY (migration flags {flags})"
                        )));
                    }
                }
                (Some(device), None)
            }
            DeviceMode::DataFd => {
                if a.owner.is_some() {
                    return Err(Refusal::new(
                        "add-device: owner is for mode device (a data_fd device is the VMM's)",
                    ));
                }
                if fds.contains_key("device") {
                    return Err(Refusal::new(
                        "add-device: mode data-fd takes the fd \"data-fd\", not \"device\"",
                    ));
                }
                let fd = fds.remove("data-fd");
                if let Some(fd) = &fd {
                    check_either_direction(&format!("add-device {handle}"), fd)?;
                }
                (None, fd)
            }
        };
        let load_config_after_iter = match a.load_config_after_iter {
            OnOffAuto::On => true,
            // QEMU's AUTO is on for ARM targets only; the VMM knows its target and says on.
            OnOffAuto::Off | OnOffAuto::Auto => false,
        };
        self.registry.push(Registered {
            handle: handle.clone(),
            id,
            mode: a.mode,
            device,
            data_fd,
            precopy: a.precopy,
            config,
            multifd_transfer: a.multifd_transfer,
            load_config_after_iter,
            max_queued: a
                .max_queued_buffers_size
                .map_or(self.default_limit, |l| l.bytes()),
        });
        Ok(json!({ "device": handle }))
    }

    /// A command's `config`: base64, and no larger than the one packet that carries it.
    fn decode_config(
        &self,
        command: &str,
        device: &str,
        text: Option<&str>,
    ) -> Result<Option<Vec<u8>>, Refusal> {
        let Some(text) = text else { return Ok(None) };
        let config = base64_decode(text).ok_or_else(|| {
            Refusal::new(format!(
                "{command}: config is not base64 (RFC 4648, standard alphabet)"
            ))
        })?;
        let chunk = self.base.chunk();
        if config.len() > chunk {
            return Err(Refusal::new(format!(
                "{command} {device}: config of {} bytes is more than one packet may carry (the chunk, {chunk} bytes)",
                config.len()
            )));
        }
        Ok(Some(config))
    }

    fn update_device(&mut self, a: UpdateDevice, fds: Vec<OwnedFd>) -> Outcome {
        let mut fds = named_fds(&a.fds, fds, &["data-fd"])?;
        let config = self.decode_config("update-device", &a.device, a.config.as_deref())?;
        let data_fd = fds.remove("data-fd");
        if config.is_none() && data_fd.is_none() {
            return Err(Refusal::new(
                "update-device: nothing to update (config, or the fd \"data-fd\")",
            ));
        }
        self.reap();
        let status = self.status();
        if status.idle() {
            let i = self.find_registered(&a.device)?;
            let entry = &mut self.registry[i];
            if data_fd.is_some() && entry.mode != DeviceMode::DataFd {
                return Err(Refusal::new(format!(
                    "update-device {}: a data_fd is for mode data-fd devices",
                    a.device
                )));
            }
            if let Some(fd) = &data_fd {
                check_either_direction(&a.device, fd)?;
            }
            if config.is_some() {
                entry.config = config;
            }
            if data_fd.is_some() {
                entry.data_fd = data_fd;
            }
            return Ok(json!({}));
        }
        let role = self.shared.lock().role;
        let switching = self.migration.as_ref().is_some_and(|m| m.switchover_sent);
        if role != Some(Role::Source)
            || !matches!(status, Status::Setup | Status::Precopy)
            || switching
        {
            return Err(Refusal::new(format!(
                "update-device: only before migrate-* or, on the source, before switchover-start (status {})",
                status.name()
            )));
        }
        let index = {
            let mut inner = self.shared.lock();
            let Some(index) = inner.devices.iter().position(|d| d.handle == a.device) else {
                return Err(Refusal {
                    class: ErrorClass::DeviceNotFound,
                    desc: format!("no device {:?} in this migration", a.device),
                });
            };
            let view = &mut inner.devices[index];
            if data_fd.is_some() && view.mode != DeviceMode::DataFd {
                return Err(Refusal::new(format!(
                    "update-device {}: a data_fd is for mode data-fd devices",
                    a.device
                )));
            }
            if let Some(fd) = &data_fd {
                vfio::fd::check_data_fd(fd.as_fd(), DataDirection::Save).map_err(|e| {
                    Refusal::new(format!("update-device {}: {}", a.device, error_chain(&e)))
                })?;
                view.has_data_fd = true;
            }
            if config.is_some() {
                view.has_config = true;
            }
            index
        };
        if self.migration.is_some() {
            let mut inner = self.shared.lock();
            if inner.status.idle() {
                return Err(Refusal::new(format!(
                    "update-device {}: the migration has ended",
                    a.device
                )));
            }
            // A later update for the same device replaces what it replaces.
            if let Some(old) = inner.pending_updates.iter_mut().find(|u| u.device == index) {
                if config.is_some() {
                    old.config = config;
                }
                if data_fd.is_some() {
                    old.data_fd = data_fd;
                }
            } else {
                inner.pending_updates.push(DeviceUpdate {
                    device: index,
                    config,
                    data_fd,
                });
            }
        }
        Ok(json!({}))
    }

    fn remove_device(&mut self, a: RemoveDevice) -> Outcome {
        self.require_idle("remove-device")?;
        let i = self.find_registered(&a.device)?;
        self.registry.remove(i);
        Ok(json!({}))
    }

    fn set_limits(&mut self, a: SetLimits) -> Outcome {
        self.require_idle("set-limits")?;
        let bytes = a.max_queued_buffers_size.bytes();
        match &a.device {
            Some(handle) => {
                let i = self.find_registered(handle)?;
                self.registry[i].max_queued = bytes;
            }
            None => {
                self.default_limit = bytes;
                for d in &mut self.registry {
                    d.max_queued = bytes;
                }
            }
        }
        Ok(json!({ "max-queued-buffers-size": limit_value(bytes) }))
    }

    /// Checks shared by both migrate commands; returns the devices to move and the engine
    /// settings. Devices that do not use multifd transfer are listed and let go.
    fn prepare(
        &mut self,
        command: &str,
        role: Role,
        channels: u8,
        uuid: &Option<String>,
        timeout: Option<u64>,
        unsupported: Option<String>,
    ) -> Result<Prepared, Refusal> {
        self.require_idle(command)?;
        if channels == 0 {
            return Err(Refusal::new(format!(
                "{command}: channels must be 1 to 255"
            )));
        }
        let uuid = match uuid {
            Some(text) => parse_uuid(text).ok_or_else(|| {
                Refusal::new(format!(
                    "{command}: uuid {text:?} is not 8-4-4-4-12 hex digits"
                ))
            })?,
            None => [0; 16],
        };
        let timeout = match timeout {
            Some(0) | Some(3601..) => {
                return Err(Refusal::new(format!(
                    "{command}: timeout must be 1 to 3600 seconds"
                )))
            }
            Some(secs) => Duration::from_secs(secs),
            None => self.base.timeout,
        };
        if self.registry.is_empty() {
            return Err(Refusal::new(format!(
                "{command}: no devices registered (add-device first)"
            )));
        }
        // QEMU: ON when unsupported fails setup; AUTO follows support; OFF leaves the device
        // to the VMM's own main channel.
        for d in &self.registry {
            if d.multifd_transfer == OnOffAuto::On {
                if let Some(why) = &unsupported {
                    return Err(Refusal::new(format!(
                        "{}: Multifd device transfer requested but unsupported in the current config ({why})",
                        d.handle
                    )));
                }
            }
        }
        let (moved, skipped): (Vec<Registered>, Vec<Registered>) =
            std::mem::take(&mut self.registry)
                .into_iter()
                .partition(|d| match d.multifd_transfer {
                    OnOffAuto::On => true,
                    OnOffAuto::Auto => unsupported.is_none(),
                    OnOffAuto::Off => false,
                });
        let not_moved: Vec<String> = skipped.iter().map(|d| d.handle.clone()).collect();
        if moved.is_empty() {
            self.registry = skipped;
            return Err(Refusal::new(format!(
                "{command}: no device uses multifd transfer{}",
                unsupported.map(|w| format!(" ({w})")).unwrap_or_default()
            )));
        }
        // From here on a refusal gives the devices back to the registry.
        let check = || -> Result<(), Refusal> {
            for d in &moved {
                if let Some(fd) = &d.data_fd {
                    let direction = match role {
                        Role::Source => DataDirection::Save,
                        Role::Destination => DataDirection::Resume,
                    };
                    vfio::fd::check_data_fd(fd.as_fd(), direction).map_err(|e| {
                        Refusal::new(format!(
                            "{command}: device {}: {}",
                            d.handle,
                            error_chain(&e)
                        ))
                    })?;
                }
                match role {
                    Role::Source => {
                        if d.precopy && d.mode == DeviceMode::DataFd && d.data_fd.is_none() {
                            return Err(Refusal::new(format!(
                                "{command}: device {} is precopy but no data_fd in PRE_COPY was handed over",
                                d.handle
                            )));
                        }
                    }
                    Role::Destination => {
                        if d.mode == DeviceMode::DataFd && d.data_fd.is_none() {
                            return Err(Refusal::new(format!(
                                "{command}: device {} needs its resuming data_fd (add-device fds [\"data-fd\"])",
                                d.handle
                            )));
                        }
                    }
                }
            }
            Ok(())
        };
        if let Err(refusal) = check() {
            self.registry = moved.into_iter().chain(skipped).collect();
            return Err(refusal);
        }
        drop(skipped);
        Ok(Prepared {
            role,
            devices: moved,
            channels,
            uuid,
            timeout,
            not_moved,
        })
    }

    fn engine_for(&self, transport: &Transport) -> (Arc<dyn crate::engine::Engine>, Vec<String>) {
        let mut config = self.base.clone();
        let mut notes = Vec::new();
        let unix = matches!(transport, Transport::Passed(p) if matches!(p.main, Conn::Unix(_)));
        if unix && !config.engine_config.forbid.contains(uring::Feature::SendZc) {
            // AF_UNIX has no zero-copy send: plain sends from the start.
            config.engine_config.forbid = config.engine_config.forbid.with(uring::Feature::SendZc);
            notes.push(
                "send-zc: not used on unix-socket channels (AF_UNIX has no zero-copy send)".into(),
            );
        }
        let (engine, more) = crate::demo::make_engine(&config);
        notes.extend(more);
        (engine, notes)
    }

    fn launch(&mut self, prepared: Prepared, transport: Transport) -> Outcome {
        let Prepared {
            role,
            devices,
            channels,
            uuid,
            timeout,
            not_moved,
        } = prepared;
        let (engine, notes) = self.engine_for(&transport);
        let plan = Plan {
            role,
            devices,
            channels,
            uuid,
            chunk: self.base.chunk(),
            timeout,
            transport,
            engine: engine.clone(),
        };
        let migration = migration::start(plan, &self.shared)
            .map_err(|e| Refusal::new(format!("starting the migration thread: {e}")))?;
        {
            let mut inner = self.shared.lock();
            inner.notes.extend(notes);
            inner.not_moved = not_moved.clone();
        }
        self.migration = Some(migration);
        Ok(json!({ "engine": engine.kind().name(), "not-moved": not_moved }))
    }

    fn migrate_outgoing(&mut self, a: MigrateOutgoing, fds: Vec<OwnedFd>) -> Outcome {
        let passed = passed_channels(&a.fds, fds, a.channels)?;
        let unsupported = schema::multifd_unsupported(
            a.multifd_compression.as_deref(),
            a.mapped_ram,
            a.send_switchover_start,
        );
        let transport = match (passed, &a.connect) {
            (Some(passed), None) => Transport::Passed(passed),
            (None, Some(addr)) => {
                let resolved = addr
                    .to_socket_addrs()
                    .map_err(|e| Refusal::new(format!("migrate-outgoing: connect {addr:?}: {e}")))?
                    .next()
                    .ok_or_else(|| {
                        Refusal::new(format!("migrate-outgoing: connect {addr:?}: no address"))
                    })?;
                Transport::Connect(resolved)
            }
            (Some(_), Some(_)) => {
                return Err(Refusal::new(
                    "migrate-outgoing: give connect or passed sockets, not both",
                ))
            }
            (None, None) => {
                return Err(Refusal::new(
                    "migrate-outgoing: needs connect HOST:PORT or passed sockets (fds main, multifd-0..)",
                ))
            }
        };
        let prepared = self.prepare(
            "migrate-outgoing",
            Role::Source,
            a.channels,
            &a.uuid,
            a.timeout,
            unsupported,
        )?;
        self.launch(prepared, transport)
    }

    fn migrate_incoming(&mut self, a: MigrateIncoming, fds: Vec<OwnedFd>) -> Outcome {
        let passed = passed_channels(&a.fds, fds, a.channels)?;
        let unsupported = schema::multifd_unsupported(
            a.multifd_compression.as_deref(),
            a.mapped_ram,
            a.send_switchover_start,
        );
        self.require_idle("migrate-incoming")?;
        let mut address = None;
        let transport = match (passed, &a.listen) {
            (Some(passed), None) => Transport::Passed(passed),
            (None, Some(addr)) => {
                let listener = TcpListener::bind(addr.as_str()).map_err(|e| {
                    Refusal::new(format!("migrate-incoming: listen {addr:?}: {e}"))
                })?;
                address = listener.local_addr().ok().map(|a| a.to_string());
                Transport::Listen(listener)
            }
            (Some(_), Some(_)) => {
                return Err(Refusal::new(
                    "migrate-incoming: give listen or passed sockets, not both",
                ))
            }
            (None, None) => {
                return Err(Refusal::new(
                    "migrate-incoming: needs listen HOST:PORT or passed sockets (fds main, multifd-0..)",
                ))
            }
        };
        let prepared = self.prepare(
            "migrate-incoming",
            Role::Destination,
            a.channels,
            &a.uuid,
            a.timeout,
            unsupported,
        )?;
        let mut ret = self.launch(prepared, transport)?;
        ret["address"] = json!(address);
        Ok(ret)
    }

    fn switchover_start(&mut self) -> Outcome {
        self.reap();
        let Some(migration) = self.migration.as_mut() else {
            return Err(Refusal::new("switchover-start: no migration"));
        };
        if migration.switchover_sent {
            return Err(Refusal::new(
                "switchover-start: already accepted; the migration is switching over",
            ));
        }
        let mut inner = self.shared.lock();
        if inner.role != Some(Role::Source) {
            return Err(Refusal::new(
                "switchover-start: only the source switches over (the destination follows SWITCHOVER_START)",
            ));
        }
        if inner.status != Status::Precopy {
            return Err(Refusal::new(format!(
                "switchover-start: status is {}, precopy is needed",
                inner.status.name()
            )));
        }
        if !inner.acked {
            return Err(Refusal::new(
                "switchover-start: the destination has not sent SWITCHOVER_ACK yet (initial precopy data not loaded)",
            ));
        }
        for (i, view) in inner.devices.iter().enumerate() {
            let updated = inner.pending_updates.iter().find(|u| u.device == i);
            if view.mode == DeviceMode::DataFd
                && !view.has_data_fd
                && updated.is_none_or(|u| u.data_fd.is_none())
            {
                return Err(Refusal::new(format!(
                    "switchover-start: device {} has no data_fd in STOP_COPY (update-device fds [\"data-fd\"])",
                    view.handle
                )));
            }
            if !view.has_config && updated.is_none_or(|u| u.config.is_none()) {
                return Err(Refusal::new(format!(
                    "switchover-start: device {} has no config blob (add-device or update-device config)",
                    view.handle
                )));
            }
        }
        let updates = std::mem::take(&mut inner.pending_updates);
        drop(inner);
        if !migration
            .commander
            .send(VmmCommand::SwitchoverStart { updates })
        {
            return Err(Refusal::new("switchover-start: the migration has ended"));
        }
        migration.switchover_sent = true;
        Ok(json!({}))
    }

    fn load_config_ready(&mut self, a: LoadConfigReady) -> Outcome {
        let (role, status, index) = {
            let inner = self.shared.lock();
            let index = match &a.device {
                Some(handle) => Some(
                    inner
                        .devices
                        .iter()
                        .position(|d| &d.handle == handle)
                        .ok_or_else(|| Refusal {
                            class: ErrorClass::DeviceNotFound,
                            desc: format!("no device {handle:?} in this migration"),
                        })?,
                ),
                None => None,
            };
            (inner.role, inner.status, index)
        };
        if role != Some(Role::Destination) || status.idle() {
            return Err(Refusal::new(format!(
                "load-config-ready: only on a destination during a migration (status {})",
                status.name()
            )));
        }
        let hold = self.migration.as_ref().map(|m| &m.hold);
        let still_held = self.shared.release_configs(index, hold);
        Ok(json!({ "held": still_held }))
    }

    fn cancel(&mut self) -> Outcome {
        self.reap();
        if let Some(migration) = &self.migration {
            if !self.status().idle() {
                migration.cancel();
                return Ok(json!({ "cancelling": true }));
            }
        }
        if !self.registry.is_empty() {
            let n = self.registry.len();
            self.registry.clear();
            return Ok(json!({ "removed-devices": n }));
        }
        Err(Refusal::new(format!(
            "cancel: nothing to cancel (status {})",
            self.status().name()
        )))
    }
}

fn error_reply(refusal: Refusal, id: Option<Value>) -> Reply {
    Reply::Error {
        error: ErrorBody {
            class: refusal.class,
            desc: refusal.desc,
        },
        id,
    }
}

fn limit_value(bytes: u64) -> Value {
    if bytes == u64::MAX {
        json!("unlimited")
    } else {
        json!(bytes)
    }
}

/// Typed arguments, or an error naming the command.
fn args<T: DeserializeOwned>(command: &str, arguments: Value) -> Result<T, Refusal> {
    if !arguments.is_object() {
        return Err(Refusal::new(format!(
            "{command}: arguments must be an object"
        )));
    }
    serde_json::from_value(arguments)
        .map_err(|e| Refusal::new(format!("{command}: invalid arguments: {e}")))
}

fn no_fds(fds: Vec<OwnedFd>) -> Result<(), Refusal> {
    if fds.is_empty() {
        Ok(())
    } else {
        Err(Refusal::new(format!(
            "this command takes no file descriptors, but {} arrived (closed)",
            fds.len()
        )))
    }
}

/// Pairs the fds that arrived with the names in `arguments.fds`.
fn named_fds(
    names: &[String],
    fds: Vec<OwnedFd>,
    allowed: &[&str],
) -> Result<std::collections::HashMap<String, OwnedFd>, Refusal> {
    if names.len() != fds.len() {
        return Err(Refusal::new(format!(
            "fds names {} descriptor(s) ({}) but {} arrived with the message (closed)",
            names.len(),
            names.join(", "),
            fds.len()
        )));
    }
    let mut seen = HashSet::new();
    for name in names {
        if !allowed.contains(&name.as_str()) {
            return Err(Refusal::new(format!(
                "unknown fd name {name:?} (this command takes {})",
                allowed.join(", ")
            )));
        }
        if !seen.insert(name.as_str()) {
            return Err(Refusal::new(format!("fd name {name:?} given twice")));
        }
    }
    Ok(names.iter().cloned().zip(fds).collect())
}

fn check_either_direction(handle: &str, fd: &OwnedFd) -> Result<(), Refusal> {
    let save = vfio::fd::check_data_fd(fd.as_fd(), DataDirection::Save);
    let resume = vfio::fd::check_data_fd(fd.as_fd(), DataDirection::Resume);
    match (save, resume) {
        (Err(e), Err(_)) => Err(Refusal::new(format!("{handle}: {}", error_chain(&e)))),
        _ => Ok(()),
    }
}

/// `fds: ["main", "multifd-0", ..., "multifd-N-1"]`: the sockets of a migration, checked.
fn passed_channels(
    names: &[String],
    fds: Vec<OwnedFd>,
    channels: u8,
) -> Result<Option<PassedChannels>, Refusal> {
    if names.is_empty() && fds.is_empty() {
        return Ok(None);
    }
    let expected: Vec<String> = std::iter::once("main".to_string())
        .chain((0..channels).map(|i| format!("multifd-{i}")))
        .collect();
    if names != expected.as_slice() {
        return Err(Refusal::new(format!(
            "passed sockets must be named, in order, main, multifd-0 .. multifd-{} (got {})",
            channels.saturating_sub(1),
            names.join(", ")
        )));
    }
    if names.len() != fds.len() {
        return Err(Refusal::new(format!(
            "fds names {} sockets but {} descriptors arrived (closed)",
            names.len(),
            fds.len()
        )));
    }
    let mut conns = Vec::with_capacity(fds.len());
    for (name, fd) in names.iter().zip(fds) {
        let raw = fd.as_raw_fd();
        let conn = Conn::from_fd(fd)
            .map_err(|e| Refusal::new(format!("the fd named {name} (received as {raw}): {e}")))?;
        conns.push(conn);
    }
    let mut conns = conns.into_iter();
    let main = conns.next().expect("names start with main");
    Ok(Some(PassedChannels {
        main,
        multifd: conns.collect(),
    }))
}
