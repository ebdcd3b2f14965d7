//! A stand-in for `loraplane-agent`'s Admin API, for the operator's scenario tests and the
//! placement benchmark (never used by `run`). One [`FakeAgent`] holds what an agent's Admin
//! API exposes (adapter registry, tenant table, host-cache accounting); it is reached either
//! in memory through [`FakeAgents`] (an [`AgentApi`]) or over real gRPC through
//! [`serve`], so the benchmark exercises the real [`crate::agent_client::GrpcAgents`].
//!
//! Behaviour mirrors the contract in `admin.proto`: every call needs the admin token; loads
//! are idempotent for the same (tenant, name, digest); a pinned load that does not fit the
//! host cache is `RESOURCE_EXHAUSTED`; a source URI containing `invalid` is refused with
//! `INVALID_ARGUMENT` (a bad adapter); a given digest is checked against the "fetched" one.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use futures::FutureExt;
use k8s_openapi::api::core::v1::{
    Container, ContainerPort, ContainerStatus, Pod, PodCondition, PodSpec, PodStatus,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use loraplane_proto::v1 as pb;
use loraplane_proto::v1::admin_server::{Admin, AdminServer};
use sha2::{Digest, Sha256};
use tonic::{Request, Response, Status};

use crate::agent_client::{AgentApi, AgentError, AgentFuture, Target, tenants_to_proto};
use crate::desired::labels;
use crate::role::Role;
use crate::tenancy::Tenant;

/// Bytes a fake adapter takes unless the source says otherwise (`…?size=N`).
pub const DEFAULT_ADAPTER_BYTES: u64 = 1 << 20;

/// One fake agent's state.
#[derive(Debug, Clone)]
pub struct FakeAgent {
    pub role: String,
    pub token: String,
    pub capacity_bytes: u64,
    adapters: BTreeMap<(String, String), pb::AdapterInfo>,
    tenants: Vec<pb::TenantSpec>,
    /// Requests served per registered adapter (`GetStats.adapter_requests`).
    requests: BTreeMap<(String, String), u64>,
    /// Every call, as `Method tenant/name` (or just `Method`), oldest first.
    pub calls: Vec<String>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The fetched digest of a source: `sha256:` of the URI (what the fake "downloads").
pub fn digest_of(uri: &str) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(uri.as_bytes())))
}

fn size_of(uri: &str) -> u64 {
    uri.split_once("size=")
        .and_then(|(_, n)| n.split(['&', '/']).next()?.parse().ok())
        .unwrap_or(DEFAULT_ADAPTER_BYTES)
}

impl FakeAgent {
    pub fn new(role: &str, token: &str, capacity_bytes: u64) -> Self {
        FakeAgent {
            role: role.into(),
            token: token.into(),
            capacity_bytes,
            adapters: BTreeMap::new(),
            tenants: Vec::new(),
            requests: BTreeMap::new(),
            calls: Vec::new(),
        }
    }

    /// A process restart: the registry and the tenant table are gone.
    pub fn restart(&mut self) {
        self.adapters.clear();
        self.tenants.clear();
        self.requests.clear();
    }

    /// Serves `n` requests on a registered adapter (counted as the real agent counts them);
    /// returns whether it is registered here.
    pub fn serve_requests(&mut self, tenant: &str, name: &str, n: u64) -> bool {
        let key = (tenant.to_owned(), name.to_owned());
        if !self.adapters.contains_key(&key) {
            return false;
        }
        *self.requests.entry(key).or_default() += n;
        true
    }

    pub fn adapters(&self) -> Vec<pb::AdapterInfo> {
        self.adapters.values().cloned().collect()
    }

    pub fn has(&self, tenant: &str, name: &str) -> bool {
        self.adapters.contains_key(&(tenant.into(), name.into()))
    }

    pub fn tenants(&self) -> &[pb::TenantSpec] {
        &self.tenants
    }

    fn pinned_bytes(&self) -> u64 {
        self.adapters
            .values()
            .filter(|a| a.pinned)
            .map(|a| a.size_bytes)
            .sum()
    }

    fn authorize(&self, token: Option<&str>) -> Result<(), Status> {
        match token {
            Some(t) if t == self.token => Ok(()),
            _ => Err(Status::unauthenticated("admin credential required")),
        }
    }

