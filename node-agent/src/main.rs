use clap::Parser;
use node_agent::cli::{Cli, Command};

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // Dependencies enable both of rustls' crypto back ends; pick one explicitly.
    let _ = rustls::crypto::ring::default_provider().install_default();
    node_agent::telemetry::init(cli.log_format);
    let threads = match &cli.command {
        Command::Serve(s) => s.engine.threads,
        Command::Run(r) => r.engine.threads,
        Command::Pull(_) | Command::Chat(_) => None,
    };
    let threads = threads.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    });
    // candle's matmuls, the global rayon pool and mistral.rs' CPU attention pool all size
    // themselves from this variable; it must be set before any of them start.
    // SAFETY: no other thread exists yet.
    unsafe { std::env::set_var("RAYON_NUM_THREADS", threads.to_string()) };
    // CUDA numbers GPUs fastest first unless told otherwise; NVML, whose indices the inventory
    // and placement use, numbers them by PCI bus. Make CUDA agree.
    if std::env::var_os("CUDA_DEVICE_ORDER").is_none() {
        // SAFETY: as above, no other thread exists yet.
        unsafe { std::env::set_var("CUDA_DEVICE_ORDER", "PCI_BUS_ID") };
    }
    node_agent::standalone::init_engine_threads(Some(threads));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        match cli.command {
            Command::Pull(args) => node_agent::standalone::pull(args).await?,
            Command::Serve(args) => node_agent::standalone::serve(args).await?,
            Command::Run(args) => node_agent::cluster::run(args).await?,
            Command::Chat(args) => println!("{}", node_agent::chat::chat(&args).await?),
        }
        Ok(())
    })
}
