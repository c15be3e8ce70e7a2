//! Identity settling over whatever the paths' servers advertise: sizes, flags and block-size triples
//! (odd but legal ones like a 64 MiB preferred size, and illegal ones). The export's geometry must
//! always be usable — `1 <= min <= preferred <= max_payload <= 32 MiB`, min a power of two — and no
//! value may reach a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use lunmpio_engine::lun::identity::{geometry_of, refusal};
use lunmpio_engine::transport::Geometry;
use lunmpio_nbd::{BlockSize, MAX_PAYLOAD_BYTES, TransmissionFlags};

fn word(data: &[u8], at: usize) -> u32 {
    let mut b = [0u8; 4];
    for (i, x) in b.iter_mut().enumerate() {
        *x = data.get(at + i).copied().unwrap_or(0);
    }
    u32::from_le_bytes(b)
}

fuzz_target!(|data: &[u8]| {
    // 16 bytes per path: size (4, scaled), flags (2), read-only (1), spare (1), min, preferred, max
    // as three 32-bit words (the last two overlap the spare bytes of the next field on purpose).
    let infos: Vec<Geometry> = data
        .chunks(16)
        .take(8)
        .map(|c| Geometry {
            size_bytes: u64::from(word(c, 0)) << 9,
            read_only: c.get(6).is_some_and(|b| b & 1 == 1),
            flags: TransmissionFlags::from_bits_truncate(word(c, 4) as u16),
            block_size: BlockSize {
                min: word(c, 8) & 0x1_ffff,
                preferred: word(c, 10),
                max_payload: word(c, 12),
            },
            base_allocation: c.get(7).is_some_and(|b| b & 1 == 1),
            identity: None,
        })
        .collect();
    let Some(first) = infos.first() else { return };
    let refs: Vec<&Geometry> = infos.iter().collect();
    let g = geometry_of(first.size_bytes, first.read_only, None, &refs);
    let b = g.block_size;
    assert!(b.min >= 1 && b.min.is_power_of_two(), "{b:?}");
    assert!(b.min <= b.preferred && b.preferred <= b.max_payload, "{b:?}");
    assert!(b.max_payload <= MAX_PAYLOAD_BYTES, "{b:?}");
    for info in &infos {
        let _ = refusal(info, &g);
    }
});
