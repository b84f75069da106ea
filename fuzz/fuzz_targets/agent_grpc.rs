//! The agent's gRPC service, handling any bytes as a client's messages,
//! over a noop engine: the first byte picks the RPC; for `Freeze` the rest
//! is the request stream's body (gRPC length-prefixed frames, decoded by
//! the server's own codec), for the others one encoded request. Nothing
//! may panic or hang (each call bounded), and once every hold it took is
//! thawed by id the member is idle again.
#![no_main]

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use prost::Message;
use stillpoint_agent::config::NoopConfig;
use stillpoint_agent::engine::noop::Noop;
use stillpoint_agent::hold::{Holds, Limits};
use stillpoint_agent::server::AgentService;
use stillpoint_proto::pb;
use stillpoint_proto::pb::agent_server::Agent;
use tonic::Request;
use tonic::codec::{Codec, Streaming};

fn service() -> AgentService {
    let engine = Arc::new(Noop::new(
        "fuzz".into(),
        NoopConfig {
            freeze_latency: Duration::ZERO,
            thaw_latency: Duration::ZERO,
            describe_latency: Duration::ZERO,
            replica: false,
            upstream: String::new(),
        },
    ));
    let limits = Limits {
        max_ttl: Duration::from_secs(5),
        freeze_timeout: Duration::from_millis(100),
        flush_timeout: Duration::from_millis(100),
        thaw_timeout: Duration::from_millis(100),
    };
    let holds = Holds::new(
        engine.clone(),
        "fuzz".into(),
        limits,
        Arc::new(Default::default()),
        stillpoint_agent::durable::Volumes::new(Vec::new()),
    );
    AgentService {
        engine,
        holds,
        member: "fuzz".into(),
        max_ttl: Duration::from_secs(5),
        max_wait: Duration::from_millis(10),
        prepare_timeout: Duration::from_millis(100),
    }
}

/// The request stream's body as the server reads it.
fn freeze_stream(body: &[u8]) -> Streaming<pb::FreezeRequest> {
    let mut codec = tonic_prost::ProstCodec::<pb::FreezeEvent, pb::FreezeRequest>::default();
    let body = http_body_util::Full::new(Bytes::copy_from_slice(body));
    Streaming::new_request(codec.decoder(), body, None, Some(1 << 20))
}

async fn handle(agent: &AgentService, which: u8, rest: &[u8]) -> Vec<String> {
    let mut ids = Vec::new();
    match which % 6 {
        0 => {
            if let Ok(response) = agent.freeze(Request::new(freeze_stream(rest))).await {
                let mut events = response.into_inner();
                while let Ok(Some(Ok(_))) = tokio::time::timeout(
                    Duration::from_millis(20),
                    futures_util::StreamExt::next(&mut events),
                )
                .await
                {}
            }
            // Whatever a start message named.
            let mut stream = freeze_stream(rest);
            while let Ok(Some(m)) = stream.message().await {
                if let Some(pb::freeze_request::Msg::Start(s)) = m.msg {
                    ids.push(s.backup_id);
                }
            }
        }
        1 => {
            if let Ok(r) = pb::DescribeRequest::decode(rest) {
                let _ = agent.describe(Request::new(r)).await;
            }
        }
        2 => {
            if let Ok(r) = pb::PositionRequest::decode(rest) {
                let _ = agent.position(Request::new(r)).await;
            }
        }
        3 => {
            if let Ok(r) = pb::PrepareRequest::decode(rest) {
                let _ = agent.prepare(Request::new(r)).await;
            }
        }
        4 => {
            if let Ok(r) = pb::ThawRequest::decode(rest) {
                ids.push(r.backup_id.clone());
                let _ = agent.thaw(Request::new(r)).await;
            }
        }
        _ => {
            if let Ok(r) = pb::WaitForPositionRequest::decode(rest) {
                let _ = agent.wait_for_position(Request::new(r)).await;
            }
        }
    }
    ids
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    runtime.block_on(async {
        let agent = service();
        let ids = tokio::time::timeout(Duration::from_secs(2), handle(&agent, which, rest))
            .await
            .expect("a call did not end within 2 s");
        for id in ids {
            let _ = agent
                .thaw(Request::new(pb::ThawRequest { backup_id: id }))
                .await;
        }
        // A thaw may still be running in the hold's own task.
        for _ in 0..50 {
            if agent.holds.state().is_none() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        assert_eq!(
            agent.holds.state(),
            None,
            "a hold is left after every hold it took was thawed"
        );
    });
});
