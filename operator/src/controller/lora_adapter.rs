//! The LoraAdapter reconciler.
//!
//! Admission first (every check reads caches, not the API): the base model exists, admits the
//! adapter's namespace (`spec.tenancy`), and the namespace is within its adapter quota. Then
//! the adapter is converged on the model's ready agents through their Admin API
//! ([`super::converge`]); an adapter that stops being admitted is unloaded everywhere. Status
//! is patched only when it changed, with an Event on phase transitions.
//!
//! Kubernetes calls, in order (the scenario tests pin them): the finalizer `PATCH` on first
//! sight; a `GET` of the model's credentials Secret when the operator does not hold its admin
//! token yet;
//! an Event `POST` when a demand-following adapter's placements changed (reason: the sizing
//! decision); the status `PATCH` if it changed; an Event `POST` if the phase changed. On delete the
//! finalizer unloads the adapter from every agent, then `PATCH`es itself away.

use std::sync::Arc;
use std::time::Instant;

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::Api;
use kube::runtime::controller::Action;
use kube::runtime::finalizer::{Event as FinalizerEvent, finalizer};
use kube::runtime::reflector::ObjectRef;
use kube::{Resource, ResourceExt};

use super::apply::{event, patch_status};
use super::base_model::key_of;
use super::converge::{AdapterWant, Limits, converge, remove_everywhere};
use super::{Context, Error};
use crate::crd::{AdapterReplicas, BaseModel, LoraAdapter, Phase};
use crate::desired::{self, secret};
use crate::discovery::{self, Agent};
use crate::metrics::controllers::LORA_ADAPTER as CONTROLLER;
use crate::role;
use crate::status::{self, AdapterOutcome, Blocked};
use crate::tenancy;

/// The finalizer that unloads an adapter from the agents before it goes.
pub const FINALIZER: &str = "loraplane.dev/unload";

/// The controller's reconcile function.
pub async fn reconcile(adapter: Arc<LoraAdapter>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    let ns = adapter
        .namespace()
        .ok_or_else(|| Error::NoNamespace(adapter.name_any()))?;
    let api: Api<LoraAdapter> = Api::namespaced(ctx.client.clone(), &ns);
    let adds_finalizer = adapter.metadata.deletion_timestamp.is_none()
        && !adapter.finalizers().iter().any(|f| f == FINALIZER);
    let removes_finalizer = adapter.metadata.deletion_timestamp.is_some()
        && adapter.finalizers().iter().any(|f| f == FINALIZER);
    let result = finalizer(&api, FINALIZER, adapter, |ev| async {
        match ev {
            FinalizerEvent::Apply(a) => apply(&a, &ctx).await,
            FinalizerEvent::Cleanup(a) => cleanup(&a, &ctx).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)));
    if result.is_ok() && (adds_finalizer || removes_finalizer) {
        ctx.metrics.wrote("finalizer");
    }
    ctx.metrics.reconciled(CONTROLLER, started.elapsed());
    result
}

/// The controller's error policy.
pub fn error_policy(adapter: Arc<LoraAdapter>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.on_error(CONTROLLER, &key_of(&*adapter), error)
}

/// The BaseModel an adapter names: (namespace, name).
pub fn model_ref(adapter: &LoraAdapter) -> (String, String) {
    let (ns, name) = model_ref_borrowed(adapter);
    (ns.to_owned(), name.to_owned())
}

/// [`model_ref`] without allocating, for filtering many adapters.
pub fn model_ref_borrowed(adapter: &LoraAdapter) -> (&str, &str) {
    let ns = adapter
        .spec
        .base_model
        .namespace
        .as_deref()
        .or(adapter.metadata.namespace.as_deref())
        .unwrap_or_default();
    (ns, adapter.spec.base_model.name.as_str())
}

fn blocked(reason: &'static str, message: String) -> AdapterOutcome {
    AdapterOutcome::Blocked(Blocked { reason, message })
}

/// Makes sure the operator holds the model's admin token (reading the Secret only when it
/// does not). Returns whether it does.
async fn ensure_token(ctx: &Context, model_ns: &str, model_name: &str) -> Result<bool, Error> {
    let fleet = ctx.fleets.get(model_ns, model_name);
    if fleet.lock().await.token.is_some() {
        return Ok(true);
    }
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), model_ns);
    let token = api
        .get_opt(&desired::credentials_secret_name(model_name))
        .await?
        .as_ref()
        .and_then(secret::credentials_of)
        .map(|c| c.admin);
    let found = token.is_some();
    if let Some(t) = token {
        fleet.lock().await.token = Some(t.into());
    }
    Ok(found)
}

