//! Reading a file named in the config — a key, a certificate, a CA bundle — within a size bound.
//!
//! A path in the config is user input: it may name `/dev/zero`, a FIFO that never ends, a
//! directory or a multi-gigabyte log. Loading (at `-t`, at start and on every reload) must stay
//! bounded in time and memory whatever it names, so a file is read only when it is a regular
//! file of at most `max` bytes.

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::path::{Path, PathBuf};

/// The bound the contract sets for every file named in the config (keys, certificates, JWKS).
pub const MAX_CONFIG_FILE_BYTES: u64 = 1024 * 1024;

/// The whole of `path`, if it is a regular file (symlinks followed) of at most `max` bytes.
///
/// The error is a sentence naming the path, for the caller to locate:
/// `/dev/zero is not a regular file`.
pub fn read_bounded(path: &Path, max: u64) -> Result<Vec<u8>, String> {
    read_named(path, &path.display().to_string(), max)
}

/// A file named in the config: relative to `base_dir` unless absolute, at most 1 MiB, and
/// named in errors as the config wrote it (`no such file: conf/x.key`, not the joined path).
pub fn read_config_file(base_dir: &Path, written: &str) -> Result<Vec<u8>, String> {
    read_named(&config_path(base_dir, written), written, MAX_CONFIG_FILE_BYTES)
}

/// Where a path written in the config points: relative paths are taken from `base_dir`.
pub fn config_path(base_dir: &Path, written: &str) -> PathBuf {
    let p = Path::new(written);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        base_dir.join(p)
    }
}

fn read_named(path: &Path, shown: &str, max: u64) -> Result<Vec<u8>, String> {
    if shown.is_empty() {
        return Err("the file name is empty".into());
    }
    // Stat before opening: opening a FIFO blocks until a writer appears, and a device may have
    // side effects on open.
    let meta = std::fs::metadata(path).map_err(|e| format!("cannot read {shown}: {}", io_reason(&e)))?;
    check(&meta, max).map_err(|why| format!("{shown} {why}"))?;
    let file = open(path).map_err(|e| format!("cannot read {shown}: {}", io_reason(&e)))?;
    // The path may have been swapped between the stat and the open: check what was opened.
    let meta = file
        .metadata()
        .map_err(|e| format!("cannot read {shown}: {}", io_reason(&e)))?;
    check(&meta, max).map_err(|why| format!("{shown} {why}"))?;
    // The file may also grow after the check: never read more than one byte past the bound.
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    file.take(max + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("cannot read {shown}: {}", io_reason(&e)))?;
    if bytes.len() as u64 > max {
        return Err(format!("{shown} is larger than {}", size(max)));
    }
    Ok(bytes)
}

fn check(meta: &std::fs::Metadata, max: u64) -> Result<(), String> {
    if meta.is_dir() {
        return Err("is a directory, not a file".into());
    }
    if !meta.is_file() {
        return Err("is not a regular file".into());
    }
    if meta.len() > max {
        return Err(format!("is larger than {}", size(max)));
    }
    Ok(())
}

#[cfg(unix)]
fn open(path: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    // Non-blocking, so that a FIFO swapped in after the stat cannot hang the open; a regular
    // file reads the same either way.
    OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open(path)
}

#[cfg(not(unix))]
fn open(path: &Path) -> std::io::Result<File> {
    OpenOptions::new().read(true).open(path)
}

/// `No such file or directory`, without Rust's ` (os error 2)` tail.
fn io_reason(e: &std::io::Error) -> String {
    let s = e.to_string();
    match s.find(" (os error") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

fn size(n: u64) -> String {
    const MIB: u64 = 1024 * 1024;
    const KIB: u64 = 1024;
    if n >= MIB && n.is_multiple_of(MIB) {
        format!("{} MiB", n / MIB)
    } else if n >= KIB && n.is_multiple_of(KIB) {
        format!("{} KiB", n / KIB)
    } else {
        format!("{n} bytes")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::TempDir;

    #[test]
    fn reads_a_small_regular_file() {
        let dir = TempDir::new("tls-files");
        let p = dir.write("a.pem", "hello");
        assert_eq!(read_bounded(&p, MAX_CONFIG_FILE_BYTES).unwrap(), b"hello");
        // Exactly at the bound is fine.
        let p = dir.write("b.pem", &"x".repeat(16));
        assert_eq!(read_bounded(&p, 16).unwrap().len(), 16);
    }

    #[test]
    fn refuses_dev_zero() {
        let e = read_bounded(Path::new("/dev/zero"), MAX_CONFIG_FILE_BYTES).unwrap_err();
        assert_eq!(e, "/dev/zero is not a regular file");
    }

    #[test]
    fn refuses_a_directory() {
        let dir = TempDir::new("tls-files");
        let e = read_bounded(dir.path(), MAX_CONFIG_FILE_BYTES).unwrap_err();
        assert!(e.ends_with("is a directory, not a file"), "{e}");
    }

    #[test]
    fn refuses_a_file_over_the_bound() {
        let dir = TempDir::new("tls-files");
        let p = dir.write("big.pem", &"x".repeat(2 * 1024 * 1024));
        let e = read_bounded(&p, MAX_CONFIG_FILE_BYTES).unwrap_err();
        assert!(e.ends_with("is larger than 1 MiB"), "{e}");
    }

    #[test]
    fn refuses_a_fifo_without_blocking() {
        let dir = TempDir::new("tls-files");
        let p = dir.path().join("fifo");
        let made = std::process::Command::new("mkfifo").arg(&p).status();
        if !made.is_ok_and(|s| s.success()) {
            return; // no mkfifo here: nothing to check
        }
        let e = read_bounded(&p, MAX_CONFIG_FILE_BYTES).unwrap_err();
        assert!(e.ends_with("is not a regular file"), "{e}");
    }

    #[test]
    fn a_missing_file_reads_like_a_sentence() {
        let e = read_bounded(Path::new("/nonexistent/x.key"), 10).unwrap_err();
        assert_eq!(e, "cannot read /nonexistent/x.key: No such file or directory");
    }

    #[test]
    fn config_files_are_named_as_written() {
        let dir = TempDir::new("tls-files");
        dir.write("x.key", "k");
        assert_eq!(read_config_file(dir.path(), "x.key").unwrap(), b"k");
        let e = read_config_file(dir.path(), "conf/missing.key").unwrap_err();
        assert_eq!(e, "cannot read conf/missing.key: No such file or directory");
        assert_eq!(read_config_file(dir.path(), "").unwrap_err(), "the file name is empty");
        assert_eq!(config_path(dir.path(), "/etc/x"), Path::new("/etc/x"));
    }

    #[test]
    fn a_symlink_to_a_regular_file_is_followed() {
        let dir = TempDir::new("tls-files");
        let target = dir.write("real.pem", "data");
        let link = dir.path().join("link.pem");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        assert_eq!(read_bounded(&link, 10).unwrap(), b"data");
        let zero = dir.path().join("zero.pem");
        std::os::unix::fs::symlink("/dev/zero", &zero).unwrap();
        assert!(read_bounded(&zero, 10).unwrap_err().ends_with("is not a regular file"));
    }
}
