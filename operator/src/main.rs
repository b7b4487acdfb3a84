fn main() {
    eprintln!("the LocalModel operator's controllers are not built yet; see docs/architecture.md");
    std::process::exit(2);
}
