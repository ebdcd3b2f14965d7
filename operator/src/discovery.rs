//! Agent discovery: a model's agents are the ready pods of its StatefulSets (label
//! `loraplane.dev/base-model`), reached at the pod IP and the container's `grpc` port. Never a
//! hard-coded list. Pure: pods in, agents out.

use std::net::{IpAddr, SocketAddr};

use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;

use crate::desired::{GRPC_PORT, labels};
use crate::role::Role;

/// A ready agent.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Agent {
    pub pod: String,
    pub role: Role,
    pub node: Option<String>,
    pub addr: SocketAddr,
    /// Changes when the pod is replaced or its container restarts (`uid/restarts/ip`): a new
    /// incarnation starts with an empty adapter registry and tenant table.
    pub incarnation: String,
}

fn is_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

fn grpc_port(pod: &Pod) -> u16 {
    pod.spec
        .iter()
        .flat_map(|s| s.containers.iter())
        .flat_map(|c| c.ports.iter().flatten())
        .find(|p| p.name.as_deref() == Some("grpc"))
        .and_then(|p| u16::try_from(p.container_port).ok())
        .unwrap_or(GRPC_PORT as u16)
}

fn restarts(pod: &Pod) -> i32 {
    pod.status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .map(|cs| cs.iter().map(|c| c.restart_count).sum())
        .unwrap_or(0)
}

/// The agent a pod runs, if the pod is a ready, addressable agent of `model_name`.
pub fn agent(pod: &Pod, model_name: &str) -> Option<Agent> {
    let pod_labels = pod.labels();
    if pod_labels.get(labels::BASE_MODEL).map(String::as_str) != Some(model_name)
        || pod.metadata.deletion_timestamp.is_some()
        || !is_ready(pod)
    {
        return None;
    }
    let role = Role::parse(pod_labels.get(labels::ROLE)?)?;
    let ip: IpAddr = pod.status.as_ref()?.pod_ip.as_deref()?.parse().ok()?;
    let addr = SocketAddr::new(ip, grpc_port(pod));
    Some(Agent {
        pod: pod.name_any(),
        role,
        node: pod.spec.as_ref().and_then(|s| s.node_name.clone()),
        addr,
        incarnation: format!("{}/{}/{}", pod.uid().unwrap_or_default(), restarts(pod), ip),
    })
}

/// The ready agents of `model_name` among `pods` (of any model, in its namespace), sorted by pod.
pub fn agents<'a>(pods: impl IntoIterator<Item = &'a Pod>, model_name: &str) -> Vec<Agent> {
    let mut out: Vec<Agent> = pods
        .into_iter()
        .filter_map(|p| agent(p, model_name))
        .collect();
    out.sort();
    out
}
