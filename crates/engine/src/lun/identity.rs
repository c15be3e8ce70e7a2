//! Identity (docs/OPERATIONS.md, paths): every path of a LUN must lead to the same volume. The LUN's identity is
//! what its config declares (`size`, `wwid`); otherwise the value most of the paths' first answers
//! agree on, ties going to the earlier path in the config. A path that differs is refused — now or
//! whenever it comes back — and never carries I/O. This keeps two different volumes from being
//! merged into one.

use lunmpio_nbd::{BlockSize, TransmissionFlags};
use lunmpio_vds::VdsError;

use crate::settings::LunSpec;
use crate::transport::{Geometry, PathConnection};

/// What the export may advertise when no path has answered yet but the config declares a size:
/// flushes only (FUA, TRIM, WRITE_ZEROES are added only once every path is known to support them).
fn conservative_flags() -> TransmissionFlags {
    TransmissionFlags::HAS_FLAGS | TransmissionFlags::SEND_FLUSH
}

/// Capabilities the export takes from the paths (intersection); the rest it sets itself.
fn path_capabilities() -> TransmissionFlags {
    TransmissionFlags::SEND_FLUSH
        | TransmissionFlags::SEND_FUA
        | TransmissionFlags::SEND_TRIM
        | TransmissionFlags::SEND_WRITE_ZEROES
        | TransmissionFlags::SEND_CACHE
        | TransmissionFlags::SEND_FAST_ZERO
        | TransmissionFlags::ROTATIONAL
}

/// Settles the LUN's geometry from the config and the first connection attempts (same order as
/// `spec.paths` sorted by id). Errors only when nothing at all tells the size.
pub(super) fn settle(
    spec: &LunSpec,
    first: &[Result<PathConnection, String>],
) -> Result<Geometry, VdsError> {
    let infos: Vec<&Geometry> = first
        .iter()
        .filter_map(|r| r.as_ref().ok())
        .map(|c| c.info())
        .collect();
    let (size_bytes, read_only) = match spec.size_bytes {
        Some(size) => (size, majority(&infos, |i| i.read_only).unwrap_or(false)),
        None => match majority(&infos, |i| (i.size_bytes, i.read_only)) {
            Some(pair) => pair,
            None => {
                return Err(VdsError::object_status_failed(format!(
                    "LUN {:?}: no path answered at start and the config declares no `size`; \
                     set `size` so the LUN can be exported before its paths return",
                    spec.name
                )));
            }
        },
    };
    let matching: Vec<&Geometry> = infos
        .iter()
        .copied()
        .filter(|i| mismatch(i, size_bytes, read_only, spec.wwid.as_deref()).is_none())
        .collect();
    Ok(geometry_of(
        size_bytes,
        read_only,
        spec.wwid.clone(),
        &matching,
    ))
}

/// The export's geometry from the paths that match the identity. Total over any values the paths
/// report (the transports sanitize them, but this never relies on it): the result always has
/// `1 <= min <= preferred <= max_payload <= MAX_PAYLOAD_BYTES`, min a power of two.
pub fn geometry_of(
    size_bytes: u64,
    read_only: bool,
    identity: Option<String>,
    paths: &[&Geometry],
) -> Geometry {
    if paths.is_empty() {
        return Geometry {
            size_bytes,
            read_only,
            flags: conservative_flags() | read_only_flag(read_only),
            block_size: BlockSize::default(),
            base_allocation: false,
            identity,
        };
    }
    let mut caps = path_capabilities();
    for info in paths {
        caps &= info.flags;
    }
    // Our own flush covers every path that acknowledged a write, whichever client connection sent it,
    // so several client connections to the export are always coherent: CAN_MULTI_CONN is honest.
    let flags = TransmissionFlags::HAS_FLAGS
        | TransmissionFlags::CAN_MULTI_CONN
        | caps
        | read_only_flag(read_only);
    let block_size = joint_block_size(paths);
    Geometry {
        size_bytes,
        read_only,
        flags,
        block_size,
        base_allocation: paths.iter().all(|i| i.base_allocation),
        identity: identity.or_else(|| paths.iter().find_map(|i| i.identity.clone())),
    }
}

