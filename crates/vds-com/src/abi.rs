//! The C ABI: the VDS structures, unions, constants, IIDs and vtables exactly as
//! `include/lunmpio_vds.h` declares them, with the Windows x64 layout (research §2, Q13).
//!
//! Fixed-width types only: `LONG`/`ULONG` are `i32`/`u32` (C `long` is 64-bit on Linux), `BOOL` is
//! `i32`, `WCHAR` is `u16` (Linux `wchar_t` is 32-bit), `ULONGLONG` is `u64`, and every VDS enum is an
//! open `i32` (a caller may pass any value; the daemon's VDS rules judge it). Sizes and offsets are
//! checked at compile time here and, with the same numbers, by `_Static_assert` in the header.

use std::ffi::c_void;
use std::mem::{offset_of, size_of};

/// `HRESULT`: negative = failure, zero or positive = success.
pub type HResult = i32;

/// The HRESULT whose 32 bits are written `bits` in the headers (e.g. `0x80042405`).
const fn hr(bits: u32) -> HResult {
    bits as i32
}

pub const S_OK: HResult = 0;
/// Success: at least one path status was not set (a conflict with the load-balance policy).
pub const VDS_S_STATUSES_INCOMPLETELY_SET: HResult = 0x0004_2702;
pub const E_NOINTERFACE: HResult = hr(0x8000_4002);
pub const E_POINTER: HResult = hr(0x8000_4003);
pub const E_FAIL: HResult = hr(0x8000_4005);
pub const E_UNEXPECTED: HResult = hr(0x8000_FFFF);
pub const E_OUTOFMEMORY: HResult = hr(0x8007_000E);
pub const E_INVALIDARG: HResult = hr(0x8007_0057);
pub const VDS_E_NOT_SUPPORTED: HResult = hr(0x8004_2400);
pub const VDS_E_ANOTHER_CALL_IN_PROGRESS: HResult = hr(0x8004_2404);
pub const VDS_E_OBJECT_NOT_FOUND: HResult = hr(0x8004_2405);
pub const VDS_E_OBJECT_DELETED: HResult = hr(0x8004_240B);
pub const VDS_E_PROVIDER_CACHE_CORRUPT: HResult = hr(0x8004_241F);
pub const VDS_E_OBJECT_STATUS_FAILED: HResult = hr(0x8004_2431);
pub const VDS_E_BAD_PROVIDER_DATA: HResult = hr(0x8004_2441);
pub const VDS_E_PROVIDER_FAILURE: HResult = hr(0x8004_2442);
pub const VDS_E_INTERNAL_ERROR: HResult = hr(0x8004_2448);

/// `GUID` / `IID` / `VDS_OBJECT_ID`: `{Data1, Data2, Data3, Data4[8]}`, 16 bytes, align 4.
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default)]
pub struct Guid {
    pub data1: u32,
    pub data2: u16,
    pub data3: u16,
    pub data4: [u8; 8],
}

impl Guid {
    /// `GUID_NULL`.
    pub const NULL: Guid = Guid {
        data1: 0,
        data2: 0,
        data3: 0,
        data4: [0; 8],
    };

    /// The in-memory GUID of lunmpio's GUID (the text form's fields, as Windows stores them).
    pub fn from_vds(guid: lunmpio_vds::Guid) -> Guid {
        let (data1, data2, data3, data4) = guid.0.as_fields();
        Guid {
            data1,
            data2,
            data3,
            data4: *data4,
        }
    }
}

/// `IID_IUnknown` `{00000000-0000-0000-C000-000000000046}`.
pub const IID_IUNKNOWN: Guid = Guid {
    data1: 0x0000_0000,
    data2: 0x0000,
    data3: 0x0000,
    data4: [0xC0, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x46],
};

/// `IID_IVdsLunMpio` `{7c5fbae3-333a-48a1-a982-33c15788cde3}`.
pub const IID_IVDS_LUN_MPIO: Guid = Guid {
    data1: 0x7c5f_bae3,
    data2: 0x333a,
    data3: 0x48a1,
    data4: [0xa9, 0x82, 0x33, 0xc1, 0x57, 0x88, 0xcd, 0xe3],
};

/// `IID_IVdsHwProviderPrivateMpio` `{310a7715-ac2b-4c6f-9827-3d742f351676}`.
pub const IID_IVDS_HW_PROVIDER_PRIVATE_MPIO: Guid = Guid {
    data1: 0x310a_7715,
    data2: 0xac2b,
    data3: 0x4c6f,
    data4: [0x98, 0x27, 0x3d, 0x74, 0x2f, 0x35, 0x16, 0x76],
};

