//! # lunmpio-vds: the VDS vocabulary and lunmpio's policy engine
//!
//! Pure: no async, no network, no threads. The daemon, the CLI and the C ABI share this one
//! implementation of the semantics of **IVdsLunMpio** (GetPathInfo, GetLoadBalancePolicy,
//! SetLoadBalancePolicy, GetSupportedLbPolicies) and **IVdsHwProviderPrivateMpio**
//! (SetAllPathStatusesFromHbaPort), with exact VDS values.
//!
//! | module | what |
//! |---|---|
//! | [`hresult`] | [`Hresult`] and the crate's one error type [`VdsError`] |
//! | [`types`] | path ids, statuses, interconnect types, policies, HBA ports, WWNs, IP addresses, GUIDs |
//! | [`lun`] | [`LunMpio`]: one LUN's paths and policy, every Set rule, the reported status |
//! | [`select`] | [`PathLoad`], [`SelectorSnapshot`], [`Selector`]: the seven path selectors |
//! | [`persist`] | the versioned, atomically written per-LUN state file (the only I/O here) |
//!
//! ## How the engine uses it
//!
//! ```
//! use lunmpio_vds::*;
//! let path = |id: u64| PathConfig {
//!     id, name: format!("ctrl{id}"), uri: format!("nbd://10.0.{id}.10/lun0"), transport: Transport::Tcp,
//!     hw_type: HwProviderType::Unknown, endpoints: PathEndpoints::None, primary: false, weight: 0,
//! };
//! let mut lun = LunMpio::new(LunConfig {
//!     name: "lun0".into(), source_id: 0xa1, policy: LoadBalancePolicy::DynLeastQueueDepth,
//!     multi_path_safe: true, paths: vec![path(1), path(2)],
//! })?;
//! // Control plane: paths connect; publish a snapshot after every change.
//! lun.set_oper_status(PathId::new(0xa1, 1), OperStatus::Online);
//! lun.set_oper_status(PathId::new(0xa1, 2), OperStatus::Online);
//! let snap = lun.selector_snapshot();
//! // Data path: pick, dispatch, complete.
//! let selector = Selector::new();
//! let chosen = selector.pick_candidate(&snap, 4096, 1_000, 0).unwrap();
//! chosen.load.on_dispatch(4096);
//! let other = selector.pick_candidate(&snap, 4096, 1_000, 0).unwrap();
//! assert_ne!(chosen.path_id, other.path_id); // least queue depth
//! chosen.load.on_complete(4096, 150_000, 151_000);
//! # Ok::<(), VdsError>(())
//! ```
//!
//! ## Decisions where the specification was silent, and where we differ from the research
//!
//! The research notes (`vds-lun-mpio.md` §5) are followed unless listed here.
//!
//! 1. **SetAllPathStatusesFromHbaPort with no matching path is `VDS_E_OBJECT_NOT_FOUND`**, not the
//!    research's tentative `S_OK` (Q11): an unknown port must be a clear error. The per-LUN results are
//!    folded with [`aggregate_hba_outcomes`].
//! 2. **Ports are matched by WWN pair or by initiator (bind) address.** VDS has only the WWN pair;
//!    lunmpio's network paths have no WWN, so [`HbaPortMatch::Initiator`] matches them by the local
//!    address (a text address is parsed, a DNS name never matches).
//! 3. **HBA-port skips** (Q11's "conflicts with the policy", made exact): Failed is skipped when it would
//!    leave the LUN without a usable path (standby counts as usable); Standby is skipped for a primary
//!    under Failover or Round Robin with Subset when no other primary would remain usable and not
//!    standby. Matching paths are visited in path-id order, each seeing the previous changes.
//! 4. **SetPathStatus (single path) is always obeyed**, even for the last usable path or the only
//!    primary: it is an explicit request. 0 and undefined values are `E_INVALIDARG`.
//! 5. **Failover with more than one primary after merging** listed and unlisted paths is
//!    `E_INVALIDARG` — also when the extra primaries are unlisted leftovers of an earlier policy.
//!    With no primary, the path Failover uses *now* (by the current flags and weights, before this
//!    call's changes) becomes primary ([`LunMpio::failover_active_path`]).
//! 6. **Check order in SetLoadBalancePolicy**: count (raw form) → policy value → supported → each record
//!    in input order (not found, then listed twice) → primary rules. The first failure is reported.
//! 7. **Three candidate classes, not two**: Active, Standby (policy standby: non-primary under
//!    Failover/RRWS, or awaiting failback) and AdminStandby. An administratively standby path is used only
//!    after every policy standby: an administrator who stands a primary by wants the I/O to move to the
//!    backups, not back to it. Standby classes apply to every policy (research Q7).
//! 8. **Reported status** precedence is documented in [`lun`]. A stand-in that carries I/O under Failover
//!    still reports Standby (it is not the primary); `statusReason` says why.
//! 9. **Failback** is the engine's (docs/OPERATIONS.md, configuration); this crate offers [`LunMpio::set_failback_pending`]:
//!    a returned path waiting for failback is a Standby candidate and reports Standby.
//! 10. **`set_oper_status` owns the `unusable` flag** on the control-plane side: a path is marked usable
//!     only when it is Online and not administratively failed; the data path may raise the flag earlier.
//! 11. **Losing multi-path safety at run time** ([`LunMpio::set_multi_path_safe`]) falls back to
//!     Failover with the path in use as the only primary, and says so.
//! 12. **Least Blocks counts bytes** in flight (Q6), per path as this crate sees it (per LUN).
//! 13. **service-time** is documented in [`select`]: `(in flight + 1) × latency` per path, a bytes term
//!     for large transfers, and a rate-bounded probe of idle stale paths. The latency is measured per
//!     request, not as dm historical-service-time's gap between completions, which herds onto the
//!     busiest of paths that serve requests in parallel.
//! 14. **Persisted state**: per-LUN file `lun-<escaped name>.json`; corrupt → `VDS_E_PROVIDER_CACHE_CORRUPT`,
//!     newer version → `VDS_E_NOT_SUPPORTED`, I/O failure → `VDS_E_INTERNAL_ERROR`; unknown fields in a
//!     version-1 file are ignored.
//! 15. **Ids**: `"0x"` + 16 lower-case hex digits on output; `"0x…"`, decimal strings and JSON numbers on
//!     input. HRESULTs in hex use upper case (`0x8004240B`), as the headers do.

pub mod hresult;
pub mod limits;
pub mod lun;
pub mod persist;
pub mod select;
pub mod types;

pub use hresult::{Hresult, VdsError};
pub use lun::{
    AdminStatus, HbaPortMatch, HbaPortOutcome, LunConfig, LunMpio, NAME_BYTES_MAX, OperStatus,
    PATHS_PER_LUN_MAX, Path, PathConfig, PathEndpoints, PathInfo, PathPolicyInput,
    StatusTransition, Transport, aggregate_hba_outcomes, status_transitions,
};
pub use select::{CANDIDATES_MAX, Candidate, CandidateClass, PathLoad, Selector, SelectorSnapshot};
pub use types::{
    Guid, HbaPortProp, HbaPortSpeedFlags, HbaPortStatus, HbaPortType, HwProviderType, IpAddress,
    IpAddressType, IpValue, LbSupportFlags, LoadBalancePolicy, PathId, PathPolicy, PathStatus, Wwn,
    format_id64, parse_id64,
};
