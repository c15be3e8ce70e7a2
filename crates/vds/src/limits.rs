//! The product's limits, in one place. Every layer checks against these (the config at start, the VDS
//! rules on every change, the selector's masks), so a value accepted by one is accepted by all.

/// At most this many LUNs per daemon.
pub const LUNS_MAX: usize = 256;

/// At most this many paths per LUN: the selector's exclude mask and the dispatcher's tried-paths
/// mask are `u64`s, one bit per path.
pub const PATHS_PER_LUN_MAX: usize = 64;
const _: () = assert!(PATHS_PER_LUN_MAX <= u64::BITS as usize);

/// Longest LUN or path name, in bytes. A LUN's name is part of its state files' names
/// (`lun-NAME.in-doubt.json`), which must fit a file name (255 bytes).
pub const NAME_BYTES_MAX: usize = 128;
const _: () = assert!("lun-".len() + NAME_BYTES_MAX + ".in-doubt.json.tmp".len() <= 255);
