//! The event log: every change of a path's reported status, with its cause (docs/OPERATIONS.md, metrics, GetEvents).
//!
//! Bounded (the oldest events drop off), numbered by a sequence that never repeats so a reader can ask
//! for what came after the last one it saw, and shared by every LUN of the daemon. Each event is also
//! logged through `tracing` with the LUN, the path and the cause.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::SystemTime;

use lunmpio_vds::{PathId, PathStatus};
use tokio::sync::broadcast;

/// Events kept for GetEvents.
pub const EVENTS_MAX: usize = 4096;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub seq: u64,
    pub time: SystemTime,
    pub lun: String,
    /// None for LUN-wide events (policy change, all paths down).
    pub path_id: Option<PathId>,
    pub path_name: Option<String>,
    pub from: Option<PathStatus>,
    pub to: Option<PathStatus>,
    pub cause: String,
}

pub struct EventLog {
    inner: Mutex<Inner>,
    live: broadcast::Sender<Event>,
}

struct Inner {
    next_seq: u64,
    events: VecDeque<Event>,
    /// Events ever pushed, by LUN and kind ([`event_kind`]): counters for the metrics, which the
    /// bounded `events` cannot give once old events are dropped.
    counts: std::collections::BTreeMap<(String, &'static str), u64>,
}

/// Distinct (LUN, kind) counters kept at most: LUN names come from the config, so this only bounds
/// a daemon reloaded with ever new names.
const EVENT_COUNTS_MAX: usize = 4096;

/// The kind of an event, for counting: where a path went, or `lun` for LUN-wide events.
pub fn event_kind(to: Option<PathStatus>, path: bool) -> &'static str {
    match (path, to) {
        (false, _) => "lun",
        (true, Some(PathStatus::Online)) => "path_online",
        (true, Some(PathStatus::Failed)) => "path_failed",
        (true, Some(PathStatus::Standby)) => "path_standby",
        (true, _) => "path_other",
    }
}

impl Default for EventLog {
    fn default() -> Self {
        EventLog::new()
    }
}

impl EventLog {
    pub fn new() -> Self {
        EventLog {
            inner: Mutex::new(Inner {
                next_seq: 1,
                events: VecDeque::with_capacity(256),
                counts: std::collections::BTreeMap::new(),
            }),
            live: broadcast::channel(1024).0,
        }
    }

    /// Appends an event and returns its sequence number.
    pub fn push(
        &self,
        lun: &str,
        path: Option<(PathId, &str)>,
        from: Option<PathStatus>,
        to: Option<PathStatus>,
        cause: impl Into<String>,
    ) -> u64 {
        let cause = cause.into();
        let event = {
            let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
            let event = Event {
                seq: inner.next_seq,
                time: SystemTime::now(),
                lun: lun.to_string(),
                path_id: path.map(|(id, _)| id),
                path_name: path.map(|(_, name)| name.to_string()),
                from,
                to,
                cause,
            };
            inner.next_seq += 1;
            let key = (
                event.lun.clone(),
                event_kind(event.to, event.path_name.is_some()),
            );
            if inner.counts.len() < EVENT_COUNTS_MAX || inner.counts.contains_key(&key) {
                *inner.counts.entry(key).or_insert(0) += 1;
            }
            if inner.events.len() == EVENTS_MAX {
                inner.events.pop_front();
            }
            inner.events.push_back(event.clone());
            event
        };
        match (&event.path_name, event.from, event.to) {
            // A path lost is worth a warning; every other transition is information.
            (Some(path), Some(from), Some(to)) if to == PathStatus::Failed => tracing::warn!(
                lun = %event.lun, path = %path, from = from.vds_name(), to = to.vds_name(),
                cause = %event.cause, seq = event.seq, "path status changed"
            ),
            (Some(path), Some(from), Some(to)) => tracing::info!(
                lun = %event.lun, path = %path, from = from.vds_name(), to = to.vds_name(),
                cause = %event.cause, seq = event.seq, "path status changed"
            ),
            _ => {
                tracing::info!(lun = %event.lun, path = ?event.path_name, cause = %event.cause, seq = event.seq, "event")
            }
        }
        let _ = self.live.send(event.clone()); // nobody listening is fine
        event.seq
    }

    /// Events with `seq > since`, optionally of one LUN, oldest first.
    pub fn since(&self, since: u64, lun: Option<&str>) -> Vec<Event> {
        let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        inner
            .events
            .iter()
            .filter(|e| e.seq > since && lun.is_none_or(|l| e.lun == l))
            .cloned()
            .collect()
    }

    /// Events ever pushed, by LUN and kind ([`event_kind`]).
    pub fn counts(&self) -> Vec<(String, &'static str, u64)> {
        let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        inner
            .counts
            .iter()
            .map(|((lun, kind), n)| (lun.clone(), *kind, *n))
            .collect()
    }

    /// Live events from now on (for `lunmpio events --follow` and the demo's view).
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.live.subscribe()
    }

    /// The sequence number the next event will get.
    /// Every event kept, and the next sequence number: what a live upgrade hands to the next program.
    pub fn export(&self) -> (Vec<Event>, u64) {
        let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        (inner.events.iter().cloned().collect(), inner.next_seq)
    }

    /// A log that goes on from an exported one: same events, numbering continues (a client that
    /// follows `since` sees no gap and no repeat across the upgrade).
    pub fn restored(events: Vec<Event>, next_seq: u64) -> EventLog {
        let log = EventLog::new();
        {
            let mut inner = log.inner.lock().unwrap_or_else(|p| p.into_inner());
            let last = events.last().map_or(0, |e| e.seq);
            let skip = events.len().saturating_sub(EVENTS_MAX);
            inner.events = events.into_iter().skip(skip).collect();
            inner.next_seq = next_seq.max(last + 1);
        }
        log
    }

    pub fn next_seq(&self) -> u64 {
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .next_seq
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_numbered_filtered_and_bounded() {
        let log = EventLog::new();
        let p = PathId::new(1, 2);
        let a = log.push(
            "lun0",
            Some((p, "p0")),
            Some(PathStatus::Online),
            Some(PathStatus::Failed),
            "connection reset",
        );
        let b = log.push("lun1", None, None, None, "policy set to round-robin");
        assert_eq!((a, b), (1, 2));
        assert_eq!(log.since(0, None).len(), 2);
        assert_eq!(log.since(1, None)[0].lun, "lun1");
        assert_eq!(log.since(0, Some("lun0")).len(), 1);
        assert_eq!(log.since(0, Some("lun0"))[0].cause, "connection reset");
        for i in 0..EVENTS_MAX + 10 {
            log.push("lun0", None, None, None, format!("e{i}"));
        }
        let all = log.since(0, None);
        assert_eq!(all.len(), EVENTS_MAX);
        assert!(all.windows(2).all(|w| w[0].seq + 1 == w[1].seq));
        assert_eq!(all.last().unwrap().seq + 1, log.next_seq());
    }

    #[tokio::test]
    async fn subscribers_see_new_events() {
        let log = EventLog::new();
        let mut rx = log.subscribe();
        log.push("lun0", None, None, None, "hello");
        assert_eq!(rx.recv().await.unwrap().cause, "hello");
    }
}
