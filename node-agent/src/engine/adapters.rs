//! The engine's adapter admin: registering and loading adapters (the files are read on the
//! actor's loader threads), reloading evicted ones that queued requests need, unloading, and
//! trimming the pool.

use std::path::PathBuf;
use std::sync::Arc;

use crate::backend::Backend;
use crate::engine::core::{Engine, EngineError};
use crate::engine::request::FinishReason;
use crate::lora::host::{AdapterError, HostAdapter};
use crate::lora::ids::{AdapterKey, Digest};
use crate::lora::registry::{AdapterSummary, HostState};
use crate::scheduler::SeqId;

impl<B: Backend> Engine<B> {
    /// Registers an adapter and asks for its load. Idempotent: the same source for an adapter
    /// that is already known is a no-op (returns `false`: nothing to load).
    ///
    /// Errors: replacing an adapter that requests still use.
    pub fn begin_adapter_load(
        &mut self,
        key: AdapterKey,
        source: PathBuf,
        expected: Option<Digest>,
        pin: bool,
    ) -> Result<bool, EngineError> {
        if let Some(e) = self.registry.get_mut(&key) {
            if e.source == source
                && !e.unloading
                && (expected.is_none() || e.known.as_ref().map(|k| k.0) == expected)
            {
                e.pinned |= pin;
                return Ok(matches!(e.host, HostState::Loading));
            }
            if e.active > 0 {
                return Err(EngineError::AdapterBusy(key.name));
            }
        }
        self.registry
            .begin_load(key.clone(), source.clone(), expected, pin);
        self.pending_loads.push((key, source));
        Ok(true)
    }

    /// Asks for reloads of evicted adapters that queued requests near the front need.
    pub fn request_reloads(&mut self) {
        let front: Vec<AdapterKey> = self
            .waiting
            .iter()
            .take(self.config.max_running)
            .filter_map(|id| self.seqs.get(id)?.adapter_key().cloned())
            .collect();
        for key in front {
            let Some(e) = self.registry.get(&key) else {
                continue;
            };
            if matches!(e.host, HostState::Evicted) && e.device.is_none() {
                let source = e.source.clone();
                self.registry.begin_reload(&key);
                self.pending_loads.push((key, source));
            }
        }
    }

    /// Takes the loads the actor should start.
    pub fn take_pending_loads(&mut self) -> Vec<(AdapterKey, PathBuf)> {
        std::mem::take(&mut self.pending_loads)
    }

    /// Completes a load started by [`Engine::begin_adapter_load`] or a reload. On failure the
    /// adapter is forgotten and every request waiting on it ends with an error.
    pub fn finish_adapter_load(
        &mut self,
        key: &AdapterKey,
        result: Result<HostAdapter, AdapterError>,
    ) -> Result<AdapterSummary, EngineError> {
        let expected = self.registry.get(key).and_then(|e| e.expected_digest);
        let result = result
            .map_err(|source| EngineError::AdapterLoad {
                name: key.name.clone(),
                source,
            })
            .and_then(|a| match expected {
                Some(d) if d != a.digest => Err(EngineError::DigestMismatch {
                    name: key.name.clone(),
                    expected: d.to_string(),
                    actual: a.digest.to_string(),
                }),
                _ => Ok(a),
            });
        match result {
            Ok(adapter) => {
                if !self.registry.finish_load(key, Arc::new(adapter)) {
                    return Err(EngineError::AdapterNotFound(key.name.clone()));
                }
                self.registry
                    .summary(key)
                    .ok_or_else(|| EngineError::AdapterNotFound(key.name.clone()))
            }
            Err(e) => {
                let waiting: Vec<SeqId> = self
                    .seqs
                    .iter()
                    .filter(|(_, s)| s.adapter_key() == Some(key))
                    .map(|(id, _)| *id)
                    .collect();
                for id in waiting {
                    self.finish(id, FinishReason::Error, Some(e.to_string()));
                }
                self.registry.remove(key);
                Err(e)
            }
        }
    }

    /// Unloads an adapter; requests already using it finish first. `false` if unknown.
    pub fn unload_adapter(&mut self, key: &AdapterKey) -> bool {
        match self.registry.get_mut(key) {
            None => false,
            Some(e) if e.active > 0 => {
                e.unloading = true;
                true
            }
            Some(_) => {
                self.registry.remove(key);
                true
            }
        }
    }

    pub fn adapters(&self) -> Vec<AdapterSummary> {
        self.registry.summaries()
    }

    /// Evicts every resident adapter no running request uses (returns their pages).
    pub fn trim(&mut self) {
        while self.registry.evict_idle_device() {}
    }
}
