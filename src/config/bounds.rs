//! Bounds on what Portico reads, so a hostile or broken file costs a located error, not the
//! process: the config file's size, its nesting depth and how far its YAML aliases expand, and
//! the size and kind of every file the config names (keys, certificates, JWKS).
//!
//! serde_yaml expands every alias into a copy of its node (a 1 MB anchored string named 20,000
//! times is 20 GB), and its parser slows down sharply on deep flow nesting. So the text is first
//! walked as a stream of YAML events (yaml-rust2), which stops at the first node deeper than
//! [`MAX_DEPTH`] or the first alias that takes the expansion past [`MAX_EXPANSION`]: cheap,
//! and before anything is built.

use super::error::ConfigError;
use std::collections::HashMap;
use std::io::Read;
use std::path::Path;
use yaml_rust2::parser::{Event, Parser};

/// The largest config file Portico reads.
pub const MAX_CONFIG_BYTES: u64 = 16 << 20;
/// The largest key, certificate or JWKS file Portico reads.
pub const MAX_NAMED_FILE_BYTES: u64 = 1 << 20;
/// How deep collections may nest (a real config needs about ten levels).
pub const MAX_DEPTH: usize = 64;
/// What aliases may add to the document, in bytes of scalars plus one per node.
pub const MAX_EXPANSION: usize = 16 << 20;

/// Read a file the config names: only a regular file of at most `max` bytes (so `/dev/zero`, a
/// FIFO or a directory is an error, not a hang or an exhausted memory).
pub fn read_bounded(path: &Path, max: u64) -> Result<Vec<u8>, String> {
    let shown = path.display();
    let meta = std::fs::metadata(path).map_err(|e| format!("cannot read '{shown}': {e}"))?;
    if !meta.is_file() {
        return Err(format!("'{shown}' is not a regular file"));
    }
    if meta.len() > max {
        return Err(format!("'{shown}' is larger than {max} bytes"));
    }
    let file = std::fs::File::open(path).map_err(|e| format!("cannot read '{shown}': {e}"))?;
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    // The file may grow between the check and the read: never take more than the bound.
    file.take(max + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("cannot read '{shown}': {e}"))?;
    if bytes.len() as u64 > max {
        return Err(format!("'{shown}' is larger than {max} bytes"));
    }
    Ok(bytes)
}

/// Walk the YAML events of `text` and refuse it if it nests too deep or its aliases expand
/// too far, or if it cannot be read as YAML at all.
pub fn check_yaml(text: &str) -> Result<(), ConfigError> {
    struct Open {
        anchor: usize,
        size: usize,
    }
    let mut stack: Vec<Open> = Vec::new();
    let mut anchors: HashMap<usize, usize> = HashMap::new();
    let mut expanded: usize = 0;
    let mut parser = Parser::new_from_str(text);
    loop {
        let (event, mark) = match parser.next_token() {
            Ok(e) => e,
            // The walk must see the whole document, or a bomb behind a construct it cannot
            // read would reach serde_yaml: what it cannot read is refused.
            Err(e) if e.info().contains("recursion limit") => {
                return Err(ConfigError::new(
                    "",
                    format!(
                        "the YAML nests too deep at line {} column {}",
                        e.marker().line(),
                        e.marker().col() + 1
                    ),
                ))
            }
            Err(e) => {
                return Err(ConfigError::new(
                    "",
                    format!(
                        "YAML syntax: {} at line {} column {}",
                        e.info(),
                        e.marker().line(),
                        e.marker().col() + 1
                    ),
                ))
            }
        };
        let at =
            |what: String| ConfigError::new("", format!("{what} at line {} column {}", mark.line(), mark.col() + 1));
        let node = match event {
            Event::StreamEnd => return Ok(()),
            Event::SequenceStart(anchor, _) | Event::MappingStart(anchor, _) => {
                stack.push(Open { anchor, size: 1 });
                if stack.len() > MAX_DEPTH {
                    return Err(at(format!("the YAML nests deeper than {MAX_DEPTH} levels")));
                }
                continue;
            }
            Event::SequenceEnd | Event::MappingEnd => {
                let Some(open) = stack.pop() else { continue };
                if open.anchor > 0 {
                    anchors.insert(open.anchor, open.size);
                }
                open.size
            }
            Event::Scalar(value, _, anchor, _) => {
                let size = value.len() + 1;
                if anchor > 0 {
                    anchors.insert(anchor, size);
                }
                size
            }
            Event::Alias(id) => {
                let size = anchors.get(&id).copied().unwrap_or(1);
                expanded = expanded.saturating_add(size);
                if expanded > MAX_EXPANSION {
                    return Err(at(format!(
                        "YAML aliases expand the document past {} MiB",
                        MAX_EXPANSION >> 20
                    )));
                }
                size
            }
            _ => continue,
        };
        if let Some(parent) = stack.last_mut() {
            parent.size = parent.size.saturating_add(node);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deep_nesting_is_refused_early() {
        let deep = format!("a: {}{}", "[".repeat(100_000), "]".repeat(100_000));
        let start = std::time::Instant::now();
        let e = check_yaml(&deep).unwrap_err().to_string();
        assert!(e.contains("nests") && e.contains("line 1"), "{e}");
        assert!(start.elapsed() < std::time::Duration::from_secs(1));
        let ok = format!("a: {}{}", "[".repeat(20), "]".repeat(20));
        assert!(check_yaml(&ok).is_ok());
    }

    #[test]
    fn alias_bombs_are_refused() {
        // One big anchored scalar named many times.
        let big = format!("a: [&s \"{}\"{}]", "x".repeat(1 << 20), ", *s".repeat(100));
        let e = check_yaml(&big).unwrap_err().to_string();
        assert!(e.contains("aliases expand"), "{e}");
        // Billion laughs: each level names the previous one ten times.
        let mut laughs = String::from("a: &a [\"lol\"]\n");
        let names = "abcdefghij";
        for w in names.as_bytes().windows(2) {
            let (prev, next) = (w[0] as char, w[1] as char);
            laughs.push_str(&format!(
                "{next}: &{next} [{}]\n",
                vec![format!("*{prev}"); 10].join(", ")
            ));
        }
        let e = check_yaml(&laughs).unwrap_err().to_string();
        assert!(e.contains("aliases expand"), "{e}");
        // A few ordinary aliases are fine.
        assert!(check_yaml("d: &d {x: 1}\ne: *d\nf: *d\n").is_ok());
    }

    #[test]
    fn named_files_must_be_small_regular_files() {
        assert!(read_bounded(Path::new("/dev/zero"), 1024)
            .unwrap_err()
            .contains("not a regular file"));
        assert!(read_bounded(Path::new("/tmp"), 1024)
            .unwrap_err()
            .contains("not a regular file"));
        let dir = std::env::temp_dir().join(format!("portico-bounds-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("big");
        std::fs::write(&f, vec![b'a'; 2048]).unwrap();
        assert!(read_bounded(&f, 1024).unwrap_err().contains("larger than 1024"));
        assert_eq!(read_bounded(&f, 4096).unwrap().len(), 2048);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
