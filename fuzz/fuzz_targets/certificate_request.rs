//! The PKI endpoint's signing of any request body: it must never panic;
//! what it signs carries exactly the identity it was asked for (the
//! request's own names are ignored) and is signed by the CA.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use rcgen::{Issuer, KeyPair};
use stillpoint_controller::certs::{LeafSpec, Validity, new_ca, sign_csr};
use x509_parser::extensions::GeneralName;
use x509_parser::pem::parse_x509_pem;

const URI: &str = "spiffe://cluster.local/ns/shop/sa/pg";

fn ca() -> &'static (String, Issuer<'static, KeyPair>) {
    static CA: OnceLock<(String, Issuer<'static, KeyPair>)> = OnceLock::new();
    CA.get_or_init(|| {
        let (cert, key) = new_ca("fuzz CA", Validity::days(1)).unwrap();
        let issuer = Issuer::from_ca_cert_pem(&cert, key).unwrap();
        (cert, issuer)
    })
}

fuzz_target!(|body: &[u8]| {
    let Ok(csr) = std::str::from_utf8(body) else {
        return;
    };
    let (_, issuer) = ca();
    let spec = LeafSpec {
        uri: URI.into(),
        dns: vec![],
        validity: Validity::days(1),
    };
    let Ok(pem) = sign_csr(csr, &spec, issuer) else {
        return;
    };
    let (_, pem) = parse_x509_pem(pem.as_bytes()).unwrap();
    let cert = pem.parse_x509().unwrap();
    let names: Vec<String> = cert
        .subject_alternative_name()
        .unwrap()
        .map(|san| {
            san.value
                .general_names
                .iter()
                .map(|n| match n {
                    GeneralName::URI(u) => u.to_string(),
                    other => format!("{other:?}"),
                })
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(
        names,
        [URI],
        "signed names other than the identity asked for"
    );
    assert_eq!(cert.issuer().to_string(), "CN=fuzz CA, O=Stillpoint");
});
