//! The operator's side of the agents' Admin API (`loraplane.v1.Admin`), behind the
//! [`AgentApi`] trait so the reconcilers are tested against an in-memory double
//! (`fake_agent::FakeAgents`, compiled for tests and the `testing` feature only) and the real
//! client ([`GrpcAgents`]) is tested against real agents and a loopback fake.
//!
//! Every call carries the model's admin credential (`authorization: Bearer <token>`), has a
//! deadline (connect timeout; a short request timeout for reads and small writes; a long one
//! for `LoadAdapter`, which downloads), and is counted in the metrics by method and outcome.
//! Channels are cached per address and connect lazily; a replaced pod that reuses an IP is
//! reached through the same channel, which reconnects on its own.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use loraplane_proto::v1 as pb;
use loraplane_proto::v1::admin_client::AdminClient;
use tonic::transport::{Channel, Endpoint};

use crate::metrics::Metrics;
use crate::tenancy::Tenant;

/// An agent to call and the credential it accepts.
#[derive(Clone, PartialEq, Eq)]
pub struct Target {
    pub addr: SocketAddr,
    pub token: Arc<str>,
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the token.
        f.debug_struct("Target")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

/// Why an Admin call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AgentError {
    #[error("agent {addr}: {method}: unreachable: {message}")]
    Unavailable {
        addr: SocketAddr,
        method: &'static str,
        message: String,
    },
    #[error("agent {addr}: {method}: no answer within {timeout:?}")]
    Timeout {
        addr: SocketAddr,
        method: &'static str,
        timeout: Duration,
    },
    #[error("agent {addr}: {method}: the admin credential was refused: {message}")]
    Unauthenticated {
        addr: SocketAddr,
        method: &'static str,
        message: String,
    },
    /// The request itself is wrong for this agent (a bad adapter, a digest mismatch, a rank
    /// above the maximum): retrying the same request will not help.
    #[error("agent {addr}: {method}: refused: {message}")]
    Rejected {
        addr: SocketAddr,
        method: &'static str,
        message: String,
    },
    /// The agent is out of room (host cache, tenant adapter limit).
    #[error("agent {addr}: {method}: out of capacity: {message}")]
    Exhausted {
        addr: SocketAddr,
        method: &'static str,
        message: String,
    },
    #[error("agent {addr}: {method}: failed: {message}")]
    Failed {
        addr: SocketAddr,
        method: &'static str,
        message: String,
    },
}

impl AgentError {
    pub fn kind(&self) -> &'static str {
        match self {
            AgentError::Unavailable { .. } => "unavailable",
            AgentError::Timeout { .. } => "timeout",
            AgentError::Unauthenticated { .. } => "unauthenticated",
            AgentError::Rejected { .. } => "rejected",
            AgentError::Exhausted { .. } => "exhausted",
            AgentError::Failed { .. } => "failed",
        }
    }

    /// Whether repeating the same request cannot succeed until the spec changes.
    pub fn is_permanent(&self) -> bool {
        matches!(self, AgentError::Rejected { .. })
    }

    /// A one-line reason for a status message (the agent's words, without the address).
    pub fn message(&self) -> String {
        match self {
            AgentError::Timeout { timeout, .. } => format!("no answer within {timeout:?}"),
            AgentError::Unavailable { message, .. }
            | AgentError::Unauthenticated { message, .. }
            | AgentError::Rejected { message, .. }
            | AgentError::Exhausted { message, .. }
            | AgentError::Failed { message, .. } => message.clone(),
        }
    }

    /// Maps a gRPC status to the error it means for the operator.
    pub fn from_status(addr: SocketAddr, method: &'static str, status: &tonic::Status) -> Self {
        use tonic::Code;
        let message = status.message().to_owned();
        match status.code() {
            Code::Unavailable | Code::Cancelled => AgentError::Unavailable {
                addr,
                method,
                message,
            },
            Code::DeadlineExceeded => AgentError::Timeout {
                addr,
                method,
                timeout: Duration::ZERO,
            },
            Code::Unauthenticated | Code::PermissionDenied => AgentError::Unauthenticated {
                addr,
                method,
                message,
            },
            Code::InvalidArgument
            | Code::FailedPrecondition
            | Code::NotFound
            | Code::AlreadyExists
            | Code::OutOfRange
            | Code::Unimplemented => AgentError::Rejected {
                addr,
                method,
                message,
            },
            Code::ResourceExhausted => AgentError::Exhausted {
                addr,
                method,
                message,
            },
            Code::Ok | Code::Unknown | Code::Aborted | Code::Internal | Code::DataLoss => {
                AgentError::Failed {
                    addr,
                    method,
                    message,
                }
            }
        }
    }
}

