//! Resources: the protected services of this host (`ssh = tcp/22`), their ports and
//! destination prefixes, compiled into the slots the kernel looks up.

use std::{collections::BTreeMap, net::IpAddr, ops::Range, path::Path};

use agent_common::{
    IPPROTO_TCP, IPPROTO_UDP, RESOURCE_DST_FIXED_BITS, RESOURCE_HAS_DSTS, ResourceDst,
    ResourcePort, resource_port_index,
};
use ipnet::IpNet;
use serde::Deserialize;
use toml::Spanned;

use super::{
    PolicyError,
    file::{Source, valid_name},
    rules::parse_prefix,
};
use crate::datapath::addr_bytes;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub fn number(self) -> u8 {
        match self {
            Self::Tcp => IPPROTO_TCP,
            Self::Udp => IPPROTO_UDP,
        }
    }
}

impl std::fmt::Display for Protocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
        })
    }
}

/// A protected service, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resource {
    /// Stable across restarts and reloads: derived from the name, so grants stay valid.
    pub id: u32,
    pub name: String,
    pub protocol: Protocol,
    /// Inclusive port ranges.
    pub ports: Vec<(u16, u16)>,
    /// Empty: every local address.
    pub destinations: Vec<IpNet>,
}

/// Every resource of the policy, with the kernel's view of them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResourceTable {
    pub resources: Vec<Resource>,
}

/// A `[[resource]]` table as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ResourceDef {
    name: Spanned<String>,
    protocol: Spanned<Protocol>,
    ports: Spanned<Vec<PortDef>>,
    #[serde(default)]
    destinations: Vec<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum PortDef {
    Port(i64),
    Range(String),
    /// Anything else (a float, a table, ...), refused with a message that says what a port is.
    Other(toml::Value),
}

/// A resource's claim on one protocol and port: its name and destinations.
type PortClaim = (String, Vec<IpNet>);

/// Reads every `*.toml` file of `dir` (in name order) and returns its resources. The whole
/// policy is validated, rules included: a directory whose rules are wrong is refused.
///
/// # Errors
/// The directory or a file cannot be read, or a file is invalid (with file, line and field).
pub fn load_resources(dir: &Path) -> Result<ResourceTable, PolicyError> {
    super::load_policy(dir).map(|p| p.resources)
}

/// Parses and validates several policy files taken together and returns their resources.
///
/// # Errors
/// Invalid TOML, unknown keys, bad ports or prefixes, duplicate names, two resources
/// claiming the same protocol, port and destination, or an invalid rule.
pub fn parse_resources<'a>(
    files: impl IntoIterator<Item = (&'a Path, &'a str)>,
) -> Result<ResourceTable, PolicyError> {
    super::parse_policy(files).map(|p| p.resources)
}

