//! The persisted per-LUN state file: a corrupt file is an error, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(state) = lunmpio_vds::persist::LunState::parse(text) {
            let _ = state.to_json();
        }
    }
});
