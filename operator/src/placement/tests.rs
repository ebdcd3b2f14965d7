#![allow(clippy::unwrap_used, clippy::expect_used)] // test code

use std::collections::BTreeSet;

use super::*;

const MIB: u64 = 1 << 20;

fn agent(
    pod: &str,
    role: Role,
    node: &str,
    capacity_mib: u64,
    pinned_mib: u64,
    pinned: u32,
) -> AgentLoad {
    AgentLoad {
        pod: pod.into(),
        role,
        node: Some(node.into()),
        capacity_bytes: capacity_mib * MIB,
        pinned_bytes: pinned_mib * MIB,
        pinned_adapters: pinned,
        pool_free_bytes: None,
    }
}

fn holders(pods: &[&str]) -> BTreeSet<String> {
    pods.iter().map(|p| (*p).to_owned()).collect()
}

fn demand<'a>(replicas: Option<u32>, size_mib: u64, holders: &'a BTreeSet<String>) -> Demand<'a> {
    Demand {
        replicas,
        size_bytes: size_mib * MIB,
        holders,
        sticky: None,
    }
}

#[test]
fn picks_the_agents_with_the_most_headroom() {
    let agents = [
        agent("a", Role::Unified, "n1", 1000, 900, 9),
        agent("b", Role::Unified, "n2", 1000, 100, 1),
        agent("c", Role::Unified, "n3", 1000, 500, 5),
    ];
    let none = holders(&[]);
    let plan = place(&demand(Some(2), 50, &none), &agents, &[Role::Unified]);
    assert_eq!(plan.targets(), holders(&["b", "c"]));
    assert_eq!((plan.wanted(), plan.shortfall()), (2, 0));
    assert!(plan.pin);
}

#[test]
fn never_places_where_it_does_not_fit_and_reports_the_shortfall() {
    let agents = [
        agent("a", Role::Unified, "n1", 1000, 990, 9),
        agent("b", Role::Unified, "n2", 1000, 100, 1),
    ];
    let none = holders(&[]);
    let plan = place(&demand(Some(2), 50, &none), &agents, &[Role::Unified]);
    assert_eq!(plan.targets(), holders(&["b"]));
    assert_eq!((plan.wanted(), plan.shortfall()), (2, 1));
}

#[test]
fn spreads_replicas_across_nodes_before_packing_one() {
    // a1 and a2 share node n1 and have the most room; b is alone on n2.
    let agents = [
        agent("a1", Role::Unified, "n1", 1000, 0, 0),
        agent("a2", Role::Unified, "n1", 1000, 0, 0),
        agent("b", Role::Unified, "n2", 1000, 300, 3),
    ];
    let none = holders(&[]);
    let plan = place(&demand(Some(2), 10, &none), &agents, &[Role::Unified]);
    assert_eq!(plan.targets(), holders(&["a1", "b"]));
}

#[test]
fn keeps_existing_holders_so_nothing_churns() {
    let agents = [
        agent("a", Role::Unified, "n1", 1000, 800, 8),
        agent("b", Role::Unified, "n2", 1000, 0, 0),
        agent("c", Role::Unified, "n3", 1000, 0, 0),
    ];
    let h = holders(&["a"]);
    let plan = place(&demand(Some(2), 10, &h), &agents, &[Role::Unified]);
    assert_eq!(
        plan.targets(),
        holders(&["a", "b"]),
        "a keeps it although it is the fullest"
    );
}

#[test]
fn shrinking_releases_the_fullest_holder_first() {
    let agents = [
        agent("a", Role::Unified, "n1", 1000, 800, 8),
        agent("b", Role::Unified, "n2", 1000, 100, 1),
        agent("c", Role::Unified, "n3", 1000, 300, 3),
    ];
    let h = holders(&["a", "b", "c"]);
    let plan = place(&demand(Some(2), 10, &h), &agents, &[Role::Unified]);
    assert_eq!(plan.targets(), holders(&["b", "c"]));
}

#[test]
fn replaces_a_holder_that_disappeared() {
    // "gone" held it but is no longer an agent: the plan fills the gap elsewhere.
    let agents = [
        agent("a", Role::Unified, "n1", 1000, 0, 0),
        agent("b", Role::Unified, "n2", 1000, 10, 1),
        agent("c", Role::Unified, "n3", 1000, 20, 2),
    ];
    let h = holders(&["gone", "c"]);
    let plan = place(&demand(Some(2), 10, &h), &agents, &[Role::Unified]);
    assert_eq!(plan.targets(), holders(&["a", "c"]));
}

#[test]
fn prefill_and_decode_agents_are_placed_alike() {
    let agents = [
        agent("p0", Role::Prefill, "n1", 1000, 0, 0),
        agent("p1", Role::Prefill, "n2", 1000, 500, 5),
        agent("d0", Role::Decode, "n3", 1000, 300, 3),
        agent("d1", Role::Decode, "n4", 1000, 0, 0),
        agent("d2", Role::Decode, "n5", 1000, 100, 1),
    ];
    let none = holders(&[]);
    let plan = place(
        &demand(Some(1), 10, &none),
        &agents,
        &[Role::Prefill, Role::Decode],
    );
    assert_eq!(plan.roles.len(), 2);
    assert_eq!(plan.roles[0].targets, ["p0"]);
    assert_eq!(plan.roles[1].targets, ["d1"]);
    assert_eq!(plan.wanted(), 2);
}

