//! Fault commands for one controller port of the simulated array, and the state they leave behind.
//!
//! The same parser serves the CLI (`lunmpio target fault ... CMD`), the control socket and the demo, so a
//! value that is rejected in one place is rejected everywhere with the same message.

use std::fmt;
use std::time::Duration;

use lunmpio_human::{format_duration, format_size, parse_duration, parse_probability, parse_rate};

/// One fault command, as typed after `--port I`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Fault {
    /// Reset open connections (RST) and refuse new ones.
    Down,
    /// Clear `down` and `hang`; request-level faults (delay, errors, rate) stay.
    Up,
    /// Answer nothing on open or new connections until `up`/`clear`.
    Hang,
    /// Add this latency to every request (zero removes it).
    Delay(Duration),
    /// Answer this fraction of requests with NBD_EIO (zero removes it).
    ErrorRate(f64),
    /// Cap the port's bandwidth (bytes per second); `None` removes the cap.
    Rate(Option<u64>),
    /// Back to normal: everything above is cleared.
    Clear,
}

pub const FAULT_HELP: &str = "expected one of: down, up, hang, delay=DURATION (200ms), error-rate=P (0.05 or 5%), rate=BYTES/s (50MiB), rate=off, clear";

impl Fault {
    pub fn parse(text: &str) -> Result<Fault, String> {
        let trimmed = text.trim();
        let (key, value) = match trimmed.split_once('=') {
            Some((k, v)) => (k.trim(), Some(v.trim())),
            None => (trimmed, None),
        };
        let key_lower = key.to_ascii_lowercase();
        let fault = match (key_lower.as_str(), value) {
            ("down", None) => Fault::Down,
            ("up", None) => Fault::Up,
            ("hang", None) => Fault::Hang,
            ("clear", None) => Fault::Clear,
            ("delay", Some(v)) => Fault::Delay(parse_duration(v)?),
            ("error-rate", Some(v)) => Fault::ErrorRate(parse_probability(v)?),
            ("rate", Some("off" | "none" | "unlimited")) => Fault::Rate(None),
            ("rate", Some(v)) => Fault::Rate(Some(parse_rate(v)?)),
            ("down" | "up" | "hang" | "clear", Some(_)) => {
                return Err(format!("fault `{key}` takes no value; {FAULT_HELP}"));
            }
            ("delay" | "error-rate" | "rate", None) => {
                return Err(format!(
                    "fault `{key}` needs a value (`{key}=...`); {FAULT_HELP}"
                ));
            }
            _ => return Err(format!("unknown fault `{trimmed}`; {FAULT_HELP}")),
        };
        Ok(fault)
    }
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Fault::Down => f.write_str("down"),
            Fault::Up => f.write_str("up"),
            Fault::Hang => f.write_str("hang"),
            Fault::Clear => f.write_str("clear"),
            Fault::Delay(d) => write!(f, "delay={}", format_duration(*d)),
            // Rounded so 0.07 prints as 7%, not 7.000000000000001%.
            Fault::ErrorRate(p) => write!(f, "error-rate={}%", (p * 100.0 * 1e6).round() / 1e6),
            Fault::Rate(None) => f.write_str("rate=off"),
            Fault::Rate(Some(r)) => write!(f, "rate={}/s", format_size(*r).replace(' ', "")),
        }
    }
}

/// Faults currently in force on one port.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct FaultState {
    pub down: bool,
    pub hang: bool,
    pub delay: Duration,
    pub error_rate: f64,
    pub rate: Option<u64>,
}

impl FaultState {
    /// The state after applying `fault`. Pure, so callers can validate and publish atomically.
    pub fn apply(mut self, fault: Fault) -> FaultState {
        match fault {
            Fault::Down => self.down = true,
            Fault::Hang => self.hang = true,
            Fault::Up => {
                self.down = false;
                self.hang = false;
            }
            Fault::Delay(d) => self.delay = d,
            Fault::ErrorRate(p) => self.error_rate = p,
            Fault::Rate(r) => self.rate = r,
            Fault::Clear => self = FaultState::default(),
        }
        self
    }

    /// Whether any per-request fault (delay, error rate, bandwidth cap) is active; the request path
    /// checks this one flag so an unfaulted port pays almost nothing.
    pub fn has_request_faults(&self) -> bool {
        !self.delay.is_zero() || self.error_rate > 0.0 || self.rate.is_some()
    }

    /// One word for tables: the connection-level state.
    pub fn state_name(&self) -> &'static str {
        if self.down {
            "down"
        } else if self.hang {
            "hung"
        } else {
            "up"
        }
    }

    /// Human summary of the active request-level faults, `-` when none.
    pub fn describe_request_faults(&self) -> String {
        let mut parts = Vec::new();
        if !self.delay.is_zero() {
            parts.push(Fault::Delay(self.delay).to_string());
        }
        if self.error_rate > 0.0 {
            parts.push(Fault::ErrorRate(self.error_rate).to_string());
        }
        if self.rate.is_some() {
            parts.push(Fault::Rate(self.rate).to_string());
        }
        if parts.is_empty() {
            "-".to_string()
        } else {
            parts.join(" ")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_form() {
        assert_eq!(Fault::parse("down"), Ok(Fault::Down));
        assert_eq!(Fault::parse("UP"), Ok(Fault::Up));
        assert_eq!(Fault::parse("hang"), Ok(Fault::Hang));
        assert_eq!(Fault::parse("clear"), Ok(Fault::Clear));
        assert_eq!(
            Fault::parse("delay=200ms"),
            Ok(Fault::Delay(Duration::from_millis(200)))
        );
        assert_eq!(Fault::parse("error-rate=5%"), Ok(Fault::ErrorRate(0.05)));
        assert_eq!(Fault::parse("error-rate=0.05"), Ok(Fault::ErrorRate(0.05)));
        assert_eq!(Fault::parse("rate=50MiB"), Ok(Fault::Rate(Some(50 << 20))));
        assert_eq!(Fault::parse("rate=off"), Ok(Fault::Rate(None)));
    }

    #[test]
    fn rejects_bad_values_with_a_reason() {
        for (text, needle) in [
            ("explode", "unknown fault"),
            ("delay", "needs a value"),
            ("down=1", "takes no value"),
            ("delay=fast", "invalid duration"),
            ("delay=200", "missing unit"),
            ("error-rate=150%", "between 0 and 1"),
            ("rate=0", "greater than 0"),
            ("rate=lots", "invalid rate"),
            ("", "unknown fault"),
        ] {
            let err = Fault::parse(text).unwrap_err();
            assert!(err.contains(needle), "{text}: {err}");
        }
    }

    #[test]
    fn apply_semantics() {
        let s = FaultState::default()
            .apply(Fault::Down)
            .apply(Fault::Hang)
            .apply(Fault::Delay(Duration::from_millis(5)));
        assert!(s.down && s.hang && s.has_request_faults());
        let up = s.apply(Fault::Up);
        assert!(!up.down && !up.hang);
        assert_eq!(
            up.delay,
            Duration::from_millis(5),
            "up keeps request faults"
        );
        assert_eq!(s.apply(Fault::Clear), FaultState::default());
    }

    #[test]
    fn display_round_trips() {
        for text in [
            "down",
            "up",
            "hang",
            "clear",
            "delay=200ms",
            "error-rate=5%",
            "rate=50MiB/s",
            "rate=off",
        ] {
            let fault = Fault::parse(text).unwrap();
            assert_eq!(Fault::parse(&fault.to_string()), Ok(fault), "{text}");
        }
    }
}
