//! Tests of reload and the watcher: the last good policy stays on a bad edit, good edits swap
//! in, each bad state is reported once, and dropping the guard stops the thread.

use std::{
    sync::mpsc,
    time::{Duration, Instant},
};

use super::*;
use crate::policy::testdir::TestDir;

const SSH: &str = "[[resource]]\nname = 'ssh'\nprotocol = 'tcp'\nports = [22]\n";
const WEB: &str = "[[resource]]\nname = 'web'\nprotocol = 'tcp'\nports = [443]\n";
const BAD: &str = "[[resource]]\nname = 'ssh'\nprotocol = 'tcp'\nports = [0]\n";

fn names(p: &Policy) -> Vec<&str> {
    p.resources
        .resources
        .iter()
        .map(|r| r.name.as_str())
        .collect()
}

#[test]
fn reload_keeps_the_last_good_policy() {
    let dir = TestDir::new();
    dir.write("a.toml", SSH);
    let handle = PolicyHandle::new(dir.path()).unwrap();
    let first = handle.current();
    assert_eq!(names(&first), ["ssh"]);
    assert!(matches!(handle.reload().unwrap(), Reload::Unchanged));

    dir.write("a.toml", BAD);
    let err = handle.reload().unwrap_err().to_string();
    let path = dir.path().join("a.toml");
    assert_eq!(
        err,
        format!(
            "{}:4: resource.ports: 0 is not a port: use 1 to 65535; the last good policy \
             ({}) stays in force",
            path.display(),
            first.fingerprint
        )
    );
    assert!(Arc::ptr_eq(&handle.current(), &first));

    dir.write("a.toml", SSH);
    dir.write("b.toml", WEB);
    let Reload::Changed(second) = handle.reload().unwrap() else {
        panic!("expected the new policy to be in force");
    };
    assert_eq!(names(&second), ["ssh", "web"]);
    assert!(Arc::ptr_eq(&handle.current(), &second));
    assert_ne!(second.fingerprint, first.fingerprint);

    // A removed directory is an error too, and changes nothing.
    drop(dir);
    let err = handle.reload().unwrap_err().to_string();
    assert!(err.starts_with("cannot read policy directory"), "{err}");
    assert!(err.ends_with("stays in force"), "{err}");
    assert!(Arc::ptr_eq(&handle.current(), &second));
}

#[test]
fn the_initial_load_must_succeed() {
    let dir = TestDir::new();
    dir.write("a.toml", BAD);
    assert!(PolicyHandle::new(dir.path()).is_err());
    let missing = dir.path().join("missing");
    let err = PolicyHandle::new(&missing).unwrap_err().to_string();
    assert!(
        err.starts_with(&format!(
            "cannot read policy directory {}:",
            missing.display()
        )),
        "{err}"
    );
}

/// What the watcher reported: `Ok(resource names)` or `Err(message)`.
type Reports = mpsc::Receiver<Result<Vec<String>, String>>;

/// Watches `dir` every 50 ms.
fn watching(dir: &TestDir) -> (Arc<PolicyHandle>, WatchGuard, Reports) {
    let handle = Arc::new(PolicyHandle::new(dir.path()).unwrap());
    let (tx, rx) = mpsc::channel();
    let guard = watch(Arc::clone(&handle), INTERVAL, move |change| {
        let report = change
            .map(|p| names(&p).into_iter().map(String::from).collect())
            .map_err(|e| e.to_string());
        let _ = tx.send(report);
    });
    (handle, guard, rx)
}

const INTERVAL: Duration = Duration::from_millis(50);
/// Generous, for loaded machines; the figure printed is what to look at.
const DEADLINE: Duration = Duration::from_secs(3);

fn next(rx: &Reports) -> Result<Vec<String>, String> {
    let start = Instant::now();
    let report = rx
        .recv_timeout(DEADLINE)
        .unwrap_or_else(|e| panic!("expected a report from the watcher within {DEADLINE:?}: {e}"));
    println!("watcher reported after {:?}", start.elapsed());
    report
}

fn quiet(rx: &Reports) {
    if let Ok(report) = rx.recv_timeout(INTERVAL * 6) {
        panic!("expected no report, got {report:?}");
    }
}

#[test]
fn the_watcher_sees_edits_additions_and_removals() {
    let dir = TestDir::new();
    dir.write("a.toml", SSH);
    let (handle, guard, rx) = watching(&dir);
    quiet(&rx);

    dir.write("b.toml", WEB);
    assert_eq!(next(&rx), Ok(vec!["ssh".into(), "web".into()]));
    assert_eq!(names(&handle.current()), ["ssh", "web"]);

    std::fs::remove_file(dir.path().join("a.toml")).unwrap();
    assert_eq!(next(&rx), Ok(vec!["web".into()]));

    // Same size, written twice within one timestamp tick: still seen.
    dir.write("b.toml", &WEB.replace("443", "444"));
    dir.write("b.toml", &WEB.replace("443", "445"));
    let mut last = next(&rx);
    while let Ok(report) = rx.recv_timeout(INTERVAL * 6) {
        last = report;
    }
    assert_eq!(last, Ok(vec!["web".into()]));
    assert_eq!(handle.current().resources.resources[0].ports, [(445, 445)]);

    // Touching a file (same contents) is no change.
    dir.write("b.toml", &WEB.replace("443", "445"));
    quiet(&rx);

    // Editors' lock files are not policy.
    dir.write(".#b.toml", "garbage");
    quiet(&rx);
    drop(guard);
}

#[test]
fn each_bad_state_is_reported_once_and_the_last_good_stays() {
    let dir = TestDir::new();
    dir.write("a.toml", SSH);
    let (handle, guard, rx) = watching(&dir);
    let good = handle.current();

    dir.write("a.toml", BAD);
    let err = next(&rx).unwrap_err();
    assert!(err.contains("a.toml:4: resource.ports"), "{err}");
    assert!(err.ends_with("stays in force"), "{err}");
    quiet(&rx);
    assert!(Arc::ptr_eq(&handle.current(), &good));

    dir.write("a.toml", &BAD.replace("ports", "portz"));
    let err = next(&rx).unwrap_err();
    assert!(err.contains("resource.portz: unknown key"), "{err}");
    quiet(&rx);

    // Back to what is in force: nothing to report, and the same bad edit counts again.
    dir.write("a.toml", SSH);
    quiet(&rx);
    dir.write("a.toml", BAD);
    assert!(next(&rx).is_err());

    dir.write("a.toml", WEB);
    assert_eq!(next(&rx), Ok(vec!["web".into()]));
    assert_eq!(names(&handle.current()), ["web"]);

    // Dropping the guard stops the thread, and with it the callback (and its sender).
    drop(guard);
    dir.write("a.toml", SSH);
    assert_eq!(
        rx.recv_timeout(DEADLINE),
        Err(mpsc::RecvTimeoutError::Disconnected)
    );
}

#[test]
fn the_first_poll_catches_edits_made_before_the_watcher_started() {
    let dir = TestDir::new();
    dir.write("a.toml", SSH);
    let handle = Arc::new(PolicyHandle::new(dir.path()).unwrap());
    dir.write("b.toml", WEB);
    let (tx, rx) = mpsc::channel();
    let _guard = watch(Arc::clone(&handle), INTERVAL, move |change| {
        let _ = tx.send(change.is_ok());
    });
    assert_eq!(rx.recv_timeout(DEADLINE), Ok(true));
    assert_eq!(names(&handle.current()), ["ssh", "web"]);
}

#[test]
fn handles_are_shared_across_threads() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<PolicyHandle>();
    send_sync::<Policy>();
}
