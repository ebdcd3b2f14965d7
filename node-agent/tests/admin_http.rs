//! The vLLM-compatible admin routes (`/v1/load_lora_adapter`, `/v1/unload_lora_adapter`) over
//! a real loopback TCP listener: vLLM's success texts, OpenAI error JSON with exact statuses,
//! the admin credential, and hostile bodies and sources.

// Test setup fails loudly by design.
#![allow(clippy::unwrap_used)]

#[path = "support/admin_world.rs"]
mod admin_world;

use admin_world::{ADMIN_TOKEN, TENANT_KEY, World, world};
use loraplane_agent::api::admin::admin_routes;
use serde_json::{Value, json};

struct Http {
    base: String,
    client: reqwest::Client,
}

async fn serve(w: &World) -> Http {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = admin_routes(w.state.clone());
    tokio::spawn(async move { axum::serve(listener, app).await });
    Http {
        base: format!("http://{addr}"),
        client: reqwest::Client::builder().no_proxy().build().unwrap(),
    }
}

impl Http {
    /// POSTs `body` (raw bytes) with `token`; returns status and body text.
    async fn post(&self, route: &str, body: &[u8], token: Option<&str>) -> (u16, String) {
        let mut r = self
            .client
            .post(format!("{}{route}", self.base))
            .header("content-type", "application/json")
            .body(body.to_vec());
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        let resp = r.send().await.unwrap();
        let status = resp.status().as_u16();
        (status, resp.text().await.unwrap())
    }

    async fn load(&self, body: Value) -> (u16, String) {
        self.post(
            "/v1/load_lora_adapter",
            body.to_string().as_bytes(),
            Some(ADMIN_TOKEN),
        )
        .await
    }

    async fn unload(&self, body: Value) -> (u16, String) {
        self.post(
            "/v1/unload_lora_adapter",
            body.to_string().as_bytes(),
            Some(ADMIN_TOKEN),
        )
        .await
    }
}

/// The OpenAI error object of a response body.
fn error_of(body: &str) -> Value {
    let v: Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"));
    let e = v["error"].clone();
    assert!(e["message"].is_string() && e["type"].is_string(), "{body}");
    e
}

async fn adapters(w: &World) -> Vec<String> {
    w.state
        .list(None)
        .await
        .unwrap()
        .iter()
        .map(|a| a.key.to_string())
        .collect()
}

#[tokio::test]
async fn load_and_unload_like_vllm() {
    let w = world();
    let h = serve(&w).await;
    let (status, body) = h
        .load(json!({"lora_name": "sql", "lora_path": w.adapter("a")}))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body, "Success: LoRA adapter 'sql' added successfully.");
    let (status, body) = h
        .load(json!({
            "lora_name": "sql",
            "lora_path": w.adapter("b"),
            "tenant": "team-a",
            "expected_sha256": w.digest("b").hex(),
            "load_inplace": true,
        }))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(adapters(&w).await, vec!["default/sql", "team-a/sql"]);

    let (status, body) = h.unload(json!({"lora_name": "sql"})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body, "Success: LoRA adapter 'sql' removed successfully.");
    assert_eq!(adapters(&w).await, vec!["team-a/sql"]);

    let (status, body) = h.unload(json!({"lora_name": "sql"})).await;
    assert_eq!(status, 404, "{body}");
    let e = error_of(&body);
    assert_eq!(e["message"], "The lora adapter 'sql' cannot be found.");
    assert_eq!(e["type"], "invalid_request_error");

    let (status, _) = h
        .unload(json!({"lora_name": "sql", "tenant": "team-a"}))
        .await;
    assert_eq!(status, 200);
    assert!(adapters(&w).await.is_empty());
}

