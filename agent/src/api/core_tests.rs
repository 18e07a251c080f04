//! Unit tests of the control API's core over the in-memory enforcer: dispatch, access and
//! answers as a client sees them, without root or a socket.

use std::time::Instant;

use serde_json::{Value, json};

use super::{AgentInfo, Core};
use crate::{
    api::{
        jsonrpc::Call,
        peer::{Access, Peer},
        transport::{Caller, Handler as _},
    },
    sessions::tests::{Harness, harness},
};

fn core(h: &Harness) -> Core {
    Core {
        sessions: h.sessions.clone(),
        enforcer: h.enforcer.clone(),
        policy: h.policy.clone(),
        info: AgentInfo {
            interfaces: Vec::new(),
            ingress: Vec::new(),
            pin_dir: "/nonexistent".into(),
            admission_listen: "127.0.0.1:7443".into(),
            admission_fingerprint: String::new(),
            started: Instant::now(),
            groups: Default::default(),
            fleet: None,
        },
    }
}

fn caller(access: Access) -> Caller {
    Caller {
        peer: Peer {
            pid: 1,
            uid: 1000,
            gid: 1000,
            groups: Vec::new(),
        },
        access,
    }
}

async fn call(core: &Core, access: Access, method: &str, params: Value) -> Result<Value, String> {
    let call = Call {
        id: json!(1),
        method: method.into(),
        params,
    };
    core.handle(call, caller(access))
        .await
        .and_then(|r| r.into_value())
        .map_err(|e| e.message)
}

#[tokio::test]
async fn terminate_needs_admin_and_a_reader_changes_nothing() {
    let h = harness(16);
    let id = h.admit("alice@corp.example", "198.51.100.7").await;
    let core = core(&h);
    let params = json!({"ids": [id.to_string()]});
    let refused = call(&core, Access::Read, "sessions.terminate", params.clone())
        .await
        .unwrap_err();
    assert!(refused.contains("sessions.terminate"), "{refused}");
    assert!(
        h.sessions.get(id).unwrap().is_live(),
        "a reader ended a session"
    );
    assert!(h.enforcer.revocation(id).is_none());

    let answer = call(&core, Access::Admin, "sessions.terminate", params)
        .await
        .unwrap();
    assert_eq!(answer["count"], 1, "{answer}");
    assert!(h.enforcer.revocation(id).is_some());
    let shown = call(
        &core,
        Access::Read,
        "sessions.get",
        json!({"id": id.to_string()}),
    )
    .await
    .unwrap();
    assert_eq!(shown["state"], "terminated", "{shown}");
}

#[tokio::test]
async fn terminate_with_both_ids_and_user_is_refused_with_what_to_give() {
    let h = harness(16);
    let id = h.admit("alice@corp.example", "198.51.100.7").await;
    let core = core(&h);
    let err = call(
        &core,
        Access::Admin,
        "sessions.terminate",
        json!({"ids": [id.to_string()], "user": "alice@corp.example"}),
    )
    .await
    .unwrap_err();
    assert!(err.contains("either ids"), "{err}");
    assert!(h.sessions.get(id).unwrap().is_live());
}

#[tokio::test]
async fn sessions_list_filters_by_user_and_lists_everyone_unfiltered() {
    let h = harness(16);
    let a = h.admit("alice@corp.example", "198.51.100.7").await;
    h.admit("bob@corp.example", "198.51.100.8").await;
    let core = core(&h);
    let listed = call(
        &core,
        Access::Read,
        "sessions.list",
        json!({"user": "alice@corp.example"}),
    )
    .await
    .unwrap();
    let rows = listed.as_array().expect("a list");
    assert_eq!(rows.len(), 1, "{listed}");
    assert_eq!(rows[0]["id"], a.to_string());
    let all = call(&core, Access::Read, "sessions.list", json!({}))
        .await
        .unwrap();
    assert_eq!(all.as_array().map(Vec::len), Some(2), "{all}");
}

#[tokio::test]
async fn explain_for_a_user_who_was_only_ever_refused_uses_the_refused_identity() {
    let h = harness(16);
    let core = core(&h);
    let params = json!({"user": "mallory@corp.example"});
    // Never seen: nothing to explain from, and the error says so.
    let unknown = call(&core, Access::Read, "policy.explain", params.clone())
        .await
        .unwrap_err();
    assert!(unknown.contains("refused admission"), "{unknown}");

    // Refused by the policy (not in the staff group): explain answers from the identity that
    // admission presented, with no session, and names why the rule does not apply.
    let refused = h
        .sessions
        .admit(
            crate::identity::test_identity("mallory@corp.example", &["contractors"]),
            "198.51.100.9".parse().unwrap(),
        )
        .await;
    assert!(
        matches!(refused, Err(crate::sessions::SessionError::Denied { .. })),
        "{refused:?}"
    );
    let answer = call(&core, Access::Read, "policy.explain", params)
        .await
        .unwrap();
    assert_eq!(answer["user"], "mallory@corp.example", "{answer}");
    assert!(answer.get("session").is_none(), "{answer}");
    assert!(answer["refused_at_ms"].as_u64().is_some(), "{answer}");
    assert_eq!(answer["source"], "198.51.100.9", "{answer}");
    let ssh = &answer["explanations"][0];
    assert_eq!(ssh["resource"], "ssh", "{answer}");
    assert_eq!(ssh["allowed"], false, "{answer}");
    assert!(
        ssh["reasons"].to_string().contains("staff"),
        "the refusal names the rule's groups: {answer}"
    );
}