/// The strictest constraints of all paths: the largest minimum, the smallest maximum, the largest
/// preferred size that fits. Each path's own constraints are sanitized first, so a path advertising odd
/// values (a preferred size above 32 MiB, say) cannot produce an impossible triple.
fn joint_block_size(paths: &[&Geometry]) -> BlockSize {
    let sane: Vec<BlockSize> = paths
        .iter()
        .map(|i| i.block_size.sanitize().unwrap_or_default())
        .collect();
    let min = sane.iter().map(|b| b.min).max().unwrap_or(1).max(1);
    let max_payload = sane
        .iter()
        .map(|b| b.max_payload)
        .min()
        .unwrap_or(lunmpio_nbd::MAX_PAYLOAD_BYTES)
        .min(lunmpio_nbd::MAX_PAYLOAD_BYTES);
    // `min` is a power of two up to 64 KiB and every sanitized max is a multiple of its own min, but
    // not necessarily of the largest min: round down, and never below min.
    let max_payload = (max_payload - max_payload % min).max(min);
    let preferred = sane
        .iter()
        .map(|b| b.preferred)
        .max()
        .unwrap_or(4096)
        .clamp(min, max_payload);
    let preferred = (1u32 << (31 - preferred.leading_zeros())).max(min);
    BlockSize {
        min,
        preferred,
        max_payload,
    }
}

fn read_only_flag(read_only: bool) -> TransmissionFlags {
    if read_only {
        TransmissionFlags::READ_ONLY
    } else {
        TransmissionFlags::empty()
    }
}

/// Why a path cannot serve this LUN as exported: a different volume (see [`mismatch`]), or stricter
/// alignment than the export promised its clients — a path needing 4096-byte alignment cannot take the
/// 512-byte writes of a LUN settled at 1-byte alignment, so it is refused rather than made to fail them.
pub fn refusal(info: &Geometry, lun: &Geometry) -> Option<String> {
    if let Some(reason) = mismatch(info, lun.size_bytes, lun.read_only, lun.identity.as_deref()) {
        return Some(reason);
    }
    let path_min = info
        .block_size
        .sanitize()
        .map(|b| b.min)
        .unwrap_or(u32::MAX);
    if path_min > lun.block_size.min {
        return Some(format!(
            "identity mismatch: the path needs {path_min}-byte alignment, the LUN serves I/O aligned \
             to {} bytes",
            lun.block_size.min
        ));
    }
    None
}

/// Why a path's answer does not match the LUN, if it does not.
pub fn mismatch(
    info: &Geometry,
    size_bytes: u64,
    read_only: bool,
    wwid: Option<&str>,
) -> Option<String> {
    if info.size_bytes != size_bytes {
        return Some(format!(
            "identity mismatch: size {} bytes, the LUN has {size_bytes}",
            info.size_bytes
        ));
    }
    if info.read_only != read_only {
        let says = |ro: bool| if ro { "read-only" } else { "writable" };
        return Some(format!(
            "identity mismatch: the path is {}, the LUN is {}",
            says(info.read_only),
            says(read_only)
        ));
    }
    if let (Some(want), Some(got)) = (wwid, info.identity.as_deref())
        && want != got
    {
        return Some(format!("identity mismatch: wwid {got}, the LUN is {want}"));
    }
    None
}

