//! Group commit throughput: durable commits per second and their latency, printed, never
//! asserted (run: `cargo test --release store::bench -- --ignored --nocapture`).

use std::{
    sync::atomic::Ordering,
    thread,
    time::{Duration, Instant},
};

use super::{
    Store, Write,
    testing::{TempDir, event, session},
};
use crate::audit::event::AuditKind;

const COMMITS_PER_CALLER: usize = 2000;

fn small_commit(caller: usize, i: usize, with_session: bool) -> Vec<Write> {
    let id = ((caller as u64) << 32) | (i as u64 + 1);
    let mut writes = vec![Write::Audit(event(AuditKind::FlowOpened, Some(id), None))];
    if with_session {
        writes.push(Write::PutSession(session(id, "alice@corp.example").into()));
    }
    writes
}

fn report(label: &str, store: &Store, elapsed: Duration, mut latencies: Vec<Duration>) {
    latencies.sort_unstable();
    let pick = |q: f64| latencies[((latencies.len() - 1) as f64 * q) as usize];
    let transactions = store.hooks().transactions.load(Ordering::Relaxed).max(1);
    let commit_nanos = store.hooks().commit_nanos.load(Ordering::Relaxed);
    println!(
        "{label:<34} {:>6.0} commits/s  p50 {:>8.2?}  p99 {:>8.2?}  {:.1} commits per \
         transaction, {:.2?} in redb commit (fsync) per transaction",
        latencies.len() as f64 / elapsed.as_secs_f64(),
        pick(0.50),
        pick(0.99),
        latencies.len() as f64 / transactions as f64,
        Duration::from_nanos(commit_nanos / transactions),
    );
}

fn threads(label: &str, callers: usize, with_session: bool) {
    let dir = TempDir::new("bench");
    let store = Store::open(&dir.state_file()).expect("open");
    let start = Instant::now();
    let workers: Vec<_> = (0..callers)
        .map(|caller| {
            let store = store.clone();
            thread::spawn(move || {
                (0..COMMITS_PER_CALLER)
                    .map(|i| {
                        let t = Instant::now();
                        store
                            .commit(small_commit(caller, i, with_session))
                            .expect("commit");
                        t.elapsed()
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let latencies = workers
        .into_iter()
        .flat_map(|w| w.join().expect("caller"))
        .collect();
    report(label, &store, start.elapsed(), latencies);
}

fn tasks(label: &str, callers: usize) {
    let dir = TempDir::new("bench");
    let store = Store::open(&dir.state_file()).expect("open");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a runtime");
    let start = Instant::now();
    let latencies = runtime.block_on(async {
        let tasks: Vec<_> = (0..callers)
            .map(|caller| {
                let store = store.clone();
                tokio::spawn(async move {
                    let mut latencies = Vec::with_capacity(COMMITS_PER_CALLER);
                    for i in 0..COMMITS_PER_CALLER {
                        let t = Instant::now();
                        store
                            .submit(small_commit(caller, i, false))
                            .await
                            .expect("answered")
                            .expect("commit");
                        latencies.push(t.elapsed());
                    }
                    latencies
                })
            })
            .collect();
        let mut all = Vec::new();
        for task in tasks {
            all.extend(task.await.expect("task"));
        }
        all
    });
    report(label, &store, start.elapsed(), latencies);
}

#[test]
#[ignore = "benchmark: prints figures; run with --ignored --nocapture, in release"]
fn group_commit_throughput() {
    threads("1 thread, audit event", 1, false);
    threads("8 threads, audit event", 8, false);
    threads("8 threads, session + audit event", 8, true);
    tasks("8 async tasks, audit event", 8);
}
