//! Ordering of replication positions.
//!
//! Alignment always asks "has the replica reached its primary's frozen
//! position?", i.e. `replica >= target`, never `==`: positions keep creeping
//! (heartbeats, checkpoints, Redis replica PINGs) while writes are frozen.
//!
//! Some positions are only partially ordered: two GTID sets can each hold
//! transactions the other lacks, and two Redis offsets of different
//! replication histories say nothing about each other. Those comparisons
//! return [`Incomparable`].

use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::fmt;

use crate::pb::{self, GtidFlavor, position::Kind};

/// Two positions that have no order between them, with the reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Incomparable(pub String);

impl fmt::Display for Incomparable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "positions are not comparable: {}", self.0)
    }
}

impl std::error::Error for Incomparable {}

/// Ordering and display for [`pb::Position`].
pub trait PositionExt {
    /// Compares two positions of the same kind.
    fn compare(&self, other: &pb::Position) -> Result<Ordering, Incomparable>;
    /// `self >= target`: a replica at `self` has everything `target` has.
    fn reached(&self, target: &pb::Position) -> Result<bool, Incomparable>;
    /// A short human form: `0/16B3748`, `0-1-42`, `replid:offset`, ...
    fn display(&self) -> String;
    /// The engine family name of the position, for messages.
    fn kind_name(&self) -> &'static str;
}

impl PositionExt for pb::Position {
    fn compare(&self, other: &pb::Position) -> Result<Ordering, Incomparable> {
        match (&self.kind, &other.kind) {
            (Some(Kind::Pg(a)), Some(Kind::Pg(b))) => Ok(a.lsn.cmp(&b.lsn)),
            (Some(Kind::Counter(a)), Some(Kind::Counter(b))) => Ok(a.value.cmp(&b.value)),
            (Some(Kind::Mongo(a)), Some(Kind::Mongo(b))) => {
                // MongoDB orders optimes by term first, then timestamp.
                Ok((a.term, a.ts_seconds, a.ts_increment).cmp(&(
                    b.term,
                    b.ts_seconds,
                    b.ts_increment,
                )))
            }
            (Some(Kind::Redis(a)), Some(Kind::Redis(b))) => {
                if a.replid != b.replid {
                    return Err(Incomparable(format!(
                        "Redis replication ids differ ({} vs {})",
                        a.replid, b.replid
                    )));
                }
                Ok(a.offset.cmp(&b.offset))
            }
            (Some(Kind::Gtid(a)), Some(Kind::Gtid(b))) => compare_gtid(a, b),
            (a, b) => Err(Incomparable(format!(
                "a {} position cannot be compared with a {} position",
                kind_name(a),
                kind_name(b)
            ))),
        }
    }

    fn reached(&self, target: &pb::Position) -> Result<bool, Incomparable> {
        Ok(self.compare(target)?.is_ge())
    }

    fn display(&self) -> String {
        match &self.kind {
            Some(Kind::Pg(p)) => format_lsn(p.lsn),
            Some(Kind::Counter(c)) => c.value.to_string(),
            Some(Kind::Mongo(m)) => format!(
                "{{ts: Timestamp({}, {}), t: {}}}",
                m.ts_seconds, m.ts_increment, m.term
            ),
            Some(Kind::Redis(r)) => format!("{}:{}", r.replid, r.offset),
            Some(Kind::Gtid(g)) if g.binlog_file.is_empty() => format!("gtid '{}'", g.gtid_set),
            Some(Kind::Gtid(g)) => {
                format!("gtid '{}' ({}:{})", g.gtid_set, g.binlog_file, g.binlog_pos)
            }
            None => "(none)".to_string(),
        }
    }

    fn kind_name(&self) -> &'static str {
        kind_name(&self.kind)
    }
}

fn kind_name(kind: &Option<Kind>) -> &'static str {
    match kind {
        Some(Kind::Pg(_)) => "PostgreSQL LSN",
        Some(Kind::Gtid(_)) => "GTID",
        Some(Kind::Mongo(_)) => "MongoDB optime",
        Some(Kind::Redis(_)) => "Redis offset",
        Some(Kind::Counter(_)) => "counter",
        None => "empty",
    }
}