/// `VDS_PATH_ID`.
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default)]
pub struct VdsPathId {
    /// `ullSourceId`: the LUN's source id.
    pub ull_source_id: u64,
    /// `ullPathId`.
    pub ull_path_id: u64,
}

impl VdsPathId {
    pub fn to_vds(self) -> lunmpio_vds::PathId {
        lunmpio_vds::PathId::new(self.ull_source_id, self.ull_path_id)
    }

    pub fn from_vds(id: lunmpio_vds::PathId) -> VdsPathId {
        VdsPathId {
            ull_source_id: id.source_id,
            ull_path_id: id.path_id,
        }
    }
}

/// `VDS_WWN`: 8 bytes, element 0 most significant.
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default)]
pub struct VdsWwn {
    /// `rguchWwn`.
    pub rguch_wwn: [u8; 8],
}

/// `VDS_HBAPORT_PROP`.
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default)]
pub struct VdsHbaPortProp {
    pub id: Guid,
    /// `wwnNode`.
    pub wwn_node: VdsWwn,
    /// `wwnPort`.
    pub wwn_port: VdsWwn,
    /// `type`: `VDS_HBAPORT_TYPE`.
    pub port_type: i32,
    /// `status`: `VDS_HBAPORT_STATUS`.
    pub status: i32,
    /// `ulPortSpeed`: a `VDS_HBAPORT_SPEED_FLAG` value.
    pub ul_port_speed: u32,
    /// `ulSupportedPortSpeed`: a mask of `VDS_HBAPORT_SPEED_FLAG`s.
    pub ul_supported_port_speed: u32,
}

/// `wszTextAddress` length in `WCHAR`s, including the terminating NUL.
pub const VDS_TEXT_ADDRESS_WCHARS: usize = 257;

/// `VDS_IPADDRESS`. The two bytes the C compiler inserts before `ulPort` are an explicit, always
/// zero field here, so a value copied as a whole never leaves them undefined.
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct VdsIpAddress {
    /// `type`: `VDS_IPADDRESS_TYPE`.
    pub address_type: i32,
    /// `ipv4Address`: the *numeric value* of the address, octet 0 in bits 24–31 (research Q12).
    pub ipv4_address: u32,
    /// `ipv6Address`: network byte order.
    pub ipv6_address: [u8; 16],
    /// `ulIpv6FlowInfo`.
    pub ul_ipv6_flow_info: u32,
    /// `ulIpv6ScopeId`.
    pub ul_ipv6_scope_id: u32,
    /// `wszTextAddress`: UTF-16, NUL-terminated.
    pub wsz_text_address: [u16; VDS_TEXT_ADDRESS_WCHARS],
    /// Alignment padding of the C struct (not a field there).
    pub padding: u16,
    /// `ulPort`.
    pub ul_port: u32,
}

impl VdsIpAddress {
    pub const ZERO: VdsIpAddress = VdsIpAddress {
        address_type: 0,
        ipv4_address: 0,
        ipv6_address: [0; 16],
        ul_ipv6_flow_info: 0,
        ul_ipv6_scope_id: 0,
        wsz_text_address: [0; VDS_TEXT_ADDRESS_WCHARS],
        padding: 0,
        ul_port: 0,
    };
}

/// `VDS_PATH_INFO`'s first union: `controllerPortId` (HBA arm) / `targetPortalId` (network arm).
#[repr(C)]
#[derive(Clone, Copy)]
pub union VdsPathInfoUnion1 {
    pub controller_port_id: Guid,
    pub target_portal_id: Guid,
}

/// `VDS_PATH_INFO`'s second union: `hbaPortId` / `initiatorAdapterId`.
#[repr(C)]
#[derive(Clone, Copy)]
pub union VdsPathInfoUnion2 {
    pub hba_port_id: Guid,
    pub initiator_adapter_id: Guid,
}

/// `VDS_PATH_INFO`'s third union: `pHbaPortProp` / `pInitiatorPortalIpAddr`; each a separate
/// task-memory block the caller frees before the array.
#[repr(C)]
#[derive(Clone, Copy)]
pub union VdsPathInfoUnion3 {
    pub p_hba_port_prop: *mut VdsHbaPortProp,
    pub p_initiator_portal_ip_addr: *mut VdsIpAddress,
}