/// A boxed Admin call.
pub type AgentFuture<'a, T> = BoxFuture<'a, Result<T, AgentError>>;

/// The Admin API as the reconcilers use it.
pub trait AgentApi: Send + Sync {
    /// Every adapter the agent knows (all tenants).
    fn list_adapters<'a>(&'a self, target: &'a Target) -> AgentFuture<'a, Vec<pb::AdapterInfo>>;
    fn stats<'a>(&'a self, target: &'a Target) -> AgentFuture<'a, pb::GetStatsResponse>;
    fn load<'a>(
        &'a self,
        target: &'a Target,
        request: pb::LoadAdapterRequest,
    ) -> AgentFuture<'a, pb::AdapterInfo>;
    /// `true` when the adapter was loaded and is now gone.
    fn unload<'a>(&'a self, target: &'a Target, adapter: pb::AdapterRef) -> AgentFuture<'a, bool>;
    /// Replaces the agent's tenant table.
    fn set_tenants<'a>(&'a self, target: &'a Target, tenants: &'a [Tenant])
    -> AgentFuture<'a, u32>;
}

/// The tenant table as the proto carries it.
pub fn tenants_to_proto(tenants: &[Tenant]) -> Vec<pb::TenantSpec> {
    tenants
        .iter()
        .map(|t| pb::TenantSpec {
            id: t.id.clone(),
            api_key_sha256: t.api_key_sha256.clone(),
            limits: Some(pb::TenantLimits {
                max_concurrent_requests: t.limits.max_concurrent_requests,
                max_tokens_per_minute: t.limits.max_tokens_per_minute,
                max_adapters: t.limits.max_adapters,
            }),
        })
        .collect()
}

/// Deadlines of Admin calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    pub connect: Duration,
    /// ListAdapters, GetStats, UnloadAdapter, SetTenants.
    pub request: Duration,
    /// LoadAdapter (fetches the adapter's files).
    pub load: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            connect: Duration::from_secs(3),
            request: Duration::from_secs(10),
            load: Duration::from_secs(600),
        }
    }
}

/// The Admin API over gRPC.
pub struct GrpcAgents {
    channels: Mutex<HashMap<SocketAddr, Channel>>,
    timeouts: Timeouts,
    metrics: Metrics,
}

impl GrpcAgents {
    pub fn new(timeouts: Timeouts, metrics: Metrics) -> Self {
        GrpcAgents {
            channels: Mutex::new(HashMap::new()),
            timeouts,
            metrics,
        }
    }

