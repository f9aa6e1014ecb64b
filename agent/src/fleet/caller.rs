//! Who makes a request, and how that travels from node to node.
//!
//! A client authenticates at the node it calls, with an API key. When that
//! node forwards the request (to the node that holds the sandbox, or to
//! the node it placed a create on), it drops the key and sends instead
//! `X-Wrenn-Caller: <from node>;<key id or ->;<flags>;<unix ms>;<mac>`,
//! the MAC being HMAC-SHA256 under the cluster secret over the cluster
//! name, those fields, the method and the path. The receiving node takes
//! the key's owner and quota from its own manifest, so a forwarded call is
//! held to the same rules as a direct one, and it never forwards a
//! forwarded call again.

use hmac::{KeyInit, Mac};

use super::manifest::{KeyEntry, Manifest, Quota};

type HmacSha256 = hmac::Hmac<sha2::Sha256>;

/// The header that carries a forwarded caller.
pub const HEADER: &str = "X-Wrenn-Caller";
/// How far a signature's time may be from this node's clock.
const MAX_SKEW_MS: u64 = 60_000;

/// Who makes a request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Caller {
    /// The manifest key's id; `None`: a node key of `[api] key_hashes`, or
    /// a node without keys. Such an operator sees every sandbox.
    pub key: Option<String>,
    /// The key's owner: it sees and touches only sandboxes of this owner.
    pub owner: Option<String>,
    /// What the key may hold across the fleet.
    pub quota: Quota,
    /// The node that forwarded the request, when it was.
    pub via: Option<String>,
    /// A create that the forwarding node placed here: it runs here or is
    /// refused, never placed again.
    pub placed: bool,
}

impl Caller {
    /// A node key, or a node that asks for none.
    pub fn operator() -> Caller {
        Caller::default()
    }

    /// The caller of a manifest key.
    pub fn of_key(key: &KeyEntry) -> Caller {
        Caller {
            key: Some(key.id.clone()),
            owner: Some(key.owner.clone()),
            quota: key.quota,
            ..Caller::default()
        }
    }

    /// Whether this caller may see something made by `owner`.
    pub fn may_see(&self, owner: Option<&str>) -> bool {
        match &self.owner {
            None => true,
            Some(mine) => owner == Some(mine.as_str()),
        }
    }

    /// Whether another node of the fleet sent this request on.
    pub fn is_forwarded(&self) -> bool {
        self.via.is_some()
    }
}

/// The `X-Wrenn-Caller` value with which node `from` forwards `caller`'s
/// `method path`.
pub fn sign(
    manifest: &Manifest,
    from: &str,
    caller: &Caller,
    placed: bool,
    method: &str,
    path: &str,
    now_ms: u64,
) -> String {
    let fields = format!(
        "{from};{};{};{now_ms}",
        caller.key.as_deref().unwrap_or("-"),
        if placed { "p" } else { "-" }
    );
    let secret = manifest
        .secrets
        .first()
        .map(Vec::as_slice)
        .unwrap_or_default();
    let tag = mac(secret, &manifest.cluster, &fields, method, path).unwrap_or_default();
    format!("{fields};{}", hex::encode(tag))
}

/// The caller an `X-Wrenn-Caller` value names, if it is signed by this
/// fleet for `method path`, recent, from a listed node and of a listed key.
pub fn verify(
    manifest: &Manifest,
    value: &str,
    method: &str,
    path: &str,
    now_ms: u64,
) -> Result<Caller, String> {
    let (fields, tag) = value
        .rsplit_once(';')
        .ok_or("the X-Wrenn-Caller header is malformed")?;
    let tag = hex::decode(tag).map_err(|_| "the X-Wrenn-Caller signature is not hex")?;
    let signed = manifest.secrets.iter().any(|secret| {
        mac(secret, &manifest.cluster, fields, method, path)
            .is_some_and(|m| m.len() == tag.len() && constant_eq(&m, &tag))
    });
    if !signed {
        return Err(
            "the X-Wrenn-Caller header is not signed with this fleet's secret: only nodes of \
             the fleet forward requests"
                .into(),
        );
    }
    let mut parts = fields.split(';');
    let (Some(from), Some(key), Some(flags), Some(at), None) = (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) else {
        return Err("the X-Wrenn-Caller header is malformed".into());
    };
    let at: u64 = at
        .parse()
        .map_err(|_| "the X-Wrenn-Caller time is not a number")?;
    if at.abs_diff(now_ms) > MAX_SKEW_MS {
        return Err(format!(
            "a forwarded request from node {from} is {} s off this node's clock: keep the \
             nodes' clocks in sync (NTP)",
            at.abs_diff(now_ms) / 1000
        ));
    }
    if manifest.node(from).is_none() {
        return Err(format!(
            "node {from} forwarded a request but is not in this node's manifest"
        ));
    }
    let mut caller = match key {
        "-" => Caller::operator(),
        id => Caller::of_key(manifest.keys.iter().find(|k| k.id == id).ok_or_else(|| {
            format!(
                "node {from} forwarded a request of key {id}, which this node's manifest \
                 does not list: give every node the same fleet.toml"
            )
        })?),
    };
    caller.via = Some(from.to_owned());
    caller.placed = flags == "p";
    Ok(caller)
}