/// `VDS_PATH_INFO`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct VdsPathInfo {
    /// `pathId`.
    pub path_id: VdsPathId,
    /// `type`: `VDS_HWPROVIDER_TYPE`.
    pub hw_type: i32,
    /// `status`: `VDS_PATH_STATUS`.
    pub status: i32,
    pub u1: VdsPathInfoUnion1,
    pub u2: VdsPathInfoUnion2,
    pub u3: VdsPathInfoUnion3,
}

/// `VDS_PATH_POLICY`.
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default)]
pub struct VdsPathPolicy {
    /// `pathId`.
    pub path_id: VdsPathId,
    /// `bPrimaryPath`: non-zero = primary.
    pub b_primary_path: i32,
    /// `ulWeight`.
    pub ul_weight: u32,
}

// ---- enum values (open `int` enums in C; plain constants here) ----

pub const VDS_MPS_UNKNOWN: i32 = 0;
pub const VDS_MPS_ONLINE: i32 = 1;
pub const VDS_MPS_FAILED: i32 = 5;
pub const VDS_MPS_STANDBY: i32 = 7;

pub const VDS_HWT_UNKNOWN: i32 = 0;
pub const VDS_HWT_PCI_RAID: i32 = 1;
pub const VDS_HWT_FIBRE_CHANNEL: i32 = 2;
pub const VDS_HWT_ISCSI: i32 = 3;
pub const VDS_HWT_SAS: i32 = 4;
pub const VDS_HWT_HYBRID: i32 = 5;

pub const VDS_IPT_TEXT: i32 = 0;
pub const VDS_IPT_IPV4: i32 = 1;
pub const VDS_IPT_IPV6: i32 = 2;
pub const VDS_IPT_EMPTY: i32 = 3;

// ---- the interfaces ----

/// An `IVdsLunMpio*` as C sees it: a pointer to a vtable pointer.
#[repr(C)]
pub struct IVdsLunMpio {
    pub lp_vtbl: *const IVdsLunMpioVtbl,
}

/// An `IVdsHwProviderPrivateMpio*` as C sees it.
#[repr(C)]
pub struct IVdsHwProviderPrivateMpio {
    pub lp_vtbl: *const IVdsHwProviderPrivateMpioVtbl,
}

/// `IVdsLunMpioVtbl`, slots 0–6.
#[repr(C)]
pub struct IVdsLunMpioVtbl {
    pub query_interface:
        unsafe extern "C" fn(*mut IVdsLunMpio, *const Guid, *mut *mut c_void) -> HResult,
    pub add_ref: unsafe extern "C" fn(*mut IVdsLunMpio) -> u32,
    pub release: unsafe extern "C" fn(*mut IVdsLunMpio) -> u32,
    pub get_path_info:
        unsafe extern "C" fn(*mut IVdsLunMpio, *mut *mut VdsPathInfo, *mut i32) -> HResult,
    pub get_load_balance_policy: unsafe extern "C" fn(
        *mut IVdsLunMpio,
        *mut i32,
        *mut *mut VdsPathPolicy,
        *mut i32,
    ) -> HResult,
    pub set_load_balance_policy:
        unsafe extern "C" fn(*mut IVdsLunMpio, i32, *const VdsPathPolicy, i32) -> HResult,
    pub get_supported_lb_policies: unsafe extern "C" fn(*mut IVdsLunMpio, *mut u32) -> HResult,
}

/// `IVdsHwProviderPrivateMpioVtbl`, slots 0–3.
#[repr(C)]
pub struct IVdsHwProviderPrivateMpioVtbl {
    pub query_interface: unsafe extern "C" fn(
        *mut IVdsHwProviderPrivateMpio,
        *const Guid,
        *mut *mut c_void,
    ) -> HResult,
    pub add_ref: unsafe extern "C" fn(*mut IVdsHwProviderPrivateMpio) -> u32,
    pub release: unsafe extern "C" fn(*mut IVdsHwProviderPrivateMpio) -> u32,
    pub set_all_path_statuses_from_hba_port:
        unsafe extern "C" fn(*mut IVdsHwProviderPrivateMpio, VdsHbaPortProp, i32) -> HResult,
}

// ---- layout: the Windows x64 figures of research §2 (the header asserts the same numbers) ----

