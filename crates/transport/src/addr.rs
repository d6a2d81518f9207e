//! Addresses: `tcp://host:port` and `mem://name`, name resolution with a cache,
//! and the local-hostname fallback.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::str::FromStr;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use crate::TransportError;

/// Where a node can be reached.
///
/// ```
/// use meshwork_transport::Address;
///
/// let a: Address = "tcp://[::1]:7000".parse()?;
/// assert_eq!(a.to_string(), "tcp://[::1]:7000");
/// assert!(a.is_loopback());
///
/// let m: Address = "mem://alice".parse()?;
/// assert_eq!(m, Address::mem("alice"));
///
/// assert!("127.0.0.1:7000".parse::<Address>().is_err()); // the scheme is required
/// # Ok::<(), meshwork_transport::TransportError>(())
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Address {
    /// A TCP address; the host is an IP literal or a name to resolve.
    Tcp {
        /// Host part.
        host: Host,
        /// Port; 0 when listening means "any free port".
        port: u16,
    },
    /// A name on an in-memory network ([`crate::mem`]).
    Mem(String),
}

/// The host part of a TCP address.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Host {
    /// An IPv4 or IPv6 literal.
    Ip(IpAddr),
    /// A DNS name (resolved when dialling).
    Name(String),
}

impl Address {
    /// A TCP address for a socket address.
    pub fn tcp(addr: SocketAddr) -> Self {
        Address::Tcp {
            host: Host::Ip(addr.ip()),
            port: addr.port(),
        }
    }

    /// An in-memory address. The name is not checked; parsing `mem://name` is.
    pub fn mem(name: impl Into<String>) -> Self {
        Address::Mem(name.into())
    }

    /// The socket address, when this is TCP with an IP literal host.
    pub fn socket_addr(&self) -> Option<SocketAddr> {
        match self {
            Address::Tcp {
                host: Host::Ip(ip),
                port,
            } => Some(SocketAddr::new(*ip, *port)),
            _ => None,
        }
    }

    /// True for TCP addresses whose host is an IP literal.
    pub fn is_ip(&self) -> bool {
        self.socket_addr().is_some()
    }

    /// True for loopback IPs, `localhost`, and every in-memory address.
    pub fn is_loopback(&self) -> bool {
        match self {
            Address::Tcp {
                host: Host::Ip(ip), ..
            } => ip.is_loopback(),
            Address::Tcp {
                host: Host::Name(n),
                ..
            } => n.eq_ignore_ascii_case("localhost"),
            Address::Mem(_) => true,
        }
    }

    /// The scheme: `"tcp"` or `"mem"`.
    pub fn scheme(&self) -> &'static str {
        match self {
            Address::Tcp { .. } => "tcp",
            Address::Mem(_) => "mem",
        }
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Address::Tcp {
                host: Host::Ip(IpAddr::V6(ip)),
                port,
            } => write!(f, "tcp://[{ip}]:{port}"),
            Address::Tcp {
                host: Host::Ip(IpAddr::V4(ip)),
                port,
            } => write!(f, "tcp://{ip}:{port}"),
            Address::Tcp {
                host: Host::Name(name),
                port,
            } => write!(f, "tcp://{name}:{port}"),
            Address::Mem(name) => write!(f, "mem://{name}"),
        }
    }
}

fn bad(input: &str, reason: &'static str) -> TransportError {
    TransportError::InvalidAddress {
        input: input.to_string(),
        reason,
    }
}

fn valid_hostname(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

impl FromStr for Address {
    type Err = TransportError;

    fn from_str(input: &str) -> Result<Self, TransportError> {
        let (scheme, rest) = input
            .split_once("://")
            .ok_or_else(|| bad(input, "missing scheme (expected tcp:// or mem://)"))?;
        match scheme {
            "tcp" => parse_tcp(input, rest),
            "mem" => {
                if rest.is_empty() {
                    return Err(bad(input, "empty in-memory name"));
                }
                if rest.len() > 128
                    || !rest
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
                {
                    return Err(bad(
                        input,
                        "in-memory names are up to 128 of [A-Za-z0-9._-]",
                    ));
                }
                Ok(Address::Mem(rest.to_string()))
            }
            _ => Err(bad(input, "unknown scheme (expected tcp:// or mem://)")),
        }
    }
}

fn parse_tcp(input: &str, rest: &str) -> Result<Address, TransportError> {
    if rest.contains(['/', '?', '#', '@']) {
        return Err(bad(input, "paths, queries and user info are not allowed"));
    }
    let (host, port) = if let Some(after_bracket) = rest.strip_prefix('[') {
        let (ip, after) = after_bracket
            .split_once(']')
            .ok_or_else(|| bad(input, "unclosed '[' in IPv6 address"))?;
        let ip: std::net::Ipv6Addr = ip.parse().map_err(|_| bad(input, "invalid IPv6 address"))?;
        let port = after
            .strip_prefix(':')
            .ok_or_else(|| bad(input, "missing port"))?;
        (Host::Ip(IpAddr::V6(ip)), port)
    } else {
        let (host, port) = rest
            .rsplit_once(':')
            .ok_or_else(|| bad(input, "missing port"))?;
        if host.contains(':') {
            return Err(bad(
                input,
                "IPv6 addresses must be in brackets: tcp://[::1]:7000",
            ));
        }
        if host.is_empty() {
            return Err(bad(input, "missing host"));
        }
        let host = match host.parse::<Ipv4Addr>() {
            Ok(ip) => Host::Ip(IpAddr::V4(ip)),
            Err(_) if valid_hostname(host) => {
                if host.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
                    return Err(bad(input, "invalid IPv4 address"));
                }
                Host::Name(host.to_ascii_lowercase())
            }
            Err(_) => return Err(bad(input, "invalid host name")),
        };
        (host, port)
    };
    if port.is_empty() {
        return Err(bad(input, "missing port"));
    }
    let port: u16 = port
        .parse()
        .map_err(|_| bad(input, "port must be a number from 0 to 65535"))?;
    Ok(Address::Tcp { host, port })
}

