//! What is attached to an interface, as the kernel reports it: the XDP program (from
//! `ip -d link`) and the TCX programs on ingress and egress (from a BPF_PROG_QUERY).

use aya::programs::{SchedClassifier, TcAttachType};

use crate::netns::Netns;

/// `hook:program-name` for every program attached to `interface` in `ns`.
pub fn attached_programs(ns: &Netns, interface: &str) -> Vec<String> {
    let mut found = Vec::new();
    let link = ns
        .ip(&["-d", "link", "show", "dev", interface])
        .unwrap_or_default();
    for line in link.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        if let Some(i) = words.iter().position(|w| *w == "name")
            && words.first().is_some_and(|w| w.starts_with("prog/xdp"))
        {
            found.push(format!("xdp:{}", words.get(i + 1).unwrap_or(&"?")));
        }
    }
    let iface = interface.to_owned();
    for (hook, attach_type) in [
        ("tcx_ingress", TcAttachType::Ingress),
        ("tcx_egress", TcAttachType::Egress),
    ] {
        let iface = iface.clone();
        let names = ns.run(move || {
            SchedClassifier::query_tcx(&iface, attach_type)
                .map(|(_, progs)| {
                    progs
                        .iter()
                        .map(|p| p.name_as_str().unwrap_or("?").to_owned())
                        .collect::<Vec<_>>()
                })
                .unwrap_or_default()
        });
        found.extend(names.into_iter().map(|n| format!("{hook}:{n}")));
    }
    found
}
