//! Refusals made before a token is verified are answered like every other: a JSON body and
//! an audit record. A 1 MiB token used to get hyper's bare 431 and leave no trace.

use std::{net::IpAddr, time::Duration};

use flowwarden_tests::{
    admit::{AdmitClient, AdmitOutcome},
    privileged::require_root,
    stack::{ADMISSION_PORT, Stack},
};
use serde_json::Value;

const POLICY: &str = flowwarden_tests::stack::ECHO_POLICY;

#[test]
fn a_one_mib_token_gets_a_json_431_and_an_audit_record() {
    if !require_root("a_one_mib_token_gets_a_json_431_and_an_audit_record") {
        return;
    }
    let stack = Stack::start("refusals", POLICY, "");
    let client = AdmitClient::new(
        (stack.pair.server_addr, ADMISSION_PORT).into(),
        &stack.fingerprint(),
    );
    let source = IpAddr::V4(stack.pair.client_addr);
    let huge = "a".repeat(1024 * 1024);
    let outcome = stack.pair.client.run(|| client.admit(source, &huge));
    let AdmitOutcome::Refused { status, body } = outcome else {
        panic!(
            "expected a refusal, got {outcome:?}\n{}",
            stack.agent().log()
        );
    };
    assert_eq!(status, 431, "{body}");
    let error: Value = serde_json::from_str(&body)
        .unwrap_or_else(|e| panic!("the 431 has no JSON body ({e}): {body:?}"));
    assert_eq!(error["error"], "too_large", "{body}");
    assert!(
        error["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );

    // The refusal is in the audit log, with its reason and source, and the agent serves on.
    stack.wait_until(
        Duration::from_secs(5),
        "the audit record of the 431",
        || {
            let (ok, out) = stack.ctl(&["audit", "--json", "--limit", "100"]);
            ok && out.lines().any(|l| {
                l.contains("admission_rejected")
                    && l.contains("too_large")
                    && l.contains(&stack.pair.client_addr.to_string())
            })
        },
    );
    let (ok, out) = stack.ctl(&["status"]);
    assert!(ok, "{out}");
}
