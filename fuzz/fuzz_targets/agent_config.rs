//! The agent's configuration from any environment: `KEY=VALUE` lines. It
//! must never panic; a configuration it accepts has a member name and a
//! lease bound above zero, and one it refuses says at least one problem,
//! each naming a key.
#![no_main]

use std::collections::BTreeMap;

use libfuzzer_sys::fuzz_target;
use stillpoint_agent::config::Config;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let env: BTreeMap<String, String> = text
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    match Config::from_source(&env) {
        Ok(config) => {
            let _ = format!("{config:?}");
        }
        Err(errors) => {
            let text = errors.to_string();
            assert!(!text.is_empty());
            assert!(text.contains("STILLPOINT_"), "{text}");
        }
    }
});
