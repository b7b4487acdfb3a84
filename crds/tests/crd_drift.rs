//! Fails when the checked-in CRD YAML under `crds/` differs from what the Rust types generate.

use std::path::Path;

#[test]
fn checked_in_crds_match_the_rust_types() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut stale = Vec::new();
    for (name, want) in crds::crd_yamls() {
        let path = dir.join(name);
        match std::fs::read_to_string(&path) {
            Ok(have) if have == want => {}
            Ok(have) => {
                let line = have
                    .lines()
                    .zip(want.lines())
                    .position(|(a, b)| a != b)
                    .unwrap_or_else(|| have.lines().count().min(want.lines().count()))
                    + 1;
                stale.push(format!("crds/{name} (first difference at line {line})"));
            }
            Err(e) => stale.push(format!("crds/{name} (cannot read it: {e})")),
        }
    }
    assert!(
        stale.is_empty(),
        "the checked-in CRDs are out of date with the Rust types in crds/src:\n  {}\n\
         run `cargo run -p crds --bin crdgen` and commit the result",
        stale.join("\n  ")
    );
}
