//! Callbacks of finished submissions: where they may go, how they are signed, and their
//! delivery by the agent process itself (never from inside a sandbox, whose network is off).
//!
//! The SSRF guard refuses loopback, private, shared (CGNAT), link-local, unique-local,
//! multicast, broadcast, reserved and metadata addresses (`169.254.169.254`, `fd00:ec2::254`),
//! IPv4 ones also when mapped into IPv6, unless an operator allowlists them
//! (`--callback-allow`: CIDRs, addresses or host names). A literal address is checked when the
//! submission arrives (400); a host name is resolved at each delivery, every address it
//! resolves to is checked, and the connection is pinned to the checked address (so a DNS answer
//! that changes between the check and the connect cannot redirect it), with redirects off.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use hmac::{Hmac, Mac};
use ipnet::IpNet;
use reqwest::Url;
use sha2::Sha256;

use codefleet_shared::{ErrorCode, Problem};

/// The header carrying a callback's signature: `sha256=<hex HMAC-SHA256 of the body>`.
pub const SIGNATURE_HEADER: &str = "x-codefleet-signature";
/// The header carrying the submission's token.
pub const TOKEN_HEADER: &str = "x-codefleet-submission";
/// The longest `callback_url` accepted.
pub const MAX_URL_BYTES: usize = 2_048;
/// The longest wait between two attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// Why an address may not be called back, or `None` when it is a public one.
pub fn forbidden(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => forbidden_v4(v4),
        IpAddr::V6(v6) => forbidden_v6(v6),
    }
}

fn forbidden_v4(ip: Ipv4Addr) -> Option<&'static str> {
    let [a, b, c, _] = ip.octets();
    Some(match (a, b, c) {
        _ if ip == Ipv4Addr::new(169, 254, 169, 254) => "a cloud metadata address",
        _ if ip.is_loopback() => "a loopback address",
        _ if ip.is_private() => "a private address",
        _ if ip.is_link_local() => "a link-local address",
        _ if ip.is_multicast() => "a multicast address",
        _ if ip.is_broadcast() => "the broadcast address",
        (0, _, _) => "an address of this network (0.0.0.0/8)",
        (100, 64..=127, _) => "a shared (carrier-grade NAT) address",
        (192, 0, 0) => "an IETF protocol address (192.0.0.0/24)",
        (198, 18..=19, _) => "a benchmarking address",
        (240..=255, _, _) => "a reserved address",
        _ => return None,
    })
}

fn forbidden_v6(ip: Ipv6Addr) -> Option<&'static str> {
    let segments = ip.segments();
    if ip == Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254) {
        return Some("a cloud metadata address");
    }
    // An IPv4 address in IPv6 clothes (mapped, NAT64, 6to4) is judged as that address.
    if let Some(v4) = ip.to_ipv4_mapped() {
        return forbidden_v4(v4);
    }
    let embedded = |hi: u16, lo: u16| Ipv4Addr::from((u32::from(hi) << 16) | u32::from(lo));
    if segments[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        return forbidden_v4(embedded(segments[6], segments[7]));
    }
    if segments[0] == 0x2002 {
        return forbidden_v4(embedded(segments[1], segments[2]));
    }
    Some(match segments[0] {
        _ if ip.is_unspecified() => "the unspecified address",
        _ if ip.is_loopback() => "a loopback address",
        s if s & 0xfe00 == 0xfc00 => "a unique-local address",
        s if s & 0xffc0 == 0xfe80 => "a link-local address",
        s if s & 0xffc0 == 0xfec0 => "a site-local address",
        s if s & 0xff00 == 0xff00 => "a multicast address",
        _ if segments[..6] == [0; 6] => "an IPv4-compatible address",
        _ => return None,
    })
}

/// The operator's exceptions to [`forbidden`].
#[derive(Debug, Clone, Default)]
pub struct Allowlist {
    nets: Vec<IpNet>,
    hosts: Vec<String>,
}

impl Allowlist {
    /// From `--callback-allow` entries: a CIDR or an address allows those addresses, anything
    /// else names a host allowed whatever it resolves to.
    pub fn new(entries: &[String]) -> Allowlist {
        let mut list = Allowlist::default();
        for entry in entries.iter().map(|e| e.trim()).filter(|e| !e.is_empty()) {
            if let Ok(net) = entry.parse::<IpNet>() {
                list.nets.push(net);
            } else if let Ok(ip) = entry.trim_matches(['[', ']']).parse::<IpAddr>() {
                list.nets.push(IpNet::from(ip));
            } else {
                list.hosts
                    .push(entry.trim_end_matches('.').to_ascii_lowercase());
            }
        }
        list
    }