/// Validates the resources of every file (in file order) into one table.
pub(super) fn compile_resources<'a>(
    files: impl IntoIterator<Item = (Source<'a>, Vec<ResourceDef>)>,
) -> Result<ResourceTable, PolicyError> {
    let mut resources: Vec<Resource> = Vec::new();
    // `file:line` of each resource's name, in step with `resources`, for duplicate names.
    let mut locations: Vec<String> = Vec::new();
    // (proto, port) → owners, to find overlaps.
    let mut claims: BTreeMap<(u8, u16), Vec<PortClaim>> = BTreeMap::new();
    for (src, defs) in files {
        for def in defs {
            let invalid = |span: Range<usize>, field: &str, problem: String| {
                src.invalid(span, format!("resource.{field}"), problem)
            };
            let name = def.name.get_ref().clone();
            if !valid_name(&name) {
                return Err(invalid(
                    def.name.span(),
                    "name",
                    format!("{name:?}: use 1 to 64 of a-z, 0-9, '-' and '_'"),
                ));
            }
            if let Some(i) = resources.iter().position(|r| r.name == name) {
                return Err(invalid(
                    def.name.span(),
                    "name",
                    format!(
                        "{name:?} is defined twice (first at {}): resource names must be unique",
                        locations[i]
                    ),
                ));
            }
            let id = resource_id(&name);
            if let Some(other) = resources.iter().find(|r| r.id == id) {
                return Err(invalid(
                    def.name.span(),
                    "name",
                    format!(
                        "{name:?} hashes to the same id as {:?}: rename one",
                        other.name
                    ),
                ));
            }
            let mut ports = Vec::new();
            for p in def.ports.get_ref() {
                let range =
                    parse_port(p).map_err(|problem| invalid(def.ports.span(), "ports", problem))?;
                ports.push(range);
            }
            if ports.is_empty() {
                return Err(invalid(
                    def.ports.span(),
                    "ports",
                    "empty: list ports or ranges, e.g. [22] or [\"8000-8010\"]".into(),
                ));
            }
            let mut destinations = Vec::with_capacity(def.destinations.len());
            for d in &def.destinations {
                let net = parse_prefix(d.get_ref()).ok_or_else(|| {
                    invalid(
                        d.span(),
                        "destinations",
                        format!(
                            "{:?} is not an address prefix: write e.g. \"10.0.0.0/8\", \
                             \"fd00::/8\" or a single address",
                            d.get_ref()
                        ),
                    )
                })?;
                destinations.push(net);
            }
            let protocol = *def.protocol.get_ref();
            for &(lo, hi) in &ports {
                for port in lo..=hi {
                    let owners = claims.entry((protocol.number(), port)).or_default();
                    if owners.iter().any(|(other, _)| *other == name) {
                        return Err(invalid(
                            def.ports.span(),
                            "ports",
                            format!("{protocol}/{port} is listed twice"),
                        ));
                    }
                    for (other, other_dsts) in owners.iter() {
                        if overlaps(&destinations, other_dsts) {
                            return Err(invalid(
                                def.ports.span(),
                                "ports",
                                format!(
                                    "{protocol}/{port} is already protected by resource {other:?} \
                                     for the same destinations: give each resource its own \
                                     ports or disjoint destinations"
                                ),
                            ));
                        }
                    }
                    owners.push((name.clone(), destinations.clone()));
                }
            }
            locations.push(src.at(def.name.span()));
            resources.push(Resource {
                id,
                name,
                protocol,
                ports,
                destinations,
            });
        }
    }
    Ok(ResourceTable { resources })
}

impl ResourceTable {
    pub fn by_name(&self, name: &str) -> Option<&Resource> {
        self.resources.iter().find(|r| r.name == name)
    }

    pub fn by_id(&self, id: u32) -> Option<&Resource> {
        self.resources.iter().find(|r| r.id == id)
    }

    /// The port table slots the kernel needs: index → owner.
    pub fn port_slots(&self) -> BTreeMap<u32, ResourcePort> {
        let mut slots = BTreeMap::new();
        for r in &self.resources {
            for &(lo, hi) in &r.ports {
                for port in lo..=hi {
                    let Some(index) = resource_port_index(r.protocol.number(), port) else {
                        continue;
                    };
                    // A port shared by resources with destinations is resolved by the trie.
                    let shared = slots.contains_key(&index);
                    let flags = if shared || !r.destinations.is_empty() {
                        RESOURCE_HAS_DSTS
                    } else {
                        0
                    };
                    let slot: &mut ResourcePort = slots.entry(index).or_insert(ResourcePort {
                        resource_id: r.id,
                        flags,
                    });
                    slot.flags |= flags;
                }
            }
        }
        slots
    }

    /// Destination-trie entries `(prefix length, key, resource id)` for every port whose slot
    /// says to consult the trie. A resource without destinations matches every address there.
    pub fn dst_entries(&self) -> Vec<(u32, ResourceDst, u32)> {
        let slots = self.port_slots();
        let mut entries = Vec::new();
        for r in &self.resources {
            for &(lo, hi) in &r.ports {
                for port in lo..=hi {
                    let proto = r.protocol.number();
                    let Some(index) = resource_port_index(proto, port) else {
                        continue;
                    };
                    if slots
                        .get(&index)
                        .is_none_or(|s| s.flags & RESOURCE_HAS_DSTS == 0)
                    {
                        continue;
                    }
                    let key = |addr: [u8; 16]| ResourceDst {
                        proto,
                        _pad: 0,
                        port_be: port.to_be_bytes(),
                        addr,
                    };
                    if r.destinations.is_empty() {
                        entries.push((RESOURCE_DST_FIXED_BITS, key([0; 16]), r.id));
                    }
                    for net in &r.destinations {
                        let bits = match net {
                            IpNet::V4(n) => 96 + u32::from(n.prefix_len()),
                            IpNet::V6(n) => u32::from(n.prefix_len()),
                        };
                        let addr = addr_bytes(net.network());
                        entries.push((RESOURCE_DST_FIXED_BITS + bits, key(addr), r.id));
                    }
                }
            }
        }
        entries
    }

