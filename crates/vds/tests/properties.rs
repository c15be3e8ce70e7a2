//! Property tests: all-or-nothing Set calls, agreeing Gets, and the selectors' guarantees.

use lunmpio_vds::persist::LunState;
use lunmpio_vds::*;
use proptest::prelude::*;
use std::sync::Arc;

const SOURCE: u64 = 0x51;

#[derive(Clone, Debug)]
struct PathSpec {
    id: u64,
    primary: bool,
    weight: u32,
    oper: u8,  // 0 unknown, 1 online, 2 failed
    admin: u8, // 0 none, 1 failed, 2 standby
    bind: u8,  // initiator address 10.0.0.<bind>
}

fn path_spec() -> impl Strategy<Value = PathSpec> {
    (0u64..12, any::<bool>(), 0u32..4, 0u8..3, 0u8..3, 0u8..3).prop_map(
        |(id, primary, weight, oper, admin, bind)| PathSpec {
            id,
            primary,
            weight,
            oper: if oper == 0 { 1 } else { oper },
            admin,
            bind,
        },
    )
}

fn policy_value() -> impl Strategy<Value = i32> {
    prop_oneof![1 => -1i32..=0, 8 => 1i32..=7, 1 => 8i32..=9]
}

/// A LUN in some reachable state, or `None` when the configuration is refused.
fn build(specs: &[PathSpec], policy: i32, safe: bool) -> Option<LunMpio> {
    let policy = LoadBalancePolicy::try_from(policy).ok()?;
    // Make the configuration valid so that few cases are wasted: unique ids, and primaries as the
    // policy needs them.
    let mut specs: Vec<PathSpec> = specs.to_vec();
    specs.sort_by_key(|s| s.id);
    specs.dedup_by_key(|s| s.id);
    if policy == LoadBalancePolicy::Failover {
        let mut seen = false;
        for s in specs.iter_mut() {
            let first = s.primary && !seen;
            seen |= s.primary;
            s.primary = first;
        }
    }
    if policy == LoadBalancePolicy::RoundRobinWithSubset
        && !specs.iter().any(|s| s.primary)
        && let Some(first) = specs.first_mut()
    {
        first.primary = true;
    }
    let specs = &specs[..];
    let paths = specs
        .iter()
        .map(|s| PathConfig {
            id: s.id,
            name: format!("p{}", s.id),
            uri: format!("nbd://10.0.{}.10/x", s.id),
            transport: Transport::Tcp,
            hw_type: HwProviderType::Iscsi,
            endpoints: PathEndpoints::Network {
                target_portal_id: Guid::derive("target-portal", &s.id.to_string()),
                initiator_adapter_id: Guid::NIL,
                initiator: IpAddress::from_ip(format!("10.0.0.{}", s.bind).parse().unwrap(), 0),
            },
            primary: s.primary,
            weight: s.weight,
        })
        .collect();
    let mut lun = LunMpio::new(LunConfig {
        name: "lun".into(),
        source_id: SOURCE,
        policy,
        multi_path_safe: safe,
        paths,
    })
    .ok()?;
    for s in specs {
        let id = PathId::new(SOURCE, s.id);
        let oper = match s.oper {
            1 => OperStatus::Online,
            2 => OperStatus::Failed {
                reason: "reset".into(),
            },
            _ => OperStatus::Unknown,
        };
        lun.set_oper_status(id, oper);
        let admin = [PathStatus::Online, PathStatus::Failed, PathStatus::Standby][s.admin as usize];
        lun.set_path_admin_status(id, admin as i32).unwrap();
    }
    Some(lun)
}

/// Everything observable about a LUN's configuration and status.
fn full_state(lun: &LunMpio) -> (LunState, Vec<PathInfo>, LbSupportFlags, Vec<bool>) {
    let unusable = lun.paths().iter().map(|p| p.load().is_unusable()).collect();
    (
        LunState::capture(lun),
        lun.get_path_info(),
        lun.get_supported_lb_policies(),
        unusable,
    )
}