    fn allows_host(&self, host: &str) -> bool {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        self.hosts.contains(&host)
    }

    /// `Err(why)` when `ip` may not be called back.
    pub fn check(&self, ip: IpAddr) -> Result<(), String> {
        let canonical = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        match forbidden(ip) {
            Some(_) if self.nets.iter().any(|n| n.contains(&ip) || n.contains(&canonical)) => {
                Ok(())
            }
            Some(why) => Err(format!(
                "{ip} is {why}; callbacks go to public addresses only, unless an operator allowlists it (--callback-allow)"
            )),
            None => Ok(()),
        }
    }
}

/// A callback URL that passed the submit-time checks.
#[derive(Debug, Clone)]
pub struct Target {
    pub url: Url,
    host: Host,
    port: u16,
}

#[derive(Debug, Clone)]
enum Host {
    Ip(IpAddr),
    Name(String),
}

fn invalid(detail: String) -> Problem {
    Problem::new(ErrorCode::InvalidRequest, format!("callback_url: {detail}"))
}

/// Checks a `callback_url` when a submission arrives: an absolute `http://` URL whose host, when
/// it is an address (or `localhost`), is one callbacks may go to.
pub fn check_url(url: &str, allow: &Allowlist) -> Result<Target, Problem> {
    if url.len() > MAX_URL_BYTES {
        return Err(invalid(format!("longer than {MAX_URL_BYTES} bytes")));
    }
    let parsed = Url::parse(url).map_err(|e| invalid(format!("not an absolute URL: {e}")))?;
    match parsed.scheme() {
        "http" => {}
        "https" => {
            return Err(invalid(
                "https callbacks are not supported by this build; use http:// (the body is signed)"
                    .to_string(),
            ))
        }
        other => return Err(invalid(format!("scheme {other:?} is not http"))),
    }
    let port = parsed.port_or_known_default().unwrap_or(80);
    // The URL parser has already made every IPv4 spelling (`0x7f000001`, `127.1`) canonical.
    let host = match parsed.host_str() {
        Some(text) => match text.trim_matches(['[', ']']).parse::<IpAddr>() {
            Ok(ip) => Host::Ip(ip),
            Err(_) => Host::Name(text.to_string()),
        },
        None => return Err(invalid("no host".to_string())),
    };
    match &host {
        Host::Ip(ip) => allow.check(*ip).map_err(invalid)?,
        // `localhost` is loopback by definition (RFC 6761), whatever a resolver says.
        Host::Name(name) if is_localhost(name) && !allow.allows_host(name) => {
            allow
                .check(IpAddr::V4(Ipv4Addr::LOCALHOST))
                .map_err(invalid)?;
        }
        Host::Name(_) => {}
    }
    Ok(Target {
        url: parsed,
        host,
        port,
    })
}

fn is_localhost(name: &str) -> bool {
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    name == "localhost" || name.ends_with(".localhost")
}

/// `sha256=<hex>`: the HMAC-SHA256 of `body` under `secret`.
pub fn sign(secret: &str, body: &[u8]) -> String {
    let mut mac =
        Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes a key of any size");
    mac.update(body);
    let digest = mac.finalize().into_bytes();
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256={hex}")
}

/// Why one delivery attempt failed, and whether another may succeed.
#[derive(Debug)]
pub struct Failure {
    pub reason: &'static str,
    pub detail: String,
    pub retry: bool,
}

/// Delivers callbacks: signed, retried with doubling waits, each attempt bounded.
#[derive(Debug, Clone)]
pub struct Sender {
    pub secret: Option<String>,
    pub allow: Allowlist,
    pub attempts: u32,
    pub backoff: Duration,
    pub timeout: Duration,
}

impl Sender {
    /// Posts `body` (the submission `token`'s JSON) to `url` until it is taken (2xx), the
    /// attempts are spent, or the address is refused. Returns the last failure.
    pub async fn deliver(&self, url: &str, token: &str, body: &[u8]) -> Result<(), Failure> {
        let mut wait = self.backoff;
        let mut attempt = 1;
        loop {
            let failure = match self.attempt(url, token, body).await {
                Ok(()) => {
                    metrics::counter!("codefleet_callback_deliveries_total").increment(1);
                    return Ok(());
                }
                Err(failure) => failure,
            };
            metrics::counter!("codefleet_callback_failures_total", "reason" => failure.reason)
                .increment(1);
            tracing::info!(submission = %token, attempt, error = %failure.detail, "callback attempt failed");
            if !failure.retry || attempt >= self.attempts {
                return Err(failure);
            }
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(MAX_BACKOFF);
            attempt += 1;
        }
    }

