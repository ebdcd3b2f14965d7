//! The BaseModel reconciler.
//!
//! Calls, in order (the scenario tests pin them):
//! 1. `GET` the credentials Secret (`POST` it with fresh tokens when missing);
//! 2. `LIST` the model's ConfigMaps, StatefulSets, Services, PodDisruptionBudgets,
//!    HorizontalPodAutoscalers and, with `--autoscaler keda`, ScaledObjects (label
//!    `loraplane.dev/base-model`, `managed-by=loraplane-operator`);
//! 3. server-side `PATCH` each child whose desired hash changed, `DELETE` owned children no
//!    longer desired (a mode switch, autoscaling switched off); when a role's autoscaling is
//!    switched on, first a `PATCH` that hands its StatefulSet's `spec.replicas` to the
//!    autoscaler (`desired::autoscaling`);
//! 4. `SetTenants` on agents (ready pods, from the cache) whose incarnation lacks the current
//!    tenant table;
//! 5. `PATCH` status when it changed; an Event when the phase changed.
//!
//! Children are garbage-collected with the BaseModel through owner references, so there is no
//! finalizer.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Instant;

use futures::future::join_all;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod, Secret, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::{Resource, ResourceExt};

use super::apply::{event, patch_status, sync_children};
use super::{Context, Error};
use crate::agent_client::AgentError;
use crate::crd::{BaseModel, Phase};
use crate::desired::autoscaling::{self, Autoscaler};
use crate::desired::config::SpecError;
use crate::desired::keda::ScaledObject;
use crate::desired::secret::Credentials;
use crate::desired::{self, AgentParams, MANAGER, config, pdb, secret, service, statefulset};
use crate::discovery;
use crate::metrics::controllers::BASE_MODEL as CONTROLLER;
use crate::role;
use crate::status::{self, ObservedModel};
use crate::tenancy::{self, Tenant};

/// Every object a BaseModel owns (except the admin Secret, created once).
#[derive(Debug, Clone, PartialEq)]
pub struct Children {
    pub config: ConfigMap,
    pub statefulsets: Vec<StatefulSet>,
    /// Headless per role, then the client Service.
    pub services: Vec<Service>,
    pub pdbs: Vec<PodDisruptionBudget>,
    /// One per autoscaled role (`--autoscaler hpa`).
    pub hpas: Vec<HorizontalPodAutoscaler>,
    /// One per autoscaled role (`--autoscaler keda`).
    pub scaled_objects: Vec<ScaledObject>,
}

/// Builds every child of `model` (pure), the agents mounting `adapter_claims`
/// ([`desired::claims`]).
///
/// Errors: a spec the agents' configuration cannot express.
pub fn children(
    model: &BaseModel,
    params: &AgentParams,
    creds: &Credentials,
    adapter_claims: &BTreeSet<String>,
) -> Result<Children, SpecError> {
    let fingerprint = secret::fingerprint(creds);
    let roles = role::roles(model);
    let mut services: Vec<Service> = roles
        .iter()
        .map(|(r, _)| service::headless(model, *r))
        .collect();
    services.push(service::client(model));
    let mut hpas = Vec::new();
    let mut scaled_objects = Vec::new();
    for (r, spec) in &roles {
        let Some(a) = &spec.autoscaling else { continue };
        if spec.replicas.is_some() {
            // The CRD refuses this too; a spec that got past it must not pin the count.
            return Err(SpecError::Autoscaling {
                role: r.as_str(),
                reason: "set replicas or autoscaling, not both".into(),
            });
        }
        match &params.autoscaler {
            Autoscaler::Hpa => hpas.push(autoscaling::hpa(model, *r, a)?),
            Autoscaler::Keda { prometheus } => {
                scaled_objects.push(autoscaling::scaled_object(model, *r, a, prometheus)?);
            }
        }
    }
    Ok(Children {
        config: config::agent_config(model, params, adapter_claims)?,
        statefulsets: roles
            .iter()
            .map(|(r, _)| {
                statefulset::statefulset_with(model, *r, params, &fingerprint, adapter_claims)
            })
            .collect::<Result<_, _>>()?,
        services,
        pdbs: roles.iter().map(|(r, _)| pdb::pdb(model, *r)).collect(),
        hpas,
        scaled_objects,
    })
}

/// The key of an object for backoff bookkeeping.
pub fn key_of<K: Resource<DynamicType = ()>>(obj: &K) -> String {
    format!(
        "{}/{}/{}",
        K::kind(&()),
        obj.meta().namespace.as_deref().unwrap_or_default(),
        obj.meta().name.as_deref().unwrap_or_default()
    )
}

/// The controller's reconcile function.
pub async fn reconcile(model: Arc<BaseModel>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    let result = reconcile_model(&model, &ctx).await;
    ctx.metrics.reconciled(CONTROLLER, started.elapsed());
    if result.is_ok() {
        ctx.backoff.reset(&key_of(&*model));
    }
    result
}

/// The controller's error policy.
pub fn error_policy(model: Arc<BaseModel>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.on_error(CONTROLLER, &key_of(&*model), error)
}

