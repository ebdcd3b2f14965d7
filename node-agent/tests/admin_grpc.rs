//! The `loraplane.v1.Admin` gRPC service on a real engine with a tiny fixture model: over a
//! real loopback socket with a tonic client, and in-process through the service trait.

// Test setup fails loudly by design.
#![allow(clippy::unwrap_used)]

#[path = "support/admin_world.rs"]
mod admin_world;

use std::net::SocketAddr;

use admin_world::{ADMIN_TOKEN, TENANT_KEY, World, world};
use loraplane_agent::api::admin::AdminService;
use loraplane_agent::engine::request::{AdapterUse, Request, SamplingParams};
use loraplane_agent::lora::ids::TenantId;
use loraplane_proto::v1 as pb;
use loraplane_proto::v1::admin_client::AdminClient;
use loraplane_proto::v1::admin_server::Admin;
use tonic::Code;
use tonic::transport::Channel;

async fn serve(w: &World) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let service = AdminService::new(w.state.clone()).into_server();
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await
    });
    addr
}

async fn client(addr: SocketAddr) -> AdminClient<Channel> {
    AdminClient::connect(format!("http://{addr}"))
        .await
        .unwrap()
}

/// A request carrying `token` as the bearer credential (none when `None`).
fn req<T>(msg: T, token: Option<&str>) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    if let Some(t) = token {
        r.metadata_mut()
            .insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    r
}

fn admin<T>(msg: T) -> tonic::Request<T> {
    req(msg, Some(ADMIN_TOKEN))
}

fn load(tenant: &str, name: &str, uri: &str, sha: &str) -> pb::LoadAdapterRequest {
    pb::LoadAdapterRequest {
        adapter: Some(pb::AdapterRef {
            tenant: tenant.into(),
            name: name.into(),
        }),
        source_uri: uri.into(),
        expected_sha256: sha.into(),
        pin: false,
    }
}

fn unload(tenant: &str, name: &str) -> pb::UnloadAdapterRequest {
    pb::UnloadAdapterRequest {
        adapter: Some(pb::AdapterRef {
            tenant: tenant.into(),
            name: name.into(),
        }),
    }
}

async fn names(c: &mut AdminClient<Channel>, tenant: &str) -> Vec<String> {
    let list = c
        .list_adapters(admin(pb::ListAdaptersRequest {
            tenant: tenant.into(),
        }))
        .await
        .unwrap()
        .into_inner();
    list.adapters
        .iter()
        .map(|a| {
            let r = a.adapter.as_ref().unwrap();
            format!("{}/{}", r.tenant, r.name)
        })
        .collect()
}

#[tokio::test]
async fn load_list_unload_round_trip() {
    let w = world();
    let mut c = client(serve(&w).await).await;
    let digest = w.digest("a");

    let info = c
        .load_adapter(admin(load(
            "default",
            "sql",
            &w.adapter("a"),
            &digest.hex(),
        )))
        .await
        .unwrap()
        .into_inner()
        .adapter
        .unwrap();
    assert_eq!(info.digest, digest.to_string());
    assert_eq!(info.rank, 4);
    assert_eq!(info.target_modules, vec!["q_proj", "v_proj"]);
    assert_eq!(info.source_uri, w.adapter("a"));
    assert_eq!(info.residency, pb::Residency::HostCache as i32);
    assert!(info.size_bytes > 0);

    // Idempotent for the same source and digest (with the `sha256:` form this time).
    let again = c
        .load_adapter(admin(load(
            "default",
            "sql",
            &w.adapter("a"),
            &digest.to_string(),
        )))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.adapter.unwrap().digest, digest.to_string());

    let file_uri = format!("file://{}", w.adapter("b"));
    c.load_adapter(admin(load("team-b", "sql", &file_uri, "")))
        .await
        .unwrap();
    assert_eq!(names(&mut c, "").await, vec!["default/sql", "team-b/sql"]);
    assert_eq!(names(&mut c, "team-b").await, vec!["team-b/sql"]);

    let out = c.unload_adapter(admin(unload("default", "sql"))).await;
    assert!(out.unwrap().into_inner().unloaded);
    let out = c.unload_adapter(admin(unload("default", "sql"))).await;
    assert!(!out.unwrap().into_inner().unloaded);
    assert_eq!(names(&mut c, "").await, vec!["team-b/sql"]);
}