    /// Which resource owns `proto`/`port` at `dst`, as the kernel decides it.
    pub fn resource_for(&self, protocol: Protocol, port: u16, dst: IpAddr) -> Option<&Resource> {
        self.resources
            .iter()
            .filter(|r| {
                r.protocol == protocol && r.ports.iter().any(|&(l, h)| (l..=h).contains(&port))
            })
            .filter(|r| {
                r.destinations.is_empty() || r.destinations.iter().any(|n| n.contains(&dst))
            })
            // Longest prefix wins; a resource without destinations is the shortest.
            .max_by_key(|r| {
                r.destinations
                    .iter()
                    .filter(|n| n.contains(&dst))
                    .map(|n| n.prefix_len())
                    .max()
                    .map_or(0, |l| l as u32 + 1)
            })
    }
}

/// FNV-1a of the name: stable across restarts and reloads, never zero (zero means "none").
fn resource_id(name: &str) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in name.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    if h == 0 { 1 } else { h }
}

fn parse_port(p: &PortDef) -> Result<(u16, u16), String> {
    let one = |v: i64| -> Result<u16, String> {
        u16::try_from(v)
            .ok()
            .filter(|&p| p != 0)
            .ok_or_else(|| format!("{v} is not a port: use 1 to 65535"))
    };
    match p {
        PortDef::Port(v) => one(*v).map(|p| (p, p)),
        PortDef::Other(v) => Err(format!(
            "{v} is not a port: write a number from 1 to 65535 or a range such as \"8000-8010\""
        )),
        PortDef::Range(s) => {
            let (lo, hi) = s
                .split_once('-')
                .ok_or_else(|| format!("{s:?} is not a range: write \"LOW-HIGH\" or a number"))?;
            let parse = |x: &str| -> Result<u16, String> {
                x.trim()
                    .parse::<i64>()
                    .map_err(|_| format!("{s:?} is not a range: write \"LOW-HIGH\""))
                    .and_then(one)
            };
            let (lo, hi) = (parse(lo)?, parse(hi)?);
            if lo > hi {
                return Err(format!("{s:?}: the low port is above the high port"));
            }
            Ok((lo, hi))
        }
    }
}