/// Reads the model's agent credentials, creating the Secret when it is missing.
///
/// Errors: API failures; a Secret that exists without both tokens (delete it to rotate).
pub async fn ensure_credentials(model: &BaseModel, ctx: &Context) -> Result<Credentials, Error> {
    let ns = model
        .namespace()
        .ok_or_else(|| Error::NoNamespace(model.name_any()))?;
    let name = desired::credentials_secret_name(&model.name_any());
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
    let missing = || {
        Error::Token(format!(
            "Secret {ns}/{name} lacks `admin-token` or `cluster-token`; delete it to rotate"
        ))
    };
    if let Some(s) = api.get_opt(&name).await? {
        return secret::credentials_of(&s).ok_or_else(missing);
    }
    let creds = secret::generate().map_err(|e| Error::Token(e.to_string()))?;
    let pp = PostParams {
        field_manager: Some(MANAGER.into()),
        ..PostParams::default()
    };
    match api.create(&pp, &secret::credentials(model, &creds)).await {
        Ok(_) => {
            ctx.metrics.wrote("create");
            Ok(creds)
        }
        // Another writer won the race: use theirs.
        Err(kube::Error::Api(s)) if s.is_already_exists() => {
            let s = api.get(&name).await?;
            secret::credentials_of(&s).ok_or_else(missing)
        }
        Err(e) => Err(e.into()),
    }
}

/// The tenant table of a model's agents, from the caches.
pub fn tenant_table(model: &BaseModel, ctx: &Context) -> Vec<Tenant> {
    let namespaces: Vec<Namespace> = ctx
        .stores
        .namespaces
        .state()
        .iter()
        .map(|n| (**n).clone())
        .collect();
    let secrets: Vec<Secret> = ctx
        .stores
        .api_keys
        .state()
        .iter()
        .map(|s| (**s).clone())
        .collect();
    tenancy::tenant_table(model, &namespaces, &secrets)
}

/// The ready pods of a model's agents, from the cache.
pub fn model_pods(ctx: &Context, namespace: &str, model: &str) -> Vec<Pod> {
    ctx.stores
        .pods
        .state()
        .iter()
        .filter(|p| {
            p.namespace().as_deref() == Some(namespace)
                && p.labels()
                    .get(desired::labels::BASE_MODEL)
                    .map(String::as_str)
                    == Some(model)
        })
        .map(|p| (**p).clone())
        .collect()
}

/// Pushes the tenant table to every agent incarnation that has not acknowledged it. An empty
/// table is never sent: the agent reads it as "open to everyone".
async fn push_tenants(
    model: &BaseModel,
    ctx: &Context,
    pods: &[Pod],
    token: &str,
) -> Vec<AgentError> {
    let ns = model.namespace().unwrap_or_default();
    let table = tenant_table(model, ctx);
    let hash = desired::hash_json(&format!("{table:?}"));
    let agents = discovery::agents(pods, &model.name_any());
    let fleet = ctx.fleets.get(&ns, &model.name_any());
    let calls: Vec<_> = {
        let mut f = fleet.lock().await;
        if f.token.as_deref() != Some(token) {
            f.token = Some(token.into());
        }
        f.set_agents(&agents);
        if table.is_empty() {
            return Vec::new();
        }
        f.agents
            .values()
            .filter(|e| e.tenants_pushed.as_deref() != Some(hash.as_str()))
            .filter_map(|e| Some((e.agent.pod.clone(), f.target(&e.agent)?)))
            .collect()
    };
    let api = ctx.agents.as_ref();
    let table_ref = &table;
    let results = join_all(
        calls
            .iter()
            .map(|(pod, t)| async move { (pod.clone(), api.set_tenants(t, table_ref).await) }),
    )
    .await;
    let mut f = fleet.lock().await;
    let mut errors = Vec::new();
    for (pod, r) in results {
        match r {
            Ok(_) => {
                if let Some(e) = f.agents.get_mut(&pod) {
                    e.tenants_pushed = Some(hash.clone());
                }
            }
            Err(e) => {
                tracing::warn!(pod, error = %e, "SetTenants failed");
                errors.push(e);
            }
        }
    }
    errors
}