    fn key(adapter: Option<&pb::AdapterRef>) -> Result<(String, String), Status> {
        let a = adapter.ok_or_else(|| Status::invalid_argument("adapter is required"))?;
        if a.tenant.is_empty() || a.name.is_empty() {
            return Err(Status::invalid_argument("tenant and name are required"));
        }
        Ok((a.tenant.clone(), a.name.clone()))
    }

    pub fn load(&mut self, req: pb::LoadAdapterRequest) -> Result<pb::AdapterInfo, Status> {
        let key = Self::key(req.adapter.as_ref())?;
        self.calls.push(format!("LoadAdapter {}/{}", key.0, key.1));
        if req.source_uri.is_empty() || req.source_uri.contains("invalid") {
            return Err(Status::invalid_argument(format!(
                "{}: not a PEFT adapter",
                req.source_uri
            )));
        }
        let digest = digest_of(&req.source_uri);
        if !req.expected_sha256.is_empty()
            && format!(
                "sha256:{}",
                req.expected_sha256.trim_start_matches("sha256:")
            ) != digest
        {
            return Err(Status::failed_precondition(format!(
                "digest mismatch: expected {}, fetched {digest}",
                req.expected_sha256
            )));
        }
        if let Some(existing) = self.adapters.get_mut(&key)
            && existing.digest == digest
        {
            existing.pinned |= req.pin;
            return Ok(existing.clone());
        }
        let size = size_of(&req.source_uri);
        let old = self
            .adapters
            .get(&key)
            .filter(|a| a.pinned)
            .map_or(0, |a| a.size_bytes);
        if req.pin && self.pinned_bytes() - old + size > self.capacity_bytes {
            return Err(Status::resource_exhausted(
                "host adapter cache is full of pinned adapters",
            ));
        }
        let info = pb::AdapterInfo {
            adapter: Some(pb::AdapterRef {
                tenant: key.0.clone(),
                name: key.1.clone(),
            }),
            digest,
            rank: 16,
            target_modules: vec!["q_proj".into(), "v_proj".into()],
            size_bytes: size,
            residency: pb::Residency::HostCache as i32,
            pinned: req.pin,
            source_uri: req.source_uri.clone(),
            active_requests: 0,
        };
        self.requests.insert(key.clone(), 0);
        self.adapters.insert(key, info.clone());
        Ok(info)
    }

    pub fn unload(&mut self, adapter: Option<&pb::AdapterRef>) -> Result<bool, Status> {
        let key = Self::key(adapter)?;
        self.calls
            .push(format!("UnloadAdapter {}/{}", key.0, key.1));
        self.requests.remove(&key);
        Ok(self.adapters.remove(&key).is_some())
    }

    pub fn list(&mut self) -> Vec<pb::AdapterInfo> {
        self.calls.push("ListAdapters".into());
        self.adapters()
    }

    pub fn stats(&mut self) -> pb::GetStatsResponse {
        self.calls.push("GetStats".into());
        pb::GetStatsResponse {
            role: self.role.clone(),
            host_cache: Some(pb::HostCacheStats {
                capacity_bytes: self.capacity_bytes,
                used_bytes: self.adapters.values().map(|a| a.size_bytes).sum(),
                adapters: u32::try_from(self.adapters.len()).unwrap_or(u32::MAX),
            }),
            model: "fake".into(),
            adapter_requests: self
                .requests
                .iter()
                .map(|((tenant, name), n)| pb::AdapterRequests {
                    adapter: Some(pb::AdapterRef {
                        tenant: tenant.clone(),
                        name: name.clone(),
                    }),
                    requests_total: *n,
                })
                .collect(),
            ..pb::GetStatsResponse::default()
        }
    }

    pub fn set_tenants(&mut self, tenants: Vec<pb::TenantSpec>) -> u32 {
        self.calls.push("SetTenants".into());
        self.tenants = tenants;
        u32::try_from(self.tenants.len()).unwrap_or(u32::MAX)
    }
}

/// Fake agents reached in memory, by address (as discovery finds them).
#[derive(Debug, Default)]
pub struct FakeAgents {
    agents: Mutex<HashMap<SocketAddr, Arc<Mutex<FakeAgent>>>>,
}

