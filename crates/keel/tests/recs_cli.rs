//! `keel optimize` and `keel recs` refuse bad arguments before they connect: nothing listens at
//! the endpoint, so a command that tried to connect would fail "unavailable" (exit 7) instead
//! of with the exit code of its refusal (2 from clap, 3 for an invalid value).

mod common;

use std::process::{Command, Output};

use common::{KEEL, expect_exit};

/// Runs `keel args` against an endpoint nothing listens at, with a well-formed key.
fn keel(args: &[&str]) -> Output {
    let port = keel_testkit::free_port().expect("a free port");
    Command::new(KEEL)
        .args(args)
        .env("KEEL_ENDPOINT", format!("http://127.0.0.1:{port}"))
        .env(
            "KEEL_API_KEY",
            "keel_nobodynobodynobodynobodynobodynobody0000",
        )
        .env_remove("KEEL_API_KEY_FILE")
        .env_remove("KEEL_TIMEOUT")
        .output()
        .expect("run keel")
}

#[test]
fn a_bad_budget_or_window_is_an_invalid_argument_naming_the_flag() {
    for (budget, says) in [
        (
            "5XB",
            "error: --budget: \"5XB\" is not a size; write e.g. 500MB",
        ),
        ("lots", "--budget: \"lots\" is not a size"),
        ("1GBs", "--budget: \"1GBs\" is not a size"),
        ("0", "--budget: \"0\" leaves no room for an index"),
        ("99999999999TB", "--budget: \"99999999999TB\" is too large"),
    ] {
        let flag = format!("--budget={budget}");
        expect_exit(&keel(&["optimize", "db", &flag]), 3, says);
    }
    expect_exit(
        &keel(&["optimize", "db", "--budget=-1GB"]),
        3,
        "--budget: \"-1GB\" is not a size",
    );
    expect_exit(
        &keel(&["optimize", "db", "--window", "soon"]),
        3,
        "--window: \"soon\" is not a duration",
    );
    // A good budget gets as far as connecting.
    expect_exit(
        &keel(&["optimize", "db", "--budget", "1.5GB"]),
        7,
        "cannot reach Keel",
    );
}

#[test]
fn counts_out_of_range_are_refused_by_the_parser() {
    for args in [
        &["optimize", "db", "--max-indexes", "0"][..],
        &["optimize", "db", "--max-indexes", "51"][..],
        &["optimize", "db", "--max-statements", "501"][..],
        &["optimize", "db", "--max-statements", "many"][..],
        &["recs", "ls", "--limit", "0"][..],
        &["recs", "ls", "--limit", "501"][..],
    ] {
        expect_exit(&keel(args), 2, "error: invalid value");
    }
    expect_exit(&keel(&["optimize"]), 2, "<INSTANCE>");
}

#[test]
fn states_are_the_recommendation_states_with_either_separator() {
    let stderr =
        String::from_utf8_lossy(&keel(&["recs", "ls", "--state", "done"]).stderr).into_owned();
    for state in [
        "proposed",
        "applying",
        "applied",
        "rolling-back",
        "rolled-back",
        "failed",
    ] {
        assert!(stderr.contains(state), "{state} in {stderr}");
    }
    expect_exit(
        &keel(&["recs", "ls", "--state", "done"]),
        2,
        "invalid value",
    );
    // Keel's own spelling is taken too; then it connects.
    expect_exit(
        &keel(&["recs", "ls", "--state", "rolled_back"]),
        7,
        "cannot reach Keel",
    );
}

#[test]
fn a_mistyped_recommendation_id_is_refused_before_connecting() {
    for command in ["show", "apply", "rollback"] {
        expect_exit(
            &keel(&["recs", command, "not-an-id"]),
            3,
            "\"not-an-id\" is not a recommendation id",
        );
        expect_exit(
            &keel(&["recs", command, "7d8"]),
            3,
            "is not a recommendation id",
        );
    }
    // Whole and short ids get as far as connecting.
    for id in ["0198f3a2-7c4e-7b1a-9d2e-3f4a5b6c7d8e", "3f4a5b6c7d8e"] {
        expect_exit(&keel(&["recs", "show", id]), 7, "cannot reach Keel");
    }
}

#[test]
fn waiting_is_bounded_only_with_wait() {
    expect_exit(
        &keel(&["recs", "apply", "3f4a5b6c7d8e", "--wait-timeout", "5m"]),
        2,
        "--wait",
    );
    expect_exit(
        &keel(&[
            "recs",
            "rollback",
            "3f4a5b6c7d8e",
            "--wait",
            "--wait-timeout",
            "soon",
        ]),
        2,
        "is not a duration",
    );
    expect_exit(
        &keel(&[
            "recs",
            "apply",
            "3f4a5b6c7d8e",
            "--wait",
            "--wait-timeout",
            "10m",
        ]),
        7,
        "cannot reach Keel",
    );
}

#[test]
fn help_says_what_each_command_takes() {
    let help = expect_exit(&keel(&["optimize", "--help"]), 0, "");
    for needle in [
        "--budget",
        "500MB, 1.5GB, 200kB",
        "powers of 1024",
        "--max-indexes",
        "--window",
        "--max-statements",
    ] {
        assert!(help.contains(needle), "{needle} in {help}");
    }
    let help = expect_exit(&keel(&["recs", "--help"]), 0, "");
    for needle in ["ls", "show", "apply", "rollback"] {
        assert!(help.contains(needle), "{needle} in {help}");
    }
    let help = expect_exit(&keel(&["recs", "apply", "--help"]), 0, "");
    for needle in ["--wait", "--wait-timeout", "[default: 1h]", "--timeout"] {
        assert!(help.contains(needle), "{needle} in {help}");
    }
}
