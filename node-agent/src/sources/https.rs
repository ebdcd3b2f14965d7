//! `https://` sources: a directory URL whose files are fetched one by one
//! (`<url>/adapter_config.json`, `<url>/adapter_model.safetensors`; for models the config,
//! tokenizer files, and the shards a `model.safetensors.index.json` names or
//! `model.safetensors`), or one archive URL (`….tar`, `….tar.gz`, `….tgz`) unpacked by
//! [`super::tarball`].
//!
//! Every request goes through a client that resolves names with the guarded resolver (no
//! non-public address unless allowed), checks every redirect target (scheme, IP literal, at
//! most [`MAX_REDIRECTS`]), ignores proxy environment variables (a proxy would resolve names
//! on our behalf, unchecked), and does not decompress (the size cap counts bytes on the wire).
//! Servers are trusted through the built-in public roots plus, when configured, a private CA
//! bundle ([`SourceOptions::ca`]: `--source-ca-file` or `SSL_CERT_FILE`).
//!
//! Files land in the digest-keyed download cache under `cache_dir/https` ([`super::download`]).

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt as _;

use super::download::{self, Body, Remote};
use super::net::{self, Blocked, GuardedResolver};
use super::{Artifact, Ctx, SourceError, SourceOptions, tarball};
use crate::lora::ids::Digest;

/// Redirects followed per request.
pub const MAX_REDIRECTS: usize = 5;

pub(crate) async fn fetch(
    ctx: &Ctx,
    uri: &str,
    artifact: Artifact,
    expected: Option<&Digest>,
    opts: &SourceOptions,
) -> Result<std::path::PathBuf, SourceError> {
    let mut base =
        reqwest::Url::parse(uri).map_err(|e| ctx.unsupported(format!("invalid URL: {e}")))?;
    if base.query().is_some() || base.fragment().is_some() {
        return Err(ctx.unsupported("a source URL takes no query or fragment"));
    }
    let policy = opts.address_policy();
    policy
        .check_url(&base, opts.allow_http)
        .map_err(|b| ctx.forbidden(b.to_string()))?;
    let archive = base
        .path_segments()
        .and_then(|mut s| s.next_back())
        .filter(|name| tarball::is_tarball(name))
        .map(str::to_owned);
    if archive.is_none() && !base.path().ends_with('/') {
        let path = format!("{}/", base.path());
        base.set_path(&path);
    }
    let client = client(opts, policy).map_err(|e| ctx.io("building the HTTP client", e))?;
    let remote = HttpRemote {
        ctx,
        client: &client,
        base: &base,
    };
    download::fetch(
        ctx,
        &remote,
        archive.as_deref(),
        artifact,
        expected,
        opts,
        "https",
    )
    .await
}

fn client(opts: &SourceOptions, policy: net::AddressPolicy) -> reqwest::Result<reqwest::Client> {
    let allow_http = opts.allow_http;
    let redirect_policy = policy.clone();
    let mut builder = reqwest::Client::builder()
        .no_proxy()
        .dns_resolver(Arc::new(GuardedResolver {
            inner: opts.resolver.clone(),
            policy,
        }))
        .redirect(reqwest::redirect::Policy::custom(move |attempt| {
            if attempt.previous().len() > MAX_REDIRECTS {
                return attempt.error(Blocked::TooManyRedirects(MAX_REDIRECTS));
            }
            match redirect_policy.check_url(attempt.url(), allow_http) {
                Ok(()) => attempt.follow(),
                Err(blocked) => attempt.error(blocked),
            }
        }))
        .connect_timeout(opts.timeout.min(Duration::from_secs(30)))
        .user_agent(concat!("loraplane-agent/", env!("CARGO_PKG_VERSION")));
    if let Some(ca) = &opts.ca {
        for cert in reqwest::Certificate::from_pem_bundle(ca.pem())? {
            builder = builder.add_root_certificate(cert);
        }
    }
    builder.build()
}

/// The files of one `https://` directory (or the directory holding one archive).
struct HttpRemote<'a> {
    ctx: &'a Ctx,
    client: &'a reqwest::Client,
    base: &'a reqwest::Url,
}

impl Remote for HttpRemote<'_> {
    async fn open(&self, name: &str) -> Result<Option<Body>, SourceError> {
        let ctx = self.ctx;
        let url = self
            .base
            .join(name)
            .map_err(|e| ctx.unsupported(format!("cannot form the URL of {name}: {e}")))?;
        let response = self
            .client
            .get(url)
            .send()
            .await
            .map_err(|e| classify(ctx, name, e))?;
        let status = response.status();
        if status == reqwest::StatusCode::NOT_FOUND || status == reqwest::StatusCode::GONE {
            return Ok(None);
        }
        if !status.is_success() {
            return Err(ctx.fetch(format!("{name}: HTTP {status}")));
        }
        let size = response.content_length();
        let (ctx, name) = (ctx.clone(), name.to_owned());
        let chunks = response
            .bytes_stream()
            .map(move |chunk| chunk.map_err(|e| classify(&ctx, &name, e)))
            .boxed();
        Ok(Some(Body { size, chunks }))
    }
}

/// Maps a client error: a policy refusal anywhere in its chain is [`SourceError::Forbidden`];
/// everything else is a fetch failure, described without the URL (it may carry credentials).
fn classify(ctx: &Ctx, file: &str, e: reqwest::Error) -> SourceError {
    if let Some(blocked) = net::find_blocked(&e) {
        return ctx.forbidden(blocked.to_string());
    }
    let e = e.without_url();
    let mut reason = format!("{file}: {e}");
    let mut cur = std::error::Error::source(&e);
    let mut tls = false;
    while let Some(inner) = cur {
        let text = inner.to_string();
        tls |= text.contains("certificate") || text.contains("UnknownIssuer");
        reason.push_str(&format!(": {text}"));
        cur = inner.source();
    }
    if tls {
        // The chain reads "error sending request: client error (Connect): invalid peer
        // certificate: UnknownIssuer"; say what it means and what to do.
        reason = format!(
            "TLS: the server's certificate is not trusted ({reason}); a private CA goes in \
             --source-ca-file or SSL_CERT_FILE"
        );
    }
    ctx.fetch(reason)
}
