//! The task allocator (`CoTaskMemAlloc`/`CoTaskMemFree` semantics: C `malloc`/`free`) and the
//! callee-allocated output blocks built with it.
//!
//! Every block handed to a caller is one `malloc` block: the `VDS_PATH_INFO` array, each embedded
//! `VDS_HBAPORT_PROP`/`VDS_IPADDRESS`, the `VDS_PATH_POLICY` array. Until a block reaches the caller
//! it is owned by a guard that frees it on any failure, so a failed call leaks nothing.

use std::ffi::c_void;
use std::mem::size_of;
use std::ptr;

use crate::abi::{
    E_OUTOFMEMORY, HResult, VdsPathInfo, VdsPathInfoUnion1, VdsPathInfoUnion2, VdsPathInfoUnion3,
    VdsPathPolicy,
};
use crate::convert::{PathEndpoint, PathRecord};

/// `CoTaskMemAlloc`: `cb` bytes of uninitialized memory aligned for any type, or NULL when out of
/// memory. A zero-byte request returns a unique pointer (as `CoTaskMemAlloc(0)` does).
#[unsafe(no_mangle)]
pub extern "C" fn lunmpio_task_mem_alloc(cb: usize) -> *mut c_void {
    // SAFETY: malloc has no preconditions; a NULL result is passed on to the caller.
    unsafe { libc::malloc(cb.max(1)) }
}

/// `CoTaskMemFree`: frees a block from [`lunmpio_task_mem_alloc`] or from any method of this library
/// (they are plain `malloc` blocks, so `free()` works too). NULL is ignored.
///
/// # Safety
/// `pv` is NULL or a block allocated by this library (or `malloc`) and not freed yet.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn lunmpio_task_mem_free(pv: *mut c_void) {
    // SAFETY: the caller passes NULL (a no-op for free) or a live malloc block.
    unsafe { libc::free(pv) }
}

/// One zeroed task-memory block holding `count` values of `T`, freed on drop unless released.
struct Block<T> {
    ptr: *mut T,
}

impl<T> Block<T> {
    fn new(count: usize) -> Result<Block<T>, HResult> {
        let bytes = count
            .checked_mul(size_of::<T>())
            .ok_or(E_OUTOFMEMORY)?
            .max(1);
        // SAFETY: calloc has no preconditions. malloc alignment (16 on x86_64 and aarch64 glibc) is
        // enough for every type here (at most 8).
        let ptr = unsafe { libc::calloc(1, bytes) }.cast::<T>();
        if ptr.is_null() {
            return Err(E_OUTOFMEMORY);
        }
        Ok(Block { ptr })
    }

    /// Hands the block to the caller: no longer freed here.
    fn release(self) -> *mut T {
        let ptr = self.ptr;
        std::mem::forget(self);
        ptr
    }
}

impl<T> Drop for Block<T> {
    fn drop(&mut self) {
        // SAFETY: `ptr` is a live calloc block owned by this guard.
        unsafe { libc::free(self.ptr.cast()) }
    }
}

/// Copies `value` into a new single-element block.
fn boxed<T: Copy>(value: &T) -> Result<Block<T>, HResult> {
    let block = Block::<T>::new(1)?;
    // SAFETY: the block holds one `T`-sized, suitably aligned, writable allocation.
    unsafe { ptr::write(block.ptr, *value) };
    Ok(block)
}

/// The callee-allocated `VDS_PATH_INFO` array: NULL for no paths, else one block for the array and
/// one per embedded pointer. On failure nothing stays allocated.
pub fn path_info_array(records: &[PathRecord]) -> Result<*mut VdsPathInfo, HResult> {
    if records.is_empty() {
        return Ok(ptr::null_mut());
    }
    let array = Block::<VdsPathInfo>::new(records.len())?;
    // The embedded blocks, owned here until the whole array is built.
    let mut embedded: Vec<Block<u8>> = Vec::with_capacity(records.len());
    for (i, r) in records.iter().enumerate() {
        let u3 = match &r.endpoint {
            PathEndpoint::None => VdsPathInfoUnion3 {
                p_hba_port_prop: ptr::null_mut(),
            },
            PathEndpoint::Hba(prop) => {
                let b = boxed(prop)?;
                let p = b.release();
                embedded.push(Block { ptr: p.cast() });
                VdsPathInfoUnion3 { p_hba_port_prop: p }
            }
            PathEndpoint::Ip(ip) => {
                let b = boxed(&**ip)?;
                let p = b.release();
                embedded.push(Block { ptr: p.cast() });
                VdsPathInfoUnion3 {
                    p_initiator_portal_ip_addr: p,
                }
            }
        };
        let info = VdsPathInfo {
            path_id: r.path_id,
            hw_type: r.hw_type,
            status: r.status,
            u1: VdsPathInfoUnion1 {
                controller_port_id: r.far_end_id,
            },
            u2: VdsPathInfoUnion2 {
                hba_port_id: r.near_end_id,
            },
            u3,
        };
        // SAFETY: `i < records.len()`, the array's element count; the element is writable.
        unsafe { ptr::write(array.ptr.add(i), info) };
    }
    for b in embedded {
        b.release();
    }
    Ok(array.release())
}

