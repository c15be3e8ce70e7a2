//! The COM objects: a LUN (`IVdsLunMpio`) and the provider (`IVdsHwProviderPrivateMpio`), their
//! vtables, reference counting, `QueryInterface`, and the exported entry points.
//!
//! Every exported function and vtable slot runs its body under [`guard`]: a panic never crosses the
//! FFI boundary, it becomes `E_UNEXPECTED` (`0` for `AddRef`/`Release`).

use std::ffi::{CStr, c_char, c_void};
use std::os::unix::ffi::OsStrExt;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::PathBuf;
use std::ptr;
use std::sync::atomic::{AtomicU32, Ordering, fence};

use lunmpio_rpc::{
    Call, Done, HbaPortResult, LunList, LunParams, SetHbaPortParams, SupportedLbPolicies,
};

use crate::abi::{
    E_INVALIDARG, E_NOINTERFACE, E_POINTER, E_UNEXPECTED, Guid, HResult, IID_IUNKNOWN,
    IID_IVDS_HW_PROVIDER_PRIVATE_MPIO, IID_IVDS_LUN_MPIO, IVdsHwProviderPrivateMpio,
    IVdsHwProviderPrivateMpioVtbl, IVdsLunMpio, IVdsLunMpioVtbl, S_OK, VdsHbaPortProp, VdsPathInfo,
    VdsPathPolicy,
};
use crate::{convert, daemon, mem};

/// Most records SetLoadBalancePolicy forwards. A LUN has at most 64 paths, so a longer list can
/// only hold unknown or repeated ids; the bound keeps the request under the daemon's line limit.
pub const SET_POLICY_RECORDS_MAX: i32 = 4096;

/// Runs an FFI body; a panic becomes `on_panic`.
fn guard<T>(on_panic: T, body: impl FnOnce() -> T) -> T {
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(value) => value,
        Err(_) => {
            daemon::set_last_error("internal error (panic) in lunmpio_vds_com");
            on_panic
        }
    }
}

/// Like [`guard`] for HRESULT bodies, clearing the last error first.
fn guard_hr(body: impl FnOnce() -> HResult) -> HResult {
    guard(E_UNEXPECTED, || {
        daemon::clear_last_error();
        body()
    })
}

/// Test hook: counts objects dropped.
#[cfg(test)]
pub type DropCounter = Option<std::sync::Arc<std::sync::atomic::AtomicUsize>>;

// ---- IVdsLunMpio ----

/// A LUN object. `#[repr(C)]` with the interface (the vtable pointer) first, so an
/// `IVdsLunMpio*` is a `LunObject*`.
#[repr(C)]
pub struct LunObject {
    iface: IVdsLunMpio,
    refs: AtomicU32,
    socket: PathBuf,
    lun: String,
    #[cfg(test)]
    pub dropped: DropCounter,
}

impl LunObject {
    /// One call about this object's LUN. If the daemon no longer has the LUN, the object is stale:
    /// `VDS_E_OBJECT_DELETED`, as the reference pages give for "the LUN object is no longer present"
    /// (the daemon says `VDS_E_OBJECT_NOT_FOUND` both for that and for an unknown path id, so the
    /// LUN list decides which it was).
    fn perform<T: serde::de::DeserializeOwned>(&self, call: &Call) -> Result<T, HResult> {
        match daemon::perform(&self.socket, call) {
            Err(h) if h == crate::abi::VDS_E_OBJECT_NOT_FOUND && !self.lun_exists() => {
                Err(daemon::fail(
                    crate::abi::VDS_E_OBJECT_DELETED,
                    format!("{}: LUN {:?} is no longer present", call.method(), self.lun),
                ))
            }
            other => other,
        }
    }

    fn lun_params(&self) -> LunParams {
        LunParams {
            lun: self.lun.clone(),
        }
    }

    /// Whether the daemon still has this object's LUN (true when that cannot be told).
    fn lun_exists(&self) -> bool {
        match daemon::perform::<LunList>(&self.socket, &Call::ListLuns) {
            Ok(list) => list.luns.iter().any(|l| l.name == self.lun),
            Err(_) => true,
        }
    }
}

#[cfg(test)]
impl Drop for LunObject {
    fn drop(&mut self) {
        if let Some(c) = &self.dropped {
            c.fetch_add(1, Ordering::SeqCst);
        }
    }
}