fn inputs() -> impl Strategy<Value = Vec<(u8, u8, Option<bool>, Option<u32>)>> {
    // (path selector, source selector, primary, weight): see `to_inputs`.
    prop::collection::vec(
        (
            0u8..64,
            0u8..32,
            any::<Option<bool>>(),
            prop::option::of(0u32..5),
        ),
        0..6,
    )
}

/// Mostly paths of the LUN (selector < 60, so that the primary rules get exercised), sometimes an
/// unknown path id or the wrong source id.
fn to_inputs(raw: &[(u8, u8, Option<bool>, Option<u32>)], lun: &LunMpio) -> Vec<PathPolicyInput> {
    let ids: Vec<u64> = lun.paths().iter().map(|p| p.id().path_id).collect();
    raw.iter()
        .map(|&(path, source, primary, weight)| {
            let path_id = if path < 60 && !ids.is_empty() {
                ids[path as usize % ids.len()]
            } else {
                100 + u64::from(path)
            };
            PathPolicyInput {
                path_id: PathId::new(if source == 0 { SOURCE + 1 } else { SOURCE }, path_id),
                primary,
                weight,
            }
        })
        .collect()
}

fn gets_agree(lun: &LunMpio) -> Result<(), TestCaseError> {
    let info = lun.get_path_info();
    let (_, policy_paths) = lun.get_load_balance_policy();
    prop_assert_eq!(info.len(), policy_paths.len());
    prop_assert_eq!(info.len(), lun.paths().len());
    for (i, p) in info.iter().zip(&policy_paths) {
        prop_assert_eq!(i.path_id, p.path_id);
    }
    prop_assert!(info.windows(2).all(|w| w[0].path_id < w[1].path_id));
    Ok(())
}

