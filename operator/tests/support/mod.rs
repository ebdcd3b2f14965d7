//! What the operator's tests against real `loraplane-agent` processes share: finding the agent
//! binary of this build profile, writing fixtures with it, and one running agent that is killed
//! on drop.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// `target/<profile>/loraplane-agent` if it exists and has `serve`; otherwise says why.
pub fn agent_binary() -> Result<PathBuf, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .ok_or("the test executable is not in target/<profile>/deps")?;
    let bin = dir.join(format!("loraplane-agent{}", std::env::consts::EXE_SUFFIX));
    if !bin.is_file() {
        return Err(format!(
            "{} is missing (build it with `cargo build -p loraplane-agent --bins`)",
            bin.display()
        ));
    }
    let help = Command::new(&bin)
        .args(["serve", "--help"])
        .output()
        .map_err(|e| e.to_string())?;
    if !help.status.success() {
        return Err(format!("{} has no `serve` subcommand yet", bin.display()));
    }
    Ok(bin)
}

/// The agent binary, or a loud SKIPPED line and `return` from the test.
#[macro_export]
macro_rules! agent_binary_or_skip {
    () => {
        match support::agent_binary() {
            Ok(b) => b,
            Err(why) => {
                eprintln!("\n!!!!!!!! SKIPPED {}: {why} !!!!!!!!\n", module_path!());
                return;
            }
        }
    };
}

/// `loraplane-agent fixtures ARGS`, which must succeed.
pub fn fixtures(bin: &Path, args: &[&str]) {
    let out = Command::new(bin)
        .arg("fixtures")
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "fixtures {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A running `loraplane-agent serve`, killed on drop unless it already exited.
pub struct AgentProc {
    pub child: Child,
    pub grpc: SocketAddr,
}

impl AgentProc {
    /// Starts `cmd` (a `serve` command line; stdout is taken for the listening line) and waits
    /// up to a minute for the agent to listen.
    pub fn spawn(cmd: &mut Command) -> AgentProc {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                let _ = tx.send(line);
            }
        });
        let line = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("the agent's listening line");
        let v: serde_json::Value = serde_json::from_str(&line).expect("a JSON listening line");
        assert_eq!(v["event"], "listening", "{line}");
        AgentProc {
            grpc: v["grpc"].as_str().unwrap().parse().unwrap(),
            child,
        }
    }
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
