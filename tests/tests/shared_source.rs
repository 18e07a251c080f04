//! Two live sessions from one source address (NAT): when the newer one ends, the older one's
//! grant carries new flows from that address, attributed to the older session; once no live
//! session from the address holds the resource, new flows are dropped. docs/security-model.md
//! ("NAT and shared source addresses") says the same. On the way, the default ingress on
//! veth is checked to be TC, with its reason in `status`.

use std::{net::SocketAddr, time::Duration};

use flowwarden_tests::{
    privileged::require_root,
    stack::{Stack, TokenSpec},
    tcp::{accept, carries, connect, listen},
};
use serde_json::Value;

const POLICY: &str = flowwarden_tests::stack::ECHO_POLICY;

const SHORT: Duration = Duration::from_millis(700);
const LONG: Duration = Duration::from_secs(5);

fn login(stack: &Stack, user: &str) -> String {
    let token = stack.token(&TokenSpec::user(user, &["ops"]));
    let cache = stack.scratch.dir.join(user);
    let (ok, out) = stack.login(&token, &cache);
    assert!(ok, "login of {user} failed: {out}");
    let start = out.find('{').unwrap_or_else(|| panic!("no JSON in: {out}"));
    let answer: Value = serde_json::Deserializer::from_str(&out[start..])
        .into_iter::<Value>()
        .next()
        .unwrap()
        .unwrap();
    answer["session"].as_str().unwrap().to_owned()
}

/// The user of the session that owns the flow from `client`'s local address to `to`.
fn owner(stack: &Stack, client: &std::net::TcpStream, to: SocketAddr) -> Value {
    let from = client.local_addr().unwrap().to_string();
    stack.ctl_json(&["whois", &from, &to.to_string()])["session"]["user"].clone()
}

#[test]
fn the_older_live_session_carries_new_flows_when_the_newer_one_from_its_address_ends() {
    if !require_root(
        "the_older_live_session_carries_new_flows_when_the_newer_one_from_its_address_ends",
    ) {
        return;
    }
    let stack = Stack::start("shared", POLICY, "");
    let echo: SocketAddr = (stack.pair.server_addr, 7000).into();
    let listener = listen(&stack.pair.server, echo);
    // On veth the default ingress (auto) is TC, and status says why.
    let status = stack.ctl_json(&["status"]);
    let ingress = &status["ingress"][0];
    assert_eq!(ingress["hook"], "tc_ingress", "status: {status}");
    assert!(
        ingress["why"]
            .as_str()
            .unwrap_or("")
            .contains("driver veth"),
        "status should say why TC was chosen: {status}"
    );
    let older = login(&stack, "alice@corp.example");
    let newer = login(&stack, "bob@corp.example");

    // While both live, new flows belong to the newer session.
    let mut c = connect(&stack.pair.client, echo, LONG).expect("a flow while both live");
    let mut s = accept(&listener, LONG).unwrap();
    assert!(carries(&mut c, &mut s, b"both"));
    assert_eq!(owner(&stack, &c, echo), "bob@corp.example");
    drop((c, s));

    let (ok, out) = stack.ctl(&["sessions", "terminate", &newer, "--reason", "test"]);
    assert!(ok, "terminate failed: {out}");
    // The older session is live and policy grants it the resource from this address: its
    // grant carries the next flow, which is its own, not the ended session's.
    let mut c = connect(&stack.pair.client, echo, LONG)
        .expect("a new flow from the address while the older session lives");
    let mut s = accept(&listener, LONG).unwrap();
    assert!(carries(&mut c, &mut s, b"older"));
    assert_eq!(
        owner(&stack, &c, echo),
        "alice@corp.example",
        "the new flow should belong to the older live session"
    );
    let flows = stack.ctl_json(&["flows", "list", "--session", &older]);
    assert!(
        flows
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f["source"] == c.local_addr().unwrap().to_string()),
        "flows list --session {older} should list the new flow: {flows}"
    );
    drop((c, s));

    // With no live session from the address holding the resource, nothing opens.
    let (ok, out) = stack.ctl(&["sessions", "terminate", &older, "--reason", "test"]);
    assert!(ok, "terminate failed: {out}");
    assert!(
        connect(&stack.pair.client, echo, SHORT).is_err(),
        "a new flow opened after every session from the address ended"
    );
}
