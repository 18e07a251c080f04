//! An admission flood from one source beyond its rate limit: the flooder is answered 429
//! `rate_limited` and gets no more sessions than the limit allows, while a client from
//! another source is still admitted.

use std::{
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use flowwarden_tests::{
    flood::{FloodStack, Tally, forged, hammer, mint, paced},
    privileged::require_root,
};

const POLICY: &str = "[[resource]]\nname = \"echo\"\nprotocol = \"tcp\"\nports = [7000]\n\n\
                      [[rule]]\nname = \"staff\"\ngroups = [\"staff\"]\nresources = [\"echo\"]\n";
/// A low limit, so that one flooding thread is far beyond it within a second.
const PER_SEC: u32 = 5;
const BURST: u32 = 5;
/// How long the flood lasts; the other source admits in the middle of it.
const FLOOD: Duration = Duration::from_secs(4);

#[test]
fn a_flood_from_one_source_does_not_keep_another_source_out() {
    if !require_root("a_flood_from_one_source_does_not_keep_another_source_out") {
        return;
    }
    let stack = FloodStack::start(
        "aflood",
        POLICY,
        &format!("rate_per_sec = {PER_SEC}\nrate_burst = {BURST}"),
        2,
    )
    .expect("starting the agent with two sources");
    let (flooder, other) = (stack.sources[0], stack.sources[1]);
    // Valid and forged tokens in turn: neither kind may get past the limit.
    let flood_tokens: Vec<String> = mint(&stack, "flooder", 4, &["staff"])
        .expect("minting")
        .iter()
        .flat_map(|t| [t.clone(), forged(t)])
        .collect();
    let other_tokens = mint(&stack, "other", 3, &["staff"]).expect("minting");

    let stop = AtomicBool::new(false);
    let (flood, others, flood_secs) = stack.pair.client.run(|| {
        std::thread::scope(|s| {
            let started = Instant::now();
            let flooding = s.spawn(|| hammer(&stack, &flooder, &flood_tokens, false, &stop));
            // Well inside the flood: the flooder's burst is long gone by then.
            std::thread::sleep(Duration::from_millis(1_000));
            let others = paced(
                &stack,
                &other,
                &other_tokens,
                Instant::now(),
                Duration::from_millis(500),
            );
            std::thread::sleep(FLOOD.saturating_sub(started.elapsed()));
            stop.store(true, Ordering::Relaxed);
            let flood = flooding.join().unwrap();
            (flood, others, started.elapsed().as_secs_f64())
        })
    });
    let flood: Tally = flood.expect("flooding");
    let others: Tally = others.expect("admitting from the other source");
    let log = || stack.agent.as_ref().map(|a| a.log()).unwrap_or_default();

    assert_eq!(
        others.admitted,
        other_tokens.len(),
        "the other source, admitting at 2/s during the flood, was refused: {others:?}\n\
         agent log:\n{}",
        log()
    );
    assert!(
        flood.rate_limited > 0,
        "the flooder ({} attempts) never got 429 rate_limited: {flood:?}",
        flood.attempts()
    );
    let message = flood.first_rate_limited.clone().unwrap_or_default();
    let expected = format!("too many attempts from {}", flooder.client);
    assert!(
        message.contains(&expected),
        "the 429 should say {expected:?} (the documented rate_limited answer), said {message:?}"
    );
    assert_eq!(
        flood.failed, 0,
        "the flooder's attempts should be answered (201, 401 or 429), not fail: {flood:?}"
    );
    // The limit lets through at most the burst plus the refill over the flood's duration,
    // admitted (valid tokens) or refused after verification (forged ones).
    let ceiling = f64::from(BURST) + f64::from(PER_SEC) * (flood_secs + 0.5);
    let through = flood.admitted + flood.rejected;
    assert!(
        flood.admitted >= 1 && flood.rejected >= 1 && through as f64 <= ceiling,
        "the flooder got {} admitted and {} refused in {flood_secs:.1} s; the limit lets 2 to \
         {ceiling:.0} through",
        flood.admitted,
        flood.rejected
    );
    assert!(
        flood.attempts() as f64 > ceiling * 2.0,
        "the flood must be well beyond the limit to test it: only {} attempts",
        flood.attempts()
    );

    // What the agent holds agrees: the rate-limited attempts created nothing, and the other
    // source's sessions are its own.
    let listed = stack
        .ctl_json(&["sessions", "list"])
        .expect("sessions list");
    let from = |ip: std::net::Ipv4Addr| {
        listed
            .as_array()
            .expect("a list")
            .iter()
            .filter(|s| s["source"] == ip.to_string())
            .count()
    };
    assert_eq!(
        from(flooder.client),
        flood.admitted,
        "sessions from the flooding source should be exactly its 201 answers"
    );
    assert_eq!(
        from(other.client),
        other_tokens.len(),
        "sessions from the other source"
    );
}