/// Formats an LSN the way PostgreSQL does: `XXXXXXXX/XXXXXXXX` in hex.
pub fn format_lsn(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xFFFF_FFFF)
}

/// Parses PostgreSQL's `X/Y` LSN text form.
pub fn parse_lsn(text: &str) -> Option<u64> {
    let (hi, lo) = text.trim().split_once('/')?;
    let hi = u64::from_str_radix(hi, 16).ok()?;
    let lo = u64::from_str_radix(lo, 16).ok()?;
    if hi > u64::from(u32::MAX) || lo > u64::from(u32::MAX) {
        return None;
    }
    Some((hi << 32) | lo)
}

fn compare_gtid(a: &pb::GtidPosition, b: &pb::GtidPosition) -> Result<Ordering, Incomparable> {
    if a.flavor != b.flavor {
        return Err(Incomparable(
            "a MySQL GTID set cannot be compared with a MariaDB GTID position".into(),
        ));
    }
    let (a_has_b, b_has_a) = match GtidFlavor::try_from(a.flavor) {
        Ok(GtidFlavor::Mariadb) => {
            let x = parse_mariadb_gtid(&a.gtid_set).map_err(Incomparable)?;
            let y = parse_mariadb_gtid(&b.gtid_set).map_err(Incomparable)?;
            (mariadb_contains(&x, &y), mariadb_contains(&y, &x))
        }
        Ok(GtidFlavor::Mysql) => {
            let x = parse_mysql_gtid(&a.gtid_set).map_err(Incomparable)?;
            let y = parse_mysql_gtid(&b.gtid_set).map_err(Incomparable)?;
            (mysql_contains(&x, &y), mysql_contains(&y, &x))
        }
        _ => return Err(Incomparable("GTID position without a flavor".into())),
    };
    match (a_has_b, b_has_a) {
        (true, true) => Ok(Ordering::Equal),
        (true, false) => Ok(Ordering::Greater),
        (false, true) => Ok(Ordering::Less),
        (false, false) => Err(Incomparable(format!(
            "GTID sets '{}' and '{}' each hold transactions the other lacks",
            a.gtid_set, b.gtid_set
        ))),
    }
}

/// The GTID position a displayed one stands for (`gtid '0-1-42'
/// (binlog.000002:4)`, as [`PositionExt::display`] writes it, or the bare
/// set), without its binlog coordinates.
pub fn gtid_from_display(flavor: GtidFlavor, text: &str) -> pb::Position {
    let set = text
        .trim()
        .strip_prefix("gtid '")
        .and_then(|rest| rest.split_once('\''))
        .map_or(text.trim(), |(set, _)| set);
    make::gtid(flavor, set, "", 0)
}

/// MariaDB GTID position: replication domain → highest sequence number.
/// (The server id in `domain-server-seq` does not take part in the order.)
pub fn parse_mariadb_gtid(text: &str) -> Result<BTreeMap<u32, u64>, String> {
    let mut domains = BTreeMap::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let fields: Vec<&str> = part.split('-').collect();
        let [domain, _server, seq] = fields.as_slice() else {
            return Err(format!(
                "'{part}' is not a MariaDB GTID (domain-server-seq)"
            ));
        };
        let domain: u32 = domain
            .parse()
            .map_err(|_| format!("bad domain id in MariaDB GTID '{part}'"))?;
        let seq: u64 = seq
            .parse()
            .map_err(|_| format!("bad sequence number in MariaDB GTID '{part}'"))?;
        let entry = domains.entry(domain).or_insert(0);
        *entry = (*entry).max(seq);
    }
    Ok(domains)
}

fn mariadb_contains(a: &BTreeMap<u32, u64>, b: &BTreeMap<u32, u64>) -> bool {
    b.iter()
        .all(|(domain, seq)| a.get(domain).is_some_and(|s| s >= seq))
}