/// The agents of a model, read from the pod cache without copying the pods
/// ([`discovery::agents`] keeps the model's ready ones).
fn agents_of(ctx: &Context, model_ns: &str, model_name: &str) -> Vec<Agent> {
    let pods = ctx
        .stores
        .pods
        .state_filter(|p| p.metadata.namespace.as_deref() == Some(model_ns));
    discovery::agents(pods.iter().map(AsRef::as_ref), model_name)
}

/// Unloads the adapter from every agent of the model; `None` when there is nothing to reach
/// yet (no agents, or no admin credential).
async fn unload_everywhere(
    ctx: &Context,
    model_ns: &str,
    model_name: &str,
    adapter: &LoraAdapter,
) -> Result<Option<u32>, Error> {
    let agents = agents_of(ctx, model_ns, model_name);
    if agents.is_empty() || !ensure_token(ctx, model_ns, model_name).await? {
        return Ok(None);
    }
    let fleet = ctx.fleets.get(model_ns, model_name);
    let key = AdapterWant::from_adapter(adapter).key();
    let removed = remove_everywhere(
        ctx.agents.as_ref(),
        &fleet,
        &agents,
        &key,
        ctx.settings.snapshot_ttl,
    )
    .await?;
    Ok(Some(removed))
}

/// Unloads the adapter from a model's agents (it is no longer admitted there).
async fn evict(ctx: &Context, model: &BaseModel, adapter: &LoraAdapter) -> Result<(), Error> {
    let (ns, name) = (model.namespace().unwrap_or_default(), model.name_any());
    unload_everywhere(ctx, &ns, &name, adapter).await?;
    Ok(())
}

/// Decides and carries out where the adapter runs.
pub async fn place(adapter: &LoraAdapter, ctx: &Context) -> Result<AdapterOutcome, Error> {
    let ns = adapter.namespace().unwrap_or_default();
    let (model_ns, model_name) = model_ref(adapter);
    let replicas = match AdapterReplicas::resolve(adapter.spec.replicas.as_ref()) {
        Ok(replicas) => replicas,
        Err(message) => return Ok(blocked("InvalidSpec", message)),
    };
    let Some(model) = ctx
        .stores
        .base_models
        .get(&ObjectRef::new(&model_name).within(&model_ns))
    else {
        return Ok(blocked(
            "BaseModelNotFound",
            format!("BaseModel {model_ns}/{model_name} does not exist"),
        ));
    };
    let ns_obj = ctx.stores.namespaces.get(&ObjectRef::new(&ns));
    if !tenancy::admits(&model, &ns, ns_obj.as_deref()) {
        evict(ctx, &model, adapter).await?;
        return Ok(blocked(
            "NamespaceNotAdmitted",
            format!(
                "BaseModel {model_ns}/{model_name} does not admit namespace {ns} (spec.tenancy)"
            ),
        ));
    }
    // A pod mounts claims of its own namespace only: a `pvc://` adapter elsewhere would name a
    // claim of the model's namespace, which is not the tenant's to read.
    if adapter.spec.source.pvc_claim().is_some() && ns != model_ns {
        evict(ctx, &model, adapter).await?;
        return Ok(blocked(
            "ClaimOutsideModelNamespace",
            format!(
                "a pvc:// adapter must live in the BaseModel's namespace {model_ns}: its agents \
                 can only mount claims there"
            ),
        ));
    }
    let limits = tenancy::limits(ns_obj.as_deref());
    // The namespace's adapters are only needed (and only listed) when it has a quota.
    let over_quota = limits.max_adapters > 0 && {
        let siblings = ctx
            .stores
            .adapters
            .state_filter(|a| a.metadata.namespace.as_deref() == Some(ns.as_str()));
        let sibling_refs: Vec<&LoraAdapter> = siblings.iter().map(AsRef::as_ref).collect();
        !tenancy::within_quota(adapter, &sibling_refs, limits.max_adapters)
    };
    if over_quota {
        evict(ctx, &model, adapter).await?;
        return Ok(blocked(
            "QuotaExceeded",
            format!(
                "namespace {ns} may have {} adapters ({} annotation)",
                limits.max_adapters,
                desired::annotations::MAX_ADAPTERS
            ),
        ));
    }
    let agents = agents_of(ctx, &model_ns, &model_name);
    if agents.is_empty() {
        return Ok(blocked(
            "NoAgents",
            format!("BaseModel {model_ns}/{model_name} has no ready agent"),
        ));
    }
    if !ensure_token(ctx, &model_ns, &model_name).await? {
        return Ok(blocked(
            "NoAgents",
            format!("the admin token of BaseModel {model_ns}/{model_name} does not exist yet"),
        ));
    }
    let roles: Vec<_> = role::roles(&model).into_iter().map(|(r, _)| r).collect();
    let fleet = ctx.fleets.get(&model_ns, &model_name);
    let want = AdapterWant {
        replica_quota: (limits.max_adapter_replicas > 0).then_some(limits.max_adapter_replicas),
        ..AdapterWant::with_replicas(adapter, replicas)
    };
    let (converged, work) = converge(
        ctx.agents.as_ref(),
        &fleet,
        &agents,
        &roles,
        &want,
        Limits {
            ttl: ctx.settings.snapshot_ttl,
            loads_per_minute: ctx.settings.adapter_loads_per_minute,
        },
    )
    .await;
    if work.loads + work.unloads > 0 {
        tracing::info!(
            adapter = %format!("{ns}/{}", adapter.name_any()),
            loads = work.loads,
            unloads = work.unloads,
            "placements changed"
        );
    }
    Ok(AdapterOutcome::Converged(converged))
}

