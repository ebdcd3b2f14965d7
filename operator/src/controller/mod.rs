//! The two controllers and what they share. Each reconcile reads (API and local caches),
//! calls the pure builders and status functions, server-side-applies with one field manager,
//! patches status only when it changed, and returns an [`Action`]; a reconcile of an unchanged
//! world makes no writes.
//!
//! - [`base_model`]: BaseModel → admin Secret, ConfigMap, StatefulSets, Services, PDBs,
//!   tenant tables on the agents, status.
//! - [`lora_adapter`]: LoraAdapter → admission, placement and loads on the agents, status;
//!   a finalizer unloads it on delete.
//! - [`runtime`]: the watches, caches and triggers that drive both, and graceful shutdown.

pub mod apply;
pub mod base_model;
pub mod converge;
pub mod fleet;
pub mod lora_adapter;
pub mod runtime;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Namespace, Pod, Secret};
use kube::Client;
use kube::runtime::controller::Action;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::Store;

use crate::agent_client::{AgentApi, AgentError};
use crate::crd::{BaseModel, LoraAdapter};
use crate::desired::AgentParams;
use crate::desired::config::SpecError;
use crate::metrics::Metrics;
use fleet::Fleets;

/// Why a reconcile failed (the controller retries with exponential backoff).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("kubernetes API: {0}")]
    Kube(#[source] kube::Error),
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error(transparent)]
    Agent(#[from] AgentError),
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
    #[error("admin token: {0}")]
    Token(String),
    #[error("{0} has no namespace")]
    NoNamespace(String),
}

impl From<kube::Error> for Error {
    fn from(e: kube::Error) -> Self {
        Error::Kube(e)
    }
}

impl Error {
    /// A bounded label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::Kube(kube::Error::Api(s)) if s.is_conflict() => "kube_conflict",
            Error::Kube(kube::Error::Api(s)) if s.is_not_found() => "kube_not_found",
            Error::Kube(kube::Error::Api(s)) if s.is_forbidden() => "kube_forbidden",
            Error::Kube(kube::Error::Api(s)) if s.is_invalid() => "kube_invalid",
            Error::Kube(kube::Error::Api(_)) => "kube_api",
            Error::Kube(_) => "kube_transport",
            Error::Spec(e) => e.kind(),
            Error::Agent(e) => e.kind(),
            Error::Finalizer(e) => match e.as_ref() {
                kube::runtime::finalizer::Error::ApplyFailed(inner)
                | kube::runtime::finalizer::Error::CleanupFailed(inner) => inner.kind(),
                kube::runtime::finalizer::Error::AddFinalizer(_)
                | kube::runtime::finalizer::Error::RemoveFinalizer(_) => "finalizer_patch",
                kube::runtime::finalizer::Error::UnnamedObject
                | kube::runtime::finalizer::Error::InvalidFinalizer => "finalizer_invalid",
            },
            Error::Token(_) => "admin_token",
            Error::NoNamespace(_) => "no_namespace",
        }
    }
}

/// Operator-wide settings, validated once from the flags.
#[derive(Debug, Clone)]
pub struct Settings {
    pub agent: AgentParams,
    /// How long an agent snapshot (adapters, capacity) is reused before it is fetched again.
    pub snapshot_ttl: Duration,
    /// Loads of demand-following adapters one model's agents may take per minute (0 =
    /// unbounded).
    pub adapter_loads_per_minute: u32,
    /// Requeue of a healthy object (a safety net; watches drive the rest).
    pub resync: Duration,
    /// Requeue while something is converging (rollout, agents starting).
    pub progress: Duration,
    /// First retry after a failure; doubles per consecutive failure up to `retry_max`.
    pub retry_base: Duration,
    pub retry_max: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            agent: AgentParams::default(),
            snapshot_ttl: Duration::from_secs(30),
            adapter_loads_per_minute: 30,
            resync: Duration::from_secs(300),
            progress: Duration::from_secs(10),
            retry_base: Duration::from_secs(1),
            retry_max: Duration::from_secs(300),
        }
    }
}

/// Local caches (reflector stores) both controllers read instead of the API.
#[derive(Clone)]
pub struct Stores {
    pub base_models: Store<BaseModel>,
    pub adapters: Store<LoraAdapter>,
    /// Agent pods (label `app.kubernetes.io/managed-by=loraplane-operator`).
    pub pods: Store<Pod>,
    pub namespaces: Store<Namespace>,
    /// Secrets labelled `loraplane.dev/api-key: "true"`.
    pub api_keys: Store<Secret>,
}

/// Consecutive failures per object, for exponential backoff.
#[derive(Debug, Default)]
pub struct Backoff {
    failures: Mutex<HashMap<String, u32>>,
}

impl Backoff {
    /// The delay after one more failure of `key`: `base · 2^(n-1)`, capped at `max`.
    pub fn fail(&self, key: &str, base: Duration, max: Duration) -> Duration {
        let mut f = self.failures.lock().unwrap_or_else(PoisonError::into_inner);
        let n = f.entry(key.to_owned()).or_insert(0);
        *n = n.saturating_add(1);
        delay(*n, base, max)
    }

    /// `key` succeeded: the next failure starts from `base` again.
    pub fn reset(&self, key: &str) {
        let mut f = self.failures.lock().unwrap_or_else(PoisonError::into_inner);
        f.remove(key);
    }
}

/// `base · 2^(n-1)` capped at `max` (n ≥ 1).
pub fn delay(n: u32, base: Duration, max: Duration) -> Duration {
    let factor = 2u32.saturating_pow(n.saturating_sub(1).min(20));
    base.saturating_mul(factor).min(max)
}

/// What every reconcile gets.
pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
    pub settings: Settings,
    pub agents: Arc<dyn AgentApi>,
    pub stores: Stores,
    pub fleets: Fleets,
    pub metrics: Metrics,
    pub backoff: Backoff,
}

impl Context {
    pub fn new(
        client: Client,
        settings: Settings,
        agents: Arc<dyn AgentApi>,
        stores: Stores,
        metrics: Metrics,
        instance: Option<String>,
    ) -> Self {
        let recorder = Recorder::new(
            client.clone(),
            Reporter {
                controller: crate::desired::MANAGER.into(),
                instance,
            },
        );
        Context {
            client,
            recorder,
            settings,
            agents,
            stores,
            fleets: Fleets::default(),
            metrics,
            backoff: Backoff::default(),
        }
    }

    /// The error policy of both controllers: count the error, back off exponentially.
    pub fn on_error(&self, controller: &str, key: &str, error: &Error) -> Action {
        self.metrics.reconcile_failed(controller, error.kind());
        let wait = self
            .backoff
            .fail(key, self.settings.retry_base, self.settings.retry_max);
        tracing::warn!(controller, object = key, kind = error.kind(), %error, retry_in = ?wait, "reconcile failed");
        Action::requeue(wait)
    }
}

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_autoscaling;
#[cfg(test)]
mod tests_claims;
#[cfg(test)]
mod tests_demand;
