//! lunmpio-console: the live console, `lunmpio top`.
//!
//! - [`model`]: the daemon's answers turned into per-path rates and histories (pure).
//! - [`view`]: the ratatui widgets that draw a model (pure; tested on a `TestBackend`).
//! - [`app`]: the loop: poll the control socket, draw, act on keys (changes are confirmed and show
//!   the daemon's VDS result), end on `q`/Ctrl-C or when the daemon goes away.
//!
//! It speaks only the management contract (`lunmpio-rpc`), like any other client of the daemon.

pub mod app;
pub mod model;
pub mod view;

pub use app::{TopError, TopOptions, run};
