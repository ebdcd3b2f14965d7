//! Wiring: the watches and caches behind both controllers, the triggers between them, and
//! graceful shutdown.
//!
//! - Auxiliary reflectors (agent pods, namespaces, API-key Secrets) run as their own tasks and
//!   fan their changes out as reconcile triggers: a pod change re-reconciles the adapters of
//!   its model (re-placement after a restart or scale-up); a namespace or API-key change
//!   re-reconciles the models that admit it (tenant tables) and the namespace's adapters.
//! - LoraAdapters have a reflector of their own too (the cache both reconcilers read): a
//!   `pvc://` adapter re-reconciles its BaseModel, whose agents mount the claim.
//! - Controllers start only once the caches they read are complete, so a restarted operator
//!   never reports "BaseModel not found" for a model it has not listed yet.
//! - Shutdown stops new reconciles, lets running ones finish, and returns.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures::channel::mpsc::{UnboundedReceiver, UnboundedSender, unbounded};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod, Secret, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::Api;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{Controller, WatchStreamExt, watcher};
use kube::{Client, ResourceExt};

use super::lora_adapter::model_ref_borrowed;
use super::{Context, Settings, Stores, base_model, lora_adapter};
use crate::agent_client::AgentApi;
use crate::crd::{BaseModel, LoraAdapter};
use crate::desired::{MANAGER, labels};
use crate::metrics::Metrics;
use crate::status;
use crate::tenancy;

fn managed() -> watcher::Config {
    watcher::Config::default().labels(&format!("{}={MANAGER}", labels::MANAGED_BY))
}

/// Runs a reflector into `writer` and forwards every touched object (after the cache has it)
/// to `subscribers`, until the watch ends (it retries with backoff on its own).
async fn drive<K>(
    api: Api<K>,
    config: watcher::Config,
    writer: reflector::store::Writer<K>,
    subscribers: Vec<UnboundedSender<K>>,
) where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    let stream = reflector::reflector(writer, watcher(api, config))
        .default_backoff()
        .touched_objects();
    let mut stream = std::pin::pin!(stream);
    loop {
        match stream.try_next().await {
            Ok(Some(obj)) => {
                for s in &subscribers {
                    let _ = s.unbounded_send(obj.clone());
                }
            }
            Ok(None) => return,
            Err(error) => tracing::warn!(%error, kind = K::kind(&()).as_ref(), "watch error"),
        }
    }
}

/// A channel's receiving end as a watch-like stream for `Controller::watches_stream`.
fn as_watch<K>(
    rx: UnboundedReceiver<K>,
) -> impl futures::Stream<Item = Result<K, watcher::Error>> + Send + 'static
where
    K: Send + 'static,
{
    rx.map(Ok)
}

fn adapters_of_model(
    store: &Store<LoraAdapter>,
    ns: &str,
    name: &str,
) -> Vec<ObjectRef<LoraAdapter>> {
    store
        .state_filter(|a| model_ref_borrowed(a) == (ns, name))
        .iter()
        .map(|a| ObjectRef::from_obj(a.as_ref()))
        .collect()
}

fn adapters_in(store: &Store<LoraAdapter>, ns: &str) -> Vec<ObjectRef<LoraAdapter>> {
    store
        .state()
        .iter()
        .filter(|a| a.namespace().as_deref() == Some(ns))
        .map(|a| ObjectRef::from_obj(a.as_ref()))
        .collect()
}

fn models_admitting(
    store: &Store<BaseModel>,
    ns: &str,
    ns_obj: Option<&Namespace>,
) -> Vec<ObjectRef<BaseModel>> {
    store
        .state()
        .iter()
        .filter(|m| {
            m.spec
                .tenancy
                .as_ref()
                .is_some_and(|t| t.namespace_selector.is_some())
                || tenancy::admits(m, ns, ns_obj)
        })
        .map(|m| ObjectRef::from_obj(m.as_ref()))
        .collect()
}