/// Hands `spec.replicas` of each newly autoscaled role's StatefulSet to
/// [`autoscaling::HANDOVER_MANAGER`] at its current value, so the operator's next apply, which
/// leaves the field out, does not reset it (docs: server-side apply, "transferring
/// ownership"). Not forced: a conflict means another manager already holds the field.
///
/// Errors: the API refused the apply for another reason.
async fn hand_over_replicas(
    api: &Api<StatefulSet>,
    model: &BaseModel,
    observed: &[StatefulSet],
    metrics: &crate::metrics::Metrics,
) -> Result<(), Error> {
    for (r, spec) in role::roles(model) {
        let name = desired::role_name(model, r);
        let Some(sts) = observed.iter().find(|s| s.name_any() == name) else {
            continue;
        };
        let Some(replicas) = autoscaling::replicas_handover(sts, &spec) else {
            continue;
        };
        let pp = PatchParams::apply(autoscaling::HANDOVER_MANAGER);
        let patch = autoscaling::handover_patch(sts, replicas);
        match api.patch(&name, &pp, &Patch::Apply(&patch)).await {
            Ok(_) => {
                metrics.wrote("apply");
                tracing::info!(name, replicas, "replicas handed over to the autoscaler");
            }
            Err(kube::Error::Api(s)) if s.is_conflict() => {
                tracing::warn!(name, error = %s, "replicas already held by another manager");
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

async fn reconcile_model(model: &BaseModel, ctx: &Context) -> Result<Action, Error> {
    let name = model.name_any();
    let ns = model
        .namespace()
        .ok_or_else(|| Error::NoNamespace(name.clone()))?;
    if model.metadata.deletion_timestamp.is_some() {
        ctx.fleets.remove(&ns, &name);
        return Ok(Action::await_change());
    }
    let uid = model.uid().unwrap_or_default();
    let creds = ensure_credentials(model, ctx).await?;
    let client = ctx.client.clone();
    let lp = ListParams::default().labels(&desired::children_selector(&name));
    let cm_api: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    let sts_api: Api<StatefulSet> = Api::namespaced(client.clone(), &ns);
    let svc_api: Api<Service> = Api::namespaced(client.clone(), &ns);
    let pdb_api: Api<PodDisruptionBudget> = Api::namespaced(client.clone(), &ns);
    let observed_cm = cm_api.list(&lp).await?.items;
    let observed_sts = sts_api.list(&lp).await?.items;
    let observed_svc = svc_api.list(&lp).await?.items;
    let observed_pdb = pdb_api.list(&lp).await?.items;
    let hpa_api: Api<HorizontalPodAutoscaler> = Api::namespaced(client.clone(), &ns);
    let observed_hpa = hpa_api.list(&lp).await?.items;
    // ScaledObjects exist only where KEDA is installed: listed only when the operator uses it.
    let keda = matches!(ctx.settings.agent.autoscaler, Autoscaler::Keda { .. });
    let so_api: Api<ScaledObject> = Api::namespaced(client.clone(), &ns);
    let observed_so = if keda {
        so_api.list(&lp).await?.items
    } else {
        Vec::new()
    };
    // Claims of `pvc://` adapters, from the cache (no API call).
    let adapters = ctx.stores.adapters.state();
    let claims = desired::claims::adapter_claims(model, adapters.iter().map(AsRef::as_ref));
    let built = children(model, &ctx.settings.agent, &creds, &claims);
    let (statefulsets, spec_error) = match built {
        Ok(c) => {
            let m = &ctx.metrics;
            sync_children(&cm_api, vec![c.config], observed_cm, &uid, m).await?;
            hand_over_replicas(&sts_api, model, &observed_sts, m).await?;
            let sts = sync_children(&sts_api, c.statefulsets, observed_sts, &uid, m).await?;
            sync_children(&svc_api, c.services, observed_svc, &uid, m).await?;
            sync_children(&pdb_api, c.pdbs, observed_pdb, &uid, m).await?;
            // In KEDA mode no HPA is desired: ours (not KEDA's, which it owns) are pruned.
            sync_children(&hpa_api, c.hpas, observed_hpa, &uid, m).await?;
            if keda {
                sync_children(&so_api, c.scaled_objects, observed_so, &uid, m).await?;
            }
            (sts, None)
        }
        Err(e) => {
            tracing::warn!(model = name, error = %e, "spec cannot be realised; children left as they are");
            (observed_sts, Some(e.to_string()))
        }
    };
    let pods = model_pods(ctx, &ns, &name);
    let tenant_errors = push_tenants(model, ctx, &pods, &creds.admin).await;
    let now = Time(k8s_openapi::jiff::Timestamp::now());
    let endpoint = service::endpoint(model);
    let new = status::base_model_status(
        model,
        ObservedModel {
            statefulsets: &statefulsets,
            pods: &pods,
            spec_error: spec_error.as_deref(),
            endpoint: &endpoint,
        },
        &now,
    );
    let old_phase = model.status.as_ref().and_then(|s| s.phase);
    if model.status.as_ref() != Some(&new) {
        let api: Api<BaseModel> = Api::namespaced(client, &ns);
        patch_status(&api, &name, &new, &ctx.metrics).await?;
    }
    if old_phase != new.phase
        && let Some(phase) = new.phase
    {
        let note = status::ready_message(&new.conditions)
            .map(|(_, m)| m)
            .unwrap_or_default();
        let warning = matches!(phase, Phase::Degraded | Phase::Failed);
        event(
            &ctx.recorder,
            &model.object_ref(&()),
            warning,
            phase.as_str(),
            note,
            &ctx.metrics,
        )
        .await;
    }
    Ok(match new.phase {
        Some(Phase::Ready) if tenant_errors.is_empty() => Action::requeue(ctx.settings.resync),
        Some(Phase::Failed) => Action::requeue(ctx.settings.resync),
        _ => Action::requeue(ctx.settings.progress),
    })
}
