//! mTLS between the controller and an agent: who is served, who is refused
//! (and that the agent logs why), and certificate rotation without restart.

use std::sync::Arc;
use std::time::Duration;

use stillpoint_controller::certs::Validity;
use stillpoint_controller::core::agents::ControllerTls;
use stillpoint_proto::pb;
use stillpoint_proto::tls::TlsFiles;
use stillpoint_tests::harness::agent::AgentProc;
use stillpoint_tests::harness::pki::{CONTROLLER_IDENTITY, Pki, agent_identity};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const RELOAD: Duration = Duration::from_millis(200);

struct Setup {
    pki: Pki,
    agent: AgentProc,
    agent_id: String,
}

fn setup(member: &str) -> Setup {
    let pki = Pki::new().unwrap();
    let agent_id = agent_identity(member);
    let tls = pki.issue(member, &agent_id).unwrap();
    let agent = AgentProc::spawn(
        &stillpoint_tests::harness::agent::noop(member, tls)
            .with("STILLPOINT_TLS_RELOAD_INTERVAL", "200ms"),
    )
    .unwrap();
    Setup {
        pki,
        agent,
        agent_id,
    }
}

async fn describe(
    tls: &ControllerTls,
    addr: &str,
    identity: &str,
) -> Result<pb::DescribeResponse, String> {
    let mut client = tls
        .connect(addr, identity)
        .await
        .map_err(|e| e.to_string())?;
    client
        .describe(pb::DescribeRequest::default())
        .await
        .map(|r| r.into_inner())
        .map_err(|s| s.to_string())
}

#[tokio::test]
async fn a_valid_controller_certificate_is_served() {
    let s = setup("valid");
    let files = s.pki.issue("controller", CONTROLLER_IDENTITY).unwrap();
    let tls = ControllerTls::watch(files, RELOAD).unwrap();
    let described = describe(&tls, &s.agent.grpc_addr(), &s.agent_id)
        .await
        .unwrap();
    assert_eq!(described.member, "valid");
    assert_eq!(described.engine, pb::Engine::Noop as i32);
    s.agent
        .wait_log(
            "mTLS connection accepted peer=127.0.0.1",
            Duration::from_secs(2),
        )
        .unwrap();
    assert!(s.agent.logs().contains(&format!("({CONTROLLER_IDENTITY})")));
}

#[tokio::test]
async fn a_certificate_from_another_ca_is_refused() {
    let s = setup("other-ca");
    let other = Pki::new().unwrap();
    // A certificate from another CA, by a controller that does trust the agent.
    let foreign = other.issue("controller", CONTROLLER_IDENTITY).unwrap();
    let files = TlsFiles {
        ca: s.pki.ca_dir().join("ca.crt"),
        ..foreign
    };
    let tls = ControllerTls::watch(files, RELOAD).unwrap();
    let err = describe(&tls, &s.agent.grpc_addr(), &s.agent_id)
        .await
        .unwrap_err();
    assert!(!err.is_empty());
    s.agent
        .wait_log(
            "certificate not issued by the configured CA",
            Duration::from_secs(5),
        )
        .unwrap();
}

#[tokio::test]
async fn the_right_ca_with_another_identity_is_refused() {
    let s = setup("wrong-id");
    let intruder = "spiffe://stillpoint.test/ns/default/sa/intruder";
    let files = s.pki.issue("intruder", intruder).unwrap();
    let tls = ControllerTls::watch(files, RELOAD).unwrap();
    let err = describe(&tls, &s.agent.grpc_addr(), &s.agent_id)
        .await
        .unwrap_err();
    assert!(!err.is_empty());
    s.agent
        .wait_log(
            &format!("client presented identity {intruder}, expected {CONTROLLER_IDENTITY}"),
            Duration::from_secs(5),
        )
        .unwrap();
}

#[tokio::test]
async fn an_expired_certificate_is_refused() {
    let s = setup("expired");
    let now = time::OffsetDateTime::now_utc();
    let validity = Validity {
        not_before: now - time::Duration::days(10),
        not_after: now - time::Duration::days(1),
    };
    let files = s
        .pki
        .issue_with("controller-expired", CONTROLLER_IDENTITY, validity)
        .unwrap();
    let tls = ControllerTls::watch(files, RELOAD).unwrap();
    let err = describe(&tls, &s.agent.grpc_addr(), &s.agent_id)
        .await
        .unwrap_err();
    assert!(!err.is_empty());
    s.agent
        .wait_log("certificate has expired", Duration::from_secs(5))
        .unwrap();
}