/// Runs both controllers until `shutdown` resolves.
pub async fn run<S>(
    client: Client,
    settings: Settings,
    agents: Arc<dyn AgentApi>,
    metrics: Metrics,
    instance: Option<String>,
    shutdown: S,
) where
    S: Future<Output = ()> + Send + Sync + Clone + 'static,
{
    let (pods, pod_writer) = reflector::store::<Pod>();
    let (namespaces, ns_writer) = reflector::store::<Namespace>();
    let (api_keys, key_writer) = reflector::store::<Secret>();
    let (pod_bm_tx, pod_bm_rx) = unbounded::<Pod>();
    let (pod_lora_tx, pod_lora_rx) = unbounded::<Pod>();
    let (ns_bm_tx, ns_bm_rx) = unbounded::<Namespace>();
    let (ns_lora_tx, ns_lora_rx) = unbounded::<Namespace>();
    let (key_tx, key_rx) = unbounded::<Secret>();
    let (adapter_cache, adapter_writer) = reflector::store::<LoraAdapter>();
    let (adapter_bm_tx, adapter_bm_rx) = unbounded::<LoraAdapter>();
    tokio::spawn(drive(
        Api::<Pod>::all(client.clone()),
        managed(),
        pod_writer,
        vec![pod_bm_tx, pod_lora_tx],
    ));
    tokio::spawn(drive(
        Api::<Namespace>::all(client.clone()),
        watcher::Config::default(),
        ns_writer,
        vec![ns_bm_tx, ns_lora_tx],
    ));
    tokio::spawn(drive(
        Api::<Secret>::all(client.clone()),
        watcher::Config::default().labels(&format!("{}=true", labels::API_KEY)),
        key_writer,
        vec![key_tx],
    ));

    tokio::spawn(drive(
        Api::<LoraAdapter>::all(client.clone()),
        watcher::Config::default(),
        adapter_writer,
        vec![adapter_bm_tx],
    ));

    let bm_controller = Controller::new(
        Api::<BaseModel>::all(client.clone()),
        watcher::Config::default(),
    );
    let base_models = bm_controller.store();
    let (models_for_ns, models_for_keys, ns_for_keys) =
        (base_models.clone(), base_models.clone(), namespaces.clone());
    let bm_controller = bm_controller
        .owns(Api::<StatefulSet>::all(client.clone()), managed())
        .owns(Api::<Service>::all(client.clone()), managed())
        .owns(Api::<ConfigMap>::all(client.clone()), managed())
        .owns(Api::<PodDisruptionBudget>::all(client.clone()), managed())
        // Agent pods: new incarnations need the tenant table; readiness changes the status.
        .watches_stream(as_watch(pod_bm_rx), |pod: Pod| {
            let ns = pod.namespace().unwrap_or_default();
            pod.labels()
                .get(labels::BASE_MODEL)
                .map(|m| ObjectRef::new(m).within(&ns))
        })
        // Namespaces: admission by selector, tenant limits.
        .watches_stream(as_watch(ns_bm_rx), move |ns: Namespace| {
            models_admitting(&models_for_ns, &ns.name_any(), Some(&ns))
        })
        // API keys: the tenant tables of the models admitting their namespace.
        .watches_stream(as_watch(key_rx), move |s: Secret| {
            let ns = s.namespace().unwrap_or_default();
            let ns_obj = ns_for_keys.get(&ObjectRef::new(&ns));
            models_admitting(&models_for_keys, &ns, ns_obj.as_deref())
        })
        // pvc:// adapters (created, changed or deleted): the claims the agents mount. An
        // adapter switched from pvc:// to another scheme unmounts its claim at the next resync.
        .watches_stream(as_watch(adapter_bm_rx), |a: LoraAdapter| {
            a.spec.source.pvc_claim()?;
            let (ns, name) = model_ref_borrowed(&a);
            Some(ObjectRef::new(name).within(ns))
        })
        .graceful_shutdown_on(shutdown.clone());

    let lora_controller = Controller::new(
        Api::<LoraAdapter>::all(client.clone()),
        watcher::Config::default(),
    );
    let adapters = lora_controller.store();
    let (for_models, for_pods, for_ns) = (adapters.clone(), adapters.clone(), adapters.clone());
    let lora_controller = lora_controller
        .watches(
            Api::<BaseModel>::all(client.clone()),
            watcher::Config::default(),
            move |m: BaseModel| {
                adapters_of_model(
                    &for_models,
                    &m.namespace().unwrap_or_default(),
                    &m.name_any(),
                )
            },
        )
        // Agent pods: restarts, scale-ups and removals re-place the model's adapters.
        .watches_stream(as_watch(pod_lora_rx), move |pod: Pod| {
            let ns = pod.namespace().unwrap_or_default();
            pod.labels()
                .get(labels::BASE_MODEL)
                .map(|m| adapters_of_model(&for_pods, &ns, m))
                .unwrap_or_default()
        })
        // Namespaces: admission and quota of the namespace's adapters.
        .watches_stream(as_watch(ns_lora_rx), move |ns: Namespace| {
            adapters_in(&for_ns, &ns.name_any())
        })
        .graceful_shutdown_on(shutdown.clone());

    // The adapters-by-phase gauge.
    {
        let (adapters, metrics) = (adapters.clone(), metrics.clone());
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(15)).await;
                let state = adapters.state();
                for (phase, n) in status::count_phases(state.iter().map(|a| a.status.as_ref())) {
                    metrics.set_adapters(phase, n);
                }
            }
        });
    }

    if pods.wait_until_ready().await.is_err()
        || namespaces.wait_until_ready().await.is_err()
        || api_keys.wait_until_ready().await.is_err()
        || adapter_cache.wait_until_ready().await.is_err()
    {
        tracing::error!("a cache writer was dropped before it was ready");
        return;
    }
    let stores = Stores {
        base_models: base_models.clone(),
        adapters: adapter_cache,
        pods,
        namespaces,
        api_keys,
    };
    let ctx = Arc::new(Context::new(
        client, settings, agents, stores, metrics, instance,
    ));
    let bm = tokio::spawn(
        bm_controller
            .run(base_model::reconcile, base_model::error_policy, ctx.clone())
            .for_each(|r| async move {
                if let Err(error) = r {
                    tracing::debug!(%error, "basemodel controller");
                }
            }),
    );
    if base_models.wait_until_ready().await.is_err() {
        tracing::error!("basemodel cache never became ready");
        return;
    }
    tracing::info!("caches ready; reconciling");
    lora_controller
        .run(lora_adapter::reconcile, lora_adapter::error_policy, ctx)
        .for_each(|r| async move {
            if let Err(error) = r {
                tracing::debug!(%error, "loraadapter controller");
            }
        })
        .await;
    let _ = bm.await;
}
