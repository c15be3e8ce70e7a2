//! HRESULTs and the crate's one error type.
//!
//! Every failure this crate reports is a [`VdsError`]: an exact VDS/COM [`Hresult`] plus a message for
//! people. The daemon turns it into a JSON-RPC error (`code` = the HRESULT as a signed 32-bit integer),
//! the C ABI returns the HRESULT as is. Success codes that carry meaning
//! ([`Hresult::VDS_S_STATUSES_INCOMPLETELY_SET`]) are returned as `Ok(Hresult)`, never as errors.

use std::fmt;

/// A COM `HRESULT`: negative values are failures, zero and positive values are successes.
///
/// ```
/// use lunmpio_vds::Hresult;
/// let hr = Hresult::VDS_E_OBJECT_NOT_FOUND;
/// assert_eq!(hr.as_hex(), "0x80042405");
/// assert_eq!(hr.name(), "VDS_E_OBJECT_NOT_FOUND");
/// assert_eq!(hr.0, -2147212283);
/// assert!(!hr.is_success());
/// assert!(Hresult::VDS_S_STATUSES_INCOMPLETELY_SET.is_success());
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct Hresult(pub i32);

impl Hresult {
    pub const S_OK: Hresult = Hresult(0);
    /// Success: at least one path status could not be set because it conflicts with the policy.
    pub const VDS_S_STATUSES_INCOMPLETELY_SET: Hresult = Hresult(0x0004_2702);
    pub const E_INVALIDARG: Hresult = Hresult::from_bits(0x8007_0057);
    pub const E_OUTOFMEMORY: Hresult = Hresult::from_bits(0x8007_000E);
    pub const E_POINTER: Hresult = Hresult::from_bits(0x8000_4003);
    pub const E_NOINTERFACE: Hresult = Hresult::from_bits(0x8000_4002);
    pub const E_FAIL: Hresult = Hresult::from_bits(0x8000_4005);
    pub const E_UNEXPECTED: Hresult = Hresult::from_bits(0x8000_FFFF);
    pub const VDS_E_NOT_SUPPORTED: Hresult = Hresult::from_bits(0x8004_2400);
    pub const VDS_E_ANOTHER_CALL_IN_PROGRESS: Hresult = Hresult::from_bits(0x8004_2404);
    pub const VDS_E_OBJECT_NOT_FOUND: Hresult = Hresult::from_bits(0x8004_2405);
    pub const VDS_E_OBJECT_DELETED: Hresult = Hresult::from_bits(0x8004_240B);
    pub const VDS_E_PATH_NOT_FOUND: Hresult = Hresult::from_bits(0x8004_2416);
    pub const VDS_E_PROVIDER_CACHE_CORRUPT: Hresult = Hresult::from_bits(0x8004_241F);
    pub const VDS_E_OBJECT_STATUS_FAILED: Hresult = Hresult::from_bits(0x8004_2431);
    pub const VDS_E_BAD_PROVIDER_DATA: Hresult = Hresult::from_bits(0x8004_2441);
    pub const VDS_E_PROVIDER_FAILURE: Hresult = Hresult::from_bits(0x8004_2442);
    pub const VDS_E_INTERNAL_ERROR: Hresult = Hresult::from_bits(0x8004_2448);
    pub const VDS_E_PROVIDER_CACHE_OUTOFSYNC: Hresult = Hresult::from_bits(0x8004_2712);

    /// Every code this crate knows by name, for tables and tests.
    pub const KNOWN: [Hresult; 19] = [
        Hresult::S_OK,
        Hresult::VDS_S_STATUSES_INCOMPLETELY_SET,
        Hresult::E_INVALIDARG,
        Hresult::E_OUTOFMEMORY,
        Hresult::E_POINTER,
        Hresult::E_NOINTERFACE,
        Hresult::E_FAIL,
        Hresult::E_UNEXPECTED,
        Hresult::VDS_E_NOT_SUPPORTED,
        Hresult::VDS_E_ANOTHER_CALL_IN_PROGRESS,
        Hresult::VDS_E_OBJECT_NOT_FOUND,
        Hresult::VDS_E_OBJECT_DELETED,
        Hresult::VDS_E_PATH_NOT_FOUND,
        Hresult::VDS_E_PROVIDER_CACHE_CORRUPT,
        Hresult::VDS_E_OBJECT_STATUS_FAILED,
        Hresult::VDS_E_BAD_PROVIDER_DATA,
        Hresult::VDS_E_PROVIDER_FAILURE,
        Hresult::VDS_E_INTERNAL_ERROR,
        Hresult::VDS_E_PROVIDER_CACHE_OUTOFSYNC,
    ];