async fn apply(adapter: &LoraAdapter, ctx: &Context) -> Result<Action, Error> {
    let outcome = place(adapter, ctx).await?;
    let now = Time(k8s_openapi::jiff::Timestamp::now());
    let new = status::adapter_status(adapter, &outcome, &now);
    let old_phase = adapter.status.as_ref().and_then(|s| s.phase);
    // A demand-following adapter: an Event for every change of its placements, saying why.
    let scaled = match &outcome {
        AdapterOutcome::Converged(c) => c.scaling.as_ref().zip(c.change.as_ref()),
        AdapterOutcome::Blocked(_) => None,
    };
    if let Some((scaling, change)) = scaled {
        // A change while the count holds (first placement, a replaced agent) is a placement.
        let reason = match scaling.reason.as_str() {
            "Steady" | "AwaitingSustainedDemand" | "StabilizingScaleDown" => "Placed",
            r => r,
        };
        event(
            &ctx.recorder,
            &adapter.object_ref(&()),
            false,
            reason,
            format!("{change}: {}", scaling.message),
            &ctx.metrics,
        )
        .await;
    }
    if adapter.status.as_ref() != Some(&new) {
        let api: Api<LoraAdapter> =
            Api::namespaced(ctx.client.clone(), &adapter.namespace().unwrap_or_default());
        patch_status(&api, &adapter.name_any(), &new, &ctx.metrics).await?;
    }
    if old_phase != new.phase
        && let Some(phase) = new.phase
    {
        let (reason, note) = status::ready_message(&new.conditions).unwrap_or_default();
        let warning = matches!(phase, Phase::Degraded | Phase::Failed);
        let reason = if phase == Phase::Ready {
            "Ready".to_owned()
        } else {
            reason
        };
        event(
            &ctx.recorder,
            &adapter.object_ref(&()),
            warning,
            &reason,
            note,
            &ctx.metrics,
        )
        .await;
    }
    let key = key_of(adapter);
    // Demand-following adapters are sized from the agents' request counters, read once per
    // snapshot TTL: reconcile them as often.
    let follows_demand = new.scaling.is_some();
    Ok(match new.phase {
        Some(Phase::Ready) if follows_demand => {
            ctx.backoff.reset(&key);
            Action::requeue(ctx.settings.snapshot_ttl.min(ctx.settings.resync))
        }
        Some(Phase::Ready) => {
            ctx.backoff.reset(&key);
            Action::requeue(ctx.settings.resync)
        }
        // Only a spec change helps; the watch brings it.
        Some(Phase::Failed) => Action::requeue(ctx.settings.resync),
        _ => Action::requeue(
            ctx.backoff
                .fail(&key, ctx.settings.progress, ctx.settings.retry_max),
        ),
    })
}

async fn cleanup(adapter: &LoraAdapter, ctx: &Context) -> Result<Action, Error> {
    let (model_ns, model_name) = model_ref(adapter);
    let Some(removed) = unload_everywhere(ctx, &model_ns, &model_name, adapter).await? else {
        return Ok(Action::await_change());
    };
    if removed > 0 {
        event(
            &ctx.recorder,
            &adapter.object_ref(&()),
            false,
            "Unloaded",
            format!("unloaded from {removed} agents"),
            &ctx.metrics,
        )
        .await;
    }
    ctx.backoff.reset(&key_of(adapter));
    Ok(Action::await_change())
}