/// A MySQL GTID set: source uuid → sorted, merged, inclusive intervals.
pub type MysqlGtidSet = BTreeMap<String, Vec<(u64, u64)>>;

/// Parses MySQL's `uuid:1-5:7,uuid2:1-3` GTID set text (tags not supported).
pub fn parse_mysql_gtid(text: &str) -> Result<MysqlGtidSet, String> {
    let mut set = MysqlGtidSet::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let mut fields = part.split(':');
        let uuid = fields.next().unwrap_or_default().to_ascii_lowercase();
        if uuid.len() != 36 {
            return Err(format!("'{part}' does not start with a source uuid"));
        }
        let intervals = set.entry(uuid).or_default();
        for interval in fields {
            let (lo, hi) = match interval.split_once('-') {
                Some((lo, hi)) => (lo, hi),
                None => (interval, interval),
            };
            let lo: u64 = lo
                .parse()
                .map_err(|_| format!("bad interval '{interval}' in GTID set '{part}'"))?;
            let hi: u64 = hi
                .parse()
                .map_err(|_| format!("bad interval '{interval}' in GTID set '{part}'"))?;
            if lo > hi || lo == 0 {
                return Err(format!("bad interval '{interval}' in GTID set '{part}'"));
            }
            intervals.push((lo, hi));
        }
    }
    for intervals in set.values_mut() {
        intervals.sort_unstable();
        let mut merged: Vec<(u64, u64)> = Vec::with_capacity(intervals.len());
        for &(lo, hi) in intervals.iter() {
            match merged.last_mut() {
                Some(last) if lo <= last.1.saturating_add(1) => last.1 = last.1.max(hi),
                _ => merged.push((lo, hi)),
            }
        }
        *intervals = merged;
    }
    set.retain(|_, intervals| !intervals.is_empty());
    Ok(set)
}

fn mysql_contains(a: &MysqlGtidSet, b: &MysqlGtidSet) -> bool {
    b.iter().all(|(uuid, needed)| {
        let Some(have) = a.get(uuid) else {
            return false;
        };
        needed
            .iter()
            .all(|&(lo, hi)| have.iter().any(|&(l, h)| l <= lo && hi <= h))
    })
}

/// Convenience constructors used by engines and tests.
pub mod make {
    use crate::pb::{self, position::Kind};

    pub fn lsn(lsn: u64) -> pb::Position {
        pb::Position {
            kind: Some(Kind::Pg(pb::PgLsn { lsn })),
        }
    }

    pub fn counter(value: u64) -> pb::Position {
        pb::Position {
            kind: Some(Kind::Counter(pb::Counter { value })),
        }
    }

    pub fn redis(replid: &str, offset: u64) -> pb::Position {
        pb::Position {
            kind: Some(Kind::Redis(pb::RedisOffset {
                replid: replid.to_string(),
                offset,
            })),
        }
    }

    pub fn mongo(ts_seconds: u32, ts_increment: u32, term: i64) -> pb::Position {
        pb::Position {
            kind: Some(Kind::Mongo(pb::MongoOpTime {
                ts_seconds,
                ts_increment,
                term,
            })),
        }
    }

