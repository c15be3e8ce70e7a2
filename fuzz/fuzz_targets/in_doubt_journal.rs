//! The persisted in-doubt journal: a corrupt file is an error, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(journal) = lunmpio_vds::persist::InDoubtJournal::parse(text) {
            let again = lunmpio_vds::persist::InDoubtJournal::parse(&journal.to_json());
            assert_eq!(again.as_ref(), Ok(&journal));
        }
    }
});
