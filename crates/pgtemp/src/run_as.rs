//! Postgres refuses to run as root, so a root process runs the server as an unprivileged user.

use std::ffi::CString;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;

use crate::PgTempError;

/// Candidates in order of preference: `postgres` owns server files on packaged installs.
const UNPRIVILEGED_USERS: [&str; 2] = ["postgres", "nobody"];

/// The user the server binaries run as when this process is root.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RunAs {
    pub(crate) name: &'static str,
    pub(crate) uid: libc::uid_t,
    pub(crate) gid: libc::gid_t,
}

impl RunAs {
    /// `None` when this process is not root and can run the binaries itself.
    pub(crate) fn for_this_process() -> Result<Option<RunAs>, PgTempError> {
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            return Ok(None);
        }
        UNPRIVILEGED_USERS
            .iter()
            .find_map(|&name| {
                let (uid, gid) = lookup_user(name)?;
                Some(RunAs { name, uid, gid })
            })
            .map(Some)
            .ok_or(PgTempError::NoUnprivilegedUser {
                candidates: UNPRIVILEGED_USERS.join(", "),
            })
    }

    /// Makes `command` drop to this user (std also clears the supplementary groups).
    pub(crate) fn apply(&self, command: &mut Command) {
        command.gid(self.gid).uid(self.uid);
    }

    /// Whether this user may enter `dir` and every directory above it.
    pub(crate) fn can_traverse(&self, dir: &Path) -> bool {
        dir.ancestors().all(|ancestor| {
            std::fs::metadata(ancestor).is_ok_and(|metadata| {
                let mode = metadata.mode();
                let search_bit = if metadata.uid() == self.uid {
                    0o100
                } else if metadata.gid() == self.gid {
                    0o010
                } else {
                    0o001
                };
                mode & search_bit != 0
            })
        })
    }
}

fn lookup_user(name: &str) -> Option<(libc::uid_t, libc::gid_t)> {
    let c_name = CString::new(name).ok()?;
    // SAFETY: an all-zero passwd is a valid value of this plain C struct; getpwnam_r fills it.
    let mut entry: libc::passwd = unsafe { std::mem::zeroed() };
    let mut strings: Vec<libc::c_char> = vec![0; 16 * 1024];
    let mut found: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the duration of the call and `strings.len()` is the
    // true buffer size; getpwnam_r (unlike getpwnam) is thread-safe.
    let status = unsafe {
        libc::getpwnam_r(
            c_name.as_ptr(),
            &mut entry,
            strings.as_mut_ptr(),
            strings.len(),
            &mut found,
        )
    };
    (status == 0 && !found.is_null()).then_some((entry.pw_uid, entry.pw_gid))
}