static LUN_VTBL: IVdsLunMpioVtbl = IVdsLunMpioVtbl {
    query_interface: lun_query_interface,
    add_ref: lun_add_ref,
    release: lun_release,
    get_path_info: lun_get_path_info,
    get_load_balance_policy: lun_get_load_balance_policy,
    set_load_balance_policy: lun_set_load_balance_policy,
    get_supported_lb_policies: lun_get_supported_lb_policies,
};

impl LunObject {
    /// A new object with one reference, owned by the returned pointer.
    pub fn create(socket: PathBuf, lun: String) -> *mut IVdsLunMpio {
        let object = Box::new(LunObject {
            iface: IVdsLunMpio { lp_vtbl: &LUN_VTBL },
            refs: AtomicU32::new(1),
            socket,
            lun,
            #[cfg(test)]
            dropped: None,
        });
        Box::into_raw(object).cast()
    }

    /// # Safety
    /// `this` is NULL or a live object from [`LunObject::create`].
    unsafe fn from_iface<'a>(this: *mut IVdsLunMpio) -> Option<&'a LunObject> {
        // SAFETY: by the caller's contract; the interface is the first field of a repr(C) struct.
        unsafe { this.cast::<LunObject>().as_ref() }
    }
}

/// # Safety
/// `this` is a live object whose vtable is `vtbl`; `ppv` is NULL or writable.
unsafe fn query_interface(
    this: *mut c_void,
    own_iid: &Guid,
    riid: *const Guid,
    ppv: *mut *mut c_void,
    add_ref: impl FnOnce(),
) -> HResult {
    if ppv.is_null() {
        return E_POINTER;
    }
    // SAFETY: `ppv` is non-NULL and writable by the caller's contract.
    unsafe { *ppv = ptr::null_mut() };
    // SAFETY: `riid` is NULL or a readable GUID.
    let Some(iid) = (unsafe { riid.as_ref() }) else {
        return E_POINTER;
    };
    if this.is_null() {
        return E_POINTER;
    }
    if *iid == IID_IUNKNOWN || iid == own_iid {
        add_ref();
        // SAFETY: as above.
        unsafe { *ppv = this };
        S_OK
    } else {
        E_NOINTERFACE
    }
}

fn add_ref(refs: &AtomicU32) -> u32 {
    refs.fetch_add(1, Ordering::Relaxed).wrapping_add(1)
}

/// Drops a reference; true when it was the last one (the caller then frees the object).
fn release(refs: &AtomicU32) -> (u32, bool) {
    let before = refs.fetch_sub(1, Ordering::Release);
    if before == 1 {
        fence(Ordering::Acquire);
        (0, true)
    } else {
        (before.wrapping_sub(1), false)
    }
}

unsafe extern "C" fn lun_query_interface(
    this: *mut IVdsLunMpio,
    riid: *const Guid,
    ppv: *mut *mut c_void,
) -> HResult {
    guard_hr(|| {
        // SAFETY: COM contract: `this` is a live object of this class; `riid`/`ppv` per QI rules.
        unsafe {
            query_interface(this.cast(), &IID_IVDS_LUN_MPIO, riid, ppv, || {
                lun_add_ref(this);
            })
        }
    })
}

unsafe extern "C" fn lun_add_ref(this: *mut IVdsLunMpio) -> u32 {
    guard(0, || {
        // SAFETY: COM contract: `this` is a live object of this class.
        match unsafe { LunObject::from_iface(this) } {
            Some(o) => add_ref(&o.refs),
            None => 0,
        }
    })
}

unsafe extern "C" fn lun_release(this: *mut IVdsLunMpio) -> u32 {
    guard(0, || {
        // SAFETY: COM contract: `this` is a live object of this class.
        let Some(o) = (unsafe { LunObject::from_iface(this) }) else {
            return 0;
        };
        let (left, last) = release(&o.refs);
        if last {
            // SAFETY: the last reference is gone, so no one else uses the object; it came from
            // Box::into_raw in `create`.
            drop(unsafe { Box::from_raw(this.cast::<LunObject>()) });
        }
        left
    })
}

