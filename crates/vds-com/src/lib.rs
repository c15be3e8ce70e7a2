//! # lunmpio-vds-com: IVdsLunMpio for C programs on Linux
//!
//! Programs written against the Windows VDS headers call **IVdsLunMpio** (GetPathInfo,
//! GetLoadBalancePolicy, SetLoadBalancePolicy, GetSupportedLbPolicies) and
//! **IVdsHwProviderPrivateMpio** (SetAllPathStatusesFromHbaPort) through COM vtables. This crate gives
//! them the same vtables, structures and HRESULTs on Linux (header `include/lunmpio_vds.h`), backed
//! by a running lunmpio daemon over its JSON-RPC control socket (docs/MANAGEMENT.md). Built as a `cdylib`
//! (`liblunmpio_vds_com.so`), a `staticlib` (`liblunmpio_vds_com.a`) and an `rlib`.
//!
//! | C entry point | what |
//! |---|---|
//! | `lunmpio_open_lun(socket, lun, &p)` | an `IVdsLunMpio*` for one LUN (one reference) |
//! | `lunmpio_open_provider(socket, &p)` | an `IVdsHwProviderPrivateMpio*` for the daemon |
//! | `lunmpio_task_mem_alloc` / `lunmpio_task_mem_free` | `CoTaskMemAlloc` / `CoTaskMemFree` (malloc/free) |
//! | `lunmpio_last_error_message(buf, size)` | why this thread's last call failed, for people |
//!
//! Memory rules (as in VDS): GetPathInfo returns a callee-allocated `VDS_PATH_INFO` array whose
//! elements each own their third-union pointer (`pHbaPortProp` or `pInitiatorPortalIpAddr`, or NULL):
//! free each of those, then the array. GetLoadBalancePolicy returns one callee-allocated
//! `VDS_PATH_POLICY` array. No paths: NULL and a count of 0. On failure every out-pointer is NULL/0.
//!
//! Errors: the daemon's HRESULT as is; the daemon unreachable or gone (`ClientError::Io`):
//! `VDS_E_OBJECT_DELETED`; see [`daemon`] for the whole table. See `docs/VDS_C_API.md`.
//!
//! Layout: the structures are `#[repr(C)]` with the Windows x64 sizes and offsets of the research
//! notes (§2, Q13), asserted at compile time in [`abi`] and, with the same numbers, in the header.

pub mod abi;
pub mod convert;
pub mod daemon;
pub mod mem;
pub mod object;

pub use mem::{lunmpio_task_mem_alloc, lunmpio_task_mem_free};
pub use object::{lunmpio_last_error_message, lunmpio_open_lun, lunmpio_open_provider};