/// Accepts any server certificate: these probes test the agent's refusal.
#[derive(Debug)]
struct AnyServer(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &rustls::pki_types::CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &rustls::pki_types::CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[tokio::test]
async fn no_client_certificate_is_refused() {
    let s = setup("no-cert");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServer(provider)))
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = tokio::net::TcpStream::connect(s.agent.grpc).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("agent").unwrap();
    let served = match tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
    {
        // TLS 1.3 finishes the client side first; the refusal arrives on the first read.
        Ok(mut tls) => {
            let _ = tls
                .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
                .await;
            let mut buf = [0u8; 64];
            matches!(
                tokio::time::timeout(Duration::from_secs(5), tls.read(&mut buf)).await,
                Ok(Ok(n)) if n > 0
            )
        }
        Err(_) => false,
    };
    assert!(!served, "the agent answered a client without a certificate");
    s.agent
        .wait_log("no client certificate presented", Duration::from_secs(5))
        .unwrap();
}

#[tokio::test]
async fn plaintext_is_refused() {
    let s = setup("plaintext");
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", s.agent.grpc))
        .unwrap()
        .connect_timeout(Duration::from_secs(3))
        .timeout(Duration::from_secs(3))
        .connect()
        .await;
    if let Ok(channel) = channel {
        let mut client = pb::agent_client::AgentClient::new(channel);
        let answer = client.describe(pb::DescribeRequest::default()).await;
        assert!(answer.is_err(), "a plaintext client was served: {answer:?}");
    }
    s.agent
        .wait_log("not a TLS client", Duration::from_secs(5))
        .unwrap();
}

#[tokio::test]
async fn the_controller_refuses_an_agent_with_another_identity() {
    let s = setup("impostor");
    let files = s.pki.issue("controller", CONTROLLER_IDENTITY).unwrap();
    let tls = ControllerTls::watch(files, RELOAD).unwrap();
    let expected = agent_identity("the-real-member");
    let err = describe(&tls, &s.agent.grpc_addr(), &expected)
        .await
        .unwrap_err();
    assert!(
        err.contains(&format!(
            "agent presented identity {}, expected {expected}",
            s.agent_id
        )),
        "{err}"
    );
}

fn replace(from: &TlsFiles, to: &TlsFiles) {
    // As a Secret volume update does: new files appear whole.
    for (src, dst) in [
        (&from.ca, &to.ca),
        (&from.key, &to.key),
        (&from.cert, &to.cert),
    ] {
        let tmp = dst.with_extension("new");
        std::fs::copy(src, &tmp).unwrap();
        std::fs::rename(&tmp, dst).unwrap();
    }
}

#[tokio::test]
async fn replaced_certificate_files_take_effect_without_a_restart() {
    let old = Pki::new().unwrap();
    let new = Pki::new().unwrap();
    let agent_id = agent_identity("rotating");
    let agent_files = old.issue("rotating", &agent_id).unwrap();
    let controller_files = old.issue("controller", CONTROLLER_IDENTITY).unwrap();
    let agent = AgentProc::spawn(
        &stillpoint_tests::harness::agent::noop("rotating", agent_files.clone())
            .with("STILLPOINT_TLS_RELOAD_INTERVAL", "200ms"),
    )
    .unwrap();
    let controller = ControllerTls::watch(controller_files.clone(), RELOAD).unwrap();
    let addr = agent.grpc_addr();
    describe(&controller, &addr, &agent_id).await.unwrap();

    // The agent moves to the new CA: the old controller certificate stops working.
    replace(&new.issue("rotating", &agent_id).unwrap(), &agent_files);
    agent.wait_log("reloaded", Duration::from_secs(5)).unwrap();
    let pid = agent.pid();
    assert!(describe(&controller, &addr, &agent_id).await.is_err());
    assert_eq!(
        agent.metric("stillpoint_agent_tls_reloads_total").unwrap(),
        1.0
    );

    // The controller's files rotate too: the same ControllerTls picks them up.
    replace(
        &new.issue("controller", CONTROLLER_IDENTITY).unwrap(),
        &controller_files,
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        match describe(&controller, &addr, &agent_id).await {
            Ok(d) => {
                assert_eq!(d.member, "rotating");
                break;
            }
            Err(e) => assert!(
                tokio::time::Instant::now() < deadline,
                "never reloaded: {e}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(agent.pid(), pid, "no restart");
}