    async fn attempt(&self, url: &str, token: &str, body: &[u8]) -> Result<(), Failure> {
        let refused = |detail: String| Failure {
            reason: "refused",
            detail,
            retry: false,
        };
        let target = check_url(url, &self.allow).map_err(|p| refused(p.detail))?;
        let address = self.address(&target).await?;
        let mut client = reqwest::Client::builder()
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(self.timeout);
        if let Host::Name(name) = &target.host {
            // The connection goes to the address just checked, not to a second DNS answer.
            client = client.resolve(name, address);
        }
        let client = client.build().map_err(|e| Failure {
            reason: "client",
            detail: e.to_string(),
            retry: false,
        })?;
        let mut request = client
            .post(target.url.clone())
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header(TOKEN_HEADER, token)
            .body(body.to_vec());
        if let Some(secret) = &self.secret {
            request = request.header(SIGNATURE_HEADER, sign(secret, body));
        }
        let response = request.send().await.map_err(|e| Failure {
            reason: if e.is_timeout() { "timeout" } else { "connect" },
            detail: format!("POST {}: {e}", target.url),
            retry: true,
        })?;
        if let Some(peer) = response.remote_addr() {
            if peer.ip() != address.ip() {
                return Err(refused(format!(
                    "connected to {peer}, not the checked {address}"
                )));
            }
        }
        let status = response.status();
        if status.is_success() {
            return Ok(());
        }
        Err(Failure {
            reason: "status",
            detail: format!("POST {} answered {status}", target.url),
            retry: true,
        })
    }

