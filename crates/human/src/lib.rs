//! Text for people, written once for the whole product: the sizes (`256MiB`), byte rates (`50MiB/s`),
//! durations (`200ms`, `1m30s`) and probabilities (`5%`) administrators type into flags, config files
//! and fault commands, the same quantities printed back, and aligned tables.

mod table;
mod units;

pub use table::render_table;
pub use units::{
    format_duration, format_size, parse_duration, parse_probability, parse_rate, parse_size,
};
