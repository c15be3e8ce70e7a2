//! lunmpio's daemon crate: the `lunmpio` binary's commands, also usable as a library (tests, the C ABI's
//! tests and the demo start a daemon in-process).
//!
//! - [`config`]: the TOML configuration (strict; errors name the key and the line).
//! - [`serve`]: the multipath daemon — LUNs, NBD exports, control socket, metrics, graceful stop.
//! - [`manage`]: the management commands (one per JSON-RPC method).
//! - [`target`]: the simulated storage array with live per-port faults.
//! - [`demo`]: the showcase.

pub mod cli;
pub mod config;
pub mod demo;
pub mod manage;
pub mod serve;
pub mod table;
pub mod target;
pub mod target_cli;
pub mod units;