unsafe extern "C" fn lun_get_path_info(
    this: *mut IVdsLunMpio,
    pp_paths: *mut *mut VdsPathInfo,
    pl_number_of_paths: *mut i32,
) -> HResult {
    guard_hr(|| {
        // SAFETY: each out-pointer is NULL or writable (COM contract); NULL ones are skipped.
        unsafe {
            if let Some(p) = pp_paths.as_mut() {
                *p = ptr::null_mut();
            }
            if let Some(n) = pl_number_of_paths.as_mut() {
                *n = 0;
            }
        }
        if pp_paths.is_null() || pl_number_of_paths.is_null() {
            return daemon::fail(E_POINTER, "GetPathInfo: NULL out-pointer");
        }
        // SAFETY: COM contract: `this` is NULL or a live object of this class.
        let Some(o) = (unsafe { LunObject::from_iface(this) }) else {
            return E_POINTER;
        };
        let result = match o.perform(&Call::GetPathInfo(o.lun_params())) {
            Ok(r) => r,
            Err(h) => return h,
        };
        let records = match convert::path_infos(&result) {
            Ok(r) => r,
            Err(e) => return daemon::bad_data(e),
        };
        let Ok(count) = i32::try_from(records.len()) else {
            return daemon::fail(crate::abi::VDS_E_BAD_PROVIDER_DATA, "too many paths");
        };
        match mem::path_info_array(&records) {
            Ok(array) => {
                // SAFETY: both checked non-NULL above.
                unsafe {
                    *pp_paths = array;
                    *pl_number_of_paths = count;
                }
                S_OK
            }
            Err(h) => daemon::fail(h, "GetPathInfo: out of memory"),
        }
    })
}

unsafe extern "C" fn lun_get_load_balance_policy(
    this: *mut IVdsLunMpio,
    p_policy: *mut i32,
    pp_paths: *mut *mut VdsPathPolicy,
    pl_number_of_paths: *mut i32,
) -> HResult {
    guard_hr(|| {
        // SAFETY: each out-pointer is NULL or writable (COM contract); NULL ones are skipped.
        unsafe {
            if let Some(p) = p_policy.as_mut() {
                *p = 0; // VDS_LBP_UNKNOWN
            }
            if let Some(p) = pp_paths.as_mut() {
                *p = ptr::null_mut();
            }
            if let Some(n) = pl_number_of_paths.as_mut() {
                *n = 0;
            }
        }
        if p_policy.is_null() || pp_paths.is_null() || pl_number_of_paths.is_null() {
            return daemon::fail(E_POINTER, "GetLoadBalancePolicy: NULL out-pointer");
        }
        // SAFETY: COM contract: `this` is NULL or a live object of this class.
        let Some(o) = (unsafe { LunObject::from_iface(this) }) else {
            return E_POINTER;
        };
        let result = match o.perform(&Call::GetLoadBalancePolicy(o.lun_params())) {
            Ok(r) => r,
            Err(h) => return h,
        };
        let (policy, paths) = convert::load_balance_policy(&result);
        let Ok(count) = i32::try_from(paths.len()) else {
            return daemon::fail(crate::abi::VDS_E_BAD_PROVIDER_DATA, "too many paths");
        };
        match mem::path_policy_array(&paths) {
            Ok(array) => {
                // SAFETY: all three checked non-NULL above.
                unsafe {
                    *p_policy = policy;
                    *pp_paths = array;
                    *pl_number_of_paths = count;
                }
                S_OK
            }
            Err(h) => daemon::fail(h, "GetLoadBalancePolicy: out of memory"),
        }
    })
}

unsafe extern "C" fn lun_set_load_balance_policy(
    this: *mut IVdsLunMpio,
    policy: i32,
    p_paths: *const VdsPathPolicy,
    l_number_of_paths: i32,
) -> HResult {
    guard_hr(|| {
        if l_number_of_paths < 0 {
            return daemon::fail(
                E_INVALIDARG,
                format!("SetLoadBalancePolicy: path count {l_number_of_paths} is negative"),
            );
        }
        if p_paths.is_null() && l_number_of_paths > 0 {
            return daemon::fail(
                E_INVALIDARG,
                format!("SetLoadBalancePolicy: pPaths is NULL with {l_number_of_paths} paths"),
            );
        }
        if l_number_of_paths > SET_POLICY_RECORDS_MAX {
            return daemon::fail(
                E_INVALIDARG,
                format!(
                    "SetLoadBalancePolicy: {l_number_of_paths} path records, at most {SET_POLICY_RECORDS_MAX}"
                ),
            );
        }
        // SAFETY: COM contract: `this` is NULL or a live object of this class.
        let Some(o) = (unsafe { LunObject::from_iface(this) }) else {
            return E_POINTER;
        };
        let records: &[VdsPathPolicy] = if l_number_of_paths == 0 {
            &[]
        } else {
            // SAFETY: `p_paths` is non-NULL and, by the caller's contract ([in, size_is]), points to
            // `l_number_of_paths` (positive, bounded) readable records.
            unsafe { std::slice::from_raw_parts(p_paths, l_number_of_paths as usize) }
        };
        let params = convert::set_load_balance_policy_params(&o.lun, policy, records);
        match o.perform::<Done>(&Call::SetLoadBalancePolicy(params)) {
            Ok(_) => S_OK,
            Err(h) => h,
        }
    })
}

