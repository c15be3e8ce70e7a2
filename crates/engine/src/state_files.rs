//! The per-LUN state files on disk: the persisted policy state and the in-doubt journal. Their formats
//! are `lunmpio_vds::persist`'s; this module does the file I/O, which is synchronous `std::fs` (write,
//! fsync, rename, fsync the directory) — callers on the async runtime run it with
//! `tokio::task::spawn_blocking` so a slow disk never stalls a runtime thread.
//!
//! - Writes are atomic: a reader (or a crash) sees the old content or the new, never a mix.
//! - A missing file loads as `Ok(None)`. A corrupt file (`VDS_E_PROVIDER_CACHE_CORRUPT`) or one of a
//!   newer format (`VDS_E_NOT_SUPPORTED`) is renamed to `NAME.corrupt-<unix-time>` or
//!   `NAME.newer-v<N>`, so it is never silently dropped and never read again by accident, and the
//!   error names both the problem and the new name.

use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Read, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use lunmpio_vds::VdsError;
use lunmpio_vds::persist::{
    IN_DOUBT_FILE_BYTES_MAX, IN_DOUBT_VERSION, InDoubtJournal, LunState, STATE_FILE_BYTES_MAX,
    STATE_VERSION, StateProblem,
};

fn io_error(what: &str, path: &Path, error: std::io::Error) -> VdsError {
    VdsError::internal(format!("{what} {}: {error}", path.display()))
}

/// Writes `state` to `path` atomically (temp file, fsync, rename, fsync of the directory).
pub fn save_state(path: &Path, state: &LunState) -> Result<(), VdsError> {
    write_atomic(path, state.to_json().as_bytes())
        .map_err(|e| io_error("cannot write state file", path, e))
}

/// Writes `bytes` to `path` so that a reader (or a crash) sees the old content or the new, never a
/// mix: a temporary file in the same directory, write, fsync, rename over `path`, fsync the directory.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    let file_name = path.file_name().ok_or_else(|| {
        std::io::Error::new(
            ErrorKind::InvalidInput,
            format!("{} is not a file path", path.display()),
        )
    })?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        file_name.to_string_lossy(),
        std::process::id()
    ));
    let written = (|| -> std::io::Result<()> {
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        drop(file);
        fs::rename(&tmp, path)?;
        // The rename is durable only once the directory entry is.
        File::open(dir)?.sync_all()
    })();
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    written
}

/// Renames `path` to `path.<suffix>` (or `path.<suffix>-N` if that exists) and returns the new name.
fn set_aside(path: &Path, suffix: &str) -> Result<PathBuf, VdsError> {
    let base = format!("{}.{suffix}", path.display());
    let mut target = PathBuf::from(&base);
    let mut n = 1;
    while target.exists() {
        target = PathBuf::from(format!("{base}-{n}"));
        n += 1;
    }
    fs::rename(path, &target).map_err(|e| io_error("cannot set aside state file", path, e))?;
    Ok(target)
}

/// Loads the state at `path`: `Ok(None)` when there is none. A corrupt or newer file is set aside
/// (module docs) and reported as an error that names both the problem and the new file name.
pub fn load_state(path: &Path) -> Result<Option<LunState>, VdsError> {
    load_with(
        path,
        "state file",
        STATE_FILE_BYTES_MAX,
        STATE_VERSION,
        LunState::parse,
    )
}

/// Reads a versioned JSON file of at most `bytes_max` bytes and parses it; a corrupt or newer one is
/// set aside and reported.
fn load_with<T>(
    path: &Path,
    what: &str,
    bytes_max: u64,
    version_max: u32,
    parse: impl FnOnce(&str) -> Result<T, StateProblem>,
) -> Result<Option<T>, VdsError> {
    let mut file = match File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_error(&format!("cannot open {what}"), path, e)),
    };
    let mut bytes = Vec::new();
    Read::by_ref(&mut file)
        .take(bytes_max + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| io_error(&format!("cannot read {what}"), path, e))?;
    drop(file);
    let parsed = if bytes.len() as u64 > bytes_max {
        Err(StateProblem::Corrupt(format!(
            "larger than {bytes_max} bytes"
        )))
    } else {
        match std::str::from_utf8(&bytes) {
            Ok(text) => parse(text),
            Err(e) => Err(StateProblem::Corrupt(format!("not UTF-8: {e}"))),
        }
    };
    match parsed {
        Ok(state) => Ok(Some(state)),
        Err(StateProblem::Corrupt(why)) => {
            let unix_time = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            let aside = set_aside(path, &format!("corrupt-{unix_time}"))?;
            Err(VdsError::provider_cache_corrupt(format!(
                "{what} {} is corrupt ({why}); set aside as {}",
                path.display(),
                aside.display()
            )))
        }
        Err(StateProblem::Newer(version)) => {
            let aside = set_aside(path, &format!("newer-v{version}"))?;
            Err(VdsError::not_supported(format!(
                "{what} {} has format version {version}, this lunmpio reads up to {version_max}; set aside as {}",
                path.display(),
                aside.display()
            )))
        }
    }
}

