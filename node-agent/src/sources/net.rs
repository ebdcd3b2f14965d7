//! Which network addresses a download may reach, and name resolution that enforces it.
//!
//! The rule is applied to *resolved IP addresses*, at connection time, through the HTTP
//! client's resolver hook: a name is resolved once, every address is checked, and the
//! connection uses exactly the checked addresses, so DNS rebinding between check and connect
//! is impossible. Hosts written as IP literals never reach a resolver, so URLs (the first and
//! every redirect target) are also checked directly with [`AddressPolicy::check_url`].

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;

/// Resolves a host name to IP addresses. Injectable so tests can map names to loopback
/// addresses without DNS.
pub trait HostResolver: Send + Sync + 'static {
    fn resolve<'a>(
        &'a self,
        host: &'a str,
    ) -> Pin<Box<dyn Future<Output = std::io::Result<Vec<IpAddr>>> + Send + 'a>>;
}

/// The operating system's resolver (`getaddrinfo` through tokio).
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemResolver;

impl HostResolver for SystemResolver {
    fn resolve<'a>(
        &'a self,
        host: &'a str,
    ) -> Pin<Box<dyn Future<Output = std::io::Result<Vec<IpAddr>>> + Send + 'a>> {
        Box::pin(async move {
            let addrs = tokio::net::lookup_host((host, 0)).await?;
            Ok(addrs.map(|a| a.ip()).collect())
        })
    }
}

/// A fixed table of names; unknown names fail to resolve.
#[derive(Debug, Clone, Default)]
pub struct StaticResolver(pub HashMap<String, Vec<IpAddr>>);

impl HostResolver for StaticResolver {
    fn resolve<'a>(
        &'a self,
        host: &'a str,
    ) -> Pin<Box<dyn Future<Output = std::io::Result<Vec<IpAddr>>> + Send + 'a>> {
        let found = self.0.get(&host.to_ascii_lowercase()).cloned();
        Box::pin(async move {
            found.ok_or_else(|| {
                std::io::Error::new(std::io::ErrorKind::NotFound, "unknown host (static table)")
            })
        })
    }
}

/// Whether `ip` is a globally routable unicast address. Refused: loopback, private (RFC 1918,
/// IPv6 unique-local), link-local (incl. cloud metadata at 169.254.169.254), carrier-grade NAT,
/// unspecified, broadcast, multicast, documentation and reserved ranges, and IPv4-mapped or
/// IPv4-compatible IPv6 forms of any of these.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_public_v4(v4),
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_public_v4(v4);
            }
            let s = v6.segments();
            // IPv4-compatible (::a.b.c.d, deprecated) and NAT64 (64:ff9b::/96) embed an IPv4.
            if s[..6] == [0; 6] || s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
                let v4 =
                    Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8);
                return !v6.is_unspecified() && !v6.is_loopback() && is_public_v4(v4);
            }
            !(v6.is_unspecified()
                || v6.is_loopback()
                || v6.is_multicast()
                || (s[0] & 0xfe00) == 0xfc00 // unique local fc00::/7
                || (s[0] & 0xffc0) == 0xfe80 // link-local fe80::/10
                || (s[0] & 0xffc0) == 0xfec0 // site-local fec0::/10 (deprecated)
                || (s[0] == 0x2001 && s[1] == 0x0db8)) // documentation
        }
    }
}

fn is_public_v4(ip: Ipv4Addr) -> bool {
    let [a, b, ..] = ip.octets();
    !(ip.is_unspecified()
        || ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local()
        || ip.is_broadcast()
        || ip.is_multicast()
        || ip.is_documentation()
        || a == 0 // "this network"
        || (a == 100 && (64..128).contains(&b)) // carrier-grade NAT 100.64/10
        || (a == 192 && b == 0 && ip.octets()[2] == 0) // IETF protocol assignments
        || (a == 198 && (18..20).contains(&b)) // benchmarking
        || a >= 240) // reserved
}

/// Why a destination was refused; carried through the HTTP client's error chain.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Blocked {
    #[error("{host} resolves to {ip}, a non-public address (private networks are not allowed)")]
    Address { host: String, ip: IpAddr },
    #[error("{scheme}:// URLs are not allowed (only https)")]
    Scheme { scheme: String },
    #[error("too many redirects (more than {0})")]
    TooManyRedirects(usize),
    #[error("the URL has no host")]
    NoHost,
}

/// The private-address rule.
#[derive(Debug, Clone, Default)]
pub struct AddressPolicy {
    pub allow_private: bool,
    /// Lower-case host names or IP literals exempt from the rule.
    pub allowed_hosts: HashSet<String>,
}

impl AddressPolicy {
    fn exempt(&self, host: &str) -> bool {
        self.allow_private
            || self
                .allowed_hosts
                .contains(&host.trim_matches(['[', ']']).to_ascii_lowercase())
    }