unsafe extern "C" fn lun_get_supported_lb_policies(
    this: *mut IVdsLunMpio,
    pul_lb_flags: *mut u32,
) -> HResult {
    guard_hr(|| {
        // SAFETY: `pul_lb_flags` is NULL or writable (COM contract).
        let Some(out) = (unsafe { pul_lb_flags.as_mut() }) else {
            return daemon::fail(E_POINTER, "GetSupportedLbPolicies: NULL out-pointer");
        };
        *out = 0;
        // SAFETY: COM contract: `this` is NULL or a live object of this class.
        let Some(o) = (unsafe { LunObject::from_iface(this) }) else {
            return E_POINTER;
        };
        match o.perform::<SupportedLbPolicies>(&Call::GetSupportedLbPolicies(o.lun_params())) {
            Ok(result) => {
                *out = result.flags;
                S_OK
            }
            Err(h) => h,
        }
    })
}

// ---- IVdsHwProviderPrivateMpio ----

/// The provider object: SetAllPathStatusesFromHbaPort applies to every LUN of the daemon.
#[repr(C)]
pub struct ProviderObject {
    iface: IVdsHwProviderPrivateMpio,
    refs: AtomicU32,
    socket: PathBuf,
    #[cfg(test)]
    pub dropped: DropCounter,
}

#[cfg(test)]
impl Drop for ProviderObject {
    fn drop(&mut self) {
        if let Some(c) = &self.dropped {
            c.fetch_add(1, Ordering::SeqCst);
        }
    }
}

static PROVIDER_VTBL: IVdsHwProviderPrivateMpioVtbl = IVdsHwProviderPrivateMpioVtbl {
    query_interface: provider_query_interface,
    add_ref: provider_add_ref,
    release: provider_release,
    set_all_path_statuses_from_hba_port: provider_set_all_path_statuses_from_hba_port,
};

impl ProviderObject {
    /// A new object with one reference, owned by the returned pointer.
    pub fn create(socket: PathBuf) -> *mut IVdsHwProviderPrivateMpio {
        let object = Box::new(ProviderObject {
            iface: IVdsHwProviderPrivateMpio {
                lp_vtbl: &PROVIDER_VTBL,
            },
            refs: AtomicU32::new(1),
            socket,
            #[cfg(test)]
            dropped: None,
        });
        Box::into_raw(object).cast()
    }

    /// # Safety
    /// `this` is NULL or a live object from [`ProviderObject::create`].
    unsafe fn from_iface<'a>(this: *mut IVdsHwProviderPrivateMpio) -> Option<&'a ProviderObject> {
        // SAFETY: by the caller's contract; the interface is the first field of a repr(C) struct.
        unsafe { this.cast::<ProviderObject>().as_ref() }
    }
}

unsafe extern "C" fn provider_query_interface(
    this: *mut IVdsHwProviderPrivateMpio,
    riid: *const Guid,
    ppv: *mut *mut c_void,
) -> HResult {
    guard_hr(|| {
        // SAFETY: COM contract: `this` is a live object of this class; `riid`/`ppv` per QI rules.
        unsafe {
            query_interface(
                this.cast(),
                &IID_IVDS_HW_PROVIDER_PRIVATE_MPIO,
                riid,
                ppv,
                || {
                    provider_add_ref(this);
                },
            )
        }
    })
}

unsafe extern "C" fn provider_add_ref(this: *mut IVdsHwProviderPrivateMpio) -> u32 {
    guard(0, || {
        // SAFETY: COM contract: `this` is a live object of this class.
        match unsafe { ProviderObject::from_iface(this) } {
            Some(o) => add_ref(&o.refs),
            None => 0,
        }
    })
}

unsafe extern "C" fn provider_release(this: *mut IVdsHwProviderPrivateMpio) -> u32 {
    guard(0, || {
        // SAFETY: COM contract: `this` is a live object of this class.
        let Some(o) = (unsafe { ProviderObject::from_iface(this) }) else {
            return 0;
        };
        let (left, last) = release(&o.refs);
        if last {
            // SAFETY: the last reference is gone; the object came from Box::into_raw in `create`.
            drop(unsafe { Box::from_raw(this.cast::<ProviderObject>()) });
        }
        left
    })
}

