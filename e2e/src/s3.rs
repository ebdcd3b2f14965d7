//! A real S3-protocol server for the tests: `e2e/clients/s3_server.py` (moto in server mode,
//! authentication enforced) as a child process on a loopback port, holding the objects the
//! test uploaded through it with boto3. Killed on drop. (The GCS and Azure servers, and the
//! helpers every object-store test shares, are in [`crate::object_stores`].)

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use crate::workspace_root;

/// A running moto server and the key of its one IAM user (who may use S3).
pub struct MotoS3 {
    child: Child,
    pub endpoint: String,
    pub access_key_id: String,
    pub secret_access_key: String,
}

impl MotoS3 {
    /// Starts the server, creates `buckets` and uploads `puts` (`bucket/key`, local file).
    ///
    /// Panics with the install command when moto is missing.
    pub fn start(buckets: &[&str], puts: &[(String, &Path)]) -> MotoS3 {
        let mut cmd = Command::new("python3");
        cmd.arg(workspace_root().join("e2e/clients/s3_server.py"));
        for b in buckets {
            cmd.args(["--bucket", b]);
        }
        for (target, file) in puts {
            cmd.arg("--put").arg(format!("{target}={}", file.display()));
        }
        // Credentials of the developer's shell must not leak into the setup.
        for var in [
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
            "AWS_SESSION_TOKEN",
            "AWS_PROFILE",
        ] {
            cmd.env_remove(var);
        }
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("running python3 e2e/clients/s3_server.py");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx.recv_timeout(Duration::from_secs(60)).unwrap_or_default();
        let v: serde_json::Value = match serde_json::from_str(&line) {
            Ok(v) => v,
            Err(_) => {
                let _ = child.kill();
                panic!(
                    "the S3 server did not start (install the pinned clients: python3 -m pip \
                     install -r e2e/clients/requirements.txt; scripts/test.sh does); it printed {line:?}"
                );
            }
        };
        let field = |k: &str| v[k].as_str().expect("a string field").to_owned();
        MotoS3 {
            endpoint: field("endpoint"),
            access_key_id: field("access_key_id"),
            secret_access_key: field("secret_access_key"),
            child,
        }
    }

    /// The agent's environment for this server with the user's key.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ENDPOINT_URL", self.endpoint.clone()),
            ("AWS_REGION", "us-east-1".to_owned()),
            ("AWS_ACCESS_KEY_ID", self.access_key_id.clone()),
            ("AWS_SECRET_ACCESS_KEY", self.secret_access_key.clone()),
        ]
    }
}

impl Drop for MotoS3 {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
