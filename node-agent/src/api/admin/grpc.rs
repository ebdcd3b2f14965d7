//! The `loraplane.v1.Admin` gRPC service: wire translation over [`AdminState`]; every call
//! checks the admin credential first.

use std::sync::Arc;
use std::time::Duration;

use loraplane_proto::v1 as pb;
use loraplane_proto::v1::admin_server::{Admin, AdminServer};
use tonic::{Request, Response as GrpcResponse, Status};

use super::{AdminEngine, AdminError, AdminState, invalid};
use crate::api::auth::TenantSpec;
use crate::credential::bearer_from_metadata;
use crate::engine::LoadChange;
use crate::lora::ids::AdapterKey;
use crate::lora::registry::{AdapterSummary, Residency};

/// The `loraplane.v1.Admin` gRPC service.
#[derive(Debug)]
pub struct AdminService<E> {
    state: Arc<AdminState<E>>,
}

impl<E: AdminEngine> AdminService<E> {
    pub fn new(state: Arc<AdminState<E>>) -> Self {
        AdminService { state }
    }

    /// The tonic server to add to a `Server` builder.
    pub fn into_server(self) -> AdminServer<Self> {
        AdminServer::new(self)
    }

    fn authorize<T>(&self, request: &Request<T>) -> Result<(), Status> {
        Ok(self
            .state
            .authorize(bearer_from_metadata(request.metadata()))?)
    }
}

fn required_ref(r: Option<pb::AdapterRef>) -> Result<pb::AdapterRef, AdminError> {
    r.ok_or_else(|| invalid("adapter", "adapter (tenant and name) is required"))
}

#[tonic::async_trait]
impl<E: AdminEngine> Admin for AdminService<E> {
    async fn load_adapter(
        &self,
        request: Request<pb::LoadAdapterRequest>,
    ) -> Result<GrpcResponse<pb::LoadAdapterResponse>, Status> {
        self.authorize(&request)?;
        let req = request.into_inner();
        let r = required_ref(req.adapter)?;
        let loaded = self
            .state
            .load(
                &r.tenant,
                &r.name,
                &req.source_uri,
                &req.expected_sha256,
                req.pin,
            )
            .await?;
        let outcome = match loaded.change {
            LoadChange::Added => pb::LoadOutcome::Added,
            LoadChange::Replaced { .. } => pb::LoadOutcome::Replaced,
            LoadChange::Unchanged => pb::LoadOutcome::Unchanged,
        };
        Ok(GrpcResponse::new(pb::LoadAdapterResponse {
            adapter: Some(adapter_info(&self.state, &loaded.summary)),
            outcome: outcome as i32,
        }))
    }

    async fn unload_adapter(
        &self,
        request: Request<pb::UnloadAdapterRequest>,
    ) -> Result<GrpcResponse<pb::UnloadAdapterResponse>, Status> {
        self.authorize(&request)?;
        let r = required_ref(request.into_inner().adapter)?;
        let unloaded = self.state.unload(&r.tenant, &r.name).await?;
        Ok(GrpcResponse::new(pb::UnloadAdapterResponse { unloaded }))
    }

    async fn list_adapters(
        &self,
        request: Request<pb::ListAdaptersRequest>,
    ) -> Result<GrpcResponse<pb::ListAdaptersResponse>, Status> {
        self.authorize(&request)?;
        let tenant = request.into_inner().tenant;
        let adapters = self
            .state
            .list((!tenant.is_empty()).then_some(tenant.as_str()))
            .await?;
        Ok(GrpcResponse::new(pb::ListAdaptersResponse {
            adapters: adapters
                .iter()
                .map(|a| adapter_info(&self.state, a))
                .collect(),
        }))
    }

    async fn set_tenants(
        &self,
        request: Request<pb::SetTenantsRequest>,
    ) -> Result<GrpcResponse<pb::SetTenantsResponse>, Status> {
        self.authorize(&request)?;
        let specs = request
            .into_inner()
            .tenants
            .iter()
            .map(TenantSpec::from)
            .collect();
        let n = self.state.set_tenants(specs)?;
        Ok(GrpcResponse::new(pb::SetTenantsResponse {
            tenants: sat_u32(n),
        }))
    }

    async fn get_stats(
        &self,
        request: Request<pb::GetStatsRequest>,
    ) -> Result<GrpcResponse<pb::GetStatsResponse>, Status> {
        self.authorize(&request)?;
        let s = self.state.stats().await?;
        Ok(GrpcResponse::new(pb::GetStatsResponse {
            role: self.state.role.as_str().to_owned(),
            pool: Some(pb::PoolStats {
                page_bytes: s.page_bytes as u64,
                total_pages: s.pool.total,
                free_pages: s.pool.free,
                kv_pages: s.pool.kv,
                adapter_pages: s.pool.adapter,
            }),
            queue: Some(pb::QueueStats {
                waiting_requests: sat_u32(s.waiting),
                running_requests: sat_u32(s.running),
                queued_prefill_tokens: s.queued_prefill_tokens as u64,
                preemptions_total: s.preemptions,
            }),
            host_cache: Some(pb::HostCacheStats {
                capacity_bytes: s.host_cache_capacity as u64,
                used_bytes: s.host_cache_used as u64,
                adapters: sat_u32(s.adapters),
            }),
            device_resident_adapters: s.device_resident.iter().map(adapter_ref).collect(),
            draining: self.state.lifecycle.is_draining(),
            model: self.state.model.clone(),
            adapter_requests: s
                .adapter_requests
                .iter()
                .map(|(key, n)| pb::AdapterRequests {
                    adapter: Some(adapter_ref(key)),
                    requests_total: *n,
                })
                .collect(),
        }))
    }

    async fn drain(
        &self,
        request: Request<pb::DrainRequest>,
    ) -> Result<GrpcResponse<pb::DrainResponse>, Status> {
        self.authorize(&request)?;
        let secs = request.into_inner().timeout_seconds;
        let timeout = (secs > 0).then(|| Duration::from_secs(u64::from(secs)));
        let in_flight = self.state.drain(timeout).await?;
        Ok(GrpcResponse::new(pb::DrainResponse {
            in_flight: sat_u32(in_flight),
        }))
    }
}

fn adapter_info<E>(state: &AdminState<E>, a: &AdapterSummary) -> pb::AdapterInfo {
    let source_uri = state
        .uris
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(&a.key)
        .cloned()
        .unwrap_or_else(|| a.source.display().to_string());
    let residency = match a.residency {
        // Not in memory yet: the proto has no "loading" state.
        Residency::Loading | Residency::Registered => pb::Residency::Registered,
        Residency::HostCache => pb::Residency::HostCache,
        Residency::DevicePool => pb::Residency::DevicePool,
    };
    pb::AdapterInfo {
        adapter: Some(adapter_ref(&a.key)),
        digest: a.digest.map(|d| d.to_string()).unwrap_or_default(),
        rank: u32::try_from(a.rank).unwrap_or(u32::MAX),
        target_modules: a
            .target_modules
            .iter()
            .map(|m| m.name().to_owned())
            .collect(),
        size_bytes: a.bytes as u64,
        residency: residency as i32,
        pinned: a.pinned,
        source_uri,
        active_requests: u32::try_from(a.active_requests).unwrap_or(u32::MAX),
    }
}

fn adapter_ref(key: &AdapterKey) -> pb::AdapterRef {
    pb::AdapterRef {
        tenant: key.tenant.0.clone(),
        name: key.name.clone(),
    }
}

fn sat_u32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}
