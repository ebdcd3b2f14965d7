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
use crate::lora::registry::{AdapterSummary, Registration, RegistryError, Verified};
use crate::scheduler::SeqId;

/// What a caller of [`Engine::begin_adapter_load`] waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoadWait {
    /// A load of the adapter's files (queued by this call, or already in flight).
    Load,
    /// The caller re-reads the source of an adapter already loaded from it, and hands the
    /// result to [`Engine::finish_adapter_verify`].
    Verify,
}

/// What a finished load did, for the admin API's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoadChange {
    /// The adapter was loaded (new, or from another source).
    Added,
    /// Loaded again from the same source, whose files changed: the new weights replaced the
    /// weights of digest `previous`.
    Replaced { previous: Digest },
    /// Loaded again from the same source, whose files have the digest already loaded.
    Unchanged,
}

/// A finished adapter load: the adapter as it is now and what the load changed.
#[derive(Debug, Clone, PartialEq)]
pub struct Loaded {
    pub summary: AdapterSummary,
    pub change: LoadChange,
}

impl<B: Backend> Engine<B> {
    /// Registers an adapter and asks for its load. The same source for an adapter already
    /// loaded from it asks the caller to re-read the files ([`LoadWait::Verify`]): they may
    /// have been rewritten in place since.
    ///
    /// Errors: replacing an adapter that requests still use.
    pub fn begin_adapter_load(
        &mut self,
        key: AdapterKey,
        source: PathBuf,
        expected: Option<Digest>,
        pin: bool,
    ) -> Result<LoadWait, EngineError> {
        // `register` refuses only an adapter in use.
        match self
            .registry
            .register(key.clone(), source.clone(), expected, pin)
        {
            Ok(Registration::InFlight) => Ok(LoadWait::Load),
            Ok(Registration::Verify) => Ok(LoadWait::Verify),
            Ok(Registration::Load) => {
                self.pending_loads.push((key, source));
                Ok(LoadWait::Load)
            }
            Err(_) => Err(EngineError::AdapterBusy(key.name)),
        }
    }

    /// Completes a re-read of an adapter's source (after [`LoadWait::Verify`]): the same
    /// digest keeps the adapter as it is, a new one replaces its weights (host and pool
    /// copies of the old ones are dropped). Unlike a first load, a failure here leaves the
    /// adapter serving the weights it had: they were verified when they were loaded.
    ///
    /// Errors: the files no longer load, or not with the expected digest; the weights
    /// changed while requests still use the old ones, or another load replaced the entry
    /// meanwhile (busy); the adapter was unloaded meanwhile.
    pub fn finish_adapter_verify(
        &mut self,
        key: &AdapterKey,
        source: &std::path::Path,
        result: Result<HostAdapter, AdapterError>,
    ) -> Result<Loaded, EngineError> {
        let adapter = result.map_err(|source| EngineError::AdapterLoad {
            name: key.name.clone(),
            source: Arc::new(source),
        })?;
        if let Some(d) = self.registry.expected_digest(key)
            && d != adapter.digest
        {
            return Err(EngineError::DigestMismatch {
                name: key.name.clone(),
                expected: d.to_string(),
                actual: adapter.digest.to_string(),
            });
        }
        let change = match self.registry.finish_verify(key, source, Arc::new(adapter)) {
            Ok(Verified::Unchanged) => LoadChange::Unchanged,
            Ok(Verified::Replaced { previous }) => LoadChange::Replaced { previous },
            Err(RegistryError::Unknown(_)) => {
                return Err(EngineError::AdapterNotFound(key.name.clone()));
            }
            Err(_) => return Err(EngineError::AdapterBusy(key.name.clone())),
        };
        let summary = self
            .registry
            .summary(key)
            .ok_or_else(|| EngineError::AdapterNotFound(key.name.clone()))?;
        Ok(Loaded { summary, change })
    }

    /// Asks for reloads of evicted adapters that queued requests near the front need.
    pub fn request_reloads(&mut self) {
        let front: Vec<AdapterKey> = self
            .waiting
            .iter()
            .take(self.config.max_running)
            .filter_map(|id| self.seqs.get(id))
            .flat_map(|s| s.adapter_keys.iter().cloned())
            .collect();
        for key in front {
            if let Some(source) = self.registry.reload_if_evicted(&key) {
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
        let expected = self.registry.expected_digest(key);
        let result = result
            .map_err(|source| EngineError::AdapterLoad {
                name: key.name.clone(),
                source: Arc::new(source),
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
                    .filter(|(_, s)| s.uses(key))
                    .map(|(id, _)| *id)
                    .collect();
                for id in waiting {
                    self.finish(id, FinishReason::Error, Some(e.to_string()));
                }
                // Every request on it just ended, so nothing holds a lease.
                if let Err(broken) = self.registry.forget(key) {
                    tracing::error!(adapter = %key, error = %broken, "a failed adapter stays registered");
                }
                Err(e)
            }
        }
    }

    /// Unloads an adapter; requests already using it finish first. `false` if unknown.
    pub fn unload_adapter(&mut self, key: &AdapterKey) -> bool {
        self.registry.unload(key)
    }

    pub fn adapters(&self) -> Vec<AdapterSummary> {
        self.registry.summaries()
    }

    /// Evicts every resident adapter no running request uses and every idle prefix-cache
    /// block (returns their pages).
    pub fn trim(&mut self) {
        while self.registry.evict_idle_lru().is_some() {}
        self.clear_prefix_cache();
    }
}
