//! A detached watchdog that stops the server and deletes the cluster once its owner is gone.
//!
//! Tests keep their cluster in a `static`, whose `Drop` never runs, and a demo may be killed
//! with SIGKILL; either way nothing may be left behind. The reaper is a small `sh` process
//! whose stdin is a pipe that only the owning process holds open (std creates pipes
//! close-on-exec, so no other child inherits it). The pipe reaches EOF exactly when the owner
//! drops the cluster or exits for any reason, including SIGKILL, without polling pids that may
//! be reused.

use std::io;
use std::path::Path;
use std::process::{Child, Command, Stdio};

use crate::PgTempError;

/// `$1` is the cluster directory. It stops the server with an immediate shutdown (SIGQUIT)
/// and removes the directory. `postmaster.pid` disappearing is the sign the server is gone;
/// the server may be nobody's child, and a zombie still answers `kill -0`.
const SCRIPT: &str = r#"
trap '' INT HUP TERM
read -r _ignored
pidfile="$1/data/postmaster.pid"
if [ -f "$pidfile" ] && read -r pid < "$pidfile" && [ -n "$pid" ]; then
    kill -QUIT "$pid" 2>/dev/null
    tries=0
    while [ -f "$pidfile" ] && kill -0 "$pid" 2>/dev/null && [ "$tries" -lt 300 ]; do
        sleep 0.1
        tries=$((tries + 1))
    done
fi
rm -rf "$1"
"#;

pub(crate) struct Reaper {
    child: Child,
}

impl Reaper {
    pub(crate) fn spawn(cluster_dir: &Path) -> Result<Reaper, PgTempError> {
        use std::os::unix::process::CommandExt;

        let child = Command::new("/bin/sh")
            .arg("-c")
            .arg(SCRIPT)
            .arg("membrane-pgtemp-reaper")
            .arg(cluster_dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            // Not the owner's cwd (it may be deleted) nor its process group (Ctrl-C in a
            // terminal must reach the owner, not the reaper).
            .current_dir("/")
            .process_group(0)
            .spawn()
            .map_err(|source| PgTempError::Io {
                what: "spawning the cleanup process /bin/sh".to_owned(),
                source,
            })?;
        Ok(Reaper { child })
    }

    /// Lets the reaper run now (the owner has already cleaned up, so it finds nothing left) and
    /// reaps it so it does not linger as a zombie.
    pub(crate) fn release(mut self) -> io::Result<()> {
        drop(self.child.stdin.take());
        self.child.wait().map(drop)
    }
}
