//! Host names renamed for a restore under new names: the copies of an
//! application's Services and StatefulSets answer to new names, and what
//! named the originals (a replica's primary, in its pod template, its
//! ConfigMaps, or its restored data directory) must name the copies, or
//! a restored replica would follow the running original past the cut.
//!
//! A name is renamed when it is a whole DNS-like token of the text (letters,
//! digits, `-`, `_`, `.`) that names, in the restore's namespace:
//!
//! - a StatefulSet's pod by its Service: `<sts>-<n>.<svc>`, optionally
//!   followed by `.<namespace>`, `.<namespace>.svc` or
//!   `.<namespace>.svc.cluster.local` (renamed anywhere in the text);
//! - a Service qualified by the namespace: `<svc>.<namespace>[.svc[.cluster.local]]`
//!   (anywhere);
//! - a Service by its bare name `<svc>` only where it can be nothing but
//!   a host: right after `host=` (any case: `host=`, `PGHOST=`,
//!   `--host=`), `@` or `//`, or after the word `-h`, `--host`,
//!   `replicaof`, `slaveof` (or `--replicaof`, `--slaveof`) and spaces;
//!   or, by [`HostRenames::rename_host`], as the whole of a value known to
//!   be a host (an argument after such a flag, an environment variable
//!   whose name says `HOST`, `PRIMARY` or `MASTER`, a `master.info` host
//!   line). Elsewhere a bare word is left: `redis` may as well be an
//!   engine's name.
//!
//! Names of other namespaces, pod IPs and anything else are left as they
//! are. This is string work of our own: no crate renames Kubernetes
//! service names in free text.

use std::collections::BTreeMap;

/// The renames of one restore.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostRenames {
    namespace: String,
    /// A Service's name and its copy's.
    services: BTreeMap<String, String>,
    /// A StatefulSet's name, its Service and its copy's name.
    statefulsets: BTreeMap<String, (String, String)>,
}

impl HostRenames {
    /// Renames in `namespace`.
    pub fn new(namespace: &str) -> HostRenames {
        HostRenames {
            namespace: namespace.to_ascii_lowercase(),
            ..Default::default()
        }
    }

    /// Service `old` is copied as `new`.
    pub fn service(&mut self, old: &str, new: &str) {
        self.services.insert(old.into(), new.into());
    }

    /// StatefulSet `old`, whose pods `service` names, is copied as `new`.
    pub fn statefulset(&mut self, old: &str, service: &str, new: &str) {
        self.statefulsets
            .insert(old.into(), (service.into(), new.into()));
    }

    pub fn is_empty(&self) -> bool {
        self.services.is_empty()
    }

    /// `text` with every name of the originals renamed (see the module doc).
    pub fn rename(&self, text: &str) -> String {
        self.rename_in(text, false)
    }

    /// `value`, which is a host as a whole, renamed if it names an
    /// original (a bare Service name included); any other text as
    /// [`HostRenames::rename`] renames it.
    pub fn rename_host(&self, value: &str) -> String {
        self.rename_in(value, true)
    }

    fn rename_in(&self, text: &str, whole_is_host: bool) -> String {
        let mut out = String::with_capacity(text.len());
        let mut rest = text;
        while let Some(start) = rest.find(is_name_char) {
            let (before, from) = rest.split_at(start);
            out.push_str(before);
            let len = from.find(|c| !is_name_char(c)).unwrap_or(from.len());
            let (token, after) = from.split_at(len);
            let whole = whole_is_host && out.is_empty() && after.is_empty();
            let bare_ok = whole || host_position(&out);
            out.push_str(&self.token(token, bare_ok).unwrap_or_else(|| token.into()));
            rest = after;
        }
        out.push_str(rest);
        out
    }

    /// Token `token` renamed, if it names an original; `bare_ok`: whether a
    /// bare Service name may be taken for a host here.
    fn token(&self, token: &str, bare_ok: bool) -> Option<String> {
        let trimmed = token.trim_end_matches('.');
        let dots = &token[trimmed.len()..];
        let lower = trimmed.to_ascii_lowercase();
        let ns = &self.namespace;
        let suffixes = [
            format!(".{ns}.svc.cluster.local"),
            format!(".{ns}.svc"),
            format!(".{ns}"),
            String::new(),
        ];
        for suffix in &suffixes {
            let Some(head) = lower.strip_suffix(suffix.as_str()) else {
                continue;
            };
            let renamed = match head.split_once('.') {
                None if suffix.is_empty() && !bare_ok => None,
                None => self.services.get(head).cloned(),
                Some((pod, svc)) => self.pod(pod, svc),
            };
            if let Some(r) = renamed {
                return Some(format!("{r}{}{dots}", &trimmed[head.len()..]));
            }
        }
        None
    }

    /// Pod `pod` of Service `svc` (`<sts>-<n>`), renamed.
    fn pod(&self, pod: &str, svc: &str) -> Option<String> {
        let new_svc = self.services.get(svc)?;
        let (sts, n) = pod.rsplit_once('-')?;
        if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let (service, new_sts) = self.statefulsets.get(sts)?;
        (service == svc).then(|| format!("{new_sts}-{n}.{new_svc}"))
    }

    /// The renames as text, one per line, for the agent in restore mode:
    /// `namespace <ns>`, `service <old> <new>`, `statefulset <old> <service> <new>`.
    pub fn encode(&self) -> String {
        let mut s = format!("namespace {}\n", self.namespace);
        for (old, new) in &self.services {
            s.push_str(&format!("service {old} {new}\n"));
        }
        for (old, (svc, new)) in &self.statefulsets {
            s.push_str(&format!("statefulset {old} {svc} {new}\n"));
        }
        s
    }