/// The value most items agree on; ties go to the earliest (items are in config order).
fn majority<T: PartialEq + Copy>(infos: &[&Geometry], key: impl Fn(&Geometry) -> T) -> Option<T> {
    let keys: Vec<T> = infos.iter().map(|i| key(i)).collect();
    let mut best: Option<(T, usize)> = None;
    for k in &keys {
        let count = keys.iter().filter(|other| *other == k).count();
        if best.is_none_or(|(_, c)| count > c) {
            best = Some((*k, count));
        }
    }
    best.map(|(k, _)| k)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(size: u64, flags: TransmissionFlags) -> Geometry {
        Geometry {
            size_bytes: size,
            read_only: false,
            flags: TransmissionFlags::HAS_FLAGS | flags,
            block_size: BlockSize {
                min: 1,
                preferred: 4096,
                max_payload: 32 << 20,
            },
            base_allocation: true,
            identity: None,
        }
    }

    #[test]
    fn majority_wins_and_ties_go_to_the_earlier_path() {
        let a = info(100, TransmissionFlags::empty());
        let b = info(200, TransmissionFlags::empty());
        assert_eq!(majority(&[&a, &b, &b], |i| i.size_bytes), Some(200));
        assert_eq!(majority(&[&a, &b], |i| i.size_bytes), Some(100));
        assert_eq!(majority(&[&b, &a], |i| i.size_bytes), Some(200));
        assert_eq!(majority::<u64>(&[], |i| i.size_bytes), None);
    }

    #[test]
    fn export_flags_are_the_intersection_and_multi_conn_is_ours() {
        let a = info(
            100,
            TransmissionFlags::SEND_FLUSH
                | TransmissionFlags::SEND_TRIM
                | TransmissionFlags::SEND_FUA,
        );
        let b = info(
            100,
            TransmissionFlags::SEND_FLUSH | TransmissionFlags::SEND_FUA,
        );
        let g = geometry_of(100, false, None, &[&a, &b]);
        assert!(
            g.flags
                .contains(TransmissionFlags::SEND_FLUSH | TransmissionFlags::SEND_FUA)
        );
        assert!(!g.flags.contains(TransmissionFlags::SEND_TRIM));
        assert!(g.flags.contains(TransmissionFlags::CAN_MULTI_CONN));
        assert!(!g.flags.contains(TransmissionFlags::READ_ONLY));
    }

    #[test]
    fn block_sizes_are_the_strictest() {
        let mut a = info(100, TransmissionFlags::empty());
        let mut b = info(100, TransmissionFlags::empty());
        a.block_size = BlockSize {
            min: 512,
            preferred: 4096,
            max_payload: 1 << 20,
        };
        b.block_size = BlockSize {
            min: 4096,
            preferred: 65536,
            max_payload: 32 << 20,
        };
        let g = geometry_of(100, false, None, &[&a, &b]);
        assert_eq!(
            g.block_size,
            BlockSize {
                min: 4096,
                preferred: 65536,
                max_payload: 1 << 20
            }
        );
    }

    #[test]
    fn odd_but_legal_block_sizes_never_produce_an_impossible_triple() {
        let mut odd = info(100, TransmissionFlags::empty());
        odd.block_size = BlockSize {
            min: 1,
            preferred: 64 << 20,
            max_payload: u32::MAX,
        };
        let g = geometry_of(100, false, None, &[&odd]);
        let b = g.block_size;
        assert!(
            b.min <= b.preferred && b.preferred <= b.max_payload,
            "{b:?}"
        );
        assert_eq!(b.max_payload, lunmpio_nbd::MAX_PAYLOAD_BYTES);
        // Mixed minimums: the max payload is rounded to the strictest minimum.
        let mut a = info(100, TransmissionFlags::empty());
        a.block_size = BlockSize {
            min: 512,
            preferred: 512,
            max_payload: 1536,
        };
        let mut c = info(100, TransmissionFlags::empty());
        c.block_size = BlockSize {
            min: 1024,
            preferred: 1024,
            max_payload: 4096,
        };
        let b = geometry_of(100, false, None, &[&a, &c]).block_size;
        assert_eq!((b.min, b.preferred, b.max_payload), (1024, 1024, 1024));
    }

    #[test]
    fn a_path_stricter_than_the_export_is_refused() {
        let lun = geometry_of(100, false, None, &[&info(100, TransmissionFlags::empty())]);
        assert_eq!(lun.block_size.min, 1);
        let mut strict = info(100, TransmissionFlags::empty());
        strict.block_size.min = 4096;
        let reason = refusal(&strict, &lun).expect("refused");
        assert!(reason.contains("4096-byte alignment"), "{reason}");
        assert!(refusal(&info(100, TransmissionFlags::empty()), &lun).is_none());
    }

    #[test]
    fn mismatches_say_what_differs() {
        let a = info(100, TransmissionFlags::empty());
        assert!(mismatch(&a, 100, false, None).is_none());
        assert!(
            mismatch(&a, 200, false, None)
                .unwrap()
                .contains("size 100 bytes, the LUN has 200")
        );
        assert!(mismatch(&a, 100, true, None).unwrap().contains("writable"));
        let mut w = a.clone();
        w.identity = Some("naa.1".into());
        assert!(
            mismatch(&w, 100, false, Some("naa.2"))
                .unwrap()
                .contains("wwid naa.1")
        );
        assert!(mismatch(&w, 100, false, Some("naa.1")).is_none());
    }
}