/// Keeps only the TCP addresses whose host is an IP literal.
///
/// Like bndl.net's `filter_ip_addresses`: names are skipped, in-memory
/// addresses too.
pub fn filter_ip_addresses<'a>(addrs: impl IntoIterator<Item = &'a Address>) -> Vec<Address> {
    addrs.into_iter().filter(|a| a.is_ip()).cloned().collect()
}

/// An IP address other nodes can probably use to reach this host.
///
/// Tries, in order, the machine's host name and `localhost`, resolved with the
/// system resolver, and falls back to `127.0.0.1` (the bndl.net rule). Used to
/// advertise a listener bound to an unspecified address such as `0.0.0.0`.
pub async fn local_host_ip() -> IpAddr {
    let hostname = gethostname::gethostname().to_string_lossy().into_owned();
    for name in [hostname.as_str(), "localhost"] {
        if name.is_empty() {
            continue;
        }
        if let Ok(mut addrs) = tokio::net::lookup_host((name, 0)).await {
            if let Some(addr) = addrs.next() {
                return addr.ip();
            }
        }
    }
    IpAddr::V4(Ipv4Addr::LOCALHOST)
}

/// Resolves host names to socket addresses, caching answers for a while.
///
/// IP literals are returned as they are, without a lookup. The cache holds at
/// most [`Resolver::MAX_ENTRIES`] names; failed lookups are not cached.
#[derive(Debug)]
pub struct Resolver {
    ttl: Duration,
    cache: Mutex<HashMap<String, (Instant, Vec<IpAddr>)>>,
}

impl Default for Resolver {
    fn default() -> Self {
        Self::new(Duration::from_secs(60))
    }
}

impl Resolver {
    /// Most names kept in the cache.
    pub const MAX_ENTRIES: usize = 1024;

