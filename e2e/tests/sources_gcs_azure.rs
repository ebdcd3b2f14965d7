//! `gs://` and `az://` adapter sources against real servers of those protocols — fake-gcs-server
//! (Google Cloud Storage's JSON and XML APIs) and Azurite (Azure Blob Storage, Shared Key
//! authentication enforced) — through the real agent binary. For each: a prefix preloaded with
//! `--adapters`, single adapters and a `.tar.gz` loaded through the admin API, all serving
//! exactly what the same files loaded from a local path serve; a missing bucket or key and a
//! malformed URI as clear 4xx errors. For Azure, a wrong account key is refused as the
//! credentials' fault without the key appearing in the answer or the log.

// Test setup fails loudly by design.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

use loraplane_e2e::object_stores::{Azurite, FakeGcs, tar_gz, uploads};
use loraplane_e2e::{Agent, World, complete, key_hash, load_lora, model_ids};

const ADMIN: &str = "sources-admin";

/// Two adapters in a world, their uploads (`adapters/acme/{sql,tone}`, an archive, one adapter
/// outside the preloaded prefix) and the local reference copies.
struct Uploads {
    w: World,
    sql: PathBuf,
    tone: PathBuf,
    puts: Vec<(String, PathBuf)>,
}

fn uploads_of_two_adapters() -> Uploads {
    let w = World::tiny();
    let sql = w.adapter("local/sql", 7);
    let tone = w.adapter("local/tone", 8);
    let archive = w.path("sql.tar.gz");
    tar_gz(&sql, &archive);
    let mut puts = uploads("adapters/acme/sql", &sql);
    puts.extend(uploads("adapters/acme/tone", &tone));
    puts.extend(uploads("adapters/elsewhere/other", &sql));
    puts.push(("adapters/archives/sql.tar.gz".into(), archive));
    Uploads { w, sql, tone, puts }
}

/// Starts an agent preloading `<scheme>://adapters/acme` with `env`, and checks every way of
/// loading from the store against the local files, then the refusals (a load from
/// `missing_bucket` must say `missing_bucket_says`).
async fn serves_exactly_what_local_files_serve(
    u: &Uploads,
    scheme: &str,
    env: &[(&str, &str)],
    missing_bucket: &str,
    missing_bucket_says: &str,
) {
    let w = &u.w;
    let roots = w.path("local");
    let preload = format!("{scheme}://adapters/acme");
    let agent = Agent::start_with_env(
        w,
        &[
            "--adapters",
            &preload,
            "--adapter-roots",
            roots.to_str().unwrap(),
            "--admin-token-sha256",
            &key_hash(ADMIN),
            "--source-cache-dir",
            w.path(&format!("cache-{scheme}")).to_str().unwrap(),
        ],
        env,
    );

    // The prefix's adapters were listed and preloaded; the one outside it was not.
    let ids = model_ids(&agent).await;
    assert_eq!(ids, ["sql", "tiny", "tone"], "{scheme}: preloaded {ids:?}");

    // The same files from a local path: the reference.
    for (name, path) in [("sql-local", &u.sql), ("tone-local", &u.tone)] {
        let r = load_lora(&agent, ADMIN, name, path.to_str().unwrap()).await;
        assert_eq!(r.status, 200, "{name}: {}", r.text());
    }
    for (name, key) in [
        ("sql-store", "adapters/acme/sql"),
        ("tone-store", "adapters/acme/tone/"),
        ("sql-tar", "adapters/archives/sql.tar.gz"),
    ] {
        let r = load_lora(&agent, ADMIN, name, &format!("{scheme}://{key}")).await;
        assert_eq!(r.status, 200, "{scheme} {name}: {}", r.text());
    }
    let sql_local = complete(&agent, "sql-local").await;
    let tone_local = complete(&agent, "tone-local").await;
    assert_ne!(
        sql_local, tone_local,
        "two adapters gave the same output: the comparison would prove nothing"
    );
    for (name, local) in [
        ("sql", &sql_local),
        ("tone", &tone_local),
        ("sql-store", &sql_local),
        ("tone-store", &tone_local),
        ("sql-tar", &sql_local),
    ] {
        assert_eq!(&complete(&agent, name).await, local, "{scheme} {name}");
    }

    // A missing bucket and a missing key are 404s; a malformed URI is a 400 before any request.
    let r = load_lora(
        &agent,
        ADMIN,
        "nope",
        &format!("{scheme}://{missing_bucket}/acme/sql"),
    )
    .await;
    assert_eq!(r.status, 404, "{scheme}: {}", r.text());
    assert!(r.text().contains(missing_bucket_says), "{}", r.text());
    let r = load_lora(
        &agent,
        ADMIN,
        "nope",
        &format!("{scheme}://adapters/acme/missing"),
    )
    .await;
    assert_eq!(r.status, 404, "{scheme}: {}", r.text());
    assert!(r.text().contains("adapter_config.json"), "{}", r.text());
    let r = load_lora(&agent, ADMIN, "nope", &format!("{scheme}://Bad_Bucket/x")).await;
    assert_eq!(r.status, 400, "{scheme}: {}", r.text());
}

fn as_refs(puts: &[(String, PathBuf)]) -> Vec<(String, &Path)> {
    puts.iter().map(|(k, p)| (k.clone(), p.as_path())).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gcs_adapters_serve_exactly_what_local_files_serve() {
    let u = uploads_of_two_adapters();
    let gcs = FakeGcs::start(&["empty-bucket"], &as_refs(&u.puts));
    let env = gcs.env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    // fake-gcs-server answers a missing bucket with a bare 404 where GCS says `NoSuchBucket`, so
    // the agent can only tell that the first file is missing.
    serves_exactly_what_local_files_serve(&u, "gs", &env, "no-such-bucket", "adapter_config.json")
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn azure_adapters_serve_exactly_what_local_files_serve_and_a_wrong_key_is_refused() {
    let u = uploads_of_two_adapters();
    let azurite = Azurite::start(&["empty-container"], &as_refs(&u.puts));
    let env = azurite.env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    serves_exactly_what_local_files_serve(&u, "az", &env, "no-such-container", "no such container")
        .await;

    // Another key for the same account: Azurite checks the Shared Key signature and refuses it.
    let wrong = "d3Jvbmcta2V5LXdyb25nLWtleS13cm9uZy1rZXktd3Jvbmcta2V5LXdyb25nLWtleQ==";
    let agent = Agent::start_with_env(
        &u.w,
        &["--admin-token-sha256", &key_hash(ADMIN)],
        &[
            ("AZURE_STORAGE_ACCOUNT_NAME", "devstoreaccount1"),
            ("AZURE_STORAGE_ACCOUNT_KEY", wrong),
            ("AZURE_STORAGE_ENDPOINT", azurite.endpoint.as_str()),
        ],
    );
    let r = load_lora(&agent, ADMIN, "sql", "az://adapters/acme/sql").await;
    assert_eq!(r.status, 400, "{}", r.text());
    let text = r.text();
    assert!(text.contains("refused the credentials"), "{text}");
    assert!(text.contains("AZURE_STORAGE_ACCOUNT_KEY"), "{text}");
    assert!(!text.contains(wrong), "{text}");
    assert!(!agent.log().contains(wrong), "the key reached the log");
}
