//! Continuous evaluation against the real kernel maps, in-process: a policy change withdraws
//! exactly the grants it no longer allows (in one batch), hands a shared (source, resource)
//! entry to the session that keeps it, terminates sessions left with nothing, and records
//! every removal durably.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr},
    sync::Arc,
};

use flowwarden::{
    audit::Audit,
    config::SessionsConfig,
    datapath::{Datapath, LoadOptions, detach_all},
    enforce::Enforcer,
    identity::{Device, Identity},
    policy::{PolicyHandle, Reload},
    sessions::{
        Sessions,
        model::{SessionId, SessionState},
    },
    store::Store,
};
use flowwarden_tests::{agent_proc::Scratch, loaded::private_pin_dir, privileged};

fn policy(web_groups: &str) -> String {
    format!(
        "[[resource]]\nname = \"ssh\"\nprotocol = \"tcp\"\nports = [22]\n\n\
         [[resource]]\nname = \"web\"\nprotocol = \"tcp\"\nports = [443]\n\n\
         [[rule]]\nname = \"ssh\"\ngroups = [\"ops\"]\nresources = [\"ssh\"]\n\n\
         [[rule]]\nname = \"web\"\ngroups = [{web_groups}]\nresources = [\"web\"]\n"
    )
}

fn identity(user: &str, groups: &[&str]) -> Identity {
    Identity {
        issuer: "https://idp.test".into(),
        subject: user.into(),
        email: Some(format!("{user}@corp.example")),
        groups: groups.iter().map(|g| g.to_string()).collect(),
        device: Device::default(),
        claims: BTreeMap::from([("sub".to_owned(), serde_json::json!(user))]).into(),
        token_sha256: "00".repeat(32),
        token_expires_at: u64::MAX / 2000,
        token_issued_at: None,
    }
}

struct Pins(std::path::PathBuf);

impl Drop for Pins {
    fn drop(&mut self) {
        let _ = detach_all(&self.0);
    }
}

/// Sessions, a store and the real kernel maps (no interface attached), as the agent wires them.
struct World {
    _scratch: Scratch,
    _pins: Pins,
    file: std::path::PathBuf,
    handle: Arc<PolicyHandle>,
    enforcer: Arc<Enforcer>,
    store: Store,
    sessions: Arc<Sessions>,
    rt: tokio::runtime::Runtime,
}

impl World {
    fn new(tag: &str, text: &str) -> Self {
        privileged::ensure_bpffs().expect("bpffs");
        let scratch = Scratch::new(tag);
        let pins = Pins(private_pin_dir(tag));
        let file = scratch.dir.join("policies/p.toml");
        std::fs::create_dir_all(file.parent().unwrap()).unwrap();
        std::fs::write(&file, text).unwrap();
        let handle = Arc::new(PolicyHandle::new(scratch.dir.join("policies")).unwrap());
        let datapath = Datapath::load(&LoadOptions {
            pin_dir: pins.0.clone(),
            flow_table_size: 1024,
            ..LoadOptions::default()
        })
        .expect("load the datapath");
        let mut maps = datapath.maps;
        maps.install_resources(&handle.current().resources).unwrap();
        let enforcer = Arc::new(Enforcer::new(maps));
        let store = Store::open(&scratch.dir.join("state/state.redb")).unwrap();
        let sessions = Arc::new(Sessions::new(
            Arc::clone(&enforcer),
            store.clone(),
            Audit::new(store.clone()),
            Arc::clone(&handle),
            SessionsConfig::default(),
            Vec::new(),
        ));
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .build()
            .unwrap();
        Self {
            _scratch: scratch,
            _pins: pins,
            file,
            handle,
            enforcer,
            store,
            sessions,
            rt,
        }
    }

    fn change(&self, text: &str) -> flowwarden::sessions::PolicyOutcome {
        std::fs::write(&self.file, text).unwrap();
        let Reload::Changed(new) = self.handle.reload().unwrap() else {
            panic!("the edit was not noticed")
        };
        self.rt.block_on(self.sessions.apply_policy(&new)).unwrap()
    }
}

