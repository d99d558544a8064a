//! Durations and sizes as the config file writes them: `250ms`, `5s`, `1m`, `1d`;
//! `16KiB`, `10MiB`, `1048576`.

use serde::{de, Deserialize, Deserializer};
use std::fmt;
use std::time::Duration;

/// A duration written as a string with a unit (`250ms`, `5s`, `1m`, `1h`, `1d`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Dur(pub Duration);

impl Dur {
    pub const fn secs(s: u64) -> Self {
        Dur(Duration::from_secs(s))
    }
}

/// The longest duration any key accepts: a deadline computed from it (`now + d`) can never
/// overflow. Each key has its own, tighter bound on top ([`bounded`]).
pub const MAX_DURATION: Duration = Duration::from_secs(365 * 86400);

pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    if t.is_empty() || t.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!(
            "invalid duration '{s}': write a number with a unit, such as 250ms, 5s, 1m, 1h or 1d"
        ));
    }
    let d = humantime::parse_duration(t).map_err(|e| {
        format!("invalid duration '{s}' ({e}): write a number with a unit, such as 250ms, 5s, 1m, 1h or 1d")
    })?;
    if d > MAX_DURATION {
        return Err(format!("invalid duration '{s}': at most 365d"));
    }
    Ok(d)
}

/// Whether `d` lies within `min..=max`; the error is the message for the key's location
/// (`must be at least 100ms`, `must be at most 1h`).
pub fn bounded(d: Duration, min: Duration, max: Duration) -> Result<(), String> {
    // As the file would write it: 100ms, 1h, 1d.
    let show = |d: Duration| match (d.as_secs(), d.subsec_millis()) {
        (0, ms) => format!("{ms}ms"),
        (s, 0) if s % 86400 == 0 => format!("{}d", s / 86400),
        (s, 0) if s % 3600 == 0 => format!("{}h", s / 3600),
        (s, 0) if s % 60 == 0 => format!("{}m", s / 60),
        (s, 0) => format!("{s}s"),
        _ => humantime::format_duration(d).to_string(),
    };
    if d < min {
        return Err(if min == Duration::from_nanos(1) {
            "must be more than 0".to_string()
        } else {
            format!("must be at least {}", show(min))
        });
    }
    if d > max {
        return Err(format!("must be at most {}", show(max)));
    }
    Ok(())
}

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl de::Visitor<'_> for V {
            type Value = Dur;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a duration such as 250ms, 5s, 1m, 1h or 1d")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Dur, E> {
                parse_duration(v).map(Dur).map_err(E::custom)
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Dur, E> {
                Err(E::custom(format!(
                    "invalid duration {v}: write a number with a unit, such as {v}s or {v}ms"
                )))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Dur, E> {
                self.visit_u64(v.unsigned_abs())
            }
        }
        d.deserialize_any(V)
    }
}

/// A size in bytes: an integer, or a string with a unit (`16KiB`, `10MiB`, `1GiB`, `512B`, `64KB`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Size(pub u64);

pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let bad = || format!("invalid size '{s}': write bytes, or a number with a unit such as 16KiB or 10MiB");
    let n: u64 = num.parse().map_err(|_| bad())?;
    let mult: u64 = match unit.trim() {
        "" | "B" | "b" => 1,
        "K" | "k" | "KB" | "kB" | "KiB" | "kib" => 1 << 10,
        "M" | "MB" | "MiB" | "mib" => 1 << 20,
        "G" | "GB" | "GiB" | "gib" => 1 << 30,
        _ => return Err(bad()),
    };
    n.checked_mul(mult).ok_or_else(bad)
}

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl de::Visitor<'_> for V {
            type Value = Size;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a size such as 1048576, 16KiB or 10MiB")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Size, E> {
                parse_size(v).map(Size).map_err(E::custom)
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Size, E> {
                Ok(Size(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Size, E> {
                u64::try_from(v)
                    .map(Size)
                    .map_err(|_| E::custom(format!("invalid size {v}: must not be negative")))
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("5s").unwrap(), Duration::from_secs(5));
        assert_eq!(parse_duration("1m").unwrap(), Duration::from_secs(60));
        assert_eq!(parse_duration("1h").unwrap(), Duration::from_secs(3600));
        assert_eq!(parse_duration("1d").unwrap(), Duration::from_secs(86400));
        assert!(parse_duration("5").is_err());
        assert!(parse_duration("fast").is_err());
        assert!(parse_duration("").is_err());
        // Overflowing or absurd values are refused, never a later `Instant + d` panic.
        assert!(parse_duration("18446744073709551615s").is_err());
        assert!(parse_duration("366d").unwrap_err().contains("at most 365d"));
        assert_eq!(parse_duration("365d").unwrap(), MAX_DURATION);
        let (ms, h) = (Duration::from_millis(100), Duration::from_secs(3600));
        assert!(bounded(Duration::from_secs(5), ms, h).is_ok());
        assert_eq!(
            bounded(Duration::from_millis(5), ms, h).unwrap_err(),
            "must be at least 100ms"
        );
        assert_eq!(
            bounded(Duration::from_secs(7200), ms, h).unwrap_err(),
            "must be at most 1h"
        );
        assert_eq!(
            bounded(Duration::ZERO, Duration::from_nanos(1), h).unwrap_err(),
            "must be more than 0"
        );
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("16KiB").unwrap(), 16384);
        assert_eq!(parse_size("10MiB").unwrap(), 10 << 20);
        assert_eq!(parse_size("1048576").unwrap(), 1048576);
        assert_eq!(parse_size("1GiB").unwrap(), 1 << 30);
        assert!(parse_size("10 parsecs").is_err());
        assert!(parse_size("99999999999999999999GiB").is_err());
    }
}