impl FakeAgents {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds (or replaces) the agent at `addr`.
    pub fn add(&self, addr: SocketAddr, agent: FakeAgent) -> Arc<Mutex<FakeAgent>> {
        let a = Arc::new(Mutex::new(agent));
        lock(&self.agents).insert(addr, a.clone());
        a
    }

    /// Makes `addr` unreachable.
    pub fn remove(&self, addr: SocketAddr) {
        lock(&self.agents).remove(&addr);
    }

    pub fn get(&self, addr: SocketAddr) -> Option<Arc<Mutex<FakeAgent>>> {
        lock(&self.agents).get(&addr).cloned()
    }

    /// Runs `f` on the agent at `addr`.
    pub fn with<T>(&self, addr: SocketAddr, f: impl FnOnce(&mut FakeAgent) -> T) -> Option<T> {
        self.get(addr).map(|a| f(&mut lock(&a)))
    }

    fn call<T>(
        &self,
        target: &Target,
        method: &'static str,
        f: impl FnOnce(&mut FakeAgent) -> Result<T, Status>,
    ) -> Result<T, AgentError> {
        let agent = self
            .get(target.addr)
            .ok_or_else(|| AgentError::Unavailable {
                addr: target.addr,
                method,
                message: "connection refused".into(),
            })?;
        let mut agent = lock(&agent);
        agent
            .authorize(Some(&target.token))
            .and_then(|()| f(&mut agent))
            .map_err(|s| AgentError::from_status(target.addr, method, &s))
    }
}

impl AgentApi for FakeAgents {
    fn list_adapters<'a>(&'a self, target: &'a Target) -> AgentFuture<'a, Vec<pb::AdapterInfo>> {
        async move { self.call(target, "ListAdapters", |a| Ok(a.list())) }.boxed()
    }

    fn stats<'a>(&'a self, target: &'a Target) -> AgentFuture<'a, pb::GetStatsResponse> {
        async move { self.call(target, "GetStats", |a| Ok(a.stats())) }.boxed()
    }

    fn load<'a>(
        &'a self,
        target: &'a Target,
        request: pb::LoadAdapterRequest,
    ) -> AgentFuture<'a, pb::AdapterInfo> {
        async move { self.call(target, "LoadAdapter", |a| a.load(request)) }.boxed()
    }

    fn unload<'a>(&'a self, target: &'a Target, adapter: pb::AdapterRef) -> AgentFuture<'a, bool> {
        async move { self.call(target, "UnloadAdapter", |a| a.unload(Some(&adapter))) }.boxed()
    }

    fn set_tenants<'a>(
        &'a self,
        target: &'a Target,
        tenants: &'a [Tenant],
    ) -> AgentFuture<'a, u32> {
        async move {
            self.call(target, "SetTenants", |a| {
                Ok(a.set_tenants(tenants_to_proto(tenants)))
            })
        }
        .boxed()
    }
}

/// The gRPC face of one fake agent.
#[derive(Debug, Clone)]
pub struct FakeAdmin(pub Arc<Mutex<FakeAgent>>);

fn bearer<T>(req: &Request<T>) -> Option<&str> {
    req.metadata()
        .get("authorization")?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
}

impl FakeAdmin {
    fn with<T, R>(
        &self,
        req: &Request<T>,
        f: impl FnOnce(&mut FakeAgent) -> Result<R, Status>,
    ) -> Result<Response<R>, Status> {
        let mut agent = lock(&self.0);
        agent.authorize(bearer(req))?;
        f(&mut agent).map(Response::new)
    }
}

#[tonic::async_trait]
impl Admin for FakeAdmin {
    async fn load_adapter(
        &self,
        req: Request<pb::LoadAdapterRequest>,
    ) -> Result<Response<pb::LoadAdapterResponse>, Status> {
        let body = req.get_ref().clone();
        self.with(&req, |a| {
            a.load(body).map(|info| pb::LoadAdapterResponse {
                adapter: Some(info),
                outcome: pb::LoadOutcome::Added as i32,
            })
        })
    }

