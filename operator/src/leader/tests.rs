#![allow(clippy::unwrap_used, clippy::expect_used)] // test code

use super::*;

fn cfg(me: &str) -> LeaderConfig {
    LeaderConfig {
        name: "loraplane-operator".into(),
        namespace: "loraplane-system".into(),
        identity: me.into(),
        lease_duration: Duration::from_secs(15),
        renew_every: Duration::from_secs(5),
    }
}

fn t(s: i64) -> Timestamp {
    Timestamp::from_second(1_700_000_000 + s).unwrap()
}

#[test]
fn the_first_candidate_creates_the_lease() {
    assert_eq!(decide(None, "a", t(0)), Decision::Create);
    let lease = next_lease(&cfg("a"), None, &Decision::Create, t(0)).unwrap();
    let spec = lease.spec.unwrap();
    assert_eq!(spec.holder_identity.as_deref(), Some("a"));
    assert_eq!(spec.lease_duration_seconds, Some(15));
    assert_eq!(spec.lease_transitions, Some(0));
}

#[test]
fn a_live_lease_is_respected_an_expired_one_taken() {
    let held = next_lease(&cfg("a"), None, &Decision::Create, t(0)).unwrap();
    assert_eq!(decide(Some(&held), "a", t(5)), Decision::Renew);
    assert_eq!(
        decide(Some(&held), "b", t(14)),
        Decision::Wait { holder: "a".into() }
    );
    assert_eq!(decide(Some(&held), "b", t(16)), Decision::Acquire);
    let taken = next_lease(&cfg("b"), Some(&held), &Decision::Acquire, t(16)).unwrap();
    let spec = taken.spec.unwrap();
    assert_eq!(spec.holder_identity.as_deref(), Some("b"));
    assert_eq!(spec.lease_transitions, Some(1));
    assert_eq!(spec.renew_time.unwrap().0, t(16));
}

#[test]
fn renewing_moves_only_the_renew_time() {
    let held = next_lease(&cfg("a"), None, &Decision::Create, t(0)).unwrap();
    let renewed = next_lease(&cfg("a"), Some(&held), &Decision::Renew, t(5)).unwrap();
    let (a, b) = (held.spec.unwrap(), renewed.spec.unwrap());
    assert_eq!(a.acquire_time, b.acquire_time);
    assert_eq!(b.renew_time.unwrap().0, t(5));
    assert_eq!(a.lease_transitions, b.lease_transitions);
}

#[test]
fn a_released_lease_is_free_at_once() {
    let mut held = next_lease(&cfg("a"), None, &Decision::Create, t(0)).unwrap();
    held.spec.as_mut().unwrap().holder_identity = None;
    assert_eq!(decide(Some(&held), "b", t(1)), Decision::Acquire);
    assert_eq!(
        next_lease(
            &cfg("b"),
            Some(&held),
            &Decision::Wait { holder: "x".into() },
            t(1)
        ),
        None
    );
}