    pub fn gtid(
        flavor: pb::GtidFlavor,
        gtid_set: &str,
        binlog_file: &str,
        binlog_pos: u64,
    ) -> pb::Position {
        pb::Position {
            kind: Some(Kind::Gtid(pb::GtidPosition {
                flavor: flavor as i32,
                gtid_set: gtid_set.to_string(),
                binlog_file: binlog_file.to_string(),
                binlog_pos,
            })),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::make::*;
    use super::*;
    use crate::pb::GtidFlavor::{Mariadb, Mysql};

    #[test]
    fn lsn_round_trips_and_orders() {
        assert_eq!(parse_lsn("0/16B3748"), Some(0x16B3748));
        assert_eq!(parse_lsn("1/0"), Some(1 << 32));
        assert_eq!(format_lsn(0x1_0000_00A0), "1/A0");
        assert_eq!(parse_lsn("nonsense"), None);
        assert!(lsn(10).reached(&lsn(10)).unwrap());
        assert!(lsn(11).reached(&lsn(10)).unwrap());
        assert!(!lsn(9).reached(&lsn(10)).unwrap());
    }

    #[test]
    fn displayed_gtid_positions_read_back_without_their_coordinates() {
        let shown = gtid(Mariadb, "0-1-42,1-2-7", "binlog.000002", 1234).display();
        assert_eq!(shown, "gtid '0-1-42,1-2-7' (binlog.000002:1234)");
        let back = gtid_from_display(Mariadb, &shown);
        assert_eq!(back, gtid(Mariadb, "0-1-42,1-2-7", "", 0));
        assert_eq!(
            gtid_from_display(Mariadb, " 0-1-42 "),
            gtid(Mariadb, "0-1-42", "", 0)
        );
        let uuid = "3e11fa47-71ca-11e1-9e33-c80aa9429562";
        let mysql = gtid(Mysql, &format!("{uuid}:1-5"), "", 0).display();
        assert_eq!(
            gtid_from_display(Mysql, &mysql),
            gtid(Mysql, &format!("{uuid}:1-5"), "", 0)
        );
    }

    #[test]
    fn mariadb_positions_order_per_domain() {
        let p = |s| gtid(Mariadb, s, "", 0);
        assert!(p("0-1-42").reached(&p("0-1-41")).unwrap());
        assert!(
            p("0-2-42").reached(&p("0-1-42")).unwrap(),
            "server id is not ordered"
        );
        assert!(!p("0-1-41").reached(&p("0-1-42")).unwrap());
        assert!(p("0-1-5,1-1-9").reached(&p("0-1-5")).unwrap());
        assert!(p("").reached(&p("")).unwrap());
        assert!(!p("").reached(&p("0-1-1")).unwrap());
        assert!(p("0-1-9,1-1-1").compare(&p("0-1-1,1-1-9")).is_err());
    }

    #[test]
    fn mysql_sets_order_by_containment() {
        let u = "3e11fa47-71ca-11e1-9e33-c80aa9429562";
        let v = "4e11fa47-71ca-11e1-9e33-c80aa9429562";
        let p = |s: String| gtid(Mysql, &s, "binlog.000001", 4);
        assert!(
            p(format!("{u}:1-10"))
                .reached(&p(format!("{u}:1-5:7")))
                .unwrap()
        );
        assert!(
            !p(format!("{u}:1-5:7"))
                .reached(&p(format!("{u}:1-7")))
                .unwrap()
        );
        assert!(
            p(format!("{u}:1-3:4-6"))
                .reached(&p(format!("{u}:1-6")))
                .unwrap(),
            "adjacent intervals merge"
        );
        assert!(
            p(format!("{u}:1-3,{v}:1"))
                .compare(&p(format!("{u}:1-3,{v}:1")))
                .unwrap()
                .is_eq()
        );
        assert!(
            p(format!("{u}:1-3"))
                .compare(&p(format!("{v}:1-3")))
                .is_err()
        );
        assert!(parse_mysql_gtid("nope:1").is_err());
    }

    #[test]
    fn redis_offsets_need_the_same_history() {
        assert!(redis("a", 100).reached(&redis("a", 86)).unwrap());
        assert!(!redis("a", 85).reached(&redis("a", 86)).unwrap());
        assert!(redis("a", 100).compare(&redis("b", 1)).is_err());
    }

    #[test]
    fn mongo_optimes_order_term_first() {
        assert!(mongo(10, 1, 2).reached(&mongo(20, 1, 1)).unwrap());
        assert!(mongo(10, 2, 1).reached(&mongo(10, 1, 1)).unwrap());
        assert!(!mongo(10, 1, 1).reached(&mongo(10, 2, 1)).unwrap());
    }

    #[test]
    fn different_kinds_never_compare() {
        let err = lsn(1).compare(&counter(1)).unwrap_err();
        assert!(err.0.contains("PostgreSQL LSN"), "{err}");
    }
}
