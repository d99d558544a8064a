//! Config errors that name their place: `routes[2].plugins[0].jwt: unknown field 'isuer'`.

use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// Where in the file: `routes[2].match.path_prefix`, or empty for the whole file.
    pub location: String,
    pub message: String,
}

impl ConfigError {
    pub fn new(location: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError {
            location: location.into(),
            message: tidy(&message.into()),
        }
    }

    /// The same error, located inside `prefix` (`cert` under `listeners[0].tls` becomes
    /// `listeners[0].tls.cert`).
    pub fn under(self, prefix: &str) -> Self {
        let location = match (prefix.is_empty(), self.location.is_empty()) {
            (true, _) => self.location,
            (false, true) => prefix.to_string(),
            (false, false) if self.location.starts_with('[') => format!("{prefix}{}", self.location),
            (false, false) => format!("{prefix}.{}", self.location),
        };
        ConfigError { location, ..self }
    }

    /// The errors of one block as one (a plugin's `build` returns one error): a single error
    /// as it is; several on one line, each with its field, so none hides another. `None` when
    /// there is none.
    pub fn several(mut errors: Vec<ConfigError>) -> Option<ConfigError> {
        match errors.len() {
            0 => None,
            1 => errors.pop(),
            _ => Some(ConfigError::new(
                "",
                errors.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "),
            )),
        }
    }

    /// A serde_yaml error, whose text already carries the path (`routes[0].match: ...`) and
    /// usually `at line L column C`. `prefix` locates values parsed on their own (plugin blocks).
    pub fn from_yaml(prefix: &str, e: &serde_yaml::Error) -> Self {
        let text = tidy(&e.to_string());
        // serde_yaml writes "path.to.field: message"; split it so prefixes compose.
        let (inner, message) = match text.split_once(": ") {
            Some((p, m)) if looks_like_path(p) => (p.to_string(), m.to_string()),
            _ => (String::new(), text.clone()),
        };
        let location = match (prefix.is_empty(), inner.is_empty()) {
            (true, _) => inner,
            (false, true) => prefix.to_string(),
            (false, false) if inner.starts_with('[') => format!("{prefix}{inner}"),
            (false, false) => format!("{prefix}.{inner}"),
        };
        ConfigError { location, message }
    }
}

/// Deserialize a YAML value into `T`, with errors located at `prefix` plus the path inside the
/// value (`routes[2].match: unknown field 'path_prefx'`). A null value parses as an empty map,
/// so a bare `- NAME` or an empty section is its type's empty form.
pub fn parse_value<T: serde::de::DeserializeOwned>(value: &serde_yaml::Value, prefix: &str) -> Result<T, ConfigError> {
    let v = if value.is_null() {
        serde_yaml::Value::Mapping(Default::default())
    } else {
        value.clone()
    };
    serde_path_to_error::deserialize(v).map_err(|e| {
        let mut path = e.path().to_string();
        let message = e.into_inner().to_string();
        if path == "." {
            path.clear();
        }
        // Name an unknown field in the message, located at its parent (as serde_yaml does).
        if message.starts_with("unknown field") {
            path = match path.rsplit_once('.') {
                Some((parent, _)) => parent.to_string(),
                None if path.starts_with('[') => path,
                None => String::new(),
            };
        }
        let location = match (prefix.is_empty(), path.is_empty(), path.starts_with('[')) {
            (_, true, _) => prefix.to_string(),
            (true, false, _) => path,
            (false, false, true) => format!("{prefix}{path}"),
            (false, false, false) => format!("{prefix}.{path}"),
        };
        ConfigError::new(location, message)
    })
}

fn looks_like_path(p: &str) -> bool {
    !p.is_empty() && !p.contains(' ') && p.chars().all(|c| c.is_alphanumeric() || "_-.[]*:/".contains(c))
}

/// serde quotes names with backticks; users read single quotes.
fn tidy(s: &str) -> String {
    s.replace('`', "'")
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.location.is_empty() {
            write!(f, "{}", self.message)
        } else {
            write!(f, "{}: {}", self.location, self.message)
        }
    }
}

/// Every error found in one file.
#[derive(Debug, Clone, Default)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl ConfigErrors {
    pub fn push(&mut self, location: impl Into<String>, message: impl Into<String>) {
        self.0.push(ConfigError::new(location, message));
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

impl From<ConfigError> for ConfigErrors {
    fn from(e: ConfigError) -> Self {
        ConfigErrors(vec![e])
    }
}