#[test]
fn a_policy_change_withdraws_hands_over_and_terminates_exactly_what_it_must() {
    if !privileged::require_root("policy_change") {
        return;
    }
    let w = World::new("polchg", &policy("\"ops\", \"web\""));
    let (handle, enforcer, store, sessions, rt) =
        (&w.handle, &w.enforcer, &w.store, &w.sessions, &w.rt);
    let shared: IpAddr = Ipv4Addr::new(10, 1, 0, 1).into();
    let alone: IpAddr = Ipv4Addr::new(10, 1, 0, 2).into();
    let admit = |who: &str, groups: &[&str], from: IpAddr| {
        rt.block_on(sessions.admit(identity(who, groups), from))
            .expect("admitted")
            .session
            .id
    };
    // Two sessions behind one address (NAT): the newer holds the shared web entry.
    let web_user = admit("wendy", &["web"], shared);
    let ops_user = admit("oscar", &["ops"], shared);
    // Web only, alone on its address: the change leaves it nothing.
    let web_only = admit("walter", &["web"], alone);
    let ids = |r: &str| handle.current().resources.by_name(r).unwrap().id;
    let (ssh, web) = (ids("ssh"), ids("web"));
    let kernel = || {
        let mut g: Vec<(IpAddr, u32, SessionId)> = enforcer.grants();
        g.sort();
        g
    };
    let mut before = vec![
        (shared, ssh, ops_user),
        (shared, web, ops_user),
        (alone, web, web_only),
    ];
    before.sort();
    assert_eq!(kernel(), before);

    // `web` now only for ops: wendy and walter lose it, oscar keeps both.
    let outcome = w.change(&policy("\"ops\""));
    assert_eq!(
        (
            outcome.evaluated,
            outcome.grants_removed,
            outcome.sessions_terminated
        ),
        (3, 2, 2),
        "{outcome:?}"
    );
    let mut after = vec![(shared, ssh, ops_user), (shared, web, ops_user)];
    after.sort();
    assert_eq!(
        kernel(),
        after,
        "oscar keeps the shared entries, walter's is gone"
    );
    for (id, state) in [
        (web_user, SessionState::Terminated),
        (web_only, SessionState::Terminated),
        (ops_user, SessionState::Active),
    ] {
        assert_eq!(sessions.get(id).unwrap().state, state, "{id}");
        assert_eq!(
            enforcer.revocation(id).is_some(),
            state != SessionState::Active
        );
    }

    // Now ops loses web too: the shared entry goes, oscar keeps ssh and stays.
    let outcome = w.change(&policy("\"nobody\""));
    assert_eq!(
        (outcome.grants_removed, outcome.sessions_terminated),
        (1, 0)
    );
    assert_eq!(kernel(), vec![(shared, ssh, ops_user)]);
    let oscar = sessions.get(ops_user).unwrap();
    assert_eq!(oscar.grants.len(), 1);

    // Everything is durable: the stored records and one audit event per removed grant.
    let stored = store.sessions().unwrap();
    let stored_oscar = stored.iter().find(|s| s.id == ops_user).unwrap();
    assert_eq!(stored_oscar.grants, oscar.grants);
    for id in [web_user, web_only] {
        let s = stored.iter().find(|s| s.id == id).unwrap();
        assert_eq!(s.state, SessionState::Terminated);
    }
    let removed = sessions
        .audit()
        .query(&Default::default())
        .unwrap()
        .into_iter()
        .filter(|e| e.kind.name() == "grant_removed")
        .count();
    assert_eq!(removed, 3);
}

#[test]
fn a_policy_change_over_many_sessions_is_shared_out_and_exact() {
    if !privileged::require_root("policy_change_many") {
        return;
    }
    // Above the size from which evaluation and the kernel deletes run on every core.
    const N: u32 = 20_000;
    let w = World::new("polmany", &policy("\"ops\", \"web\""));
    // Sessions come in pairs behind one address (NAT): 2k and 2k+1 share a source, and at
    // most one of a pair is in ops. The pair's web entry in the kernel may be held by either;
    // when the other loses web, an ops session anywhere in the table must inherit it.
    let source = |i: u32| IpAddr::V4(Ipv4Addr::from(0x0a40_0000 + i / 2));
    // Concurrent admissions, as clients make them: the store commits them in groups.
    w.rt.block_on(async {
        let tasks: Vec<_> = (0..256)
            .map(|t| {
                let sessions = Arc::clone(&w.sessions);
                tokio::spawn(async move {
                    for i in (t..N).step_by(256) {
                        // Every third user is in ops (keeps ssh and web); the others: web.
                        let groups: &[&str] = if i % 3 == 0 { &["ops"] } else { &["web"] };
                        sessions
                            .admit(identity(&format!("u{i}"), groups), source(i))
                            .await
                            .expect("admitted");
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
    });
    assert_eq!(
        w.enforcer.grants().len() as u32,
        N / 2 + N.div_ceil(3),
        "a web entry per address, an ssh entry per ops session"
    );
    let outcome = w.change(&policy("\"ops\""));
    let ops = N.div_ceil(3) as usize;
    assert_eq!(outcome.evaluated, N as usize);
    assert_eq!(outcome.grants_removed, N as usize - ops);
    assert_eq!(outcome.sessions_terminated, N as usize - ops);
    let web = w.handle.current().resources.by_name("web").unwrap().id;
    let grants = w.enforcer.grants();
    assert_eq!(
        grants.len(),
        2 * ops,
        "ssh and web of each ops session (web inherited where its partner held it), nothing else"
    );
    for (src, resource, id) in grants {
        let s = w.sessions.get(id).expect("a grant of a known session");
        assert!(s.is_live() && s.source == src, "{s:?}");
        assert!(s.grants.iter().any(|g| g.resource_id == resource));
        if resource == web {
            assert!(s.identity.in_group("ops"));
        }
    }
    assert_eq!(w.sessions.live_count(), ops);
    assert_eq!(w.enforcer.revoked().len(), N as usize - ops);
}
