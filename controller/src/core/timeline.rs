//! Per-member phases with monotonic timestamps, the freeze window, and the
//! terminal Gantt chart of `backup describe --timeline`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

/// The phases of one member, in protocol order.
pub const PHASES: &[&str] = &[
    "prepare",
    "prepared",
    "freeze_requested",
    "frozen",
    "aligned",
    "flush_requested",
    "flushed",
    "cut_requested",
    "cut",
    "thaw_requested",
    "thawed",
];

/// Phase → µs since the backup started, per member.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Timeline {
    pub members: BTreeMap<String, BTreeMap<String, u64>>,
    /// Start and end of the freeze window, µs since the start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<(u64, u64)>,
    /// The start, in µs since the Unix epoch (wall clock): what lines the
    /// phases up with other records, the storage's and the cluster's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin_unix_us: Option<u64>,
}

/// Records phases against one monotonic start.
#[derive(Debug, Clone)]
pub struct Clock {
    start: Instant,
    /// The wall clock at `start`.
    wall: std::time::SystemTime,
}

impl Default for Clock {
    fn default() -> Self {
        Clock {
            start: Instant::now(),
            wall: std::time::SystemTime::now(),
        }
    }
}

impl Clock {
    pub fn now_us(&self) -> u64 {
        self.start.elapsed().as_micros() as u64
    }

    /// `at` in µs since the start; now when it is not known.
    pub fn us_at(&self, at: Option<Instant>) -> u64 {
        at.map_or_else(
            || self.now_us(),
            |at| at.saturating_duration_since(self.start).as_micros() as u64,
        )
    }

    /// The start, in µs since the Unix epoch.
    pub fn origin_unix_us(&self) -> u64 {
        self.wall
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_micros() as u64)
    }
}

impl Timeline {
    pub fn mark(&mut self, member: &str, phase: &str, at_us: u64) {
        self.members
            .entry(member.to_string())
            .or_default()
            .insert(phase.to_string(), at_us);
    }

    /// First freeze request to last thaw acknowledgement.
    pub fn compute_window(&mut self) -> Option<u64> {
        let first = self
            .members
            .values()
            .filter_map(|p| p.get("freeze_requested"))
            .min()
            .copied()?;
        let last = self
            .members
            .values()
            .filter_map(|p| p.get("thawed"))
            .max()
            .copied()?;
        self.window = Some((first, last));
        Some(last.saturating_sub(first))
    }

    /// A Gantt chart, `width` columns of time: `p` preparing, `f` freezing,
    /// `#` frozen, `s` flushing (frozen), `t` thawing; `|` marks the freeze window.
    pub fn gantt(&self, width: usize) -> String {
        let end = self
            .members
            .values()
            .flat_map(|p| p.values())
            .max()
            .copied()
            .unwrap_or(1)
            .max(1);
        let col = |us: u64| ((us as f64 / end as f64) * (width - 1) as f64).round() as usize;
        let name_width = self
            .members
            .keys()
            .map(|k| k.len())
            .max()
            .unwrap_or(6)
            .max(6);
        let mut out = String::new();
        let mut axis = vec![' '; width];
        if let Some((a, b)) = self.window {
            axis[col(a)] = '|';
            axis[col(b)] = '|';
        }
        out.push_str(&format!(
            "{:name_width$}  {}   freeze window marked |\n",
            "",
            axis.iter().collect::<String>()
        ));
        for (member, phases) in &self.members {
            let mut row = vec!['.'; width];
            let mut paint = |from: &str, to: &str, c: char| {
                if let (Some(a), Some(b)) = (phases.get(from), phases.get(to)) {
                    for cell in row.iter_mut().take(col(*b) + 1).skip(col(*a)) {
                        *cell = c;
                    }
                }
            };
            paint("prepare", "prepared", 'p');
            paint("freeze_requested", "frozen", 'f');
            paint("frozen", "thaw_requested", '#');
            paint("flush_requested", "flushed", 's');
            paint("thaw_requested", "thawed", 't');
            if let Some((a, b)) = self.window {
                for at in [col(a), col(b)] {
                    if row[at] == '.' {
                        row[at] = '|';
                    }
                }
            }
            out.push_str(&format!(
                "{member:name_width$}  {}\n",
                row.iter().collect::<String>()
            ));
        }
        out.push_str(&format!(
            "{:name_width$}  0{:>w$}\n",
            "",
            format!("{:.1} ms", end as f64 / 1000.0),
            w = width - 1
        ));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_window_spans_first_freeze_request_to_last_thaw() {
        let mut t = Timeline::default();
        t.mark("a", "freeze_requested", 100);
        t.mark("b", "freeze_requested", 150);
        t.mark("a", "thawed", 900);
        t.mark("b", "thawed", 1200);
        assert_eq!(t.compute_window(), Some(1100));
        let chart = t.gantt(40);
        assert!(chart.contains('|'), "{chart}");
        assert!(chart.lines().any(|l| l.starts_with("a ")), "{chart}");
    }
}