#[test]
fn more_replicas_than_agents_places_on_every_agent_without_a_shortfall() {
    let agents = [agent("a", Role::Unified, "n1", 1000, 0, 0)];
    let none = holders(&[]);
    let plan = place(&demand(Some(3), 10, &none), &agents, &[Role::Unified]);
    assert_eq!(
        (plan.targets().len(), plan.wanted(), plan.shortfall()),
        (1, 1, 0)
    );
}

#[test]
fn on_demand_registers_everywhere_unpinned_regardless_of_room() {
    let agents = [
        agent("a", Role::Unified, "n1", 100, 100, 9),
        agent("b", Role::Unified, "n2", 100, 0, 0),
    ];
    let none = holders(&[]);
    let plan = place(&demand(None, 500, &none), &agents, &[Role::Unified]);
    assert_eq!(plan.targets(), holders(&["a", "b"]));
    assert!(!plan.pin);
    assert_eq!(plan.shortfall(), 0);
}

#[test]
fn no_agents_means_nothing_wanted() {
    let none = holders(&[]);
    let plan = place(&demand(Some(2), 10, &none), &[], &[Role::Unified]);
    assert_eq!(
        (plan.wanted(), plan.shortfall(), plan.targets().len()),
        (0, 0, 0)
    );
}

#[test]
fn is_deterministic_on_ties() {
    let agents: Vec<AgentLoad> = (0..6)
        .map(|i| {
            agent(
                &format!("a{i}"),
                Role::Unified,
                &format!("n{i}"),
                1000,
                0,
                0,
            )
        })
        .collect();
    let none = holders(&[]);
    let first = place(&demand(Some(3), 10, &none), &agents, &[Role::Unified]);
    let mut reversed = agents.clone();
    reversed.reverse();
    assert_eq!(
        first,
        place(&demand(Some(3), 10, &none), &reversed, &[Role::Unified])
    );
    assert_eq!(first.targets(), holders(&["a0", "a1", "a2"]));
}

#[test]
fn many_adapters_spread_evenly() {
    // 20 agents, 2,000 adapters of 2 replicas placed one after another: every agent ends
    // within one adapter of the mean (200).
    let mut agents: Vec<AgentLoad> = (0..20)
        .map(|i| {
            agent(
                &format!("a{i:02}"),
                Role::Unified,
                &format!("n{}", i / 2),
                100_000,
                0,
                0,
            )
        })
        .collect();
    let none = holders(&[]);
    for _ in 0..2000 {
        let plan = place(&demand(Some(2), 32, &none), &agents, &[Role::Unified]);
        for t in plan.targets() {
            let a = agents.iter_mut().find(|a| a.pod == t).unwrap();
            a.pinned_bytes += 32 * MIB;
            a.pinned_adapters += 1;
        }
    }
    let counts: Vec<u32> = agents.iter().map(|a| a.pinned_adapters).collect();
    let (min, max) = (*counts.iter().min().unwrap(), *counts.iter().max().unwrap());
    assert!(max - min <= 1, "{counts:?}");
    assert_eq!(counts.iter().sum::<u32>(), 4000);
}

#[test]
fn sticky_placement_grows_and_shrinks_along_one_rendezvous_order() {
    let agents: Vec<AgentLoad> = (0..6)
        .map(|i| {
            agent(
                &format!("p{i}"),
                Role::Unified,
                &format!("n{i}"),
                1000,
                0,
                0,
            )
        })
        .collect();
    let key = "team-a/sql";
    let mut order: Vec<&str> = agents.iter().map(|a| a.pod.as_str()).collect();
    order.sort_by_key(|p| Reverse(demand::rendezvous_score(key, p)));
    let sticky = |k: u32, held: &BTreeSet<String>| {
        let d = Demand {
            sticky: Some(key),
            ..demand(Some(k), 10, held)
        };
        place(&d, &agents, &[Role::Unified]).targets()
    };
    let none = holders(&[]);
    let one = sticky(1, &none);
    assert_eq!(one, holders(&order[..1]));
    let three = sticky(3, &one);
    assert_eq!(three, holders(&order[..3]), "grows along the order");
    assert!(one.is_subset(&three));
    let two = sticky(2, &three);
    assert_eq!(two, holders(&order[..2]), "shrinks from the end of it");
    // Headroom no longer decides, but an agent without room is skipped.
    let mut full = agents.clone();
    let first = full.iter_mut().find(|a| a.pod == order[0]).unwrap();
    first.pool_free_bytes = Some(MIB);
    let d = Demand {
        sticky: Some(key),
        ..demand(Some(1), 10, &none)
    };
    assert_eq!(
        place(&d, &full, &[Role::Unified]).targets(),
        holders(&order[1..2]),
        "no device-pool room on the first choice"
    );
}