unsafe extern "C" fn provider_set_all_path_statuses_from_hba_port(
    this: *mut IVdsHwProviderPrivateMpio,
    hba_port_prop: VdsHbaPortProp,
    status: i32,
) -> HResult {
    guard_hr(|| {
        // SAFETY: COM contract: `this` is NULL or a live object of this class.
        let Some(o) = (unsafe { ProviderObject::from_iface(this) }) else {
            return E_POINTER;
        };
        let call = Call::SetAllPathStatusesFromHbaPort(SetHbaPortParams {
            hba_port: convert::hba_port_param(&hba_port_prop),
            status: i64::from(status),
        });
        match daemon::perform::<HbaPortResult>(&o.socket, &call) {
            Ok(result) => result.hresult,
            Err(h) => h,
        }
    })
}

// ---- entry points ----

/// A C string argument: E_POINTER when NULL, E_INVALIDARG when empty.
///
/// # Safety
/// `text` is NULL or a NUL-terminated string.
unsafe fn c_arg<'a>(text: *const c_char, what: &str) -> Result<&'a CStr, HResult> {
    if text.is_null() {
        return Err(daemon::fail(E_POINTER, format!("{what} is NULL")));
    }
    // SAFETY: non-NULL and NUL-terminated by the caller's contract.
    let s = unsafe { CStr::from_ptr(text) };
    if s.is_empty() {
        return Err(daemon::fail(E_INVALIDARG, format!("{what} is empty")));
    }
    Ok(s)
}

fn socket_path(text: &CStr) -> PathBuf {
    PathBuf::from(std::ffi::OsStr::from_bytes(text.to_bytes()))
}

/// Opens the LUN `lun_name` of the daemon listening on `control_socket`, as an `IVdsLunMpio` with one
/// reference (release it with `Release`). The daemon is asked once (GetSupportedLbPolicies) so an
/// unknown LUN fails here: `VDS_E_OBJECT_NOT_FOUND`; no daemon: `VDS_E_OBJECT_DELETED`;
/// NULL arguments: `E_POINTER`; an empty or non-UTF-8 name: `E_INVALIDARG`. `*out` is NULL on failure.
///
/// # Safety
/// `control_socket` and `lun_name` are NULL or NUL-terminated strings; `out` is NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn lunmpio_open_lun(
    control_socket: *const c_char,
    lun_name: *const c_char,
    out: *mut *mut IVdsLunMpio,
) -> HResult {
    guard_hr(|| {
        // SAFETY: `out` is NULL or writable by the caller's contract.
        let Some(out) = (unsafe { out.as_mut() }) else {
            return daemon::fail(E_POINTER, "lunmpio_open_lun: out is NULL");
        };
        *out = ptr::null_mut();
        // SAFETY: by the caller's contract on both strings.
        let (socket, lun) = match unsafe {
            (
                c_arg(control_socket, "control_socket"),
                c_arg(lun_name, "lun_name"),
            )
        } {
            (Ok(s), Ok(l)) => (s, l),
            (Err(h), _) | (_, Err(h)) => return h,
        };
        let Ok(lun) = lun.to_str() else {
            return daemon::fail(E_INVALIDARG, "lun_name is not UTF-8");
        };
        let socket = socket_path(socket);
        let call = Call::GetSupportedLbPolicies(LunParams {
            lun: lun.to_owned(),
        });
        if let Err(h) = daemon::perform::<SupportedLbPolicies>(&socket, &call) {
            return h;
        }
        *out = LunObject::create(socket, lun.to_owned());
        S_OK
    })
}

/// Opens the daemon on `control_socket` as an `IVdsHwProviderPrivateMpio` with one reference. The
/// daemon is asked once (ListLuns): no daemon is `VDS_E_OBJECT_DELETED`; NULL arguments `E_POINTER`.
/// `*out` is NULL on failure.
///
/// # Safety
/// `control_socket` is NULL or a NUL-terminated string; `out` is NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn lunmpio_open_provider(
    control_socket: *const c_char,
    out: *mut *mut IVdsHwProviderPrivateMpio,
) -> HResult {
    guard_hr(|| {
        // SAFETY: `out` is NULL or writable by the caller's contract.
        let Some(out) = (unsafe { out.as_mut() }) else {
            return daemon::fail(E_POINTER, "lunmpio_open_provider: out is NULL");
        };
        *out = ptr::null_mut();
        // SAFETY: by the caller's contract on the string.
        let socket = match unsafe { c_arg(control_socket, "control_socket") } {
            Ok(s) => socket_path(s),
            Err(h) => return h,
        };
        if let Err(h) = daemon::perform::<LunList>(&socket, &Call::ListLuns) {
            return h;
        }
        *out = ProviderObject::create(socket);
        S_OK
    })
}