fn policy_invariants(lun: &LunMpio) -> Result<(), TestCaseError> {
    let primaries = lun.paths().iter().filter(|p| p.primary()).count();
    prop_assert!(lun.get_supported_lb_policies().contains(lun.policy()));
    if !lun.paths().is_empty() {
        match lun.policy() {
            LoadBalancePolicy::Failover => prop_assert_eq!(primaries, 1),
            LoadBalancePolicy::RoundRobinWithSubset => prop_assert!(primaries >= 1),
            _ => {}
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn set_load_balance_policy_is_all_or_nothing(
        specs in prop::collection::vec(path_spec(), 0..8),
        initial in 1i32..=7,
        safe in prop::bool::weighted(0.8),
        policy in policy_value(),
        raw in inputs(),
        count_delta in prop_oneof![8 => Just(0i32), 1 => -3i32..3],
    ) {
        let Some(mut lun) = build(&specs, initial, safe) else { return Ok(()) };
        let before = full_state(&lun);
        let inputs = to_inputs(&raw, &lun);
        let count = inputs.len() as i32 + count_delta;
        let result = lun.set_load_balance_policy_raw(policy, &inputs, count);
        match result {
            Err(e) => {
                prop_assert!(!e.hresult.is_success());
                prop_assert!([Hresult::E_INVALIDARG, Hresult::VDS_E_NOT_SUPPORTED, Hresult::VDS_E_OBJECT_NOT_FOUND]
                    .contains(&e.hresult), "{}", e);
                prop_assert_eq!(full_state(&lun), before);
            }
            Ok(()) => {
                prop_assert_eq!(count as usize, inputs.len());
                prop_assert_eq!(lun.policy() as i32, policy);
                // Listed values were applied; unlisted paths kept theirs (primary may be chosen by Failover).
                let (_, old_paths) = (before.0.policy, &before.0.paths);
                for (p, old) in lun.paths().iter().zip(old_paths) {
                    let listed = inputs.iter().find(|i| i.path_id == p.id());
                    let weight = listed.and_then(|i| i.weight).unwrap_or(old.weight);
                    prop_assert_eq!(p.weight(), weight);
                    let primary = listed.and_then(|i| i.primary).unwrap_or(old.primary);
                    if primary {
                        prop_assert!(p.primary());
                    } else if p.primary() {
                        // Only Failover without any primary may promote one path.
                        prop_assert_eq!(lun.policy(), LoadBalancePolicy::Failover);
                    }
                }
            }
        }
        policy_invariants(&lun)?;
        gets_agree(&lun)?;
    }

    #[test]
    fn admin_and_hba_calls_validate_before_changing(
        specs in prop::collection::vec(path_spec(), 1..8),
        initial in 1i32..=7,
        status in -1i32..9,
        target in 0u64..14,
        bind in 0u8..4,
    ) {
        let Some(mut lun) = build(&specs, initial, true) else { return Ok(()) };
        let before = full_state(&lun);
        if lun.set_path_admin_status(PathId::new(SOURCE, target), status).is_err() {
            prop_assert_eq!(full_state(&lun), before.clone());
        }
        let mut lun = build(&specs, initial, true).unwrap();
        let port = HbaPortMatch::Initiator(format!("10.0.0.{bind}").parse().unwrap());
        let usable_before = lun.usable_path_count();
        match lun.set_hba_port_statuses(&port, status) {
            Err(e) => {
                prop_assert_eq!(e.hresult, Hresult::E_INVALIDARG);
                prop_assert_eq!(full_state(&lun), before);
            }
            Ok(outcome) => {
                prop_assert!(outcome.changed + outcome.skipped <= outcome.matched);
                // Failing a port never takes away the last usable path.
                if status == PathStatus::Failed as i32 && usable_before > 0 {
                    prop_assert!(lun.usable_path_count() > 0);
                }
            }
        }
        policy_invariants(&lun)?;
        gets_agree(&lun)?;
    }

    #[test]
    fn gets_agree_after_any_sequence(
        specs in prop::collection::vec(path_spec(), 0..10),
        ops in prop::collection::vec((0u8..4, policy_value(), inputs(), 0u64..14, -1i32..9), 0..12),
    ) {
        let Some(mut lun) = build(&specs, LoadBalancePolicy::RoundRobin as i32, true) else { return Ok(()) };
        for (op, policy, raw, target, status) in ops {
            let id = PathId::new(SOURCE, target);
            match op {
                0 => { let inputs = to_inputs(&raw, &lun);
                    let _ = lun.set_load_balance_policy(policy, &inputs); }
                1 => { let _ = lun.set_path_admin_status(id, status); }
                2 => if lun.path(id).is_some() {
                    let oper = if status > 3 { OperStatus::Online } else { OperStatus::Failed { reason: "x".into() } };
                    lun.set_oper_status(id, oper);
                },
                _ => { let _ = lun.set_hba_port_statuses(&HbaPortMatch::Initiator("10.0.0.1".parse().unwrap()), status); }
            }
            gets_agree(&lun)?;
            policy_invariants(&lun)?;
            // The snapshot holds exactly the usable paths.
            let snap = lun.selector_snapshot();
            prop_assert_eq!(snap.candidates().len(), lun.usable_path_count());
        }
    }
}

#[derive(Clone, Debug)]
struct CandidateSpec {
    weight: u32,
    primary: bool,
    class: u8,
    in_flight: u8,
    bytes_kib: u8,
    unusable: bool,
}

fn candidate_spec() -> impl Strategy<Value = CandidateSpec> {
    (
        0u32..4,
        any::<bool>(),
        0u8..3,
        0u8..4,
        0u8..4,
        prop::bool::weighted(0.2),
    )
        .prop_map(
            |(weight, primary, class, in_flight, bytes_kib, unusable)| CandidateSpec {
                weight,
                primary,
                class,
                in_flight,
                bytes_kib,
                unusable,
            },
        )
}

fn snapshot(policy: LoadBalancePolicy, specs: &[CandidateSpec]) -> SelectorSnapshot {
    let candidates = specs
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let load = Arc::new(PathLoad::new());
            for _ in 0..s.in_flight {
                load.on_dispatch(u32::from(s.bytes_kib) * 1024);
            }
            if s.unusable {
                load.mark_unusable();
            }
            Candidate {
                index: i,
                path_id: PathId::new(SOURCE, i as u64),
                weight: s.weight,
                primary: s.primary,
                class: [
                    CandidateClass::Active,
                    CandidateClass::Standby,
                    CandidateClass::AdminStandby,
                ][s.class as usize],
                load,
            }
        })
        .collect();
    SelectorSnapshot::new(policy, candidates)
}