    /// The HRESULT whose 32 bits are `bits` (as written in the headers, e.g. `0x80042405`).
    pub const fn from_bits(bits: u32) -> Hresult {
        Hresult(bits as i32)
    }

    /// The 32 bits as an unsigned number.
    pub const fn bits(self) -> u32 {
        self.0 as u32
    }

    /// `SUCCEEDED(hr)`: the severity bit is clear.
    pub const fn is_success(self) -> bool {
        self.0 >= 0
    }

    /// The constant's name as in the SDK headers, or `"HRESULT_UNKNOWN"` for a code this crate does not name.
    pub const fn name(self) -> &'static str {
        match self.bits() {
            0x0000_0000 => "S_OK",
            0x0004_2702 => "VDS_S_STATUSES_INCOMPLETELY_SET",
            0x8007_0057 => "E_INVALIDARG",
            0x8007_000E => "E_OUTOFMEMORY",
            0x8000_4003 => "E_POINTER",
            0x8000_4002 => "E_NOINTERFACE",
            0x8000_4005 => "E_FAIL",
            0x8000_FFFF => "E_UNEXPECTED",
            0x8004_2400 => "VDS_E_NOT_SUPPORTED",
            0x8004_2404 => "VDS_E_ANOTHER_CALL_IN_PROGRESS",
            0x8004_2405 => "VDS_E_OBJECT_NOT_FOUND",
            0x8004_240B => "VDS_E_OBJECT_DELETED",
            0x8004_2416 => "VDS_E_PATH_NOT_FOUND",
            0x8004_241F => "VDS_E_PROVIDER_CACHE_CORRUPT",
            0x8004_2431 => "VDS_E_OBJECT_STATUS_FAILED",
            0x8004_2441 => "VDS_E_BAD_PROVIDER_DATA",
            0x8004_2442 => "VDS_E_PROVIDER_FAILURE",
            0x8004_2448 => "VDS_E_INTERNAL_ERROR",
            0x8004_2712 => "VDS_E_PROVIDER_CACHE_OUTOFSYNC",
            _ => "HRESULT_UNKNOWN",
        }
    }

    /// `"0x"` + 8 hex digits, upper case as in the headers (`"0x8004240B"`).
    pub fn as_hex(self) -> String {
        format!("0x{:08X}", self.bits())
    }
}

impl fmt::Display for Hresult {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.name(), self.as_hex())
    }
}

/// The crate's one error type: a failure HRESULT and a message that says what was wrong.
///
/// ```
/// use lunmpio_vds::{Hresult, VdsError};
/// let e = VdsError::object_not_found("path 0x5 is not a path of LUN lun0");
/// assert_eq!(e.hresult, Hresult::VDS_E_OBJECT_NOT_FOUND);
/// assert_eq!(e.to_string(), "path 0x5 is not a path of LUN lun0 (VDS_E_OBJECT_NOT_FOUND 0x80042405)");
/// ```
#[derive(Clone, PartialEq, Eq, Debug, thiserror::Error)]
#[error("{message} ({} {})", .hresult.name(), .hresult.as_hex())]
pub struct VdsError {
    pub hresult: Hresult,
    pub message: String,
}

impl VdsError {
    /// An error with any failure code. Success codes are not errors.
    pub fn new(hresult: Hresult, message: impl Into<String>) -> VdsError {
        assert!(
            !hresult.is_success(),
            "a success HRESULT is not an error: {hresult}"
        );
        VdsError {
            hresult,
            message: message.into(),
        }
    }

    pub fn invalid_arg(message: impl Into<String>) -> VdsError {
        VdsError::new(Hresult::E_INVALIDARG, message)
    }

    pub fn out_of_memory(message: impl Into<String>) -> VdsError {
        VdsError::new(Hresult::E_OUTOFMEMORY, message)
    }

    pub fn pointer(message: impl Into<String>) -> VdsError {
        VdsError::new(Hresult::E_POINTER, message)
    }

    pub fn no_interface(message: impl Into<String>) -> VdsError {
        VdsError::new(Hresult::E_NOINTERFACE, message)
    }

    pub fn not_supported(message: impl Into<String>) -> VdsError {
        VdsError::new(Hresult::VDS_E_NOT_SUPPORTED, message)
    }

    pub fn another_call_in_progress(message: impl Into<String>) -> VdsError {
        VdsError::new(Hresult::VDS_E_ANOTHER_CALL_IN_PROGRESS, message)
    }

    pub fn object_not_found(message: impl Into<String>) -> VdsError {
        VdsError::new(Hresult::VDS_E_OBJECT_NOT_FOUND, message)
    }