    /// Refuses `ips` for `host` when any of them is not public (one bad record taints the name:
    /// the client could pick any of them).
    pub fn check_resolved(&self, host: &str, ips: &[IpAddr]) -> Result<(), Blocked> {
        if self.exempt(host) {
            return Ok(());
        }
        match ips.iter().find(|ip| !is_public(**ip)) {
            Some(ip) => Err(Blocked::Address {
                host: host.to_owned(),
                ip: *ip,
            }),
            None => Ok(()),
        }
    }

    /// Checks a URL about to be requested: its scheme, and its host when that is an IP literal
    /// (names are checked when resolved).
    pub fn check_url(&self, url: &reqwest::Url, allow_http: bool) -> Result<(), Blocked> {
        match url.scheme() {
            "https" => {}
            "http" if allow_http => {}
            other => {
                return Err(Blocked::Scheme {
                    scheme: other.to_owned(),
                });
            }
        }
        let host = url.host_str().ok_or(Blocked::NoHost)?;
        // The URL parser normalises IP literals (decimal, hex and octal IPv4 forms included),
        // so a literal is exactly what parses as one here.
        match host.trim_matches(['[', ']']).parse::<IpAddr>() {
            Ok(ip) => self.check_resolved(host, &[ip]),
            Err(_) => Ok(()),
        }
    }
}

/// The HTTP client's resolver: resolves through a [`HostResolver`] and refuses non-public
/// addresses per the policy.
pub(crate) struct GuardedResolver {
    pub inner: Arc<dyn HostResolver>,
    pub policy: AddressPolicy,
}

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let inner = self.inner.clone();
        let policy = self.policy.clone();
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let ips = inner.resolve(&host).await?;
            if ips.is_empty() {
                return Err("the host resolved to no addresses".into());
            }
            policy.check_resolved(&host, &ips)?;
            let addrs: reqwest::dns::Addrs =
                Box::new(ips.into_iter().map(|ip| SocketAddr::new(ip, 0)));
            Ok(addrs)
        })
    }
}

/// Finds a [`Blocked`] in an error's source chain.
pub(crate) fn find_blocked<'a>(err: &'a (dyn std::error::Error + 'static)) -> Option<&'a Blocked> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = cur {
        if let Some(b) = e.downcast_ref::<Blocked>() {
            return Some(b);
        }
        cur = e.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse()
            .unwrap_or(IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED))
    }

    #[test]
    fn classifies_addresses() {
        for bad in [
            "127.0.0.1",
            "127.8.9.10",
            "10.0.0.1",
            "172.16.5.4",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "255.255.255.255",
            "224.0.0.1",
            "::1",
            "::",
            "fe80::1",
            "fd00::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "::10.0.0.1",
            "64:ff9b::10.0.0.1",
        ] {
            assert!(!is_public(ip(bad)), "{bad} must not be public");
        }
        for good in [
            "8.8.8.8",
            "1.1.1.1",
            "2606:4700:4700::1111",
            "::ffff:8.8.8.8",
        ] {
            assert!(is_public(ip(good)), "{good} is public");
        }
    }

    #[test]
    fn policy_exemptions() {
        let strict = AddressPolicy::default();
        assert!(strict.check_resolved("x", &[ip("8.8.8.8")]).is_ok());
        assert!(
            strict
                .check_resolved("x", &[ip("8.8.8.8"), ip("10.1.1.1")])
                .is_err()
        );
        let mirror = AddressPolicy {
            allow_private: false,
            allowed_hosts: HashSet::from(["mirror.internal".to_owned()]),
        };
        assert!(
            mirror
                .check_resolved("Mirror.Internal", &[ip("10.1.1.1")])
                .is_ok()
        );
        assert!(mirror.check_resolved("other", &[ip("10.1.1.1")]).is_err());
    }

    #[test]
    fn urls_with_ip_literals_are_checked() {
        let p = AddressPolicy::default();
        let url = |s: &str| reqwest::Url::parse(s).ok();
        let check = |s: &str, http| url(s).map(|u| p.check_url(&u, http).is_ok());
        assert_eq!(check("https://127.0.0.1/x", false), Some(false));
        assert_eq!(check("https://[::1]/x", false), Some(false));
        assert_eq!(check("https://169.254.169.254/x", false), Some(false));
        assert_eq!(check("https://8.8.8.8/x", false), Some(true));
        assert_eq!(check("https://example.com/x", false), Some(true));
        assert_eq!(check("http://example.com/x", false), Some(false));
        assert_eq!(check("http://example.com/x", true), Some(true));
        assert_eq!(check("ftp://example.com/x", true), Some(false));
    }
}