    async fn unload_adapter(
        &self,
        req: Request<pb::UnloadAdapterRequest>,
    ) -> Result<Response<pb::UnloadAdapterResponse>, Status> {
        let adapter = req.get_ref().adapter.clone();
        self.with(&req, |a| {
            a.unload(adapter.as_ref())
                .map(|unloaded| pb::UnloadAdapterResponse { unloaded })
        })
    }

    async fn list_adapters(
        &self,
        req: Request<pb::ListAdaptersRequest>,
    ) -> Result<Response<pb::ListAdaptersResponse>, Status> {
        let tenant = req.get_ref().tenant.clone();
        self.with(&req, |a| {
            let adapters = a
                .list()
                .into_iter()
                .filter(|i| {
                    tenant.is_empty() || i.adapter.as_ref().is_some_and(|r| r.tenant == tenant)
                })
                .collect();
            Ok(pb::ListAdaptersResponse { adapters })
        })
    }

    async fn set_tenants(
        &self,
        req: Request<pb::SetTenantsRequest>,
    ) -> Result<Response<pb::SetTenantsResponse>, Status> {
        let tenants = req.get_ref().tenants.clone();
        self.with(&req, |a| {
            Ok(pb::SetTenantsResponse {
                tenants: a.set_tenants(tenants),
            })
        })
    }

    async fn get_stats(
        &self,
        req: Request<pb::GetStatsRequest>,
    ) -> Result<Response<pb::GetStatsResponse>, Status> {
        self.with(&req, |a| Ok(a.stats()))
    }

    async fn drain(
        &self,
        req: Request<pb::DrainRequest>,
    ) -> Result<Response<pb::DrainResponse>, Status> {
        self.with(&req, |_| Ok(pb::DrainResponse { in_flight: 0 }))
    }
}

/// Serves `agent`'s Admin API on `listener` until the task is dropped.
pub async fn serve(
    agent: Arc<Mutex<FakeAgent>>,
    listener: tokio::net::TcpListener,
) -> Result<(), tonic::transport::Error> {
    tonic::transport::Server::builder()
        .add_service(AdminServer::new(FakeAdmin(agent)))
        .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener))
        .await
}

/// An agent pod as the API server would show it: `meta`, scheduled on `node`, one `agent`
/// container whose `grpc` port is `addr`'s, at `addr`'s IP, ready or not, restarted
/// `restarts` times. The one shape every test's agent pods take.
pub fn pod(meta: ObjectMeta, node: String, addr: SocketAddr, ready: bool, restarts: i32) -> Pod {
    Pod {
        metadata: meta,
        spec: Some(PodSpec {
            node_name: Some(node),
            containers: vec![Container {
                name: "agent".into(),
                ports: Some(vec![ContainerPort {
                    name: Some("grpc".into()),
                    container_port: i32::from(addr.port()),
                    ..ContainerPort::default()
                }]),
                ..Container::default()
            }],
            ..PodSpec::default()
        }),
        status: Some(PodStatus {
            pod_ip: Some(addr.ip().to_string()),
            conditions: Some(vec![PodCondition {
                type_: "Ready".into(),
                status: if ready { "True" } else { "False" }.into(),
                ..PodCondition::default()
            }]),
            container_statuses: Some(vec![ContainerStatus {
                name: "agent".into(),
                restart_count: restarts,
                ..ContainerStatus::default()
            }]),
            ..PodStatus::default()
        }),
    }
}

/// The pod of agent `i` (fake or real) listening on `addr`, as the API server would show it:
/// model `bench`, namespace `bench`, two agents per node, ready, restarted `restarts` times.
pub fn agent_pod(i: usize, addr: SocketAddr, role: Role, restarts: i32) -> Pod {
    let meta = ObjectMeta {
        name: Some(format!("bench-{}-{i}", role.as_str())),
        namespace: Some("bench".into()),
        uid: Some(format!("uid-{i}")),
        labels: Some(BTreeMap::from([
            (labels::BASE_MODEL.to_owned(), "bench".to_owned()),
            (labels::ROLE.to_owned(), role.as_str().to_owned()),
        ])),
        ..ObjectMeta::default()
    };
    pod(meta, format!("node-{}", i / 2), addr, true, restarts)
}
