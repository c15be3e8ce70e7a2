//! lunmpio's multipath engine: one logical LUN over N paths.
//!
//! - [`transport`]: how one path reaches the storage — NBD over TCP or Unix sockets, local files and
//!   block devices — behind one small enum-dispatched surface, with one conformance suite
//!   (`tests/conformance.rs`) run against each.
//! - [`lun`]: the multipath LUN — the data path (dispatch by policy, re-drive on failure, hang
//!   detection, fencing, flush fan-out), the control task (the VDS state, events, persistence) and the
//!   per-path health tasks (probes, reconnects, hold-down, failback).
//! - Building blocks: the in-doubt write table ([`in_doubt`]), the bounded no-path queue
//!   ([`no_path`]), latency statistics and adaptive timeouts ([`latency`]), one timer for the
//!   deadlines of every attempt in flight ([`deadline_watch`]), the event log ([`events`]), settings
//!   ([`settings`]).

pub mod deadline_watch;
pub mod events;
pub mod in_doubt;
pub mod latency;
pub mod lun;
pub mod no_path;
pub mod settings;
pub mod state_files;
pub mod transport;

pub use events::{Event, EventLog};
pub use lun::{
    Geometry, IoError, Lun, LunCarry, LunOptions, LunStats, PathCarry, PathStats, SetReservation,
    set_all_path_statuses_from_hba_port,
};
pub use settings::{Failback, LunSettings, LunSpec, NoPathRetry, PathSpec, stable_id};
