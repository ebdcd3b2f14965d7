//! A private CA for `https://` sources, through the real agent binary: a loopback HTTPS server
//! whose certificate is signed by a CA generated here. Without the CA the load fails with a
//! TLS error that says what to do; with `--source-ca-file` or `SSL_CERT_FILE` it succeeds (an
//! adapter directory and a `.tar.gz` of it), and serves what the local files serve.

// Test setup fails loudly by design.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;

use loraplane_e2e::servers::https_files;
use loraplane_e2e::{Agent, World, complete, key_hash, load_lora};

const ADMIN: &str = "ca-admin";

fn read(dir: &Path, f: &str) -> Vec<u8> {
    std::fs::read(dir.join(f)).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_sources_trust_a_private_ca_from_the_flag_or_ssl_cert_file() {
    let w = World::tiny();
    let sql = w.adapter("local/sql", 11);
    let archive = w.path("sql.tar.gz");
    let status = Command::new("tar")
        .arg("czf")
        .arg(&archive)
        .arg("-C")
        .arg(w.path("local"))
        .arg("sql")
        .status()
        .unwrap();
    assert!(status.success());
    let (addr, ca) = https_files(HashMap::from([
        (
            "a/sql/adapter_config.json".to_owned(),
            read(&sql, "adapter_config.json"),
        ),
        (
            "a/sql/adapter_model.safetensors".to_owned(),
            read(&sql, "adapter_model.safetensors"),
        ),
        ("a/sql.tar.gz".to_owned(), std::fs::read(&archive).unwrap()),
    ]))
    .await;
    let ca_file = w.path("ca.pem");
    std::fs::write(&ca_file, &ca).unwrap();
    let dir_uri = format!("https://localhost:{}/a/sql", addr.port());
    let tar_uri = format!("https://localhost:{}/a/sql.tar.gz", addr.port());
    let roots = w.path("local");
    let admin = key_hash(ADMIN);
    let base = [
        "--admin-token-sha256",
        admin.as_str(),
        // The server is on loopback: exempt that one name from the private-address rule.
        "--allowed-private-hosts",
        "localhost",
        "--adapter-roots",
        roots.to_str().unwrap(),
    ];

    // Without the CA: a clear TLS error, nothing loaded.
    let agent = Agent::start_with_env(&w, &base, &[("SSL_CERT_FILE", "")]);
    let r = load_lora(&agent, ADMIN, "sql", &dir_uri).await;
    assert_eq!(r.status, 502, "{}", r.text());
    let text = r.text();
    assert!(
        text.contains("TLS") && text.contains("--source-ca-file"),
        "{text}"
    );
    assert!(
        text.contains("UnknownIssuer") || text.contains("certificate"),
        "{text}"
    );
    drop(agent);

    // With --source-ca-file, and with SSL_CERT_FILE.
    let with_flag: Vec<&str> =
        [&base[..], &["--source-ca-file", ca_file.to_str().unwrap()]].concat();
    let ca_path = ca_file.to_str().unwrap();
    for (args, env) in [
        (with_flag.as_slice(), vec![]),
        (&base[..], vec![("SSL_CERT_FILE", ca_path)]),
    ] {
        let agent = Agent::start_with_env(&w, args, &env);
        for (name, uri) in [
            ("sql-https", dir_uri.as_str()),
            ("sql-tar", tar_uri.as_str()),
        ] {
            let r = load_lora(&agent, ADMIN, name, uri).await;
            assert_eq!(r.status, 200, "{name} {env:?}: {}", r.text());
        }
        let r = load_lora(&agent, ADMIN, "sql-local", sql.to_str().unwrap()).await;
        assert_eq!(r.status, 200, "{}", r.text());
        let local = complete(&agent, "sql-local").await;
        assert_eq!(complete(&agent, "sql-https").await, local);
        assert_eq!(complete(&agent, "sql-tar").await, local);
    }

    // A CA file that is not a certificate bundle stops the agent with one clear line.
    let bogus = w.path("bogus.pem");
    std::fs::write(&bogus, "not a certificate").unwrap();
    let out = Command::new(loraplane_e2e::agent_binary())
        .args(["serve", "--model", w.model.to_str().unwrap()])
        .args(["--source-ca-file", bogus.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("bogus.pem"), "{stderr}");
}
