//! Finding the installed Postgres server binaries.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::PgTempError;

/// Where Debian and Ubuntu install each major version's server binaries.
const DEBIAN_VERSIONS_DIR: &str = "/usr/lib/postgresql";

/// The directory holding `initdb`, `pg_ctl` and `postgres`: `pg_config --bindir`, else the
/// highest version under `/usr/lib/postgresql/*/bin`, else the directory of `initdb` on `PATH`.
pub(crate) fn find_bindir() -> Result<PathBuf, PgTempError> {
    let mut searched = Vec::new();

    match Command::new("pg_config").arg("--bindir").output() {
        Ok(output) if output.status.success() => {
            let dir = PathBuf::from(String::from_utf8_lossy(&output.stdout).trim());
            if has_server_binaries(&dir) {
                return Ok(dir);
            }
            searched.push(format!("`pg_config --bindir` ({})", dir.display()));
        }
        _ => searched.push("`pg_config --bindir` (no working pg_config on PATH)".to_owned()),
    }

    if let Some(dir) = highest_debian_version() {
        return Ok(dir);
    }
    searched.push(format!("{DEBIAN_VERSIONS_DIR}/*/bin"));

    if let Some(dir) = initdb_on_path() {
        return Ok(dir);
    }
    searched.push("`initdb` on PATH".to_owned());

    Err(PgTempError::BinariesNotFound {
        searched: searched.join(", "),
    })
}

fn has_server_binaries(dir: &Path) -> bool {
    ["initdb", "pg_ctl", "postgres"]
        .iter()
        .all(|binary| dir.join(binary).is_file())
}

fn highest_debian_version() -> Option<PathBuf> {
    std::fs::read_dir(DEBIAN_VERSIONS_DIR)
        .ok()?
        .filter_map(|entry| {
            let entry = entry.ok()?;
            let version = parse_version(entry.file_name().to_str()?)?;
            let bindir = entry.path().join("bin");
            has_server_binaries(&bindir).then_some((version, bindir))
        })
        .max()
        .map(|(_, bindir)| bindir)
}

/// "15" → [15], "9.6" → [9, 6]; anything else is not a version directory.
fn parse_version(name: &str) -> Option<Vec<u32>> {
    name.split('.').map(|part| part.parse().ok()).collect()
}

fn initdb_on_path() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).find_map(|dir| {
        // `initdb` is often a symlink (e.g. /usr/local/bin/initdb); its siblings live next to
        // the real file.
        let initdb = dir.join("initdb").canonicalize().ok()?;
        let bindir = initdb.parent()?.to_path_buf();
        has_server_binaries(&bindir).then_some(bindir)
    })
}

#[cfg(test)]
mod tests {
    use super::parse_version;

    #[test]
    fn versions_order_numerically() {
        assert!(parse_version("10") > parse_version("9.6"));
        assert!(parse_version("16") > parse_version("15"));
        assert_eq!(parse_version("15.x"), None);
    }
}