#[tokio::test]
async fn bad_digests_and_sources_are_refused() {
    let w = world();
    let mut c = client(serve(&w).await).await;

    let wrong = w.digest("b").hex();
    let err = c
        .load_adapter(admin(load("default", "sql", &w.adapter("a"), &wrong)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("digest"), "{}", err.message());
    assert!(names(&mut c, "").await.is_empty());

    let outside = w.dir.path().join("model").display().to_string();
    let link = w.root.join("escape");
    std::os::unix::fs::symlink(w.dir.path().join("model"), &link).unwrap();
    for uri in [
        format!("{}/../model", w.root.display()),
        format!("{}/a/../../model", w.root.display()),
        outside.clone(),
        format!("file://{outside}"),
        link.display().to_string(),
        "/etc".to_owned(),
        // Issue 16 point 2's probes: through an existing file outside, and a missing path
        // outside, answer alike (the same refusal as any path outside the roots).
        "/etc/passwd/x".to_owned(),
        "/nonexistent/x".to_owned(),
        "relative/path".to_owned(),
        "https://127.0.0.1/adapter".to_owned(),
        "https://169.254.169.254/latest".to_owned(),
        "http://example.com/adapter".to_owned(),
    ] {
        let err = c
            .load_adapter(admin(load("default", "x", &uri, "")))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{uri}: {err:?}");
        assert!(
            err.message().contains("refused"),
            "{uri}: {}",
            err.message()
        );
        assert!(
            !err.message().contains("os error") && !err.message().contains("Not a directory"),
            "{uri}: {}",
            err.message()
        );
    }
    let err = c
        .load_adapter(admin(load("default", "x", &w.adapter("nope"), "")))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    assert!(names(&mut c, "").await.is_empty());
}

#[tokio::test]
async fn input_is_validated_at_the_edge() {
    let w = world();
    let mut c = client(serve(&w).await).await;
    let good = w.adapter("a");
    let cases = [
        load("", "sql", &good, ""),
        load("default", "", &good, ""),
        load("default", "a/b", &good, ""),
        load("default", "-sql", &good, ""),
        load("Team A", "sql", &good, ""),
        load("default", &"x".repeat(64), &good, ""),
        load("default", "sql", "", ""),
        load("default", "sql", &"/x".repeat(3000), ""),
        load("default", "sql", &good, "not-hex"),
        load("default", "sql", &good, &"ab".repeat(31)),
        pb::LoadAdapterRequest {
            adapter: None,
            source_uri: good.clone(),
            expected_sha256: String::new(),
            pin: false,
        },
    ];
    for (i, case) in cases.into_iter().enumerate() {
        let err = c.load_adapter(admin(case)).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "case {i}: {err:?}");
    }
    let err = c.unload_adapter(admin(unload("default", "../x"))).await;
    assert_eq!(err.unwrap_err().code(), Code::InvalidArgument);
    let err = c
        .list_adapters(admin(pb::ListAdaptersRequest {
            tenant: "no/slash".into(),
        }))
        .await;
    assert_eq!(err.unwrap_err().code(), Code::InvalidArgument);
    let err = c
        .drain(admin(pb::DrainRequest {
            timeout_seconds: 100_000,
        }))
        .await;
    assert_eq!(err.unwrap_err().code(), Code::InvalidArgument);
    assert!(!w.lifecycle.is_draining());
}

