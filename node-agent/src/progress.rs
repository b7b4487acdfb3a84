//! Terminal progress for pulls: a bar with bytes, rate and ETA on a terminal, periodic log
//! lines otherwise.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use tokio::sync::watch;

use crate::puller::{PullProgress, PullStage};

/// Shows the progress published on `rx` until the pull reports `Done` or the sender is dropped.
pub fn show(
    mut rx: watch::Receiver<PullProgress>,
    label: String,
    quiet: bool,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        if quiet {
            return;
        }
        let tty = std::io::stderr().is_terminal();
        let bar = if tty {
            let b = ProgressBar::new(0);
            b.set_style(
                ProgressStyle::with_template(
                    "{msg} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            b.set_message(label.clone());
            Some(b)
        } else {
            None
        };
        let mut last_log = Instant::now();
        loop {
            let p = rx.borrow_and_update().clone();
            if let Some(b) = &bar {
                if let Some(t) = p.total {
                    b.set_length(t);
                }
                b.set_position(p.bytes);
            } else if p.stage == PullStage::Downloading
                && last_log.elapsed() >= Duration::from_secs(5)
            {
                last_log = Instant::now();
                let pct = p.percent().map(|x| format!("{x:.0}%")).unwrap_or_default();
                tracing::info!(model = %label, bytes = p.bytes, total = ?p.total, rate = format!("{:.1} MB/s", p.bytes_per_second / 1e6), eta = ?p.eta().map(|d| d.as_secs()), "pulling {pct}");
            }
            if p.stage == PullStage::Done {
                break;
            }
            if rx.changed().await.is_err() {
                break;
            }
        }
        if let Some(b) = bar {
            b.finish_and_clear();
        }
    })
}
