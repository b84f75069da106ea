//! The lab's cluster DNS: a resolver on the bridge's gateway (UDP port 53)
//! answering the names Kubernetes DNS gives Services and pods, from the
//! API server's Services and Pods, so that a pod names another by Service
//! as it does in a cluster (the pod runner writes each pod's
//! `/etc/resolv.conf`: this server, `search <ns>.svc.cluster.local
//! svc.cluster.local cluster.local`, `ndots:5`).
//!
//! - `<service>.<ns>.svc.cluster.local`: the addresses of the Service's
//!   ready pods (of every pod it selects with `publishNotReadyAddresses`).
//!   The lab has no service proxy, so every Service answers as a headless
//!   one does: with its pods' addresses, never a cluster IP.
//! - `<hostname>.<service>.<ns>.svc.cluster.local`: the pod with that
//!   `spec.hostname` and `spec.subdomain` (a StatefulSet's pod and its
//!   `serviceName`), under the same readiness rule.
//! - Any other name: NXDOMAIN (the lab's pods reach nothing outside it).
//!
//! Only A records: a name that exists answers other types with no record.
//! Messages are parsed and written by `hickory-proto`; the lookup is the
//! lab's own, from kube-rs reflectors (CoreDNS would be one more Go build
//! of minutes for four rules).

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;

use anyhow::{Context, Result};
use futures_util::StreamExt;
use hickory_proto::op::{Message, MessageType, ResponseCode};
use hickory_proto::rr::{RData, Record, RecordType, rdata::A};
use k8s_openapi::api::core::v1::{Pod, Service};
use kube::api::Api;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use tokio::net::UdpSocket;

/// The cluster domain.
pub const DOMAIN: &str = "cluster.local";
/// How long an answer may be cached: pods' addresses change as they restart.
const TTL: u32 = 2;

/// What the server looks names up in.
#[derive(Clone)]
struct Names {
    pods: Store<Pod>,
    services: Store<Service>,
}

/// Starts the resolver on `addr`:53 (the lab's runtime keeps it running).
pub async fn serve(client: kube::Client, addr: Ipv4Addr) -> Result<()> {
    let socket = UdpSocket::bind(SocketAddr::from((addr, 53)))
        .await
        .with_context(|| format!("the lab's DNS on {addr}:53"))?;
    let names = Names {
        pods: reflect(Api::<Pod>::all(client.clone())),
        services: reflect(Api::<Service>::all(client)),
    };
    names.pods.wait_until_ready().await?;
    names.services.wait_until_ready().await?;
    let socket = Arc::new(socket);
    tokio::spawn(async move {
        let mut buf = vec![0u8; 1500];
        loop {
            let Ok((n, from)) = socket.recv_from(&mut buf).await else {
                continue;
            };
            if let Some(answer) = names.answer(&buf[..n]) {
                let _ = socket.send_to(&answer, from).await;
            }
        }
    });
    Ok(())
}

fn reflect<K>(api: Api<K>) -> Store<K>
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
{
    let (reader, writer) = reflector::store();
    let stream = watcher(api, watcher::Config::default())
        .default_backoff()
        .reflect(writer)
        .for_each(|_| async {});
    tokio::spawn(stream);
    reader
}

impl Names {
    /// The answer to one query message (none if it cannot be parsed).
    fn answer(&self, query: &[u8]) -> Option<Vec<u8>> {
        let query = Message::from_vec(query).ok()?;
        let mut answer = Message::new();
        answer
            .set_id(query.id())
            .set_message_type(MessageType::Response)
            .set_op_code(query.op_code())
            .set_recursion_desired(query.recursion_desired())
            .set_recursion_available(false)
            .set_authoritative(true);
        let mut code = ResponseCode::NoError;
        for q in query.queries() {
            answer.add_query(q.clone());
            let name = q.name().to_ascii().to_ascii_lowercase();
            match self.lookup(name.trim_end_matches('.')) {
                None => code = ResponseCode::NXDomain,
                Some(ips) if q.query_type() == RecordType::A => {
                    for ip in ips {
                        answer.add_answer(Record::from_rdata(
                            q.name().clone(),
                            TTL,
                            RData::A(A(ip)),
                        ));
                    }
                }
                Some(_) => {}
            }
        }
        answer.set_response_code(code);
        answer.to_vec().ok()
    }

    /// The addresses `name` stands for, if it names anything.
    fn lookup(&self, name: &str) -> Option<Vec<Ipv4Addr>> {
        let local = name.strip_suffix(&format!(".svc.{DOMAIN}"))?;
        let labels: Vec<&str> = local.split('.').collect();
        let (host, service, ns) = match labels[..] {
            [service, ns] => (None, service, ns),
            [host, service, ns] => (Some(host), service, ns),
            _ => return None,
        };
        let svc = self.services.state().into_iter().find(|s| {
            s.metadata.namespace.as_deref() == Some(ns)
                && s.metadata.name.as_deref() == Some(service)
        })?;
        let spec = svc.spec.clone().unwrap_or_default();
        let not_ready = spec.publish_not_ready_addresses == Some(true);
        let selector = spec.selector.unwrap_or_default();
        let ips: Vec<Ipv4Addr> = self
            .pods
            .state()
            .into_iter()
            .filter(|p| p.metadata.namespace.as_deref() == Some(ns))
            .filter(|p| match host {
                Some(h) => {
                    let spec = p.spec.as_ref();
                    spec.and_then(|s| s.hostname.as_deref()) == Some(h)
                        && spec.and_then(|s| s.subdomain.as_deref()) == Some(service)
                }
                None => !selector.is_empty() && selects(&selector, p),
            })
            .filter(|p| not_ready || ready(p))
            .filter_map(|p| p.status.as_ref()?.pod_ip.as_deref()?.parse().ok())
            .collect();
        (host.is_none() || !ips.is_empty()).then_some(ips)
    }
}

fn selects(selector: &BTreeMap<String, String>, pod: &Pod) -> bool {
    let labels = pod.metadata.labels.clone().unwrap_or_default();
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

fn ready(pod: &Pod) -> bool {
    pod.metadata.deletion_timestamp.is_none()
        && pod
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// A pod's `/etc/resolv.conf` (dnsPolicy ClusterFirst) in namespace `ns`.
pub fn resolv_conf(server: Ipv4Addr, ns: &str) -> String {
    format!(
        "nameserver {server}\nsearch {ns}.svc.{DOMAIN} svc.{DOMAIN} {DOMAIN}\noptions ndots:5\n"
    )
}