/// The callee-allocated `VDS_PATH_POLICY` array: NULL for no paths.
pub fn path_policy_array(paths: &[VdsPathPolicy]) -> Result<*mut VdsPathPolicy, HResult> {
    if paths.is_empty() {
        return Ok(ptr::null_mut());
    }
    let array = Block::<VdsPathPolicy>::new(paths.len())?;
    // SAFETY: the block holds `paths.len()` elements and does not overlap `paths`.
    unsafe { ptr::copy_nonoverlapping(paths.as_ptr(), array.ptr, paths.len()) };
    Ok(array.release())
}

/// Frees a `VDS_PATH_INFO` array as a caller must: each embedded pointer, then the array.
///
/// # Safety
/// `array` is NULL or a live array of `count` elements from [`path_info_array`].
pub unsafe fn free_path_info_array(array: *mut VdsPathInfo, count: usize) {
    if array.is_null() {
        return;
    }
    for i in 0..count {
        // SAFETY: `i < count`, within the array; both union arms are pointers, NULL or a block.
        unsafe { libc::free((*array.add(i)).u3.p_hba_port_prop.cast()) };
    }
    // SAFETY: the array itself is a live malloc block.
    unsafe { libc::free(array.cast()) };
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::abi::{Guid, VdsHbaPortProp, VdsIpAddress, VdsPathId};

    fn record(id: u64, endpoint: PathEndpoint) -> PathRecord {
        PathRecord {
            path_id: VdsPathId {
                ull_source_id: 9,
                ull_path_id: id,
            },
            hw_type: 2,
            status: 1,
            far_end_id: Guid {
                data1: id as u32,
                ..Guid::NULL
            },
            near_end_id: Guid::NULL,
            endpoint,
        }
    }

    #[test]
    fn arrays_hold_every_record_and_free_cleanly() {
        let hba = VdsHbaPortProp {
            port_type: 5,
            ..VdsHbaPortProp::default()
        };
        let ip = VdsIpAddress {
            ipv4_address: 0x7f00_0001,
            ul_port: 10809,
            ..VdsIpAddress::ZERO
        };
        let records = [
            record(1, PathEndpoint::Hba(hba)),
            record(2, PathEndpoint::Ip(Box::new(ip))),
            record(3, PathEndpoint::None),
        ];
        let array = path_info_array(&records).unwrap();
        // SAFETY: a 3-element array just built by path_info_array.
        unsafe {
            let a = std::slice::from_raw_parts(array, 3);
            assert_eq!(a[0].path_id.ull_path_id, 1);
            assert_eq!(a[1].u1.target_portal_id.data1, 2);
            assert_eq!(*a[0].u3.p_hba_port_prop, hba);
            assert_eq!(*a[1].u3.p_initiator_portal_ip_addr, ip);
            assert!(a[2].u3.p_hba_port_prop.is_null());
            free_path_info_array(array, 3);
        }
        assert!(path_info_array(&[]).unwrap().is_null());
        assert!(path_policy_array(&[]).unwrap().is_null());
        let pol = [VdsPathPolicy {
            b_primary_path: 1,
            ..VdsPathPolicy::default()
        }];
        let p = path_policy_array(&pol).unwrap();
        // SAFETY: a one-element block from path_policy_array, freed once.
        unsafe {
            assert_eq!(*p, pol[0]);
            lunmpio_task_mem_free(p.cast());
            lunmpio_task_mem_free(ptr::null_mut());
            let z = lunmpio_task_mem_alloc(0);
            assert!(!z.is_null());
            lunmpio_task_mem_free(z);
        }
    }
}