    /// The address to connect to: the literal one, or the first a host name resolves to when
    /// every one it resolves to may be called back.
    async fn address(&self, target: &Target) -> Result<SocketAddr, Failure> {
        let name = match &target.host {
            Host::Ip(ip) => return Ok(SocketAddr::new(*ip, target.port)),
            Host::Name(name) => name,
        };
        let resolved: Vec<SocketAddr> = tokio::net::lookup_host((name.as_str(), target.port))
            .await
            .map_err(|e| Failure {
                reason: "dns",
                detail: format!("resolving {name}: {e}"),
                retry: true,
            })?
            .collect();
        let first = resolved.first().copied().ok_or_else(|| Failure {
            reason: "dns",
            detail: format!("{name} resolves to no address"),
            retry: true,
        })?;
        if !self.allow.allows_host(name) {
            for addr in &resolved {
                self.allow.check(addr.ip()).map_err(|why| Failure {
                    reason: "refused",
                    detail: format!("{name} resolves to {why}"),
                    retry: false,
                })?;
            }
        }
        Ok(first)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn address_rules() {
        let table: &[(&str, Option<&str>)] = &[
            ("8.8.8.8", None),
            ("93.184.216.34", None),
            ("127.0.0.1", Some("loopback")),
            ("127.10.0.1", Some("loopback")),
            ("10.1.2.3", Some("private")),
            ("172.16.0.1", Some("private")),
            ("172.31.255.255", Some("private")),
            ("172.32.0.1", None),
            ("192.168.1.1", Some("private")),
            ("169.254.169.254", Some("metadata")),
            ("169.254.1.1", Some("link-local")),
            ("100.64.0.1", Some("carrier-grade")),
            ("100.128.0.1", None),
            ("0.0.0.0", Some("this network")),
            ("224.0.0.1", Some("multicast")),
            ("255.255.255.255", Some("broadcast")),
            ("240.0.0.1", Some("reserved")),
            ("192.0.0.192", Some("IETF")),
            ("198.18.0.1", Some("benchmarking")),
            ("2606:4700::1111", None),
            ("::1", Some("loopback")),
            ("::", Some("unspecified")),
            ("fe80::1", Some("link-local")),
            ("fc00::1", Some("unique-local")),
            ("fd12:3456::1", Some("unique-local")),
            ("fd00:ec2::254", Some("metadata")),
            ("fec0::1", Some("site-local")),
            ("ff02::1", Some("multicast")),
            ("::ffff:127.0.0.1", Some("loopback")),
            ("::ffff:169.254.169.254", Some("metadata")),
            ("::ffff:8.8.8.8", None),
            ("64:ff9b::a00:1", Some("private")),
            ("2002:c0a8:101::1", Some("private")),
            ("2002:808:808::1", None),
            ("::127.0.0.1", Some("IPv4-compatible")),
        ];
        for (ip, why) in table {
            let got = forbidden(ip.parse().unwrap());
            match (got, why) {
                (None, None) => {}
                (Some(got), Some(want)) => assert!(got.contains(want), "{ip}: {got}"),
                (got, want) => panic!("{ip}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn the_allowlist_opens_what_it_names_only() {
        let allow = Allowlist::new(&[
            "127.0.0.1/32".to_string(),
            "fd00::/8".to_string(),
            "10.0.0.7".to_string(),
            "Hooks.Internal.".to_string(),
        ]);
        let table: &[(&str, bool)] = &[
            ("127.0.0.1", true),
            ("::ffff:127.0.0.1", true),
            ("127.0.0.2", false),
            ("fd00:ec2::254", true),
            ("fc00::1", false),
            ("10.0.0.7", true),
            ("10.0.0.8", false),
            ("169.254.169.254", false),
            ("8.8.8.8", true),
        ];
        for (ip, ok) in table {
            assert_eq!(allow.check(ip.parse().unwrap()).is_ok(), *ok, "{ip}");
        }
        assert!(allow.allows_host("hooks.internal"));
        assert!(!allow.allows_host("other.internal"));
        assert!(Allowlist::default()
            .check("127.0.0.1".parse().unwrap())
            .is_err());
    }

    #[test]
    fn urls_at_submit_time() {
        let none = Allowlist::default();
        let loopback = Allowlist::new(&["127.0.0.0/8".to_string()]);
        let table: &[(&str, &Allowlist, Result<(), &str>)] = &[
            ("http://example.com/hook", &none, Ok(())),
            ("http://93.184.216.34:8080/x", &none, Ok(())),
            ("http://127.0.0.1:9000/hook", &none, Err("loopback")),
            ("http://127.0.0.1:9000/hook", &loopback, Ok(())),
            ("http://[::1]/hook", &loopback, Err("loopback")),
            ("http://169.254.169.254/latest", &none, Err("metadata")),
            ("http://[fd00:ec2::254]/", &none, Err("metadata")),
            ("http://10.0.0.1/", &none, Err("private")),
            ("http://localhost:8080/", &none, Err("loopback")),
            ("http://api.localhost/", &none, Err("loopback")),
            ("http://localhost:8080/", &loopback, Ok(())),
            ("http://0x7f000001/", &none, Err("loopback")),
            ("https://example.com/", &none, Err("https")),
            ("ftp://example.com/", &none, Err("scheme")),
            ("/relative", &none, Err("absolute")),
        ];
        for (url, allow, want) in table {
            let got = check_url(url, allow).map(|_| ());
            match (got, want) {
                (Ok(()), Ok(())) => {}
                (Err(p), Err(w)) => {
                    assert_eq!(p.code, ErrorCode::InvalidRequest, "{url}");
                    assert!(p.detail.contains(w), "{url}: {}", p.detail);
                }
                (got, want) => panic!("{url}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn signatures_are_hmac_sha256_in_hex() {
        // RFC 4231, test case 2.
        assert_eq!(
            sign("Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    fn sender(allow: &[&str]) -> Sender {
        Sender {
            secret: Some("k".to_string()),
            allow: Allowlist::new(&allow.iter().map(|a| a.to_string()).collect::<Vec<_>>()),
            attempts: 1,
            backoff: Duration::from_millis(1),
            timeout: Duration::from_secs(1),
        }
    }

    /// A host name is checked for what it resolves to when the callback is sent (here
    /// `localhost`, which every resolver maps to loopback), not when the submission came.
    #[tokio::test]
    async fn names_are_checked_at_delivery_for_every_address_they_resolve_to() {
        let target = Target {
            url: Url::parse("http://localhost:9/hook").unwrap(),
            host: Host::Name("localhost".to_string()),
            port: 9,
        };
        let refused = sender(&[]).address(&target).await.unwrap_err();
        assert_eq!(refused.reason, "refused", "{refused:?}");
        assert!(!refused.retry);
        assert!(refused.detail.contains("loopback"), "{}", refused.detail);
        let pinned = sender(&["127.0.0.0/8", "::1"])
            .address(&target)
            .await
            .unwrap();
        assert!(pinned.ip().is_loopback() && pinned.port() == 9, "{pinned}");
        let by_name = sender(&["localhost"]).address(&target).await.unwrap();
        assert!(by_name.ip().is_loopback(), "{by_name}");
    }
}
