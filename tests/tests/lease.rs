//! The hold's lease rules, on a noop agent over real mTLS.

use std::time::{Duration, Instant};

use stillpoint_controller::core::agents::{ControllerTls, HeldFreeze};
use stillpoint_proto::pb::{self, agent_client::AgentClient, freeze_event::Event};
use stillpoint_tests::harness::agent::AgentProc;
use stillpoint_tests::harness::pki::{CONTROLLER_IDENTITY, Pki, agent_identity};
use tonic::transport::Channel;

struct Setup {
    _pki: Pki,
    agent: AgentProc,
    client: AgentClient<Channel>,
    tls: ControllerTls,
    identity: String,
}

async fn setup(member: &str) -> Setup {
    setup_with(member, &[]).await
}

async fn setup_with(member: &str, env: &[(&str, &str)]) -> Setup {
    let pki = Pki::new().unwrap();
    let identity = agent_identity(member);
    let mut spec =
        stillpoint_tests::harness::agent::noop(member, pki.issue(member, &identity).unwrap())
            .with("STILLPOINT_MAX_TTL", "2m");
    for (k, v) in env {
        spec = spec.with(k, v);
    }
    let agent = AgentProc::spawn(&spec).unwrap();
    let tls = ControllerTls::watch(
        pki.issue("controller", CONTROLLER_IDENTITY).unwrap(),
        Duration::from_secs(10),
    )
    .unwrap();
    let client = tls.connect(&agent.grpc_addr(), &identity).await.unwrap();
    Setup {
        _pki: pki,
        agent,
        client,
        tls,
        identity,
    }
}

impl Setup {
    /// Whether the agent holds a freeze right now, from its own `/healthz`.
    fn frozen(&self) -> bool {
        self.agent
            .admin_get("/healthz")
            .unwrap()
            .1
            .contains("frozen by")
    }

    /// A second controller connection (a different stream owner).
    async fn other_client(&self) -> AgentClient<Channel> {
        self.tls
            .connect(&self.agent.grpc_addr(), &self.identity)
            .await
            .unwrap()
    }
}

