//! The lab's pod network: a bridge the lab creates, and one network
//! namespace per pod on it. Addresses come from 198.18.0.0/15 (reserved
//! for benchmarking networks, RFC 2544), one /24 per lab, so they never
//! leave this machine: the bridge holds the gateway address, and only the
//! lab's own namespaces are on it.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::process::Command;
use std::sync::Mutex;

use anyhow::{Context, Result, bail};

pub(super) fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip (iproute2)")?;
    if !out.status.success() {
        bail!(
            "ip {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// The lab's bridge and the pod addresses handed out on it.
#[derive(Debug)]
pub struct Bridge {
    pub name: String,
    /// The /24's third octet (198.18.<subnet>.0/24 or 198.19.…).
    subnet: (u8, u8),
    used: Mutex<BTreeSet<u8>>,
}

impl Bridge {
    /// Creates a bridge (named after this process and a counter) with the
    /// gateway address `.1` of a /24 chosen from them.
    pub fn create() -> Result<Bridge> {
        static COUNT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let count = COUNT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let pid = std::process::id();
        let name = format!("spl{}x{}", pid % 100_000, count % 100);
        let n = (pid * 7 + count) % 512;
        let subnet = (18 + (n / 256) as u8, (n % 256) as u8);
        let bridge = Bridge {
            name,
            subnet,
            used: Mutex::new(BTreeSet::new()),
        };
        let _ = ip(&["link", "del", &bridge.name]);
        ip(&["link", "add", &bridge.name, "type", "bridge"])?;
        ip(&[
            "addr",
            "add",
            &format!("{}/24", bridge.gateway()),
            "dev",
            &bridge.name,
        ])?;
        ip(&["link", "set", &bridge.name, "up"])?;
        Ok(bridge)
    }

    /// The bridge's own address: the host side of the pod network.
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::new(198, self.subnet.0, self.subnet.1, 1)
    }

    /// Gives a pod its network namespace `netns` with a fresh address.
    pub fn attach(&self, netns: &str) -> Result<PodNet> {
        let host = {
            let mut used = self.used.lock().unwrap();
            let host = (10..=250)
                .find(|h| !used.contains(h))
                .context("the lab's pod network is full")?;
            used.insert(host);
            host
        };
        let address = Ipv4Addr::new(198, self.subnet.0, self.subnet.1, host);
        let net = PodNet {
            netns: netns.to_string(),
            address,
            host,
        };
        let veth = format!("{}v{host}", &self.name[..self.name.len().min(11)]);
        let peer = format!("{}p{host}", &self.name[..self.name.len().min(11)]);
        let setup = || -> Result<()> {
            ip(&["netns", "add", netns])?;
            ip(&["link", "add", &veth, "type", "veth", "peer", "name", &peer])?;
            ip(&["link", "set", &peer, "netns", netns])?;
            ip(&["-n", netns, "link", "set", &peer, "name", "eth0"])?;
            ip(&[
                "-n",
                netns,
                "addr",
                "add",
                &format!("{address}/24"),
                "dev",
                "eth0",
            ])?;
            ip(&["-n", netns, "link", "set", "eth0", "up"])?;
            ip(&["-n", netns, "link", "set", "lo", "up"])?;
            ip(&[
                "-n",
                netns,
                "route",
                "add",
                "default",
                "via",
                &self.gateway().to_string(),
            ])?;
            ip(&["link", "set", &veth, "master", &self.name])?;
            ip(&["link", "set", &veth, "up"])
        };
        if let Err(e) = setup() {
            self.release(net);
            return Err(e);
        }
        // The host may still map this address to the MAC of the pod that
        // had it before: forget that, or connections to the new pod go
        // nowhere until the entry goes stale.
        let _ = ip(&[
            "neigh",
            "flush",
            "to",
            &address.to_string(),
            "dev",
            &self.name,
        ]);
        Ok(net)
    }

    /// Deletes a pod's namespace (its end of the veth pair goes with it)
    /// and frees its address.
    pub fn release(&self, net: PodNet) {
        let _ = ip(&["netns", "del", &net.netns]);
        self.used.lock().unwrap().remove(&net.host);
    }

    /// Deletes the bridge. Idempotent.
    pub fn remove(&self) {
        let _ = ip(&["link", "del", &self.name]);
    }
}

/// One pod's network namespace and address.
#[derive(Debug, Clone)]
pub struct PodNet {
    pub netns: String,
    pub address: Ipv4Addr,
    host: u8,
}

/// The lab's network namespaces still present (for the cleanup check).
pub fn namespaces_with_prefix(prefix: &str) -> Vec<String> {
    std::fs::read_dir("/run/netns")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| n.starts_with(prefix))
        .collect()
}