const _: () = assert!(size_of::<Guid>() == 16 && align_of::<Guid>() == 4);
const _: () = assert!(size_of::<VdsPathId>() == 16);
const _: () = assert!(offset_of!(VdsPathId, ull_path_id) == 8);
const _: () = assert!(size_of::<VdsWwn>() == 8);
const _: () = assert!(size_of::<VdsHbaPortProp>() == 48 && align_of::<VdsHbaPortProp>() == 4);
const _: () = assert!(offset_of!(VdsHbaPortProp, wwn_node) == 16);
const _: () = assert!(offset_of!(VdsHbaPortProp, wwn_port) == 24);
const _: () = assert!(offset_of!(VdsHbaPortProp, port_type) == 32);
const _: () = assert!(offset_of!(VdsHbaPortProp, status) == 36);
const _: () = assert!(offset_of!(VdsHbaPortProp, ul_port_speed) == 40);
const _: () = assert!(offset_of!(VdsHbaPortProp, ul_supported_port_speed) == 44);
const _: () = assert!(size_of::<VdsIpAddress>() == 552 && align_of::<VdsIpAddress>() == 4);
const _: () = assert!(offset_of!(VdsIpAddress, ipv4_address) == 4);
const _: () = assert!(offset_of!(VdsIpAddress, ipv6_address) == 8);
const _: () = assert!(offset_of!(VdsIpAddress, ul_ipv6_flow_info) == 24);
const _: () = assert!(offset_of!(VdsIpAddress, ul_ipv6_scope_id) == 28);
const _: () = assert!(offset_of!(VdsIpAddress, wsz_text_address) == 32);
const _: () = assert!(offset_of!(VdsIpAddress, ul_port) == 548);
const _: () = assert!(size_of::<VdsPathInfo>() == 64 && align_of::<VdsPathInfo>() == 8);
const _: () = assert!(offset_of!(VdsPathInfo, hw_type) == 16);
const _: () = assert!(offset_of!(VdsPathInfo, status) == 20);
const _: () = assert!(offset_of!(VdsPathInfo, u1) == 24);
const _: () = assert!(offset_of!(VdsPathInfo, u2) == 40);
const _: () = assert!(offset_of!(VdsPathInfo, u3) == 56);
const _: () = assert!(size_of::<VdsPathPolicy>() == 24);
const _: () = assert!(offset_of!(VdsPathPolicy, b_primary_path) == 16);
const _: () = assert!(offset_of!(VdsPathPolicy, ul_weight) == 20);
const _: () = assert!(size_of::<IVdsLunMpioVtbl>() == 7 * size_of::<*const c_void>());
const _: () = assert!(size_of::<IVdsHwProviderPrivateMpioVtbl>() == 4 * size_of::<*const c_void>());

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::align_of;

    #[test]
    fn layout_matches_windows_x64() {
        // The same numbers as the const asserts, visible in the test report.
        assert_eq!(size_of::<VdsPathId>(), 16);
        assert_eq!(
            (
                size_of::<VdsPathInfo>(),
                offset_of!(VdsPathInfo, u1),
                offset_of!(VdsPathInfo, u2),
                offset_of!(VdsPathInfo, u3)
            ),
            (64, 24, 40, 56)
        );
        assert_eq!(size_of::<VdsPathPolicy>(), 24);
        assert_eq!(size_of::<VdsHbaPortProp>(), 48);
        assert_eq!(
            (size_of::<VdsIpAddress>(), offset_of!(VdsIpAddress, ul_port)),
            (552, 548)
        );
        assert_eq!(align_of::<VdsIpAddress>(), 4);
        assert_eq!(size_of::<Guid>(), 16);
    }

    #[test]
    fn iids_match_their_text_form() {
        for (iid, s) in [
            (IID_IUNKNOWN, "00000000-0000-0000-C000-000000000046"),
            (IID_IVDS_LUN_MPIO, "7c5fbae3-333a-48a1-a982-33c15788cde3"),
            (
                IID_IVDS_HW_PROVIDER_PRIVATE_MPIO,
                "310a7715-ac2b-4c6f-9827-3d742f351676",
            ),
        ] {
            let parsed: lunmpio_vds::Guid = s.parse().unwrap();
            assert_eq!(Guid::from_vds(parsed), iid, "{s}");
        }
    }

    #[test]
    fn hresult_values() {
        assert_eq!(VDS_E_OBJECT_NOT_FOUND, -2147212283);
        assert_eq!(VDS_E_OBJECT_DELETED, -2147212277);
        assert_eq!(E_INVALIDARG, -2147024809);
        assert_eq!(E_POINTER, -2147467261);
        assert_eq!(VDS_S_STATUSES_INCOMPLETELY_SET, 272130);
        assert_eq!(
            VDS_E_OBJECT_NOT_FOUND,
            lunmpio_vds::Hresult::VDS_E_OBJECT_NOT_FOUND.0
        );
        assert_eq!(E_NOINTERFACE, lunmpio_vds::Hresult::E_NOINTERFACE.0);
    }
}