async fn wait_thawed(s: &Setup, bound: Duration) -> Duration {
    let started = Instant::now();
    while s.frozen() {
        assert!(started.elapsed() < bound, "still frozen after {bound:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    started.elapsed()
}

#[tokio::test]
async fn an_unrenewed_freeze_thaws_by_itself_within_the_ttl() {
    let mut s = setup("expiry").await;
    let ttl = Duration::from_millis(600);
    let started = Instant::now();
    let mut hold = HeldFreeze::start(&mut s.client, "b-expiry", ttl)
        .await
        .unwrap();
    assert!(s.frozen());
    // The stream stays open; only the renewals are missing.
    let mut failed = None;
    let result = loop {
        match hold.next_event().await.unwrap() {
            Some(pb::FreezeEvent {
                event: Some(Event::Failed(f)),
            }) => failed = Some(f),
            Some(pb::FreezeEvent {
                event: Some(Event::Thawed(t)),
            }) => break t.result.unwrap(),
            Some(_) => {}
            None => panic!("stream ended without a thaw event"),
        }
    };
    let elapsed = started.elapsed();
    assert!(elapsed >= ttl, "thawed before the TTL: {elapsed:?}");
    assert!(
        elapsed < ttl + Duration::from_secs(1),
        "thawed too late: {elapsed:?}"
    );
    assert_eq!(result.cause, pb::ThawCause::LeaseExpired as i32);
    assert!(failed.unwrap().reason.contains("lease expired"));
    assert!(!s.frozen());
    assert_eq!(
        s.agent
            .metric("stillpoint_agent_lease_expiries_total")
            .unwrap(),
        1.0
    );
    assert_eq!(s.agent.metric("stillpoint_agent_frozen ").unwrap(), 0.0);
}

#[tokio::test]
async fn renewals_keep_the_hold_past_its_ttl() {
    let mut s = setup("renew").await;
    let ttl = Duration::from_millis(400);
    let hold = HeldFreeze::start(&mut s.client, "b-renew", ttl)
        .await
        .unwrap();
    for _ in 0..8 {
        tokio::time::sleep(ttl / 4).await;
        hold.renew().await.unwrap();
    }
    assert!(s.frozen(), "renewed for 2 x TTL, still must be held");
    assert_eq!(s.agent.metric("stillpoint_agent_frozen ").unwrap(), 1.0);
    drop(hold);
    wait_thawed(&s, Duration::from_secs(1)).await;
}

#[tokio::test]
async fn dropping_the_holders_stream_thaws_at_once() {
    let mut s = setup("drop").await;
    let hold = HeldFreeze::start(&mut s.client, "b-drop", Duration::from_secs(60))
        .await
        .unwrap();
    assert!(s.frozen());
    drop(hold);
    let took = wait_thawed(&s, Duration::from_secs(2)).await;
    assert!(took < Duration::from_secs(2), "{took:?}");
    s.agent
        .wait_log("holder's stream closed", Duration::from_secs(2))
        .unwrap();
}

#[tokio::test]
async fn a_second_backup_is_refused_and_told_who_holds() {
    let mut s = setup("busy").await;
    let _hold = HeldFreeze::start(&mut s.client, "b-first", Duration::from_secs(30))
        .await
        .unwrap();
    let mut other = s.other_client().await;
    let refused = HeldFreeze::start(&mut other, "b-second", Duration::from_secs(30))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
    assert!(
        refused
            .message()
            .contains("already frozen by backup 'b-first'"),
        "{}",
        refused.message()
    );
    assert!(s.frozen(), "the first hold is untouched");
}

#[tokio::test]
async fn the_same_backup_id_is_idempotent() {
    let mut s = setup("same-id").await;
    let ttl = Duration::from_secs(30);
    let mut first = HeldFreeze::start(&mut s.client, "b-same", ttl)
        .await
        .unwrap();
    assert!(!first.frozen.resumed);
    assert_eq!(
        s.agent
            .metric("stillpoint_agent_hold_takeovers_total")
            .unwrap(),
        0.0
    );
    let mut other = s.other_client().await;
    let second = HeldFreeze::start(&mut other, "b-same", ttl).await.unwrap();
    assert!(
        second.frozen.resumed,
        "the second stream takes the hold over"
    );
    assert_eq!(
        s.agent
            .metric("stillpoint_agent_hold_takeovers_total")
            .unwrap(),
        1.0,
        "counted"
    );
    assert_eq!(first.frozen.position, second.frozen.position);
    // The first stream is told, and its end no longer thaws.
    match first.next_event().await.unwrap() {
        Some(pb::FreezeEvent {
            event: Some(Event::Failed(f)),
        }) => {
            assert!(f.reason.contains("took the hold over"), "{}", f.reason)
        }
        other => panic!("expected a takeover notice, got {other:?}"),
    }
    drop(first);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(s.frozen(), "the superseded stream must not thaw the hold");
    second.renew().await.unwrap();
    drop(second);
    wait_thawed(&s, Duration::from_secs(2)).await;
}

#[tokio::test]
async fn a_superseded_stream_cannot_thaw_the_new_owners_hold() {
    let mut s = setup("superseded").await;
    let ttl = Duration::from_secs(30);
    let first = HeldFreeze::start(&mut s.client, "b-super", ttl)
        .await
        .unwrap();
    let mut other = s.other_client().await;
    let mut second = HeldFreeze::start(&mut other, "b-super", ttl).await.unwrap();
    assert!(second.frozen.resumed);
    // The old owner asks for a thaw (and for a flush) on its stream.
    let _ = first.request_flush(true).await;
    let _ = first.request_thaw(true).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        s.frozen(),
        "the superseded stream thawed the new owner's hold"
    );
    // The new owner still holds it: it renews, flushes and thaws.
    second.renew().await.unwrap();
    let flushed = second.flush(true).await.unwrap();
    assert!(flushed.error.is_empty(), "{}", flushed.error);
    second.request_thaw(true).await.unwrap();
    let result = second.thawed().await.unwrap().unwrap();
    assert_eq!(result.cause, pb::ThawCause::Requested as i32);
    assert!(!s.frozen());
}

#[tokio::test]
async fn thaw_is_idempotent_and_an_unknown_id_is_a_noop() {
    let mut s = setup("thaw").await;
    let unknown = s
        .client
        .thaw(pb::ThawRequest {
            backup_id: "b-never".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!unknown.known);
    assert!(
        unknown.message.contains("nothing to thaw"),
        "{}",
        unknown.message
    );

    let mut hold = HeldFreeze::start(&mut s.client, "b-thaw", Duration::from_secs(30))
        .await
        .unwrap();
    let first = s
        .client
        .thaw(pb::ThawRequest {
            backup_id: "b-thaw".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(first.known && !first.already_thawed);
    assert_eq!(
        first.result.as_ref().unwrap().cause,
        pb::ThawCause::Requested as i32
    );
    assert!(!s.frozen());
    // The holder's stream hears about it and ends.
    let result = hold.thawed().await.unwrap().unwrap();
    assert_eq!(result.backup_id, "b-thaw");
    assert!(hold.next_event().await.unwrap().is_none());

    let again = s
        .client
        .thaw(pb::ThawRequest {
            backup_id: "b-thaw".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(again.known && again.already_thawed, "{again:?}");
    assert_eq!(again.result, first.result);
}

#[tokio::test]
async fn thaw_over_the_stream_returns_the_result() {
    let mut s = setup("stream-thaw").await;
    let mut hold = HeldFreeze::start(&mut s.client, "b-stream", Duration::from_secs(30))
        .await
        .unwrap();
    hold.request_thaw(true).await.unwrap();
    let result = hold.thawed().await.unwrap().unwrap();
    assert_eq!(result.cause, pb::ThawCause::Requested as i32);
    assert!(result.held_us > 0);
    assert!(!s.frozen());
}

#[tokio::test]
async fn invalid_ttls_are_refused_and_the_agent_stays_up() {
    let mut s = setup("bad-ttl").await;
    for ttl in [Duration::ZERO, Duration::from_secs(3600)] {
        let err = HeldFreeze::start(&mut s.client, "b-ttl", ttl)
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");
        assert!(err.message().contains("lease TTL"), "{}", err.message());
    }
    let described = s
        .client
        .describe(pb::DescribeRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(described.max_ttl_ms, 120_000);
    assert!(!s.frozen());
}

#[tokio::test]
async fn sigterm_thaws_before_exiting() {
    let s = setup("sigterm").await;
    let mut client = s.client.clone();
    let mut hold = HeldFreeze::start(&mut client, "b-term", Duration::from_secs(60))
        .await
        .unwrap();
    let started = Instant::now();
    // Wait for the exit off the runtime, so this client keeps serving its
    // side of the connection meanwhile (as a real controller does).
    let mut agent = s.agent;
    let (status, agent) = tokio::task::spawn_blocking(move || {
        let status = agent.terminate(Duration::from_secs(10)).unwrap();
        (status, agent)
    })
    .await
    .unwrap();
    assert!(status.success(), "{status}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "an ended hold's stream must not hold up the exit: {:?}",
        started.elapsed()
    );
    let result = hold
        .thawed()
        .await
        .unwrap()
        .expect("a thawed event before the end");
    assert_eq!(result.cause, pb::ThawCause::Shutdown as i32);
    let logs = agent.logs();
    let thawed = logs.find("thawed").expect("the hold was thawed");
    let stopped = logs.find("stopped").expect("the agent stopped");
    assert!(thawed < stopped, "thaw must come before the exit:\n{logs}");
    assert!(logs.contains("agent shutting down"), "{logs}");
}

#[tokio::test]
async fn freeze_latency_is_configurable_and_positions_advance() {
    let mut s = setup_with("latency", &[("STILLPOINT_NOOP_FREEZE_LATENCY", "150ms")]).await;
    let before = s
        .client
        .position(pb::PositionRequest {})
        .await
        .unwrap()
        .into_inner();
    let started = Instant::now();
    let hold = HeldFreeze::start(&mut s.client, "b-latency", Duration::from_secs(5))
        .await
        .unwrap();
    assert!(started.elapsed() >= Duration::from_millis(150));
    assert!(hold.frozen.freeze_duration_us >= 150_000);
    use stillpoint_proto::PositionExt;
    let at_freeze = hold.frozen.position.clone().unwrap();
    assert!(
        at_freeze
            .compare(before.position.as_ref().unwrap())
            .unwrap()
            .is_gt()
    );
    let waited = s
        .client
        .wait_for_position(pb::WaitForPositionRequest {
            target: Some(at_freeze.clone()),
            timeout_ms: 1000,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(waited.reached.unwrap().reached(&at_freeze).unwrap());
}

/// The worst ordering for a thaw through a [`Holder`]: the agent's
/// `thawed` answer has arrived before the hold's task runs again. The
/// task must still take it as that thaw's answer, never as the agent
/// thawing on its own (which would fail a completed backup). Made
/// deterministic: the agent's connection runs on a runtime of its own,
/// and the hold's runtime — one thread — is stopped from the moment the
/// thaw is sent until the agent has thawed.
#[test]
fn a_thaw_answered_before_the_holds_task_runs_again_is_its_answer() {
    use stillpoint_controller::core::holder::Holder;
    let io = tokio::runtime::Runtime::new().unwrap();
    let mut s = io.block_on(setup("thaw-order"));
    let ttl = Duration::from_secs(30);
    for round in 0..20 {
        let id = format!("b-order-{round}");
        let held = io
            .block_on(HeldFreeze::start(&mut s.client, &id, ttl))
            .unwrap();
        let hold = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let result = hold.block_on(async {
            let holder = Holder::spawn(held, ttl);
            // The hold's task runs until it waits for a request or an event.
            for _ in 0..10 {
                tokio::task::yield_now().await;
            }
            let mut thaw = std::pin::pin!(holder.thaw(true));
            // Once polled, the thaw's request is queued and the thaw is on
            // its way; then this runtime's only thread waits, so the hold's
            // task cannot run while the agent thaws and answers.
            assert!(futures_util::poll!(thaw.as_mut()).is_pending());
            let started = Instant::now();
            while s.frozen() {
                assert!(started.elapsed() < ttl, "round {round}: never thawed");
                std::thread::sleep(Duration::from_millis(5));
            }
            std::thread::sleep(Duration::from_millis(50));
            thaw.await
        });
        let result = result.unwrap_or_else(|e| panic!("round {round}: {e}"));
        assert_eq!(
            result.cause,
            pb::ThawCause::Requested as i32,
            "round {round}"
        );
    }
}
