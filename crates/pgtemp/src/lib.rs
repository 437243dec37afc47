//! A private throwaway Postgres cluster started from the installed binaries, for the demo and
//! the tests.
//!
//! ```no_run
//! let cluster = membrane_pgtemp::TempCluster::start()?;
//! println!("connect to {}", cluster.url());
//! // Dropping the cluster stops the server and deletes its directory. If the process dies
//! // first (even by SIGKILL) a detached reaper process does the same.
//! # Ok::<(), membrane_pgtemp::PgTempError>(())
//! ```

mod binaries;
mod reaper;
mod run_as;

use std::ffi::OsStr;
use std::io;
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use reaper::Reaper;
use run_as::RunAs;

#[derive(Debug, thiserror::Error)]
pub enum PgTempError {
    #[error("no PostgreSQL server binaries (initdb, pg_ctl, postgres) found; searched {searched}")]
    BinariesNotFound { searched: String },
    #[error(
        "running as root, which Postgres refuses, and none of the users {candidates} exists to \
         run the server as"
    )]
    NoUnprivilegedUser { candidates: String },
    #[error("no temp directory is traversable by user {user} (tried {tried})")]
    NoTraversableTempDir { user: String, tried: String },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("`{command}` failed ({status}); its output ends with:\n{output}")]
    CommandFailed {
        command: String,
        status: ExitStatus,
        output: String,
    },
    #[error(
        "the server did not start on port {port} ({status}); pg_ctl said:\n{output}\n\
         the server log ends with:\n{log_tail}"
    )]
    ServerDidNotStart {
        port: u16,
        status: ExitStatus,
        output: String,
        log_tail: String,
    },
}

/// Settings for a cluster whose data nobody needs after a crash.
const THROWAWAY_SETTINGS: &[(&str, &str)] = &[
    ("listen_addresses", "127.0.0.1"),
    ("fsync", "off"),
    ("synchronous_commit", "off"),
    ("full_page_writes", "off"),
    ("max_connections", "200"),
    ("shared_buffers", "128MB"),
];

/// Unix socket paths are limited to ~107 bytes; a longer cluster path gets TCP only.
const MAX_SOCKET_DIR_LEN: usize = 90;

/// A free port can be taken by someone else before the server binds it.
const START_ATTEMPTS: usize = 3;

const LOG_TAIL_LINES: usize = 30;

/// A running Postgres server with its own data directory under the system temp dir.
pub struct TempCluster {
    /// Holds `data/` (the cluster), `server.log` and the unix socket.
    dir: PathBuf,
    bindir: PathBuf,
    port: u16,
    run_as: Option<RunAs>,
    reaper: Option<Reaper>,
}

impl TempCluster {
    /// Creates a cluster with `initdb` and starts a server on a free port of 127.0.0.1.
    /// Superuser `postgres`, trust authentication, UTF8 encoding, C locale.
    pub fn start() -> Result<TempCluster, PgTempError> {
        let bindir = binaries::find_bindir()?;
        let run_as = RunAs::for_this_process()?;
        let dir = create_cluster_dir(run_as.as_ref())?;
        // From here on, dropping `cluster` on any error stops and deletes what exists so far.
        let mut cluster = TempCluster {
            dir,
            bindir,
            port: 0,
            run_as,
            reaper: None,
        };
        cluster.reaper = Some(Reaper::spawn(&cluster.dir)?);
        cluster.init()?;
        cluster.start_server()?;
        tracing::info!(
            port = cluster.port,
            dir = %cluster.dir.display(),
            "started throwaway Postgres"
        );
        Ok(cluster)
    }

