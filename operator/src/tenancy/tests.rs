#![allow(clippy::unwrap_used, clippy::expect_used)] // test code

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;

use super::*;
use crate::fixtures::{api_key, namespace};

fn labels(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
    kv.iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

#[test]
fn by_default_a_model_admits_only_its_own_namespace() {
    let m = BaseModel::test();
    assert!(admits(&m, "loraplane-system", None));
    assert!(!admits(&m, "team-a", None));
    assert_eq!(
        admitted_namespaces(&m, &[]),
        BTreeSet::from(["loraplane-system".to_owned()])
    );
}

#[test]
fn a_list_admits_exactly_its_namespaces() {
    let m = BaseModel::test().allow(&["team-a", "team-b"]);
    assert!(admits(&m, "team-a", None));
    assert!(!admits(&m, "team-c", None));
    assert!(!admits(&m, "loraplane-system", None));
}

#[test]
fn a_selector_admits_namespaces_by_label() {
    let m = BaseModel::test().select("loraplane.dev/tenant", "true");
    let yes = namespace("team-a", &[("loraplane.dev/tenant", "true")], &[]);
    let no = namespace("team-b", &[], &[]);
    assert!(admits(&m, "team-a", Some(&yes)));
    assert!(!admits(&m, "team-b", Some(&no)));
    assert!(
        !admits(&m, "team-x", None),
        "an unknown namespace is not admitted by a selector"
    );
    assert_eq!(
        admitted_namespaces(&m, &[yes, no]),
        BTreeSet::from(["team-a".to_owned()])
    );
}

#[test]
fn selector_expressions_follow_kubernetes() {
    let expr = |op: &str, values: &[&str]| LabelSelector {
        match_expressions: Some(vec![LabelSelectorRequirement {
            key: "tier".into(),
            operator: op.into(),
            values: Some(values.iter().map(|v| (*v).to_owned()).collect()),
        }]),
        ..LabelSelector::default()
    };
    let gold = labels(&[("tier", "gold")]);
    let none = labels(&[]);
    assert!(selector_matches(&expr("In", &["gold", "silver"]), &gold));
    assert!(!selector_matches(&expr("In", &["silver"]), &gold));
    assert!(selector_matches(&expr("NotIn", &["silver"]), &gold));
    assert!(selector_matches(&expr("NotIn", &["silver"]), &none));
    assert!(selector_matches(&expr("Exists", &[]), &gold));
    assert!(!selector_matches(&expr("Exists", &[]), &none));
    assert!(selector_matches(&expr("DoesNotExist", &[]), &none));
    assert!(
        selector_matches(&LabelSelector::default(), &none),
        "empty selector matches all"
    );
}

#[test]
fn the_tenant_table_holds_only_key_hashes_of_admitted_namespaces() {
    let m = BaseModel::test().allow(&["team-a", "team-b"]);
    let namespaces = [
        namespace(
            "team-a",
            &[],
            &[
                ("loraplane.dev/max-adapters", "5"),
                ("loraplane.dev/max-concurrent-requests", "8"),
            ],
        ),
        namespace("team-c", &[], &[]),
    ];
    let mut unlabelled = api_key("team-a", "not-a-key", "zzz");
    unlabelled.metadata.labels = None;
    let secrets = [
        api_key("team-a", "k1", "secret-one\n"),
        api_key("team-a", "k2", "secret-two"),
        api_key("team-a", "dup", "secret-two"),
        api_key("team-c", "k3", "secret-three"),
        unlabelled,
    ];
    let table = tenant_table(&m, &namespaces, &secrets);
    assert_eq!(table.len(), 2);
    assert_eq!(table[0].id, "team-a");
    let mut want = vec![key_hash(b"secret-one"), key_hash(b"secret-two")];
    want.sort();
    assert_eq!(table[0].api_key_sha256, want);
    assert!(
        table[0]
            .api_key_sha256
            .iter()
            .all(|h| h.len() == 64 && !h.contains("secret"))
    );
    assert_eq!(table[0].limits.max_adapters, 5);
    assert_eq!(table[0].limits.max_concurrent_requests, 8);
    assert_eq!(table[1].id, "team-b");
    assert!(table[1].api_key_sha256.is_empty());
    assert_eq!(table[1].limits, Limits::default());
    assert_eq!(
        key_hash(b"abc"),
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    );
}

#[test]
fn a_deleted_key_leaves_the_table() {
    let m = BaseModel::test().allow(&["team-a"]);
    let mut s = api_key("team-a", "k1", "one");
    assert_eq!(
        tenant_table(&m, &[], std::slice::from_ref(&s))[0]
            .api_key_sha256
            .len(),
        1
    );
    s.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
        k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
    ));
    assert!(tenant_table(&m, &[], &[s])[0].api_key_sha256.is_empty());
}

#[test]
fn the_quota_admits_the_oldest_adapters() {
    let a = LoraAdapter::test().named("a").created_at(1_000);
    let b = LoraAdapter::test().named("b").created_at(2_000);
    let c = LoraAdapter::test().named("c").created_at(2_000);
    let all = [&a, &b, &c];
    assert!(within_quota(&a, &all, 2));
    assert!(within_quota(&b, &all, 2), "ties break by name");
    assert!(!within_quota(&c, &all, 2));
    assert!(within_quota(&c, &all, 0), "0 is unlimited");
    let deleting = a.clone().deleting();
    assert!(
        within_quota(&c, &[&deleting, &b, &c], 2),
        "adapters being deleted do not count"
    );
}
