//! lunmpio's daemon as a library: the `lunmpio` binary runs it (`lunmpio serve`), the demo and the C
//! ABI's tests start it in-process.
//!
//! - [`config`]: the TOML configuration (strict; errors name the key and the line).
//! - [`doctor`]: `lunmpio doctor`, a preflight check of a config and the daemon running it.
//! - [`serve`]: the multipath daemon — LUNs, NBD exports, the control socket, metrics, graceful stop.

pub mod config;
pub mod doctor;
pub mod serve;