    /// A resolver whose answers are reused for `ttl`.
    pub fn new(ttl: Duration) -> Self {
        Resolver {
            ttl,
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// The socket addresses of a TCP address (several when a name has several IPs).
    pub async fn resolve(&self, addr: &Address) -> Result<Vec<SocketAddr>, TransportError> {
        let (host, port) = match addr {
            Address::Tcp { host, port } => (host, *port),
            Address::Mem(_) => return Err(TransportError::UnsupportedAddress(addr.to_string())),
        };
        let name = match host {
            Host::Ip(ip) => return Ok(vec![SocketAddr::new(*ip, port)]),
            Host::Name(name) => name,
        };
        let now = Instant::now();
        if let Some(ips) = self.cached(name, now) {
            return Ok(ips
                .into_iter()
                .map(|ip| SocketAddr::new(ip, port))
                .collect());
        }
        let ips: Vec<IpAddr> = tokio::net::lookup_host((name.as_str(), 0))
            .await
            .map_err(|e| TransportError::Resolve {
                host: name.clone(),
                reason: e.to_string(),
            })?
            .map(|a| a.ip())
            .collect();
        if ips.is_empty() {
            return Err(TransportError::Resolve {
                host: name.clone(),
                reason: "no addresses".into(),
            });
        }
        self.store(name, now, ips.clone());
        Ok(ips
            .into_iter()
            .map(|ip| SocketAddr::new(ip, port))
            .collect())
    }

    fn cached(&self, name: &str, now: Instant) -> Option<Vec<IpAddr>> {
        let cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        cache
            .get(name)
            .filter(|(at, _)| now.duration_since(*at) < self.ttl)
            .map(|(_, ips)| ips.clone())
    }

    fn store(&self, name: &str, now: Instant, ips: Vec<IpAddr>) {
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if cache.len() >= Self::MAX_ENTRIES {
            let ttl = self.ttl;
            cache.retain(|_, (at, _)| now.duration_since(*at) < ttl);
            if cache.len() >= Self::MAX_ENTRIES {
                cache.clear();
            }
        }
        cache.insert(name.to_string(), (now, ips));
    }

    /// Number of names currently cached (for tests and metrics).
    pub fn cached_names(&self) -> usize {
        self.cache.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv6Addr;

    fn parse(s: &str) -> Address {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    fn reason(s: &str) -> &'static str {
        match s.parse::<Address>() {
            Err(TransportError::InvalidAddress { reason, .. }) => reason,
            other => panic!("{s}: expected InvalidAddress, got {other:?}"),
        }
    }

    #[test]
    fn parses_ipv4_ipv6_names_and_mem() {
        assert_eq!(
            parse("tcp://127.0.0.1:7000"),
            Address::tcp("127.0.0.1:7000".parse().unwrap())
        );
        assert_eq!(
            parse("tcp://[::1]:7000"),
            Address::Tcp {
                host: Host::Ip(IpAddr::V6(Ipv6Addr::LOCALHOST)),
                port: 7000
            }
        );
        assert_eq!(
            parse("tcp://Node-1.Example.org:80"),
            Address::Tcp {
                host: Host::Name("node-1.example.org".into()),
                port: 80
            }
        );
        assert_eq!(parse("mem://a_b.c-1"), Address::mem("a_b.c-1"));
        assert_eq!(parse("tcp://127.0.0.1:0").socket_addr().unwrap().port(), 0);
    }

    #[test]
    fn display_round_trips() {
        for s in [
            "tcp://127.0.0.1:7000",
            "tcp://[::1]:7000",
            "tcp://[fe80::1:2]:1",
            "tcp://localhost:65535",
            "mem://x",
        ] {
            assert_eq!(parse(s).to_string(), s);
        }
    }

    #[test]
    fn bad_addresses_have_clear_reasons() {
        assert!(reason("127.0.0.1:7000").contains("scheme"));
        assert!(reason("udp://127.0.0.1:7000").contains("unknown scheme"));
        assert!(reason("tcp://127.0.0.1").contains("port"));
        assert!(reason("tcp://127.0.0.1:").contains("port"));
        assert!(reason("tcp://127.0.0.1:70000").contains("65535"));
        assert!(reason("tcp://:7000").contains("host"));
        assert!(reason("tcp://::1:7000").contains("brackets"));
        assert!(reason("tcp://[::1:7000").contains("unclosed"));
        assert!(reason("tcp://[zz]:7000").contains("IPv6"));
        assert!(reason("tcp://[::1]7000").contains("port"));
        assert!(reason("tcp://999.1.1.1:80").contains("IPv4"));
        assert!(reason("tcp://bad_host:80").contains("host name"));
        assert!(reason("tcp://h:80/path").contains("paths"));
        assert!(reason("mem://").contains("empty"));
        assert!(reason("mem://a b").contains("[A-Za-z0-9._-]"));
    }

    #[test]
    fn loopback_and_ip_checks() {
        assert!(parse("tcp://127.0.0.1:1").is_loopback());
        assert!(parse("tcp://[::1]:1").is_loopback());
        assert!(parse("tcp://localhost:1").is_loopback());
        assert!(!parse("tcp://10.0.0.1:1").is_loopback());
        let all = [
            parse("tcp://127.0.0.1:1"),
            parse("tcp://localhost:1"),
            parse("mem://a"),
            parse("tcp://[::1]:2"),
        ];
        assert_eq!(
            filter_ip_addresses(&all),
            vec![parse("tcp://127.0.0.1:1"), parse("tcp://[::1]:2")]
        );
    }

    #[tokio::test]
    async fn resolver_caches_names_and_passes_ips_through() {
        let r = Resolver::default();
        let ip = r.resolve(&parse("tcp://127.0.0.1:5")).await.unwrap();
        assert_eq!(ip, vec!["127.0.0.1:5".parse().unwrap()]);
        assert_eq!(r.cached_names(), 0);
        let local = r.resolve(&parse("tcp://localhost:5")).await.unwrap();
        assert!(local.iter().all(|a| a.ip().is_loopback() && a.port() == 5));
        assert_eq!(r.cached_names(), 1);
        assert!(matches!(
            r.resolve(&parse("mem://x")).await,
            Err(TransportError::UnsupportedAddress(_))
        ));
    }

    proptest::proptest! {
        #[test]
        fn parsing_never_panics(s in ".{0,64}") {
            let _ = s.parse::<Address>();
        }

        #[test]
        fn socket_addresses_round_trip(ip in proptest::prelude::any::<IpAddr>(), port in 0u16..) {
            let a = Address::tcp(SocketAddr::new(ip, port));
            proptest::prop_assert_eq!(a.to_string().parse::<Address>().unwrap(), a);
        }
    }
}