    pub fn object_deleted(message: impl Into<String>) -> VdsError {
        VdsError::new(Hresult::VDS_E_OBJECT_DELETED, message)
    }

    pub fn provider_cache_corrupt(message: impl Into<String>) -> VdsError {
        VdsError::new(Hresult::VDS_E_PROVIDER_CACHE_CORRUPT, message)
    }

    pub fn object_status_failed(message: impl Into<String>) -> VdsError {
        VdsError::new(Hresult::VDS_E_OBJECT_STATUS_FAILED, message)
    }

    pub fn internal(message: impl Into<String>) -> VdsError {
        VdsError::new(Hresult::VDS_E_INTERNAL_ERROR, message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_values() {
        assert_eq!(Hresult::S_OK.0, 0);
        assert_eq!(Hresult::VDS_S_STATUSES_INCOMPLETELY_SET.0, 272_130);
        assert_eq!(Hresult::E_INVALIDARG.0, -2_147_024_809);
        assert_eq!(Hresult::E_OUTOFMEMORY.0, -2_147_024_882);
        assert_eq!(Hresult::E_POINTER.0, -2_147_467_261);
        assert_eq!(Hresult::E_NOINTERFACE.bits(), 0x8000_4002);
        assert_eq!(Hresult::VDS_E_NOT_SUPPORTED.0, -2_147_212_288);
        assert_eq!(Hresult::VDS_E_ANOTHER_CALL_IN_PROGRESS.0, -2_147_212_284);
        assert_eq!(Hresult::VDS_E_OBJECT_NOT_FOUND.0, -2_147_212_283);
        assert_eq!(Hresult::VDS_E_OBJECT_DELETED.0, -2_147_212_277);
        assert_eq!(Hresult::VDS_E_PROVIDER_CACHE_CORRUPT.0, -2_147_212_257);
        assert_eq!(Hresult::VDS_E_OBJECT_STATUS_FAILED.0, -2_147_212_239);
        assert_eq!(Hresult::VDS_E_INTERNAL_ERROR.bits(), 0x8004_2448);
    }

    #[test]
    fn names_hex_and_success() {
        for hr in Hresult::KNOWN {
            assert_ne!(hr.name(), "HRESULT_UNKNOWN");
            assert_eq!(hr.as_hex().len(), 10);
            assert_eq!(
                hr.is_success(),
                hr == Hresult::S_OK || hr == Hresult::VDS_S_STATUSES_INCOMPLETELY_SET
            );
        }
        assert_eq!(Hresult::VDS_E_OBJECT_DELETED.as_hex(), "0x8004240B");
        assert_eq!(
            Hresult::VDS_S_STATUSES_INCOMPLETELY_SET.as_hex(),
            "0x00042702"
        );
        assert_eq!(Hresult(-1).name(), "HRESULT_UNKNOWN");
        assert_eq!(
            Hresult::E_INVALIDARG.to_string(),
            "E_INVALIDARG (0x80070057)"
        );
    }

    #[test]
    fn constructors_carry_their_code() {
        let cases = [
            (VdsError::invalid_arg("x"), Hresult::E_INVALIDARG),
            (VdsError::out_of_memory("x"), Hresult::E_OUTOFMEMORY),
            (VdsError::pointer("x"), Hresult::E_POINTER),
            (VdsError::no_interface("x"), Hresult::E_NOINTERFACE),
            (VdsError::not_supported("x"), Hresult::VDS_E_NOT_SUPPORTED),
            (
                VdsError::another_call_in_progress("x"),
                Hresult::VDS_E_ANOTHER_CALL_IN_PROGRESS,
            ),
            (
                VdsError::object_not_found("x"),
                Hresult::VDS_E_OBJECT_NOT_FOUND,
            ),
            (VdsError::object_deleted("x"), Hresult::VDS_E_OBJECT_DELETED),
            (
                VdsError::provider_cache_corrupt("x"),
                Hresult::VDS_E_PROVIDER_CACHE_CORRUPT,
            ),
            (
                VdsError::object_status_failed("x"),
                Hresult::VDS_E_OBJECT_STATUS_FAILED,
            ),
            (VdsError::internal("x"), Hresult::VDS_E_INTERNAL_ERROR),
        ];
        for (e, hr) in cases {
            assert_eq!(e.hresult, hr);
            assert!(e.to_string().contains(hr.name()));
        }
    }

    #[test]
    #[should_panic(expected = "not an error")]
    fn success_is_not_an_error() {
        let _ = VdsError::new(Hresult::S_OK, "nope");
    }
}