/// Whether two resources on one protocol and port would claim the same traffic. Nested
/// prefixes are fine (the longest prefix wins, and a resource without destinations is the
/// shortest); the same prefix twice, or two resources without destinations, are not.
fn overlaps(a: &[IpNet], b: &[IpNet]) -> bool {
    match (a.is_empty(), b.is_empty()) {
        (true, true) => true,
        (false, false) => a.iter().any(|x| b.contains(x)),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<ResourceTable, PolicyError> {
        parse_resources([(Path::new("p.toml"), text)])
    }

    #[test]
    fn resources_compile_to_port_slots() {
        let t = parse(
            "[[resource]]\nname = 'ssh'\nprotocol = 'tcp'\nports = [22]\n\n\
             [[resource]]\nname = 'web'\nprotocol = 'tcp'\nports = ['8000-8002']\n",
        )
        .unwrap();
        let slots = t.port_slots();
        assert_eq!(slots.len(), 4);
        assert_eq!(slots[&22].resource_id, t.by_name("ssh").unwrap().id);
        assert_eq!(slots[&8001].resource_id, t.by_name("web").unwrap().id);
        assert_eq!(slots[&22].flags, 0);
        assert!(t.dst_entries().is_empty());
    }

    #[test]
    fn ids_are_stable_and_nonzero() {
        let a = parse("[[resource]]\nname = 'ssh'\nprotocol = 'tcp'\nports = [22]\n").unwrap();
        let b = parse(
            "[[resource]]\nname = 'dns'\nprotocol = 'udp'\nports = [53]\n\
             [[resource]]\nname = 'ssh'\nprotocol = 'tcp'\nports = [22]\n",
        )
        .unwrap();
        assert_eq!(a.by_name("ssh").unwrap().id, b.by_name("ssh").unwrap().id);
        assert_ne!(a.by_name("ssh").unwrap().id, 0);
    }

    #[test]
    fn destinations_go_through_the_trie() {
        let t = parse(
            "[[resource]]\nname = 'a'\nprotocol = 'tcp'\nports = [80]\ndestinations = ['10.0.0.0/24']\n\
             [[resource]]\nname = 'b'\nprotocol = 'tcp'\nports = [80]\ndestinations = ['10.0.1.0/24']\n",
        )
        .unwrap();
        let slots = t.port_slots();
        assert_eq!(slots[&80].flags, RESOURCE_HAS_DSTS);
        let entries = t.dst_entries();
        assert_eq!(entries.len(), 2);
        assert!(entries.iter().all(|(bits, _, _)| *bits == 32 + 96 + 24));
        let b = t
            .resource_for(Protocol::Tcp, 80, "10.0.1.9".parse().unwrap())
            .unwrap();
        assert_eq!(b.name, "b");
        assert!(
            t.resource_for(Protocol::Tcp, 80, "10.0.2.9".parse().unwrap())
                .is_none()
        );
    }

    #[test]
    fn errors_name_file_line_and_field() {
        let err = parse("[[resource]]\nname = 'ssh'\nprotocol = 'tcp'\nports = [0]\n")
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "p.toml:4: resource.ports: 0 is not a port: use 1 to 65535"
        );
        let err = parse("[[resource]]\nname = 'ssh'\nprotocol = 'icmp'\nports = [1]\n")
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "p.toml:3: resource.protocol: unknown variant `icmp`, expected `tcp` or `udp`"
        );
        let err = parse("[[resource]]\nname = 'ssh'\nprotocol = 'tcp'\nports = [22]\nport = 1\n")
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "p.toml:5: resource.port: unknown key, expected one of `name`, `protocol`, `ports`, \
             `destinations`"
        );
        let err = parse("[[resource]]\nname = 'ssh'\nprotocol = 'tcp'\nports = ['30-20']\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("low port is above"), "{err}");
    }

    #[test]
    fn duplicates_and_overlaps_are_refused() {
        let err = parse(
            "[[resource]]\nname = 'ssh'\nprotocol = 'tcp'\nports = [22]\n\
             [[resource]]\nname = 'ssh'\nprotocol = 'tcp'\nports = [23]\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("p.toml:6") && err.contains("defined twice"),
            "{err}"
        );
        let err = parse(
            "[[resource]]\nname = 'ssh'\nprotocol = 'tcp'\nports = [22]\n\
             [[resource]]\nname = 'ssh2'\nprotocol = 'tcp'\nports = ['20-30']\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("tcp/22 is already protected by resource \"ssh\""),
            "{err}"
        );
        // Same port, other protocol: fine.
        parse(
            "[[resource]]\nname = 'dns'\nprotocol = 'tcp'\nports = [53]\n\
             [[resource]]\nname = 'dns-udp'\nprotocol = 'udp'\nports = [53]\n",
        )
        .unwrap();
    }

    #[test]
    fn the_shipped_example_policy_is_valid() {
        let text = include_str!("../../../policies/example.toml");
        let t = parse_resources([(Path::new("policies/example.toml"), text)]).unwrap();
        // Its rules are checked with evaluation, in the module's tests.
        assert_eq!(t.resources.len(), 2);
        let console = t.by_name("admin-console").unwrap();
        assert_eq!(console.ports, vec![(8443, 8443), (9000, 9010)]);
        assert!(
            t.resource_for(Protocol::Tcp, 9005, "10.1.2.3".parse().unwrap())
                .is_some()
        );
        assert!(
            t.resource_for(Protocol::Tcp, 9005, "192.168.1.1".parse().unwrap())
                .is_none()
        );
    }
}