/// Copies the message behind the last failed call *of this thread* into `buf` (NUL-terminated,
/// truncated to `size` bytes) and returns its full length in bytes, without the NUL; 0 when the
/// last call succeeded. `buf` may be NULL when `size` is 0 (to ask for the length).
///
/// # Safety
/// `buf` is NULL or points to `size` writable bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn lunmpio_last_error_message(buf: *mut c_char, size: usize) -> usize {
    guard(0, || {
        let message = daemon::last_error();
        let bytes = message.as_bytes();
        if !buf.is_null() && size > 0 {
            let n = bytes.len().min(size - 1);
            // SAFETY: `buf` has `size` writable bytes; `n + 1 <= size`; no overlap with `message`.
            unsafe {
                ptr::copy_nonoverlapping(bytes.as_ptr(), buf.cast::<u8>(), n);
                *buf.add(n) = 0;
            }
        }
        bytes.len()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::abi::{IID_IVDS_HW_PROVIDER_PRIVATE_MPIO, VDS_E_OBJECT_DELETED};
    use serde_json::json;
    use std::sync::Arc;
    use std::sync::atomic::AtomicUsize;

    fn lun_with_counter() -> (*mut IVdsLunMpio, Arc<AtomicUsize>) {
        let counter = Arc::new(AtomicUsize::new(0));
        let p = LunObject::create("/nonexistent/lunmpio.sock".into(), "lun0".into());
        // SAFETY: a fresh object, not shared yet.
        unsafe { (*p.cast::<LunObject>()).dropped = Some(Arc::clone(&counter)) };
        (p, counter)
    }

    #[test]
    fn reference_counting_frees_at_zero() {
        let (p, dropped) = lun_with_counter();
        // SAFETY: `p` is live until its last Release; the vtable is this crate's.
        unsafe {
            let v = &*(*p).lp_vtbl;
            assert_eq!((v.add_ref)(p), 2);
            assert_eq!((v.add_ref)(p), 3);
            assert_eq!((v.release)(p), 2);
            assert_eq!((v.release)(p), 1);
            assert_eq!(dropped.load(Ordering::SeqCst), 0);
            assert_eq!((v.release)(p), 0);
        }
        assert_eq!(dropped.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn reference_counting_is_atomic_across_threads() {
        let (p, dropped) = lun_with_counter();
        let addr = p as usize;
        let threads: Vec<_> = (0..8)
            .map(|_| {
                std::thread::spawn(move || {
                    let p = addr as *mut IVdsLunMpio;
                    for _ in 0..10_000 {
                        // SAFETY: the test holds a reference throughout, so `p` stays live.
                        unsafe {
                            let v = &*(*p).lp_vtbl;
                            (v.add_ref)(p);
                            (v.release)(p);
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(dropped.load(Ordering::SeqCst), 0);
        // SAFETY: the test's own reference, released once.
        assert_eq!(unsafe { ((*(*p).lp_vtbl).release)(p) }, 0);
        assert_eq!(dropped.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn query_interface_rules() {
        let (p, dropped) = lun_with_counter();
        // SAFETY: `p` stays live until the final Release; out-pointers are locals.
        unsafe {
            let v = &*(*p).lp_vtbl;
            let mut out: *mut c_void = ptr::dangling_mut();
            assert_eq!((v.query_interface)(p, &IID_IUNKNOWN, &mut out), S_OK);
            assert_eq!(out, p.cast());
            let mut out2: *mut c_void = ptr::null_mut();
            assert_eq!((v.query_interface)(p, &IID_IVDS_LUN_MPIO, &mut out2), S_OK);
            assert_eq!(out2, p.cast());
            let mut out3: *mut c_void = ptr::dangling_mut();
            assert_eq!(
                (v.query_interface)(p, &IID_IVDS_HW_PROVIDER_PRIVATE_MPIO, &mut out3),
                E_NOINTERFACE
            );
            assert!(out3.is_null());
            assert_eq!(
                (v.query_interface)(p, &IID_IUNKNOWN, ptr::null_mut()),
                E_POINTER
            );
            let mut out4: *mut c_void = ptr::dangling_mut();
            assert_eq!((v.query_interface)(p, ptr::null(), &mut out4), E_POINTER);
            assert!(out4.is_null());
            // Two references were added by the successful QIs.
            assert_eq!((v.release)(p), 2);
            assert_eq!((v.release)(p), 1);
            assert_eq!((v.release)(p), 0);
        }
        assert_eq!(dropped.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn provider_refcount_and_qi() {
        let counter = Arc::new(AtomicUsize::new(0));
        let p = ProviderObject::create("/nonexistent/lunmpio.sock".into());
        // SAFETY: a fresh object; then used through its vtable until the last Release.
        unsafe {
            (*p.cast::<ProviderObject>()).dropped = Some(Arc::clone(&counter));
            let v = &*(*p).lp_vtbl;
            let mut out: *mut c_void = ptr::null_mut();
            assert_eq!(
                (v.query_interface)(p, &IID_IVDS_HW_PROVIDER_PRIVATE_MPIO, &mut out),
                S_OK
            );
            assert_eq!(
                (v.query_interface)(p, &IID_IVDS_LUN_MPIO, &mut out),
                E_NOINTERFACE
            );
            assert!(out.is_null());
            assert_eq!(
                (v.set_all_path_statuses_from_hba_port)(p, VdsHbaPortProp::default(), 1),
                VDS_E_OBJECT_DELETED
            );
            assert_eq!((v.release)(p), 1);
            assert_eq!((v.release)(p), 0);
        }
        assert_eq!(counter.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn no_daemon_means_object_deleted_and_cleared_outputs() {
        let (p, _) = lun_with_counter();
        // SAFETY: `p` is live until the final Release; out-pointers are locals.
        unsafe {
            let v = &*(*p).lp_vtbl;
            let mut paths: *mut VdsPathInfo = ptr::dangling_mut();
            let mut n = 7;
            assert_eq!(
                (v.get_path_info)(p, &mut paths, &mut n),
                VDS_E_OBJECT_DELETED
            );
            assert!(paths.is_null());
            assert_eq!(n, 0);
            let mut buf = [0 as c_char; 256];
            let len = lunmpio_last_error_message(buf.as_mut_ptr(), buf.len());
            assert!(len > 0);
            let msg = CStr::from_ptr(buf.as_ptr()).to_str().unwrap();
            assert!(msg.starts_with("GetPathInfo"), "{msg}");
            let mut policy = 9;
            let mut pol: *mut VdsPathPolicy = ptr::dangling_mut();
            assert_eq!(
                (v.get_load_balance_policy)(p, &mut policy, &mut pol, &mut n),
                VDS_E_OBJECT_DELETED
            );
            assert_eq!((policy, pol.is_null(), n), (0, true, 0));
            let mut flags = 5;
            assert_eq!(
                (v.get_supported_lb_policies)(p, &mut flags),
                VDS_E_OBJECT_DELETED
            );
            assert_eq!(flags, 0);
            assert_eq!(
                (v.set_load_balance_policy)(p, 1, ptr::null(), 0),
                VDS_E_OBJECT_DELETED
            );
            // Argument checks come before any call.
            assert_eq!(
                (v.set_load_balance_policy)(p, 1, ptr::null(), -1),
                E_INVALIDARG
            );
            assert_eq!(
                (v.set_load_balance_policy)(p, 1, ptr::null(), 1),
                E_INVALIDARG
            );
            assert_eq!((v.get_supported_lb_policies)(p, ptr::null_mut()), E_POINTER);
            assert_eq!((v.get_path_info)(p, ptr::null_mut(), &mut n), E_POINTER);
            assert_eq!(
                (v.get_load_balance_policy)(p, ptr::null_mut(), &mut pol, &mut n),
                E_POINTER
            );
            assert!(lunmpio_last_error_message(ptr::null_mut(), 0) > 0);
            (v.release)(p);
        }
    }

    #[test]
    fn open_checks_arguments_and_the_daemon() {
        let dir = tempfile::tempdir().unwrap();
        let sock =
            std::ffi::CString::new(dir.path().join("none.sock").as_os_str().as_bytes()).unwrap();
        let lun = c"lun0";
        let mut out: *mut IVdsLunMpio = ptr::dangling_mut();
        let mut prov: *mut IVdsHwProviderPrivateMpio = ptr::dangling_mut();
        // SAFETY: valid C strings and local out-pointers.
        unsafe {
            assert_eq!(
                lunmpio_open_lun(sock.as_ptr(), lun.as_ptr(), ptr::null_mut()),
                E_POINTER
            );
            assert_eq!(
                lunmpio_open_lun(ptr::null(), lun.as_ptr(), &mut out),
                E_POINTER
            );
            assert!(out.is_null());
            assert_eq!(
                lunmpio_open_lun(sock.as_ptr(), c"".as_ptr(), &mut out),
                E_INVALIDARG
            );
            assert_eq!(
                lunmpio_open_lun(sock.as_ptr(), c"\xff".as_ptr(), &mut out),
                E_INVALIDARG
            );
            assert_eq!(
                lunmpio_open_lun(sock.as_ptr(), lun.as_ptr(), &mut out),
                VDS_E_OBJECT_DELETED
            );
            assert!(out.is_null());
            assert_eq!(
                lunmpio_open_provider(sock.as_ptr(), &mut prov),
                VDS_E_OBJECT_DELETED
            );
            assert!(prov.is_null());
            assert_eq!(
                lunmpio_open_provider(ptr::null(), ptr::null_mut()),
                E_POINTER
            );
        }
    }

    /// A stand-in daemon answering each connection's one request with the next canned result.
    fn fake_daemon(results: Vec<serde_json::Value>) -> (tempfile::TempDir, PathBuf) {
        use std::io::{BufRead, BufReader, Write};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fake.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        std::thread::spawn(move || {
            for result in results {
                let (stream, _) = listener.accept().unwrap();
                let mut line = String::new();
                BufReader::new(stream.try_clone().unwrap())
                    .read_line(&mut line)
                    .unwrap();
                let request = lunmpio_rpc::parse_request(&line).unwrap();
                let response = lunmpio_rpc::result_response(&request.id, result);
                (&stream)
                    .write_all(format!("{response}\n").as_bytes())
                    .unwrap();
            }
        });
        (dir, path)
    }

    #[test]
    fn answers_of_the_wrong_shape_are_bad_provider_data_and_allocate_nothing() {
        let (_dir, socket) = fake_daemon(vec![
            json!({"paths": []}),
            json!({"policy": 2, "paths": []}),
            json!({"paths": [{"pathId": {"sourceId": 1, "pathId": 1}, "type": 3, "status": 1,
                "targetPortalId": "00000000-0000-0000-0000-000000000000",
                "initiatorPortalIpAddr": {"type": 1, "address": "not-an-ip", "port": 0}}]}),
            json!({"flags": "many"}),
            json!({"matched": 1}),
        ]);
        let lun = LunObject::create(socket.clone(), "lun0".into());
        let provider = ProviderObject::create(socket);
        // SAFETY: both objects live until their final Release; out-pointers are locals.
        unsafe {
            let v = &*(*lun).lp_vtbl;
            let mut paths: *mut VdsPathInfo = ptr::dangling_mut();
            let mut n = 3;
            assert_eq!((v.get_path_info)(lun, &mut paths, &mut n), S_OK);
            assert!(paths.is_null(), "no paths: NULL");
            assert_eq!(n, 0);
            let mut policy = 0;
            let mut pol: *mut VdsPathPolicy = ptr::dangling_mut();
            assert_eq!(
                (v.get_load_balance_policy)(lun, &mut policy, &mut pol, &mut n),
                S_OK
            );
            assert_eq!((policy, pol.is_null(), n), (2, true, 0));
            assert_eq!(
                (v.get_path_info)(lun, &mut paths, &mut n),
                crate::abi::VDS_E_BAD_PROVIDER_DATA
            );
            assert!(paths.is_null());
            assert!(daemon::last_error().contains("not-an-ip"));
            let mut flags = 1;
            assert_eq!(
                (v.get_supported_lb_policies)(lun, &mut flags),
                crate::abi::VDS_E_BAD_PROVIDER_DATA
            );
            assert_eq!(flags, 0);
            let pv = &*(*provider).lp_vtbl;
            assert_eq!(
                (pv.set_all_path_statuses_from_hba_port)(provider, VdsHbaPortProp::default(), 5),
                crate::abi::VDS_E_BAD_PROVIDER_DATA
            );
            (v.release)(lun);
            (pv.release)(provider);
        }
    }

    #[test]
    fn a_panic_becomes_an_hresult() {
        assert_eq!(guard_hr(|| panic!("boom")), E_UNEXPECTED);
        assert!(daemon::last_error().contains("panic"));
        assert_eq!(guard(0u32, || panic!("boom")), 0);
    }
}
