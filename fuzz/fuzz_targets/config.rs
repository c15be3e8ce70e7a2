//! The TOML configuration: arbitrary text must give a Config or an error naming a line, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(config) = lunmpio_daemon::config::Config::parse(text, "fuzz.toml") {
            for lun in &config.luns {
                let _ = lun.to_spec();
            }
        }
    }
});
