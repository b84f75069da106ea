//! Network partitions of the lab, as a test orders them: TCP traffic
//! matching a policy rule is routed into a dead link (a veth pair whose far
//! end is down, reached through a permanent neighbour entry) and lost
//! without an answer, so connections hang as they do when packets are
//! dropped. Policy routing, which the lab's kernel has without netfilter
//! or tc actions. Inside a pod (its containers talk over loopback, where
//! policy rules do not apply) the loopback device gets a `blackhole` root
//! queue instead, which drops every packet it is given. A [`Cut`] heals
//! when dropped.

use anyhow::Result;

use super::net::ip;

/// One side of a cut: in `netns` (`None`: this machine's), TCP packets
/// matching `matches` (`dport <p>` or `sport <p>`) to `to` go to a dead
/// link `link` through routing table `table`.
#[derive(Debug)]
struct Route {
    netns: Option<String>,
    link: String,
    table: String,
    matches: [String; 2],
    to: String,
}

impl Route {
    fn ip(&self, args: &[&str]) -> Result<()> {
        match &self.netns {
            Some(n) => ip(&[&["-n", n.as_str()], args].concat()),
            None => ip(args),
        }
    }

    fn rule(&self, verb: &str) -> Result<()> {
        let [what, port] = &self.matches;
        self.ip(&[
            "rule",
            verb,
            "ipproto",
            "tcp",
            what,
            port,
            "to",
            &self.to,
            "table",
            &self.table,
        ])
    }

    fn apply(&self) -> Result<()> {
        let (link, peer) = (self.link.as_str(), format!("{}p", self.link));
        self.ip(&["link", "add", link, "type", "veth", "peer", "name", &peer])?;
        self.ip(&["link", "set", link, "up"])?;
        self.ip(&["addr", "add", "169.254.78.1/30", "dev", link])?;
        self.ip(&[
            "neigh",
            "add",
            "169.254.78.2",
            "lladdr",
            "02:00:00:00:00:02",
            "dev",
            link,
            "nud",
            "permanent",
        ])?;
        self.ip(&[
            "route",
            "add",
            "default",
            "via",
            "169.254.78.2",
            "dev",
            link,
            "table",
            &self.table,
        ])?;
        self.rule("add")
    }

    fn heal(&self) {
        let _ = self.rule("del");
        let _ = self.ip(&["link", "del", &self.link]);
    }
}

/// A partition in force; healed on drop (or by [`Cut::heal`]).
#[derive(Debug)]
pub struct Cut {
    routes: Vec<Route>,
    /// Network namespaces whose loopback is cut.
    loopbacks: Vec<String>,
}

impl Cut {
    /// Pod network namespace `netns` can no longer send to `host:port`.
    pub(super) fn outbound(netns: &str, host: &str, port: &str) -> Result<Cut> {
        Cut::apply(vec![Route {
            netns: Some(netns.into()),
            link: "spcut0".into(),
            table: "100".into(),
            matches: ["dport".into(), port.into()],
            to: format!("{host}/32"),
        }])
    }

    /// This machine and port `port` of the pod at `pod_ip` (network
    /// namespace `netns`, reaching this machine at `gateway`) cut apart,
    /// both ways; the links and tables are named after the pod's address.
    pub(super) fn between_host_and(
        netns: &str,
        pod_ip: std::net::Ipv4Addr,
        gateway: &str,
        port: &str,
    ) -> Result<Cut> {
        let [_, _, c, d] = pod_ip.octets();
        let link = format!("spc{c}x{d}");
        let table = (1000 + u32::from(c) * 256 + u32::from(d)).to_string();
        Cut::apply(vec![
            Route {
                netns: None,
                link: link.clone(),
                table: table.clone(),
                matches: ["dport".into(), port.into()],
                to: format!("{pod_ip}/32"),
            },
            Route {
                netns: Some(netns.into()),
                link,
                table,
                matches: ["sport".into(), port.into()],
                to: format!("{gateway}/32"),
            },
        ])
    }

    fn apply(routes: Vec<Route>) -> Result<Cut> {
        let mut cut = Cut {
            routes: Vec::new(),
            loopbacks: Vec::new(),
        };
        for r in routes {
            // What was applied is healed on drop, even if the rest fails.
            let applied = r.apply();
            cut.routes.push(r);
            applied?;
        }
        Ok(cut)
    }

    /// The containers of the pod in network namespace `netns` can no
    /// longer reach each other over loopback (an agent cut off from the
    /// database beside it); the pod's own address still works.
    pub(super) fn loopback(netns: &str) -> Result<Cut> {
        let cut = Cut {
            routes: Vec::new(),
            loopbacks: vec![netns.to_string()],
        };
        ip(&["-n", netns, "link", "show", "lo"])?;
        let added = std::process::Command::new("ip")
            .args(["netns", "exec", netns, "tc", "qdisc", "add", "dev", "lo"])
            .args(["root", "blackhole"])
            .output()?;
        anyhow::ensure!(
            added.status.success(),
            "tc qdisc add blackhole in {netns}: {}",
            String::from_utf8_lossy(&added.stderr)
        );
        Ok(cut)
    }

    /// Heals the cut now.
    pub fn heal(&self) {
        for r in &self.routes {
            r.heal();
        }
        for netns in &self.loopbacks {
            let _ = std::process::Command::new("ip")
                .args([
                    "netns", "exec", netns, "tc", "qdisc", "del", "dev", "lo", "root",
                ])
                .stderr(std::process::Stdio::null())
                .status();
        }
    }
}

impl Drop for Cut {
    fn drop(&mut self) {
        self.heal();
    }
}
