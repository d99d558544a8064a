//! Bounds on what Portico reads, so a hostile or broken file costs a located error, not the
//! process: the config file's size, its nesting depth and how far its YAML aliases expand.
//!
//! serde_yaml expands every alias into a copy of its node (a 1 MB anchored string named 20,000
//! times is 20 GB), and its parser slows down sharply on deep flow nesting. So the text is first
//! walked as a stream of YAML events (yaml-rust2), which stops at the first node deeper than
//! [`MAX_DEPTH`] or the first alias that takes the expansion past [`MAX_EXPANSION`]: cheap,
//! and before anything is built. Files are read through [`super::files`].

use super::error::ConfigError;
use std::collections::HashMap;
use yaml_rust2::parser::{Event, Parser};

/// The largest config file Portico reads.
pub const MAX_CONFIG_BYTES: u64 = 16 << 20;
/// How deep collections may nest (a real config needs about ten levels).
pub const MAX_DEPTH: usize = 64;
/// What aliases may add to the document, in bytes of scalars plus one per node.
pub const MAX_EXPANSION: usize = 16 << 20;

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
}