#[tokio::test]
async fn credentials() {
    let w = world();
    let mut c = client(serve(&w).await).await;
    let list = || pb::ListAdaptersRequest::default();

    let err = c.list_adapters(req(list(), None)).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    let err = c
        .list_adapters(req(list(), Some("wrong")))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    let mut basic = tonic::Request::new(list());
    basic
        .metadata_mut()
        .insert("authorization", "Basic YWRtaW46eA==".parse().unwrap());
    assert_eq!(
        c.list_adapters(basic).await.unwrap_err().code(),
        Code::Unauthenticated
    );

    // Tenants through the admin API; a tenant key is then a known caller without admin rights.
    let hash = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(TENANT_KEY));
    let set = pb::SetTenantsRequest {
        tenants: vec![pb::TenantSpec {
            id: "team-a".into(),
            api_key_sha256: vec![hash],
            limits: None,
        }],
    };
    let err = c.set_tenants(req(set.clone(), Some(TENANT_KEY))).await;
    assert_eq!(
        err.unwrap_err().code(),
        Code::Unauthenticated,
        "not yet a tenant key"
    );
    let n = c
        .set_tenants(admin(set))
        .await
        .unwrap()
        .into_inner()
        .tenants;
    assert_eq!(n, 1);
    let err = c
        .list_adapters(req(list(), Some(TENANT_KEY)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    let err = c
        .load_adapter(req(
            load("team-a", "x", &w.adapter("a"), ""),
            Some(TENANT_KEY),
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    let err = c
        .list_adapters(req(list(), Some("wrong")))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert!(names(&mut c, "").await.is_empty());

    // An invalid table is refused whole.
    let bad = pb::SetTenantsRequest {
        tenants: vec![pb::TenantSpec {
            id: "team-b".into(),
            api_key_sha256: vec!["xyz".into()],
            limits: None,
        }],
    };
    let err = c.set_tenants(admin(bad)).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(w.tenants.ids().len(), 1);
}

#[tokio::test]
async fn adapter_quota_per_tenant() {
    let w = world();
    w.add_tenant(1);
    let mut c = client(serve(&w).await).await;
    c.load_adapter(admin(load("team-a", "one", &w.adapter("a"), "")))
        .await
        .unwrap();
    // Reloading the same name does not count twice.
    c.load_adapter(admin(load("team-a", "one", &w.adapter("a"), "")))
        .await
        .unwrap();
    let err = c
        .load_adapter(admin(load("team-a", "two", &w.adapter("b"), "")))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    // Other tenants are not limited by it.
    c.load_adapter(admin(load("default", "two", &w.adapter("b"), "")))
        .await
        .unwrap();
}

#[tokio::test]
async fn stats_and_drain() {
    let w = world();
    let mut c = client(serve(&w).await).await;
    c.load_adapter(admin(load("default", "sql", &w.adapter("c"), "")))
        .await
        .unwrap();
    let s = c
        .get_stats(admin(pb::GetStatsRequest {}))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (s.role.as_str(), s.model.as_str()),
        ("unified", "tiny-llama")
    );
    let pool = s.pool.unwrap();
    assert!(pool.total_pages > 0 && pool.page_bytes > 0);
    assert_eq!(pool.free_pages, pool.total_pages);
    assert_eq!(s.host_cache.unwrap().adapters, 1);
    assert!(!s.draining);
    let requests_of = |s: &pb::GetStatsResponse| -> Vec<(String, u64)> {
        s.adapter_requests
            .iter()
            .map(|r| (r.adapter.as_ref().unwrap().name.clone(), r.requests_total))
            .collect()
    };
    assert_eq!(requests_of(&s), [("sql".to_owned(), 0)]);

    // Two requests on the adapter: the counter the operator derives rates from counts them.
    for i in 0..2 {
        let mut events = w
            .engine
            .submit(Request {
                id: format!("r{i}"),
                tenant: TenantId::default_tenant(),
                adapters: vec![AdapterUse::plain("sql")],
                prompt: vec![1, 2, 3],
                params: SamplingParams {
                    max_tokens: 2,
                    ..SamplingParams::default()
                },
                cache_salt: None,
            })
            .await
            .unwrap();
        while events.recv().await.is_some() {}
    }
    let s = c
        .get_stats(admin(pb::GetStatsRequest {}))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(requests_of(&s), [("sql".to_owned(), 2)]);

    let d = c
        .drain(admin(pb::DrainRequest { timeout_seconds: 1 }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(d.in_flight, 0);
    assert!(w.lifecycle.is_draining());
    let s = c.get_stats(admin(pb::GetStatsRequest {})).await.unwrap();
    assert!(s.into_inner().draining);
}

#[tokio::test]
async fn in_process_calls_go_through_the_same_checks() {
    let w = world();
    let service = AdminService::new(w.state.clone());
    let err = service
        .list_adapters(req(pb::ListAdaptersRequest::default(), None))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    let info = service
        .load_adapter(admin(load("default", "sql", &w.adapter("a"), "")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.adapter.unwrap().rank, 4);
    let list = service
        .list_adapters(admin(pb::ListAdaptersRequest::default()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.adapters.len(), 1);
}
