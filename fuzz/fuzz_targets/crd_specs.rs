//! The CRD spec fields the controller parses by hand, from any JSON: a
//! ConsistencyGroup's durations and members, a BackupSchedule's cron
//! expression, time zone and retention, a GroupRestore's choices and stage
//! timeout, a GroupQuiesce's durations. None may panic (a cron expression
//! that never fires included), and whatever is accepted is checked again
//! the same way.
#![no_main]

use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use stillpoint_controller::kube::crd::{
    BackupSchedule, BackupScheduleSpec, ConsistencyGroupSpec, GroupRestoreSpec,
};

fuzz_target!(|data: &[u8]| {
    let Some((&which, json)) = data.split_first() else {
        return;
    };
    match which % 4 {
        0 => {
            if let Ok(spec) = serde_json::from_slice::<ConsistencyGroupSpec>(json) {
                let first = stillpoint_controller::kube::resolve::check_spec(&spec);
                assert_eq!(
                    first,
                    stillpoint_controller::kube::resolve::check_spec(&spec)
                );
            }
        }
        1 => {
            if let Ok(spec) = serde_json::from_slice::<BackupScheduleSpec>(json) {
                let bs = BackupSchedule::new("fuzz", spec);
                let min = Duration::from_secs(60);
                let _ = stillpoint_controller::kube::schedule::check_spec(&bs, min);
            }
        }
        2 => {
            if let Ok(spec) = serde_json::from_slice::<GroupRestoreSpec>(json) {
                if let Ok(bound) = stillpoint_controller::kube::restore::check_spec(&spec) {
                    assert!(!bound.is_zero());
                }
            }
        }
        _ => {
            let text = String::from_utf8_lossy(json);
            if let Ok(d) = stillpoint_controller::kube::quiesce::parse(&text, "duration") {
                assert!(!d.is_zero());
            }
            if let Ok(d) = stillpoint_proto::duration::parse_duration(&text) {
                let shown = stillpoint_proto::duration::format_duration(d);
                let again = stillpoint_proto::duration::parse_duration(&shown);
                assert!(again.is_ok(), "{text:?} → {shown:?} does not parse again");
            }
        }
    }
});