fn pickable(snap: &SelectorSnapshot, i: usize, exclude: u64) -> bool {
    exclude & (1 << i) == 0 && !snap.candidates()[i].load.is_unusable()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn never_unusable_excluded_or_needless_standby(
        policy in 1i32..=7,
        specs in prop::collection::vec(candidate_spec(), 0..64),
        exclude in any::<u64>(),
        now_ns in prop::sample::select(vec![0u64, 1_000_000, 10_000_000_000]),
        rotor_steps in 0usize..5,
    ) {
        let policy = LoadBalancePolicy::try_from(policy).unwrap();
        let snap = snapshot(policy, &specs);
        let selector = Selector::new();
        for _ in 0..rotor_steps {
            let _ = selector.pick(&snap, 0, now_ns, !0);
        }
        let n = snap.candidates().len();
        let best_class = (0..n).filter(|&i| pickable(&snap, i, exclude)).map(|i| snap.candidates()[i].class).min();
        for k in 0..8 {
            let picked = selector.pick(&snap, 4096, now_ns + k, exclude);
            match (picked, best_class) {
                (None, None) => {}
                (Some(i), Some(class)) => {
                    prop_assert!(pickable(&snap, i, exclude));
                    prop_assert_eq!(snap.candidates()[i].class, class, "a worse class was picked");
                }
                (picked, best) => prop_assert!(false, "picked {:?} but best class {:?}", picked, best),
            }
        }
    }

    #[test]
    fn round_robin_is_exactly_even_within_each_pass(n in 1usize..64, passes in 1usize..5, warmup in 0usize..100) {
        let specs: Vec<CandidateSpec> = (0..n)
            .map(|_| CandidateSpec { weight: 0, primary: false, class: 0, in_flight: 0, bytes_kib: 0, unusable: false })
            .collect();
        let snap = snapshot(LoadBalancePolicy::RoundRobin, &specs);
        let selector = Selector::new();
        for _ in 0..warmup {
            selector.pick(&snap, 0, 0, 0);
        }
        let picks: Vec<usize> = (0..n * passes).map(|_| selector.pick(&snap, 0, 0, 0).unwrap()).collect();
        for window in picks.windows(n) {
            let mut seen = vec![false; n];
            for &i in window {
                prop_assert!(!seen[i], "candidate {} twice in one pass", i);
                seen[i] = true;
            }
        }
    }

    #[test]
    fn weighted_paths_uses_only_the_lightest_and_shares_ties(
        weights in prop::collection::vec(0u32..5, 1..64),
        unusable in prop::collection::vec(prop::bool::weighted(0.3), 64),
    ) {
        let specs: Vec<CandidateSpec> = weights
            .iter()
            .zip(&unusable)
            .map(|(&weight, &unusable)| CandidateSpec { weight, primary: false, class: 0, in_flight: 0, bytes_kib: 0, unusable })
            .collect();
        let snap = snapshot(LoadBalancePolicy::WeightedPaths, &specs);
        let usable: Vec<usize> = (0..specs.len()).filter(|&i| pickable(&snap, i, 0)).collect();
        let Some(lightest) = usable.iter().map(|&i| snap.candidates()[i].weight).min() else { return Ok(()) };
        let tied: Vec<usize> = usable.iter().copied().filter(|&i| snap.candidates()[i].weight == lightest).collect();
        let selector = Selector::new();
        let mut counts = vec![0usize; specs.len()];
        for _ in 0..tied.len() * 10 {
            counts[selector.pick(&snap, 0, 0, 0).unwrap()] += 1;
        }
        for (i, count) in counts.iter().enumerate() {
            prop_assert_eq!(*count, if tied.contains(&i) { 10 } else { 0 });
        }
    }

    #[test]
    fn failover_and_subset_stay_on_primaries_while_one_lives(
        specs in prop::collection::vec(path_spec(), 1..10),
        subset in any::<bool>(),
        faults in prop::collection::vec(any::<bool>(), 10),
    ) {
        let policy = if subset { LoadBalancePolicy::RoundRobinWithSubset } else { LoadBalancePolicy::Failover };
        // All paths online with no admin state, so that the snapshot holds them all.
        let specs: Vec<PathSpec> = specs.into_iter().map(|s| PathSpec { oper: 1, admin: 0, ..s }).collect();
        let Some(lun) = build(&specs, policy as i32, true) else { return Ok(()) };
        let snap = lun.selector_snapshot();
        // The data path faults some paths before a new snapshot is published.
        for (c, fault) in snap.candidates().iter().zip(&faults) {
            if *fault {
                c.load.mark_unusable();
            }
        }
        let selector = Selector::new();
        let live_primaries: Vec<usize> = (0..snap.candidates().len())
            .filter(|&i| snap.candidates()[i].primary && pickable(&snap, i, 0))
            .collect();
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..snap.candidates().len() * 4 {
            let Some(i) = selector.pick(&snap, 4096, 0, 0) else {
                prop_assert!(live_primaries.is_empty());
                prop_assert!((0..snap.candidates().len()).all(|i| !pickable(&snap, i, 0)));
                continue;
            };
            seen.insert(i);
            if live_primaries.is_empty() {
                prop_assert!(!snap.candidates()[i].primary);
                if !subset {
                    // Failover: the first usable standby by (weight, id).
                    let first = (0..snap.candidates().len()).find(|&j| pickable(&snap, j, 0)).unwrap();
                    prop_assert_eq!(i, first);
                }
            } else {
                prop_assert!(live_primaries.contains(&i), "picked non-primary {} while a primary lives", i);
            }
        }
        if subset && !live_primaries.is_empty() {
            prop_assert_eq!(seen.len(), live_primaries.len(), "every live primary gets its turn");
        }
        if !subset {
            prop_assert!(seen.len() <= 1);
        }
    }

    #[test]
    fn wwn_and_ids_round_trip(value in any::<u64>(), source in any::<u64>()) {
        let wwn = Wwn::from_u64(value);
        prop_assert_eq!(wwn.to_string().parse::<Wwn>().unwrap(), wwn);
        prop_assert_eq!(format!("0x{value:016x}").parse::<Wwn>().unwrap(), wwn);
        let id = PathId::new(source, value);
        let json = serde_json::to_string(&id).unwrap();
        prop_assert_eq!(serde_json::from_str::<PathId>(&json).unwrap(), id);
        prop_assert_eq!(parse_id64(&format_id64(value)).unwrap(), value);
    }

    #[test]
    fn unknown_enum_values_are_invalid_arg(value in any::<i32>()) {
        for result in [
            PathStatus::try_from(value).map(|_| ()),
            HwProviderType::try_from(value).map(|_| ()),
            LoadBalancePolicy::try_from(value).map(|_| ()),
            HbaPortType::try_from(value).map(|_| ()),
            HbaPortStatus::try_from(value).map(|_| ()),
            IpAddressType::try_from(value).map(|_| ()),
        ] {
            if let Err(e) = result {
                prop_assert_eq!(e.hresult, Hresult::E_INVALIDARG);
            }
        }
    }

    #[test]
    fn state_round_trips(specs in prop::collection::vec(path_spec(), 0..10), policy in 1i32..=7) {
        let Some(lun) = build(&specs, policy, true) else { return Ok(()) };
        let state = LunState::capture(&lun);
        prop_assert_eq!(LunState::parse(&state.to_json()).unwrap(), state);
    }
}
