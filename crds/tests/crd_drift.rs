//! Fails when the checked-in CRD YAML under `crds/`, or the Helm chart's copy of it in
//! `charts/localmodel/crds/`, differs from what the Rust types generate.

use std::path::Path;

#[test]
fn checked_in_crds_match_the_rust_types() {
    let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let chart_dir = crate_dir.join("../charts/localmodel/crds");
    let mut stale = Vec::new();
    let wanted = crds::crd_yamls();
    for ((name, want), (dir, shown)) in wanted.iter().flat_map(|f| {
        [
            (f, (crate_dir, "crds")),
            (f, (chart_dir.as_path(), "charts/localmodel/crds")),
        ]
    }) {
        let path = dir.join(name);
        match std::fs::read_to_string(&path) {
            Ok(have) if &have == want => {}
            Ok(have) => {
                let line = have
                    .lines()
                    .zip(want.lines())
                    .position(|(a, b)| a != b)
                    .unwrap_or_else(|| have.lines().count().min(want.lines().count()))
                    + 1;
                stale.push(format!("{shown}/{name} (first difference at line {line})"));
            }
            Err(e) => stale.push(format!("{shown}/{name} (cannot read it: {e})")),
        }
    }
    assert!(
        stale.is_empty(),
        "the checked-in CRDs (crds/ and the chart's copy) are out of date with the Rust types in crds/src:\n  {}\n\
         run `cargo run -p crds --bin crdgen` and commit the result",
        stale.join("\n  ")
    );
}
