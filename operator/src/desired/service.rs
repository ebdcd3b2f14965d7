//! Services: a headless Service per role (stable pod DNS names; the prefill one also carries
//! the KV port, so decode agents resolve their prefill peers through it) and the client Service over the pods that own requests (decode, or unified).

use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::{
    GRPC_PORT, HTTP_PORT, KV_PORT, child_meta, client_service_name, common_labels, role_labels,
    role_name, role_selector,
};
use crate::crd::{BaseModel, ServingMode};
use crate::role::Role;

fn ports(kv: bool) -> Vec<ServicePort> {
    let mut ports = vec![
        ServicePort {
            name: Some("grpc".into()),
            port: GRPC_PORT,
            target_port: Some(IntOrString::String("grpc".into())),
            protocol: Some("TCP".into()),
            app_protocol: Some("kubernetes.io/h2c".into()),
            ..ServicePort::default()
        },
        ServicePort {
            name: Some("http".into()),
            port: HTTP_PORT,
            target_port: Some(IntOrString::String("http".into())),
            protocol: Some("TCP".into()),
            app_protocol: Some("http".into()),
            ..ServicePort::default()
        },
    ];
    if kv {
        ports.push(ServicePort {
            name: Some("kv".into()),
            port: KV_PORT,
            target_port: Some(IntOrString::String("kv".into())),
            protocol: Some("TCP".into()),
            app_protocol: Some("kubernetes.io/h2c".into()),
            ..ServicePort::default()
        });
    }
    ports
}

/// The headless Service `<model>-<role>` (the StatefulSet's `serviceName`): only ready pods
/// are published, so a peer that is draining or starting is not picked.
pub fn headless(model: &BaseModel, role: Role) -> Service {
    Service {
        metadata: child_meta(model, role_name(model, role), role_labels(model, role)),
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".into()),
            selector: Some(role_selector(model, role)),
            publish_not_ready_addresses: Some(false),
            ports: Some(ports(role == Role::Prefill)),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

/// The role whose pods the client Service selects.
pub fn client_role(model: &BaseModel) -> Role {
    match model.spec.serving.mode {
        ServingMode::Unified => Role::Unified,
        ServingMode::Disaggregated => Role::Decode,
    }
}

/// The client Service `<model>` (gRPC and HTTP) over the decode or unified pods.
pub fn client(model: &BaseModel) -> Service {
    Service {
        metadata: child_meta(model, client_service_name(model), common_labels(model)),
        spec: Some(ServiceSpec {
            type_: Some("ClusterIP".into()),
            selector: Some(role_selector(model, client_role(model))),
            ports: Some(ports(false)),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

/// The gRPC endpoint reported in status: `<model>.<namespace>.svc:50051`.
pub fn endpoint(model: &BaseModel) -> String {
    format!(
        "{}.{}.svc:{GRPC_PORT}",
        client_service_name(model),
        super::namespace(model)
    )
}
