//! Leader election through a `coordination.k8s.io/v1` Lease, so several operator replicas can
//! run and exactly one reconciles. The decision ([`decide`]) is a pure function of the Lease
//! and the clock; the loop around it writes with optimistic concurrency (`resourceVersion`),
//! so two candidates cannot both win a round.
//!
//! A leader renews every `renew_every`; one that cannot renew within `lease_duration` stops
//! (the process exits and its restart campaigns again) — never two leaders past the lease.
//! On graceful shutdown the leader releases the Lease so a standby takes over at once.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Api, PostParams};
use kube::{Client, ResourceExt};

/// Why leadership could not be held.
#[derive(Debug, thiserror::Error)]
pub enum LeaderError {
    #[error("lease {name}: kubernetes API: {source}")]
    Kube {
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("lease {name}: taken over by {holder}")]
    Lost { name: String, holder: String },
    #[error("lease {name}: not renewed within {duration:?}")]
    Expired { name: String, duration: Duration },
}

impl LeaderError {
    pub fn kind(&self) -> &'static str {
        match self {
            LeaderError::Kube { .. } => "kube",
            LeaderError::Lost { .. } => "lost",
            LeaderError::Expired { .. } => "expired",
        }
    }
}

/// Who campaigns for which Lease, and its timing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaderConfig {
    pub name: String,
    pub namespace: String,
    /// This replica (its pod name).
    pub identity: String,
    pub lease_duration: Duration,
    pub renew_every: Duration,
}

/// What to do with the Lease this round.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// No Lease yet: create it holding it.
    Create,
    /// Free, expired or released: take it (a new transition).
    Acquire,
    /// Ours: renew it.
    Renew,
    /// Someone else holds a live Lease.
    Wait { holder: String },
}

/// Decides from the Lease (if any) and the time.
pub fn decide(lease: Option<&Lease>, me: &str, now: Timestamp) -> Decision {
    let Some(spec) = lease.and_then(|l| l.spec.as_ref()) else {
        return if lease.is_some() {
            Decision::Acquire
        } else {
            Decision::Create
        };
    };
    let holder = spec.holder_identity.clone().unwrap_or_default();
    if holder == me {
        return Decision::Renew;
    }
    if holder.is_empty() {
        return Decision::Acquire;
    }
    let duration = SignedDuration::from_secs(i64::from(spec.lease_duration_seconds.unwrap_or(0)));
    let renewed = spec
        .renew_time
        .as_ref()
        .or(spec.acquire_time.as_ref())
        .map(|t| t.0);
    match renewed {
        Some(t) if t.checked_add(duration).is_ok_and(|expiry| expiry > now) => {
            Decision::Wait { holder }
        }
        _ => Decision::Acquire,
    }
}

/// The Lease as `me` holds it after `decision` (`None` for [`Decision::Wait`]).
pub fn next_lease(
    cfg: &LeaderConfig,
    current: Option<&Lease>,
    decision: &Decision,
    now: Timestamp,
) -> Option<Lease> {
    let mut lease = current.cloned().unwrap_or_else(|| Lease {
        metadata: ObjectMeta {
            name: Some(cfg.name.clone()),
            namespace: Some(cfg.namespace.clone()),
            ..ObjectMeta::default()
        },
        spec: None,
    });
    let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
    let secs = i32::try_from(cfg.lease_duration.as_secs()).unwrap_or(i32::MAX);
    match decision {
        Decision::Wait { .. } => return None,
        Decision::Renew => {}
        Decision::Create | Decision::Acquire => {
            spec.holder_identity = Some(cfg.identity.clone());
            spec.acquire_time = Some(MicroTime(now));
            spec.lease_transitions = Some(
                spec.lease_transitions.unwrap_or(0) + i32::from(*decision == Decision::Acquire),
            );
        }
    }
    spec.lease_duration_seconds = Some(secs);
    spec.renew_time = Some(MicroTime(now));
    Some(lease)
}

/// One campaign round: `Ok(true)` when `cfg.identity` holds the Lease afterwards.
///
/// Errors: API failures other than losing a race (a conflict is a lost round, not an error).
pub async fn try_acquire_or_renew(
    api: &Api<Lease>,
    cfg: &LeaderConfig,
) -> Result<bool, LeaderError> {
    let kube_err = |source| LeaderError::Kube {
        name: cfg.name.clone(),
        source,
    };
    let current = api.get_opt(&cfg.name).await.map_err(kube_err)?;
    let now = Timestamp::now();
    let decision = decide(current.as_ref(), &cfg.identity, now);
    let Some(next) = next_lease(cfg, current.as_ref(), &decision, now) else {
        return Ok(false);
    };
    let result = match decision {
        Decision::Create => api.create(&PostParams::default(), &next).await,
        _ => api.replace(&cfg.name, &PostParams::default(), &next).await,
    };
    match result {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(s)) if s.is_conflict() || s.is_already_exists() => Ok(false),
        Err(e) => Err(kube_err(e)),
    }
}

/// Campaigns until this replica leads.
///
/// Errors: never returns an error for a held Lease; API errors are retried.
pub async fn acquire(client: Client, cfg: &LeaderConfig) {
    let api: Api<Lease> = Api::namespaced(client, &cfg.namespace);
    loop {
        match try_acquire_or_renew(&api, cfg).await {
            Ok(true) => {
                tracing::info!(lease = cfg.name, identity = cfg.identity, "leading");
                return;
            }
            Ok(false) => tracing::debug!(lease = cfg.name, "standing by"),
            Err(error) => tracing::warn!(%error, "leader election"),
        }
        tokio::time::sleep(cfg.renew_every).await;
    }
}

/// Renews the Lease until it is lost; returns why.
pub async fn hold(client: Client, cfg: &LeaderConfig) -> LeaderError {
    let api: Api<Lease> = Api::namespaced(client, &cfg.namespace);
    let mut last_renewed = tokio::time::Instant::now();
    loop {
        tokio::time::sleep(cfg.renew_every).await;
        match try_acquire_or_renew(&api, cfg).await {
            Ok(true) => last_renewed = tokio::time::Instant::now(),
            Ok(false) => {
                let holder = api
                    .get_opt(&cfg.name)
                    .await
                    .ok()
                    .flatten()
                    .and_then(|l| l.spec?.holder_identity)
                    .unwrap_or_default();
                return LeaderError::Lost {
                    name: cfg.name.clone(),
                    holder,
                };
            }
            Err(error) => {
                tracing::warn!(%error, "lease renewal failed");
                if last_renewed.elapsed() >= cfg.lease_duration {
                    return LeaderError::Expired {
                        name: cfg.name.clone(),
                        duration: cfg.lease_duration,
                    };
                }
            }
        }
    }
}

/// Gives the Lease up (graceful shutdown), so a standby need not wait for it to expire.
pub async fn release(client: Client, cfg: &LeaderConfig) {
    let api: Api<Lease> = Api::namespaced(client, &cfg.namespace);
    let Ok(Some(mut lease)) = api.get_opt(&cfg.name).await else {
        return;
    };
    let Some(spec) = lease.spec.as_mut() else {
        return;
    };
    if spec.holder_identity.as_deref() != Some(cfg.identity.as_str()) {
        return;
    }
    spec.holder_identity = None;
    spec.lease_duration_seconds = Some(1);
    match api
        .replace(&lease.name_any(), &PostParams::default(), &lease)
        .await
    {
        Ok(_) => tracing::info!(lease = cfg.name, "released"),
        Err(error) => tracing::warn!(%error, "could not release the lease"),
    }
}

#[cfg(test)]
mod tests;