    /// `postgres://postgres@127.0.0.1:PORT/postgres`.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The directory holding the data directory, `server.log` and the unix socket; it is
    /// deleted when the cluster is dropped.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    fn log_file(&self) -> PathBuf {
        self.dir.join("server.log")
    }

    fn pid_file(&self) -> PathBuf {
        self.data_dir().join("postmaster.pid")
    }

    fn init(&self) -> Result<(), PgTempError> {
        let data_dir = self.data_dir();
        let output = self.run(
            "initdb",
            &[
                "-D".as_ref(),
                data_dir.as_os_str(),
                "-U".as_ref(),
                "postgres".as_ref(),
                "--auth=trust".as_ref(),
                "-E".as_ref(),
                "UTF8".as_ref(),
                "--locale=C".as_ref(),
                "--no-sync".as_ref(),
            ],
        )?;
        if !output.status.success() {
            return Err(PgTempError::CommandFailed {
                command: format!("initdb -D {}", data_dir.display()),
                status: output.status,
                output: output.text_tail(),
            });
        }
        self.append_settings()
    }

    /// Appends to `postgresql.conf` (later lines win) rather than passing `-c` options through
    /// `pg_ctl -o`, which goes through a shell and would need quoting.
    fn append_settings(&self) -> Result<(), PgTempError> {
        use std::io::Write;

        let mut settings: Vec<(&str, String)> = THROWAWAY_SETTINGS
            .iter()
            .map(|&(name, value)| (name, value.to_owned()))
            .collect();
        let socket_dir = self.dir.to_string_lossy().into_owned();
        let socket_dir = if socket_dir.len() <= MAX_SOCKET_DIR_LEN {
            socket_dir
        } else {
            String::new()
        };
        settings.push(("unix_socket_directories", socket_dir));

        let conf_path = self.data_dir().join("postgresql.conf");
        let io_error = |source| PgTempError::Io {
            what: format!("appending settings to {}", conf_path.display()),
            source,
        };
        let mut conf = std::fs::OpenOptions::new()
            .append(true)
            .open(&conf_path)
            .map_err(io_error)?;
        let mut text = String::from("\n# membrane-pgtemp: throwaway cluster\n");
        for (name, value) in settings {
            text.push_str(&format!("{name} = '{}'\n", value.replace('\'', "''")));
        }
        conf.write_all(text.as_bytes()).map_err(io_error)
    }

    fn start_server(&mut self) -> Result<(), PgTempError> {
        let data_dir = self.data_dir();
        let log_file = self.log_file();
        let mut attempt = 1;
        loop {
            let port = free_port()?;
            let port_option = format!("-p {port}");
            let output = self.run(
                "pg_ctl",
                &[
                    "start".as_ref(),
                    "-w".as_ref(),
                    "-t".as_ref(),
                    "60".as_ref(),
                    "-D".as_ref(),
                    data_dir.as_os_str(),
                    "-l".as_ref(),
                    log_file.as_os_str(),
                    "-o".as_ref(),
                    port_option.as_ref(),
                ],
            )?;
            if output.status.success() {
                self.port = port;
                return Ok(());
            }
            let log_tail = tail(&std::fs::read_to_string(&log_file).unwrap_or_default());
            if attempt < START_ATTEMPTS && log_tail.contains("could not bind") {
                tracing::debug!(port, "port taken before the server bound it; retrying");
                attempt += 1;
                continue;
            }
            return Err(PgTempError::ServerDidNotStart {
                port,
                status: output.status,
                output: output.text_tail(),
                log_tail,
            });
        }
    }

    /// Runs a server binary, as the unprivileged user if this process is root.
    fn run(&self, binary: &str, args: &[&OsStr]) -> Result<CommandOutput, PgTempError> {
        let program = self.bindir.join(binary);
        let mut command = Command::new(&program);
        command
            .args(args)
            // The binaries resolve their own path relative to the cwd, which the
            // unprivileged user may not be allowed to enter (e.g. /root).
            .current_dir(&self.dir)
            .stdin(Stdio::null());
        if let Some(run_as) = &self.run_as {
            run_as.apply(&mut command);
        }
        let output = command.output().map_err(|source| PgTempError::Io {
            what: format!("running {}", program.display()),
            source,
        })?;
        Ok(CommandOutput(output))
    }

    /// Fast shutdown, escalating to immediate; waits until `postmaster.pid` is gone, which the
    /// server removes last, after closing its sockets.
    fn stop_server(&self) -> Result<(), String> {
        let Some(pid) = std::fs::read_to_string(self.pid_file())
            .ok()
            .and_then(|contents| contents.lines().next()?.trim().parse::<libc::pid_t>().ok())
        else {
            return Ok(());
        };
        for (signal, patience) in [
            (libc::SIGINT, Duration::from_secs(10)),
            (libc::SIGQUIT, Duration::from_secs(10)),
        ] {
            // SAFETY: kill has no memory-safety preconditions.
            if unsafe { libc::kill(pid, signal) } != 0 {
                // ESRCH: the server died without removing its pid file.
                return Ok(());
            }
            let deadline = Instant::now() + patience;
            while self.pid_file().exists() {
                if Instant::now() > deadline {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            if !self.pid_file().exists() {
                return Ok(());
            }
        }
        Err(format!("server pid {pid} did not shut down"))
    }
}

impl Drop for TempCluster {
    fn drop(&mut self) {
        if let Err(problem) = self.stop_server() {
            tracing::warn!(dir = %self.dir.display(), "stopping throwaway Postgres: {problem}");
        }
        if let Err(error) = std::fs::remove_dir_all(&self.dir) {
            if error.kind() != io::ErrorKind::NotFound {
                tracing::warn!(dir = %self.dir.display(), "removing throwaway cluster: {error}");
            }
        }
        if let Some(reaper) = self.reaper.take() {
            if let Err(error) = reaper.release() {
                tracing::warn!("waiting for the cleanup process: {error}");
            }
        }
    }
}

/// Creates a fresh directory under the system temp dir, owned by the user running the server.
fn create_cluster_dir(run_as: Option<&RunAs>) -> Result<PathBuf, PgTempError> {
    let system_temp = std::env::temp_dir();
    let parent = match run_as {
        None => system_temp,
        Some(user) => {
            // TMPDIR may point into root's 0700 home; /tmp is world-traversable by convention.
            let candidates = [system_temp, PathBuf::from("/tmp")];
            candidates
                .iter()
                .find(|dir| user.can_traverse(dir))
                .cloned()
                .ok_or_else(|| PgTempError::NoTraversableTempDir {
                    user: user.name.to_owned(),
                    tried: candidates
                        .iter()
                        .map(|dir| dir.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", "),
                })?
        }
    };
    // Private: the socket inside accepts anyone as superuser (trust authentication).
    let dir = tempfile::Builder::new()
        .prefix("membrane-pgtemp-")
        .permissions(std::fs::Permissions::from_mode(0o700))
        .tempdir_in(&parent)
        .map_err(|source| PgTempError::Io {
            what: format!("creating a cluster directory in {}", parent.display()),
            source,
        })?
        .keep();
    if let Some(user) = run_as {
        if let Err(source) = std::os::unix::fs::chown(&dir, Some(user.uid), Some(user.gid)) {
            // Nothing owns the directory yet, so clean it up here.
            let _ = std::fs::remove_dir(&dir);
            return Err(PgTempError::Io {
                what: format!("giving {} to user {}", dir.display(), user.name),
                source,
            });
        }
    }
    Ok(dir)
}

fn free_port() -> Result<u16, PgTempError> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|address| address.port())
        .map_err(|source| PgTempError::Io {
            what: "finding a free port on 127.0.0.1".to_owned(),
            source,
        })
}

struct CommandOutput(std::process::Output);

impl std::ops::Deref for CommandOutput {
    type Target = std::process::Output;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl CommandOutput {
    fn text_tail(&self) -> String {
        let mut text = String::from_utf8_lossy(&self.stdout).into_owned();
        text.push_str(&String::from_utf8_lossy(&self.stderr));
        tail(&text)
    }
}

fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n")
}

/// Whether a process with this id exists (possibly as a zombie). Used to recognise databases
/// left behind by test processes that are gone.
pub fn process_is_alive(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    // SAFETY: signal 0 only checks for existence and permission.
    let status = unsafe { libc::kill(pid, 0) };
    // EPERM: it exists but belongs to someone else.
    status == 0 || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}