#[tokio::test]
async fn credentials_are_required() {
    let w = world();
    let h = serve(&w).await;
    let body = json!({"lora_name": "sql", "lora_path": w.adapter("a")}).to_string();
    let route = "/v1/load_lora_adapter";

    let (status, text) = h.post(route, body.as_bytes(), None).await;
    assert_eq!(status, 401, "{text}");
    assert_eq!(error_of(&text)["type"], "authentication_error");
    let (status, _) = h.post(route, body.as_bytes(), Some("wrong")).await;
    assert_eq!(status, 401);

    w.add_tenant(0);
    let (status, text) = h.post(route, body.as_bytes(), Some(TENANT_KEY)).await;
    assert_eq!(status, 403, "{text}");
    assert_eq!(error_of(&text)["type"], "permission_error");
    let (status, _) = h
        .post(
            "/v1/unload_lora_adapter",
            br#"{"lora_name":"sql"}"#,
            Some(TENANT_KEY),
        )
        .await;
    assert_eq!(status, 403);
    assert!(adapters(&w).await.is_empty());

    let (status, _) = h.post(route, body.as_bytes(), Some(ADMIN_TOKEN)).await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn hostile_bodies_and_sources_get_clear_400s() {
    let w = world();
    let h = serve(&w).await;
    let route = "/v1/load_lora_adapter";
    let good = w.adapter("a");
    let bodies: Vec<Vec<u8>> = vec![
        b"{not json".to_vec(),
        b"".to_vec(),
        b"[]".to_vec(),
        vec![b'{', 0xff, 0xfe, b'}'],
        json!({"lora_name": 5, "lora_path": good})
            .to_string()
            .into_bytes(),
        json!({"lora_name": "sql"}).to_string().into_bytes(),
        json!({"lora_name": "sql", "lora_path": good, "pin": "yes"})
            .to_string()
            .into_bytes(),
        json!({"lora_name": "a b", "lora_path": good})
            .to_string()
            .into_bytes(),
        json!({"lora_name": "sql", "lora_path": good, "tenant": ""})
            .to_string()
            .into_bytes(),
        json!({"lora_name": "sql", "lora_path": good, "expected_sha256": "12"})
            .to_string()
            .into_bytes(),
        json!({"lora_name": "sql", "lora_path": format!("{}/../model", w.root.display())})
            .to_string()
            .into_bytes(),
        json!({"lora_name": "sql", "lora_path": "/etc"})
            .to_string()
            .into_bytes(),
        json!({"lora_name": "sql", "lora_path": "https://127.0.0.1:9/x"})
            .to_string()
            .into_bytes(),
        json!({"lora_name": "sql", "lora_path": "https://10.0.0.1/x"})
            .to_string()
            .into_bytes(),
        // s3:// is a supported scheme; a key path that climbs out of its prefix is not.
        json!({"lora_name": "sql", "lora_path": "s3://bucket/adapters/../key"})
            .to_string()
            .into_bytes(),
    ];
    for (i, body) in bodies.iter().enumerate() {
        let (status, text) = h.post(route, body, Some(ADMIN_TOKEN)).await;
        assert_eq!(status, 400, "case {i}: {text}");
        let e = error_of(&text);
        assert_eq!(e["type"], "invalid_request_error", "case {i}: {text}");
    }
    let (status, text) = h
        .load(json!({"lora_name": "sql", "lora_path": w.adapter("a"), "expected_sha256": w.digest("b").hex()}))
        .await;
    assert_eq!(status, 400, "{text}");
    assert!(
        error_of(&text)["message"]
            .as_str()
            .unwrap()
            .contains("digest")
    );
    let (status, text) = h
        .load(json!({"lora_name": "sql", "lora_path": w.adapter("missing")}))
        .await;
    assert_eq!(status, 404, "{text}");
    assert!(adapters(&w).await.is_empty());

    // Still healthy afterwards.
    let (status, _) = h
        .load(json!({"lora_name": "sql", "lora_path": w.adapter("a")}))
        .await;
    assert_eq!(status, 200);
}

/// Every path problem is a 4xx whose message reveals nothing about the file system outside the
/// roots: a path through an existing file outside (`/etc/passwd/x`), a missing path outside, and
/// a symlink out of a root answer alike, and nothing carries an OS error text.
#[tokio::test]
async fn path_problems_are_4xx_and_reveal_nothing_outside_the_roots() {
    let w = world();
    let h = serve(&w).await;
    let outside = w.dir.path().join("outside");
    std::fs::create_dir_all(outside.join("secret")).unwrap();
    std::os::unix::fs::symlink(&outside, w.root.join("out")).unwrap();
    let load = |path: String| {
        let h = &h;
        async move {
            let (status, text) = h.load(json!({"lora_name": "sql", "lora_path": path})).await;
            let message = error_of(&text)["message"].as_str().unwrap().to_owned();
            assert!(
                !message.contains("os error") && !message.contains("Not a directory"),
                "{message}"
            );
            // The message names the path as given, then a reason: compare the reasons.
            let reason = message.replace(&path, "<path>");
            (status, reason)
        }
    };
    let through_file = load("/etc/passwd/x".into()).await;
    assert_eq!(through_file.0, 400, "{through_file:?}");
    for path in [
        "/nonexistent/x".to_owned(),
        "/etc".to_owned(),
        format!("file://{}", outside.join("secret").display()),
        outside.join("missing/x").display().to_string(),
        w.root.join("out/secret").display().to_string(),
        w.root.join("out/missing").display().to_string(),
        w.root.join("out/missing/x").display().to_string(),
    ] {
        assert_eq!(load(path.clone()).await, through_file, "{path}");
    }
    // Inside the roots, a path through a file is simply not found.
    let (status, _) = load(w.root.join("a/adapter_config.json/x").display().to_string()).await;
    assert_eq!(status, 404);
    let (status, _) = load(w.root.join("a/adapter_config.json").display().to_string()).await;
    assert_eq!(status, 404);
    assert!(adapters(&w).await.is_empty());
}
