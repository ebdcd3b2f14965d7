//! Every caller waiting on one adapter load gets the same answer. The adapter's weights are a
//! named pipe, so the loader thread blocks on them until the test has queued a second load of
//! the same adapter behind the first; then the pipe delivers bytes that are not safetensors.

#![cfg(unix)]
// Test helpers outside #[test] functions fail loudly by design.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::Path;

use loraplane_agent::backend::cpu::CpuBackend;
use loraplane_agent::engine::actor::EngineHandle;
use loraplane_agent::engine::{EngineConfig, EngineError};
use loraplane_agent::fixtures::adapter::{self, AdapterSpec};
use loraplane_agent::fixtures::model::{self, ModelSpec, Preset};
use loraplane_agent::fixtures::tensor::FixtureDtype;
use loraplane_agent::lora::Module;
use loraplane_agent::lora::ids::AdapterKey;
use loraplane_agent::model::config::Arch;

fn mkfifo(path: &Path) {
    let status = std::process::Command::new("mkfifo")
        .arg(path)
        .status()
        .unwrap();
    assert!(status.success(), "mkfifo {}", path.display());
}

#[tokio::test]
async fn callers_waiting_on_one_failed_load_get_the_same_error() {
    let dir = tempfile::tempdir().unwrap();
    let model_dir = dir.path().join("model");
    let spec = ModelSpec {
        arch: Arch::Llama,
        preset: Preset::Tiny,
        dtype: FixtureDtype::F32,
        seed: 5,
        shards: 1,
    };
    model::write(&spec, &model_dir).unwrap();
    let source = dir.path().join("slow");
    let adapter_spec = AdapterSpec {
        rank: 4,
        alpha: 8.0,
        targets: vec![Module::Q],
        rank_pattern: BTreeMap::new(),
        alpha_pattern: BTreeMap::new(),
        rslora: false,
        dtype: FixtureDtype::F32,
        seed: 2,
    };
    adapter::write(&adapter_spec, &model_dir, &source).unwrap();
    let weights = source.join("adapter_model.safetensors");
    std::fs::remove_file(&weights).unwrap();
    mkfifo(&weights);

    let engine = EngineHandle::spawn(CpuBackend, &model_dir, EngineConfig::default()).unwrap();
    let key = AdapterKey::new("default", "slow");
    let mut first = Box::pin(engine.load_adapter(key.clone(), source.clone(), None, false));
    let mut second = Box::pin(engine.load_adapter(key, source, None, false));
    // Polling each once sends its command; neither can finish while the pipe has no writer.
    assert!(futures::poll!(first.as_mut()).is_pending());
    assert!(futures::poll!(second.as_mut()).is_pending());
    // The engine answers commands in order: once this answers, both loads are registered as
    // waiting on the one loader thread, which is blocked on the pipe.
    engine.adapters().await.unwrap();

    let writer = std::thread::spawn(move || {
        let mut pipe = std::fs::OpenOptions::new()
            .write(true)
            .open(&weights)
            .unwrap();
        pipe.write_all(b"these bytes are not safetensors").unwrap();
    });
    let first = first.await.unwrap_err();
    let second = second.await.unwrap_err();
    writer.join().unwrap();

    assert!(
        matches!(first, EngineError::AdapterLoad { .. }),
        "{first:?}"
    );
    assert!(
        matches!(second, EngineError::AdapterLoad { .. }),
        "{second:?}"
    );
    assert_eq!(first.kind(), second.kind());
    assert_eq!(first.to_string(), second.to_string());
    assert!(first.to_string().contains("safetensors"), "{first}");
}