fn mac(secret: &[u8], cluster: &str, fields: &str, method: &str, path: &str) -> Option<Vec<u8>> {
    let mut mac = <HmacSha256 as KeyInit>::new_from_slice(secret).ok()?;
    for part in [cluster, "\0caller\0", fields, "\0", method, "\0", path] {
        mac.update(part.as_bytes());
    }
    Some(mac.finalize().into_bytes().to_vec())
}

/// Equality that takes the same time wherever the inputs differ.
fn constant_eq(a: &[u8], b: &[u8]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn manifest(secret: &str) -> Manifest {
        let text = format!(
            "[cluster]\nname = \"lab\"\nversion = 1\nsecrets = [\"{secret}\"]\n\
             [[node]]\nname = \"n1\"\napi = \"http://10.0.0.1:8080\"\ngossip = \"10.0.0.1:7946\"\n\
             [[node]]\nname = \"n2\"\napi = \"http://10.0.0.2:8080\"\ngossip = \"10.0.0.2:7946\"\n\
             [[key]]\nid = \"k1\"\nowner = \"team-a\"\n\
             hash = \"sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08\"\n\
             quota = {{ sandboxes = 2 }}\n"
        );
        Manifest::parse(&text, Path::new("fleet.toml")).unwrap()
    }

    const SECRET: &str = "hex:000102030405060708090a0b0c0d0e0f";

    #[test]
    fn a_signed_caller_arrives_with_its_key_owner_and_quota() {
        let m = manifest(SECRET);
        let caller = Caller::of_key(&m.keys[0]);
        let value = sign(&m, "n1", &caller, true, "POST", "/v1/sandboxes", 1_000_000);
        let got = verify(&m, &value, "POST", "/v1/sandboxes", 1_000_500).unwrap();
        assert_eq!(got.owner.as_deref(), Some("team-a"));
        assert_eq!(got.quota.sandboxes, Some(2));
        assert_eq!(got.via.as_deref(), Some("n1"));
        assert!(got.placed);
        let operator = sign(&m, "n2", &Caller::operator(), false, "GET", "/x", 5);
        let got = verify(&m, &operator, "GET", "/x", 5).unwrap();
        assert_eq!((got.owner, got.placed), (None, false));
    }

    #[test]
    fn a_forged_replayed_or_stale_caller_is_refused() {
        let m = manifest(SECRET);
        let caller = Caller::of_key(&m.keys[0]);
        let value = sign(
            &m,
            "n1",
            &caller,
            false,
            "GET",
            "/v1/sandboxes/sb-a",
            1_000_000,
        );
        // Another path or method: the signature does not hold.
        assert!(verify(&m, &value, "GET", "/v1/sandboxes/sb-b", 1_000_000).is_err());
        assert!(verify(&m, &value, "DELETE", "/v1/sandboxes/sb-a", 1_000_000).is_err());
        // Another secret.
        let other = manifest("hex:ff0102030405060708090a0b0c0d0e0f");
        assert!(verify(&other, &value, "GET", "/v1/sandboxes/sb-a", 1_000_000).is_err());
        // Tampered fields: an operator claimed.
        let forged = value.replacen(";k1;", ";-;", 1);
        assert!(verify(&m, &forged, "GET", "/v1/sandboxes/sb-a", 1_000_000).is_err());
        // Too old.
        let err = verify(&m, &value, "GET", "/v1/sandboxes/sb-a", 1_000_000 + 61_000);
        assert!(err.unwrap_err().contains("clock"));
        assert!(verify(&m, "junk", "GET", "/", 0).is_err());
    }
}
