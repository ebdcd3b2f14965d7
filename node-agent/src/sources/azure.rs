//! What is particular to `az://container/prefix` sources (the `object_store` crate's `azure`
//! store, Azure Blob Storage): the settings and the store's construction. Fetching, listing and
//! error mapping are shared with the other object stores in [`super::cloud`].
//!
//! The storage account is configuration, not part of the URI (the `az://container/path`
//! convention of `object_store` and fsspec): `AZURE_STORAGE_ACCOUNT_NAME`, with
//! `AZURE_STORAGE_ENDPOINT` for another endpoint (a sovereign cloud, a private endpoint, the
//! Azurite emulator's `http://host:10000/devstoreaccount1`; plain `http://` is allowed because it
//! is trusted configuration). Credentials, in `object_store`'s order: a bearer token
//! (`AZURE_STORAGE_TOKEN`), the account key (`AZURE_STORAGE_ACCOUNT_KEY`), AKS Workload Identity
//! (`AZURE_CLIENT_ID`, `AZURE_TENANT_ID`, `AZURE_FEDERATED_TOKEN_FILE`, as its webhook injects
//! them), a service principal's secret (`AZURE_CLIENT_SECRET`), a SAS token
//! (`AZURE_STORAGE_SAS_TOKEN`), otherwise the VM's managed identity.

use std::sync::Arc;

use object_store::azure::{AzureConfigKey, MicrosoftAzureBuilder};
use object_store::{ClientOptions, ObjectStore, RetryConfig};

use super::cloud::{BuildFailure, apply_settings, finish, setting};
use super::{Ctx, SourceOptions};

/// The environment variables the serving layer passes on, and the `object_store` setting each
/// one becomes.
pub const ENVIRONMENT: &[(&str, &str)] = &[
    ("AZURE_STORAGE_ACCOUNT_NAME", "azure_storage_account_name"),
    ("AZURE_STORAGE_ACCOUNT_KEY", "azure_storage_account_key"),
    ("AZURE_STORAGE_SAS_TOKEN", "azure_storage_sas_key"),
    ("AZURE_STORAGE_TOKEN", "azure_storage_token"),
    ("AZURE_STORAGE_ENDPOINT", "azure_storage_endpoint"),
    ("AZURE_CLIENT_ID", "azure_storage_client_id"),
    ("AZURE_CLIENT_SECRET", "azure_storage_client_secret"),
    ("AZURE_TENANT_ID", "azure_storage_tenant_id"),
    ("AZURE_AUTHORITY_HOST", "azure_storage_authority_host"),
    ("AZURE_FEDERATED_TOKEN_FILE", "azure_federated_token_file"),
    ("AZURE_SKIP_SIGNATURE", "azure_skip_signature"),
];

/// Settings whose values are secrets (scrubbed from messages).
const SECRET_SETTINGS: &[&str] = &[
    "azure_storage_account_key",
    "azure_storage_sas_key",
    "azure_storage_token",
    "azure_storage_client_secret",
];

/// The `az://` store for one container, and the secrets its messages must not show.
pub(crate) fn build(
    ctx: &Ctx,
    container: &str,
    opts: &SourceOptions,
    client: ClientOptions,
    retry: RetryConfig,
) -> Result<(Arc<dyn ObjectStore>, Vec<String>), BuildFailure> {
    let settings = &opts.azure.settings;
    // A plain-http endpoint is configuration written down on purpose; object_store refuses it
    // unless told, and the client options must carry it before they are handed over.
    let client = match setting(settings, "azure_storage_endpoint") {
        Some(e) if e.starts_with("http://") => client.with_allow_http(true),
        _ => client,
    };
    let builder = MicrosoftAzureBuilder::new()
        .with_client_options(client)
        .with_retry(retry)
        .with_container_name(container);
    let mut secrets = Vec::new();
    let builder = apply_settings(
        ctx,
        builder,
        settings,
        SECRET_SETTINGS,
        &mut secrets,
        |b: MicrosoftAzureBuilder, k: AzureConfigKey, v| b.with_config(k, v),
    )?;
    finish(builder.build(), secrets)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_variable_names_a_setting_object_store_knows() {
        super::super::cloud::check_environment::<AzureConfigKey>(ENVIRONMENT, SECRET_SETTINGS);
    }
}
