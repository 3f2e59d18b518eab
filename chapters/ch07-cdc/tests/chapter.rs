//! Chapter 7's promises, from the real binary against a real Postgres,
//! Kafka and Kafka Connect worker (its own per run), at a small size. The
//! relay comparison and the operations measurements are benchmark figures
//! for the book command, not claims a test holds.

const CHAPTER: &str = env!("CARGO_BIN_EXE_ch07-cdc");

#[test]
fn a_killed_kafka_connect_loses_nothing_and_the_hardened_consumer_absorbs_its_resends() {
    let report = chaos_lab::chapter::run_for_test(
        CHAPTER,
        &["--part", "chaos", "--messages", "120", "--seed", "7"],
    );
    let runs = report["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 3);
    for run in runs {
        assert_eq!(run["backend"], "kafka");
        assert_eq!(run["lost_events"], 0, "{run}");
        assert!(run["relay_kills"].as_u64().unwrap() >= 1, "{run}");
        // Every committed outbox row reached the topic.
        assert_eq!(
            run["topic_records"]["distinct_events"], run["audit"]["orders_committed"],
            "{run}"
        );
    }
    let (naive, at_least_once, exactly_once) = (&runs[0], &runs[1], &runs[2]);
    assert_eq!(naive["variant"], "naive");
    let resent = naive["topic_records"]["records"].as_u64().unwrap()
        - naive["topic_records"]["distinct_events"].as_u64().unwrap();
    assert!(resent > 0, "at-least-once sends records again: {naive}");
    assert!(naive["double_charges"].as_u64().unwrap() > 0, "{naive}");
    assert_eq!(at_least_once["double_charges"], 0, "{at_least_once}");
    assert_eq!(exactly_once["double_charges"], 0, "{exactly_once}");
    assert_eq!(
        exactly_once["topic_records"]["records"], exactly_once["topic_records"]["distinct_events"],
        "exactly-once source: no record twice on the topic: {exactly_once}"
    );
    assert_eq!(report["claims_hold"], true);
}