    fn client(
        &self,
        target: &Target,
        method: &'static str,
    ) -> Result<AdminClient<Channel>, AgentError> {
        let mut channels = self
            .channels
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(ch) = channels.get(&target.addr) {
            return Ok(AdminClient::new(ch.clone()));
        }
        let endpoint = Endpoint::from_shared(format!("http://{}", target.addr))
            .map_err(|e| AgentError::Failed {
                addr: target.addr,
                method,
                message: e.to_string(),
            })?
            .connect_timeout(self.timeouts.connect)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(10));
        let ch = endpoint.connect_lazy();
        channels.insert(target.addr, ch.clone());
        Ok(AdminClient::new(ch))
    }

    fn request<T>(target: &Target, msg: T, timeout: Duration) -> tonic::Request<T> {
        let mut req = tonic::Request::new(msg);
        req.set_timeout(timeout);
        if let Ok(v) = format!("Bearer {}", target.token).parse() {
            req.metadata_mut().insert("authorization", v);
        }
        req
    }

    /// Runs one call with its deadline, mapping and counting the outcome.
    async fn call<T, F>(
        &self,
        target: &Target,
        method: &'static str,
        timeout: Duration,
        fut: F,
    ) -> Result<T, AgentError>
    where
        F: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let started = Instant::now();
        let out = match tokio::time::timeout(timeout, fut).await {
            Err(_) => Err(AgentError::Timeout {
                addr: target.addr,
                method,
                timeout,
            }),
            Ok(Err(status)) => Err(
                match AgentError::from_status(target.addr, method, &status) {
                    AgentError::Timeout { addr, method, .. } => AgentError::Timeout {
                        addr,
                        method,
                        timeout,
                    },
                    e => e,
                },
            ),
            Ok(Ok(resp)) => Ok(resp.into_inner()),
        };
        let outcome = match &out {
            Ok(_) => "ok",
            Err(e) => e.kind(),
        };
        self.metrics.agent_call(method, outcome, started.elapsed());
        out
    }
}

impl AgentApi for GrpcAgents {
    fn list_adapters<'a>(&'a self, target: &'a Target) -> AgentFuture<'a, Vec<pb::AdapterInfo>> {
        Box::pin(async move {
            let method = "ListAdapters";
            let mut c = self.client(target, method)?;
            let t = self.timeouts.request;
            let req = Self::request(target, pb::ListAdaptersRequest::default(), t);
            self.call(target, method, t, c.list_adapters(req))
                .await
                .map(|r| r.adapters)
        })
    }

    fn stats<'a>(&'a self, target: &'a Target) -> AgentFuture<'a, pb::GetStatsResponse> {
        Box::pin(async move {
            let method = "GetStats";
            let mut c = self.client(target, method)?;
            let t = self.timeouts.request;
            let req = Self::request(target, pb::GetStatsRequest::default(), t);
            self.call(target, method, t, c.get_stats(req)).await
        })
    }

    fn load<'a>(
        &'a self,
        target: &'a Target,
        request: pb::LoadAdapterRequest,
    ) -> AgentFuture<'a, pb::AdapterInfo> {
        Box::pin(async move {
            let method = "LoadAdapter";
            let mut c = self.client(target, method)?;
            let t = self.timeouts.load;
            let req = Self::request(target, request, t);
            let resp = self.call(target, method, t, c.load_adapter(req)).await?;
            resp.adapter.ok_or_else(|| AgentError::Failed {
                addr: target.addr,
                method,
                message: "the response carries no adapter".into(),
            })
        })
    }

    fn unload<'a>(&'a self, target: &'a Target, adapter: pb::AdapterRef) -> AgentFuture<'a, bool> {
        Box::pin(async move {
            let method = "UnloadAdapter";
            let mut c = self.client(target, method)?;
            let t = self.timeouts.request;
            let req = Self::request(
                target,
                pb::UnloadAdapterRequest {
                    adapter: Some(adapter),
                },
                t,
            );
            self.call(target, method, t, c.unload_adapter(req))
                .await
                .map(|r| r.unloaded)
        })
    }

    fn set_tenants<'a>(
        &'a self,
        target: &'a Target,
        tenants: &'a [Tenant],
    ) -> AgentFuture<'a, u32> {
        Box::pin(async move {
            let method = "SetTenants";
            let mut c = self.client(target, method)?;
            let t = self.timeouts.request;
            let req = Self::request(
                target,
                pb::SetTenantsRequest {
                    tenants: tenants_to_proto(tenants),
                },
                t,
            );
            self.call(target, method, t, c.set_tenants(req))
                .await
                .map(|r| r.tenants)
        })
    }
}