    /// Renames from [`HostRenames::encode`]'s text.
    pub fn decode(text: &str) -> Result<HostRenames, String> {
        let mut r = HostRenames::default();
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let words: Vec<&str> = line.split_whitespace().collect();
            match words.as_slice() {
                ["namespace", ns] => r.namespace = ns.to_ascii_lowercase(),
                ["service", old, new] => r.service(old, new),
                ["statefulset", old, svc, new] => r.statefulset(old, svc, new),
                _ => return Err(format!("not a host rename: {line:?}")),
            }
        }
        if r.namespace.is_empty() {
            return Err("host renames name no namespace".into());
        }
        Ok(r)
    }
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')
}

/// The words after which (and spaces) a word is a host.
const HOST_FLAGS: &[&str] = &[
    "-h",
    "--host",
    "replicaof",
    "slaveof",
    "--replicaof",
    "--slaveof",
];

/// Whether `arg` is a flag or directive whose next word is a host.
pub fn is_host_flag(arg: &str) -> bool {
    HOST_FLAGS.contains(&arg.trim().to_ascii_lowercase().as_str())
}

/// Whether what precedes a token makes it a host: `host=`, `@`, `//`, or
/// one of [`HOST_FLAGS`] and spaces.
fn host_position(before: &str) -> bool {
    let lower = before.to_ascii_lowercase();
    if lower.ends_with("host=") || lower.ends_with('@') || lower.ends_with("//") {
        return true;
    }
    let trimmed = lower.trim_end();
    if trimmed.len() == lower.len() {
        return false;
    }
    let word = trimmed
        .rsplit(|c: char| c.is_whitespace() || c == '"' || c == '\'')
        .next()
        .unwrap_or_default();
    HOST_FLAGS.contains(&word)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shop() -> HostRenames {
        let mut r = HostRenames::new("shop");
        r.service("pg", "copy-pg");
        r.service("redis", "copy-redis");
        r.statefulset("pg", "pg", "copy-pg");
        r.statefulset("redis", "redis", "copy-redis");
        r
    }

    #[test]
    fn a_statefulset_pod_is_renamed_in_every_form() {
        let r = shop();
        for (from, to) in [
            ("pg-0.pg", "copy-pg-0.copy-pg"),
            ("pg-12.pg.shop", "copy-pg-12.copy-pg.shop"),
            ("pg-0.pg.shop.svc", "copy-pg-0.copy-pg.shop.svc"),
            (
                "pg-0.pg.shop.svc.cluster.local.",
                "copy-pg-0.copy-pg.shop.svc.cluster.local.",
            ),
            (
                "host=pg-0.pg port=5432 user=pg application_name=pg_replica",
                "host=copy-pg-0.copy-pg port=5432 user=pg application_name=pg_replica",
            ),
            (
                "pg_basebackup -h pg-0.pg -U postgres && exec postgres",
                "pg_basebackup -h copy-pg-0.copy-pg -U postgres && exec postgres",
            ),
            ("redis.shop.svc:6379", "copy-redis.shop.svc:6379"),
        ] {
            assert_eq!(r.rename(from), to, "{from}");
        }
    }

    #[test]
    fn a_bare_service_name_is_renamed_only_where_it_is_a_host() {
        let r = shop();
        for (from, to) in [
            ("pg", "pg"),
            ("redis", "redis"),
            (
                "host=pg port=5432 user=pg",
                "host=copy-pg port=5432 user=pg",
            ),
            ("PGHOST=pg", "PGHOST=copy-pg"),
            ("postgres://u@pg:5432/pg", "postgres://u@copy-pg:5432/pg"),
            ("redis://redis:6379", "redis://copy-redis:6379"),
            ("--replicaof redis 6379", "--replicaof copy-redis 6379"),
            ("replicaof  redis 6379", "replicaof  copy-redis 6379"),
            (
                "pg_basebackup -h pg -U pg",
                "pg_basebackup -h copy-pg -U pg",
            ),
            ("-U pg", "-U pg"),
            ("/var/lib/pg/data", "/var/lib/pg/data"),
            ("engine: redis", "engine: redis"),
        ] {
            assert_eq!(r.rename(from), to, "{from}");
        }
        // A value known to be a host: as a whole too.
        assert_eq!(r.rename_host("redis"), "copy-redis");
        assert_eq!(r.rename_host("redis-0.redis"), "copy-redis-0.copy-redis");
        assert_eq!(r.rename_host("other"), "other");
        assert!(is_host_flag("--replicaof") && is_host_flag("-h") && !is_host_flag("-U"));
    }

    #[test]
    fn names_of_other_namespaces_and_other_things_are_left() {
        let r = shop();
        for same in [
            "pg-0.pg.other.svc",
            "pg-0.other",
            "pgx-0.pg",
            "pg-a.pg",
            "10.0.0.7",
            "pg-0.pgsql",
            "my-pg-0.pg",
            "",
        ] {
            assert_eq!(r.rename(same), same);
        }
        // A StatefulSet named under another Service keeps its pods' names.
        let mut r = HostRenames::new("shop");
        r.service("pg", "copy-pg");
        r.statefulset("pg", "pg-headless", "copy-pg");
        assert_eq!(r.rename("pg-0.pg"), "pg-0.pg");
    }

    #[test]
    fn renames_travel_as_text() {
        let r = shop();
        assert_eq!(HostRenames::decode(&r.encode()).unwrap(), r);
        assert!(HostRenames::decode("service pg").is_err());
        assert!(
            HostRenames::decode("service a b\n").is_err(),
            "no namespace"
        );
    }
}
