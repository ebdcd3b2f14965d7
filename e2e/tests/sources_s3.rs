//! `s3://` adapter sources against a real S3-protocol server (moto in server mode, with
//! authentication enforced; `e2e/clients/s3_server.py`), through the real agent binary: single
//! adapters and a `.tar.gz` loaded through the admin API, and a prefix preloaded with
//! `--adapters s3://bucket/prefix`, all serving exactly what the same files loaded from a
//! local path serve; credentials
//! from the environment and from a mounted credentials file; a missing bucket or key, refused
//! credentials and the size cap as clear 4xx errors that never show a secret.

// Test setup fails loudly by design.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

use loraplane_e2e::object_stores::{tar_gz, uploads};
use loraplane_e2e::s3::MotoS3;
use loraplane_e2e::{Agent, World, complete, key_hash, load_lora, model_ids};

const ADMIN: &str = "sources-admin";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_adapters_serve_exactly_what_local_files_serve() {
    let w = World::tiny();
    let sql = w.adapter("local/sql", 7);
    let tone = w.adapter("local/tone", 8);
    let archive = w.path("sql.tar.gz");
    tar_gz(&sql, &archive);
    let mut puts = uploads("adapters/acme/sql", &sql);
    puts.extend(uploads("adapters/acme/tone", &tone));
    puts.push(("adapters/archives/sql.tar.gz".into(), archive.clone()));
    let puts: Vec<(String, &Path)> = puts.iter().map(|(k, p)| (k.clone(), p.as_path())).collect();
    let s3 = MotoS3::start(&["empty-bucket"], &puts);
    let env = s3.env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let roots = w.path("local");
    let agent = Agent::start_with_env(
        &w,
        &[
            "--adapter-roots",
            roots.to_str().unwrap(),
            "--admin-token-sha256",
            &key_hash(ADMIN),
            "--source-cache-dir",
            w.path("cache").to_str().unwrap(),
        ],
        &env,
    );

    // The same files from a local path: the reference.
    for (name, path) in [("sql-local", &sql), ("tone-local", &tone)] {
        let r = load_lora(&agent, ADMIN, name, path.to_str().unwrap()).await;
        assert_eq!(r.status, 200, "{name}: {}", r.text());
    }
    for (name, uri) in [
        ("sql-s3", "s3://adapters/acme/sql"),
        ("tone-s3", "s3://adapters/acme/tone"),
        ("sql-tar", "s3://adapters/archives/sql.tar.gz"),
    ] {
        let r = load_lora(&agent, ADMIN, name, uri).await;
        assert_eq!(r.status, 200, "{name}: {}", r.text());
    }
    let sql_local = complete(&agent, "sql-local").await;
    let tone_local = complete(&agent, "tone-local").await;
    assert_ne!(
        sql_local, tone_local,
        "two adapters gave the same output: the comparison would prove nothing"
    );
    assert_eq!(complete(&agent, "sql-s3").await, sql_local);
    assert_eq!(complete(&agent, "tone-s3").await, tone_local);
    assert_eq!(complete(&agent, "sql-tar").await, sql_local);

    // A missing bucket and a missing key are 404s that say which.
    let r = load_lora(&agent, ADMIN, "nope", "s3://no-such-bucket/acme/sql").await;
    assert_eq!(r.status, 404, "{}", r.text());
    assert!(r.text().contains("no such bucket"), "{}", r.text());
    let r = load_lora(&agent, ADMIN, "nope", "s3://adapters/acme/missing").await;
    assert_eq!(r.status, 404, "{}", r.text());
    assert!(r.text().contains("adapter_config.json"), "{}", r.text());
    let r = load_lora(&agent, ADMIN, "nope", "s3://empty-bucket/x").await;
    assert_eq!(r.status, 404, "{}", r.text());
    // A malformed URI is a 400 before any request.
    let r = load_lora(&agent, ADMIN, "nope", "s3://Bad_Bucket/x").await;
    assert_eq!(r.status, 400, "{}", r.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_credentials_errors_and_limits() {
    let w = World::tiny();
    let sql = w.adapter("local/sql", 7);
    let puts = uploads("adapters/acme/sql", &sql);
    let puts: Vec<(String, &Path)> = puts.iter().map(|(k, p)| (k.clone(), p.as_path())).collect();
    let s3 = MotoS3::start(&[], &puts);
    let admin = key_hash(ADMIN);
    let common = ["--admin-token-sha256", admin.as_str()];

    // A wrong secret: refused as the credentials' fault, without showing them.
    let wrong = "wrong-secret-0123456789";
    let agent = Agent::start_with_env(
        &w,
        &common,
        &[
            ("AWS_ENDPOINT_URL", s3.endpoint.as_str()),
            ("AWS_REGION", "us-east-1"),
            ("AWS_ACCESS_KEY_ID", s3.access_key_id.as_str()),
            ("AWS_SECRET_ACCESS_KEY", wrong),
        ],
    );
    let r = load_lora(&agent, ADMIN, "sql", "s3://adapters/acme/sql").await;
    assert_eq!(r.status, 400, "{}", r.text());
    let text = r.text();
    assert!(text.contains("refused the credentials"), "{text}");
    assert!(
        !text.contains(wrong) && !text.contains(&s3.secret_access_key),
        "{text}"
    );
    assert!(!agent.log().contains(wrong), "the secret reached the log");
    drop(agent);

    // An unknown key id.
    let agent = Agent::start_with_env(
        &w,
        &common,
        &[
            ("AWS_ENDPOINT_URL", s3.endpoint.as_str()),
            ("AWS_ACCESS_KEY_ID", "AKIAUNKNOWNKEY000000"),
            ("AWS_SECRET_ACCESS_KEY", wrong),
        ],
    );
    let r = load_lora(&agent, ADMIN, "sql", "s3://adapters/acme/sql").await;
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.text().contains("InvalidAccessKeyId"), "{}", r.text());
    assert!(!r.text().contains(wrong), "{}", r.text());
    drop(agent);

    // The right key from a mounted credentials file (nothing in the environment), and the size
    // cap: the weights are larger than 64KiB, so only the config fits.
    let creds = w.path("credentials");
    std::fs::write(
        &creds,
        format!(
            "[default]\naws_access_key_id = {}\naws_secret_access_key = {}\n",
            s3.access_key_id, s3.secret_access_key
        ),
    )
    .unwrap();
    let agent = Agent::start_with_env(
        &w,
        &[
            &common[..],
            &["--s3-credentials-file", creds.to_str().unwrap()],
        ]
        .concat(),
        &[("AWS_ENDPOINT_URL", s3.endpoint.as_str())],
    );
    let r = load_lora(&agent, ADMIN, "sql", "s3://adapters/acme/sql").await;
    assert_eq!(r.status, 200, "{}", r.text());
    drop(agent);
    let agent = Agent::start_with_env(
        &w,
        &[
            &common[..],
            &[
                "--s3-credentials-file",
                creds.to_str().unwrap(),
                "--source-max-bytes",
                "64KiB",
            ],
        ]
        .concat(),
        &[("AWS_ENDPOINT_URL", s3.endpoint.as_str())],
    );
    let r = load_lora(&agent, ADMIN, "sql", "s3://adapters/acme/sql").await;
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.text().contains("download limit"), "{}", r.text());
}