/// Writes the journal atomically.
pub fn save_in_doubt(path: &Path, journal: &InDoubtJournal) -> Result<(), VdsError> {
    write_atomic(path, journal.to_json().as_bytes())
        .map_err(|e| io_error("cannot write in-doubt journal", path, e))
}

/// Loads a journal: `Ok(None)` when there is none; a corrupt or newer one is set aside and reported.
pub fn load_in_doubt(path: &Path) -> Result<Option<InDoubtJournal>, VdsError> {
    load_with(
        path,
        "in-doubt journal",
        IN_DOUBT_FILE_BYTES_MAX,
        IN_DOUBT_VERSION,
        InDoubtJournal::parse,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use lunmpio_vds::Hresult;

    const STATE: &str = r#"{"format": "lunmpio-lun-state", "version": 1, "lun": "x", "sourceId": "0xa1",
        "policy": "round-robin-with-subset",
        "paths": [{"pathId": "0x1", "primary": false, "weight": 0, "admin": "none"},
                  {"pathId": "0x2", "primary": true, "weight": 5, "admin": "standby"}]}"#;

    #[test]
    fn save_load_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = lunmpio_vds::persist::state_file_path(dir.path(), "x");
        assert_eq!(load_state(&path).unwrap(), None);
        let state = LunState::parse(STATE).unwrap();
        save_state(&path, &state).unwrap();
        save_state(&path, &state).unwrap(); // Overwrites.
        assert_eq!(load_state(&path).unwrap(), Some(state));
        assert_eq!(
            fs::read_dir(dir.path()).unwrap().count(),
            1,
            "no temp file left behind"
        );
        let journal = InDoubtJournal::new("x", Vec::new());
        let path = lunmpio_vds::persist::in_doubt_file_path(dir.path(), "x");
        save_in_doubt(&path, &journal).unwrap();
        assert_eq!(load_in_doubt(&path).unwrap(), Some(journal));
    }

    #[test]
    fn corrupt_files_are_set_aside() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lun-x.json");
        let cases = [
            "{not json",
            "[]",
            r#"{"format": "other", "version": 1}"#,
            r#"{"format": "lunmpio-lun-state"}"#,
            r#"{"format": "lunmpio-lun-state", "version": 0}"#,
            r#"{"format": "lunmpio-lun-state", "version": 1, "lun": "x"}"#,
            r#"{"format": "lunmpio-lun-state", "version": 1, "lun": "x", "sourceId": "0x1", "policy": "fast", "paths": []}"#,
            r#"{"format": "lunmpio-lun-state", "version": 1, "lun": "x", "sourceId": "0x1", "policy": "failover",
                "paths": [{"pathId": "0x1", "primary": true, "weight": 0, "admin": "none"},
                          {"pathId": 1, "primary": false, "weight": 0, "admin": "none"}]}"#,
        ];
        for (n, text) in cases.iter().enumerate() {
            fs::write(&path, text).unwrap();
            let e = load_state(&path).unwrap_err();
            assert_eq!(e.hresult, Hresult::VDS_E_PROVIDER_CACHE_CORRUPT, "{text}");
            assert!(e.message.contains("set aside as"), "{}", e.message);
            assert!(!path.exists());
            let aside: Vec<_> = fs::read_dir(dir.path())
                .unwrap()
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .collect();
            assert_eq!(aside.len(), n + 1, "{aside:?}");
            assert!(
                aside
                    .iter()
                    .all(|name| name.starts_with("lun-x.json.corrupt-"))
            );
        }
        fs::write(&path, vec![b' '; STATE_FILE_BYTES_MAX as usize + 1]).unwrap();
        assert_eq!(
            load_state(&path).unwrap_err().hresult,
            Hresult::VDS_E_PROVIDER_CACHE_CORRUPT
        );
        fs::write(&path, [0xff, 0xfe]).unwrap();
        assert_eq!(
            load_state(&path).unwrap_err().hresult,
            Hresult::VDS_E_PROVIDER_CACHE_CORRUPT
        );
    }

    #[test]
    fn newer_files_are_set_aside() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lun-x.json");
        fs::write(
            &path,
            r#"{"format": "lunmpio-lun-state", "version": 7, "anything": []}"#,
        )
        .unwrap();
        let e = load_state(&path).unwrap_err();
        assert_eq!(e.hresult, Hresult::VDS_E_NOT_SUPPORTED);
        assert!(e.message.contains("version 7"), "{}", e.message);
        assert!(dir.path().join("lun-x.json.newer-v7").exists());
        assert_eq!(load_state(&path).unwrap(), None);
    }
}
