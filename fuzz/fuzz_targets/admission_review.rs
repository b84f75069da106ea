//! The injecting webhook's whole answer to any request body: it must
//! never panic, always answer either HTTP 400 or an AdmissionReview with
//! the request's uid, and every patch it sends must be valid JSON Patch
//! `add` operations.
#![no_main]

use std::collections::BTreeMap;

use libfuzzer_sys::fuzz_target;
use stillpoint_controller::kube::inject::{InjectConfig, review};

fuzz_target!(|body: &[u8]| {
    let cfg = InjectConfig {
        image: "ghcr.io/stillpoint-dev/stillpoint-agent:0.1.0".into(),
        native_sidecars: body.len() % 2 == 0,
        controller_identity: "spiffe://cluster.local/ns/stillpoint-system/sa/stillpoint-controller"
            .into(),
        certificate_url: "https://stillpoint-webhook.stillpoint-system.svc:9444/v1/certificate"
            .into(),
        version: "0.1.0".into(),
    };
    let mut labels = BTreeMap::new();
    if body.first().is_some_and(|b| b & 1 == 1) {
        labels.insert(
            "pod-security.kubernetes.io/enforce".to_string(),
            "restricted".to_string(),
        );
    }
    let (code, answer) = review(body, &labels, &cfg);
    match code {
        400 => assert!(answer.get("error").is_some()),
        200 => {
            let response = &answer["response"];
            assert!(response["uid"].is_string());
            assert!(response["allowed"].is_boolean());
            if let Some(patch) = response.get("patch") {
                use base64::Engine as _;
                let bytes = base64::engine::general_purpose::STANDARD
                    .decode(patch.as_str().unwrap())
                    .unwrap();
                let ops: Vec<serde_json::Value> = serde_json::from_slice(&bytes).unwrap();
                assert!(!ops.is_empty());
                for op in ops {
                    assert_eq!(op["op"], "add");
                    assert!(op["path"].as_str().unwrap().starts_with('/'));
                }
            }
        }
        other => panic!("unexpected status {other}"),
    }
});