/// `--adapters s3://bucket/prefix` lists the prefix through the object store and preloads
/// every adapter directory below it, each serving exactly what its local files serve; what
/// lies outside the prefix is not loaded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_s3_prefix_preloads_every_adapter_below_it() {
    let w = World::tiny();
    let sql = w.adapter("local/sql", 7);
    let tone = w.adapter("local/tone", 8);
    let mut puts = uploads("adapters/acme/sql", &sql);
    puts.extend(uploads("adapters/acme/tone", &tone));
    puts.extend(uploads("adapters/elsewhere/other", &sql));
    let puts: Vec<(String, &Path)> = puts.iter().map(|(k, p)| (k.clone(), p.as_path())).collect();
    let s3 = MotoS3::start(&[], &puts);
    let env = s3.env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let roots = w.path("local");
    let agent = Agent::start_with_env(
        &w,
        &[
            "--adapters",
            "s3://adapters/acme",
            "--adapter-roots",
            roots.to_str().unwrap(),
            "--admin-token-sha256",
            &key_hash(ADMIN),
            "--source-cache-dir",
            w.path("cache").to_str().unwrap(),
        ],
        &env,
    );

    let ids = model_ids(&agent).await;
    assert_eq!(ids, ["sql", "tiny", "tone"], "preloaded: {ids:?}");
    for (name, path) in [("sql-local", &sql), ("tone-local", &tone)] {
        let r = load_lora(&agent, ADMIN, name, path.to_str().unwrap()).await;
        assert_eq!(r.status, 200, "{name}: {}", r.text());
    }
    assert_eq!(
        complete(&agent, "sql").await,
        complete(&agent, "sql-local").await
    );
    assert_eq!(
        complete(&agent, "tone").await,
        complete(&agent, "tone-local").await
    );
}
