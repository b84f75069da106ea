//! The exec engine: a held command as the freeze.

use std::path::Path;
use std::time::{Duration, Instant};

use stillpoint_tests::harness::fleet::{Agent, Fleet};
use stillpoint_tests::harness::{pid_alive, wait_for};

async fn agent(fleet: &Fleet, member: &str, env: &[(&str, &str)]) -> Agent {
    let mut spec = fleet
        .spec(member, "exec")
        .unwrap()
        .with("STILLPOINT_EXEC_GRACE", "1s");
    for (k, v) in env {
        spec = spec.with(k, v);
    }
    fleet.start(&spec).await.unwrap()
}

fn pid_in(file: &Path) -> u32 {
    let mut pid = 0;
    wait_for(
        "the hold command's pid file",
        Duration::from_secs(5),
        || {
            pid = std::fs::read_to_string(file)
                .ok()
                .and_then(|s| s.trim().parse().ok())
                .unwrap_or(0);
            Ok(pid != 0)
        },
    )
    .unwrap();
    pid
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_command_holds_from_its_ready_line_until_the_thaw() {
    let fleet = Fleet::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let pidfile = dir.path().join("pid");
    let command = format!(
        "echo $$ > {}; sleep 0.3; echo frozen-now; exec sleep 1000",
        pidfile.display()
    );
    let mut a = agent(
        &fleet,
        "exec-line",
        &[
            ("STILLPOINT_EXEC_COMMAND", &command),
            ("STILLPOINT_EXEC_READY_LINE", "frozen-now"),
        ],
    )
    .await;
    let started = Instant::now();
    let mut hold = a.freeze("b-line", Duration::from_secs(30)).await.unwrap();
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "ready only at the line"
    );
    let pid = pid_in(&pidfile);
    assert!(pid_alive(pid));
    hold.request_thaw(true).await.unwrap();
    let result = hold.thawed().await.unwrap().unwrap();
    assert!(result.error.is_empty(), "{}", result.error);
    assert!(
        result.artefacts["exit_status"].contains("signal: 15"),
        "{:?}",
        result.artefacts
    );
    assert!(!pid_alive(pid));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ready_command_gates_the_freeze() {
    let fleet = Fleet::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let flag = dir.path().join("ready");
    let command = format!("sleep 0.4; touch {}; exec sleep 1000", flag.display());
    let probe = format!("test -f {}", flag.display());
    let mut a = agent(
        &fleet,
        "exec-probe",
        &[
            ("STILLPOINT_EXEC_COMMAND", &command),
            ("STILLPOINT_EXEC_READY_COMMAND", &probe),
        ],
    )
    .await;
    let started = Instant::now();
    let hold = a.freeze("b-probe", Duration::from_secs(30)).await.unwrap();
    assert!(started.elapsed() >= Duration::from_millis(400));
    assert!(flag.exists());
    drop(hold);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_that_exits_before_the_thaw_loses_the_hold() {
    let fleet = Fleet::new().unwrap();
    let mut a = agent(
        &fleet,
        "exec-exit",
        &[("STILLPOINT_EXEC_COMMAND", "sleep 0.5; exit 3")],
    )
    .await;
    let mut hold = a.freeze("b-exit", Duration::from_secs(30)).await.unwrap();
    let failed = Agent::failure(&mut hold, Duration::from_secs(3))
        .await
        .expect("hold lost");
    assert!(
        failed.reason.contains("exited before the thaw"),
        "{}",
        failed.reason
    );
    assert!(
        failed.reason.contains("exit status: 3"),
        "{}",
        failed.reason
    );

    let err = {
        let mut b = agent(
            &fleet,
            "exec-early",
            &[
                ("STILLPOINT_EXEC_COMMAND", "exit 7"),
                ("STILLPOINT_EXEC_READY_LINE", "never"),
            ],
        )
        .await;
        b.freeze("b-early", Duration::from_secs(30))
            .await
            .unwrap_err()
    };
    assert!(
        err.message().contains("exited before it was ready"),
        "{}",
        err.message()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_expiry_and_agent_death_both_end_the_command() {
    let fleet = Fleet::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let pidfile = dir.path().join("pid");
    let command = format!("echo $$ > {}; exec sleep 1000", pidfile.display());
    let mut a = agent(
        &fleet,
        "exec-lease",
        &[("STILLPOINT_EXEC_COMMAND", &command)],
    )
    .await;
    let ttl = Duration::from_secs(1);
    let _hold = a.freeze("b-lease", ttl).await.unwrap();
    let pid = pid_in(&pidfile);
    wait_for(
        "command ended by the lease",
        ttl + Duration::from_secs(1),
        || Ok(!pid_alive(pid)),
    )
    .unwrap();

    std::fs::remove_file(&pidfile).unwrap();
    let _hold = a.freeze("b-kill", Duration::from_secs(60)).await.unwrap();
    let pid = pid_in(&pidfile);
    a.proc.kill();
    wait_for(
        "command ended by the watchdog",
        Duration::from_secs(4),
        || Ok(!pid_alive(pid)),
    )
    .unwrap();
}
