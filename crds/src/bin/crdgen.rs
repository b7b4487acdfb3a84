//! Writes the CustomResourceDefinitions generated from the Rust types.
//!
//! `cargo run -p crds --bin crdgen` rewrites `crds/*.yaml` and the Helm chart's copies in
//! `charts/localmodel/crds/`; `--out-dir DIR` writes them into DIR only; `--stdout` prints them
//! all as one YAML stream.

use std::path::PathBuf;
use std::process::ExitCode;

const USAGE: &str = "usage: crdgen [--stdout | --out-dir DIR]\n\
    Writes the LocalModel CRDs into DIR (default: the crds crate folder and the Helm chart's crds/).";

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let crate_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let mut out_dirs = vec![
        crate_dir.clone(),
        crate_dir.join("../charts/localmodel/crds"),
    ];
    let mut stdout = false;
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--stdout" => stdout = true,
            "--out-dir" => match args.next() {
                Some(dir) => out_dirs = vec![PathBuf::from(dir)],
                None => {
                    eprintln!("crdgen: --out-dir needs a folder\n{USAGE}");
                    return ExitCode::from(2);
                }
            },
            "-h" | "--help" => {
                println!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            other => {
                eprintln!("crdgen: unknown argument {other:?}\n{USAGE}");
                return ExitCode::from(2);
            }
        }
    }

    let files = crds::crd_yamls();
    if stdout {
        let docs: Vec<&str> = files.iter().map(|(_, yaml)| yaml.as_str()).collect();
        print!("{}", docs.join("---\n"));
        return ExitCode::SUCCESS;
    }
    for dir in &out_dirs {
        for (name, yaml) in &files {
            let path = dir.join(name);
            if let Err(e) = std::fs::write(&path, yaml) {
                eprintln!("crdgen: cannot write {}: {e}", path.display());
                return ExitCode::FAILURE;
            }
            eprintln!("wrote {}", path.display());
        }
    }
    ExitCode::SUCCESS
}
