//! Chapter 5's promises, from the real binary: real consumer processes on
//! ElasticMQ, a PSP that takes 1.2 s per charge, real SIGKILLs.

use std::process::Command;

#[test]
fn the_three_scenarios_hold_their_claims() {
    let report = chaos_lab::chapter::run_for_test(
        env!("CARGO_BIN_EXE_ch05-visibility-timeout"),
        &["--messages", "10", "--seed", "7"],
    );
    let runs = report["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 6);
    assert!(runs.iter().all(|run| run["backend"] == "sqs"));

    let (naive_short, hardened_short, sized) = (&runs[0], &runs[1], &runs[2]);
    assert_eq!(naive_short["visibility_timeout_ms"], 1000);
    assert!(naive_short["double_charges"].as_u64().unwrap() > 0);
    assert_eq!(hardened_short["double_charges"], 0);
    assert!(hardened_short["redeliveries"].as_u64().unwrap() > 0);
    // The sized timeout came from the measurement, not from a constant:
    // p99 × 2 rounded up to whole seconds.
    let p99 = hardened_short["charge_time_p99_ms"].as_u64().unwrap();
    let expected = (p99 * 2).div_ceil(1000) * 1000;
    assert_eq!(sized["visibility_timeout_ms"].as_u64().unwrap(), expected);

    let (bare, heartbeat) = (&runs[3], &runs[4]);
    assert!(heartbeat["lease_extensions"].as_u64().unwrap() > 0);
    assert!(heartbeat["redeliveries"].as_u64().unwrap() < bare["redeliveries"].as_u64().unwrap());

    let poison = &runs[5];
    let reasons: Vec<&str> = poison["dead_letters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|letter| letter["reason"].as_str().unwrap())
        .collect();
    assert_eq!(reasons.len(), 3, "{reasons:?}");
    assert!(reasons.iter().all(|reason| !reason.is_empty()));
    assert_eq!(poison["double_charges"], 0);
    assert_eq!(poison["lost_events"], 0);
    assert_eq!(report["claims_hold"], true);
}

#[test]
fn rabbitmq_is_refused_with_the_reason() {
    let output = Command::new(env!("CARGO_BIN_EXE_ch05-visibility-timeout"))
        .args(["--backend", "rabbitmq"])
        .output()
        .expect("the chapter binary runs");
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("sqs only"), "{stderr}");
}
