//! Per-model admission: at most `max_running` generations reach the engine at once, at most
//! `max_waiting` more wait in line, and anything beyond that is refused with 429 at once.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::error::ApiError;
use crate::metrics::Metrics;

/// The line in front of one model.
#[derive(Debug)]
pub struct Admission {
    model: String,
    running: Arc<Semaphore>,
    waiting: AtomicUsize,
    max_waiting: usize,
    /// Rough seconds a waiting request should wait before retrying, for `Retry-After`.
    retry_after_secs: u64,
}

/// Held while a request is being generated; frees its place when dropped.
pub struct Slot {
    _permit: OwnedSemaphorePermit,
    gauge: prometheus::IntGauge,
    /// Seconds the request waited for its place.
    pub queued_secs: f64,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

struct WaitGuard<'a> {
    count: &'a AtomicUsize,
    gauge: prometheus::IntGauge,
}

impl Drop for WaitGuard<'_> {
    fn drop(&mut self) {
        self.count.fetch_sub(1, Ordering::SeqCst);
        self.gauge.dec();
    }
}

impl Admission {
    pub fn new(model: &str, max_running: usize, max_waiting: usize) -> Self {
        Self {
            model: model.to_string(),
            running: Arc::new(Semaphore::new(max_running.max(1))),
            waiting: AtomicUsize::new(0),
            max_waiting,
            retry_after_secs: 1,
        }
    }

    /// Waits for a place, or refuses at once when the line is full. Dropping the future while
    /// waiting (client gone) leaves the line.
    pub async fn admit(&self, metrics: &Metrics) -> Result<Slot, ApiError> {
        let start = Instant::now();
        let running_gauge = metrics
            .num_requests_running
            .with_label_values(&[self.model.as_str()]);
        if let Ok(permit) = self.running.clone().try_acquire_owned() {
            running_gauge.inc();
            return Ok(Slot {
                _permit: permit,
                gauge: running_gauge,
                queued_secs: 0.0,
            });
        }
        let prev = self.waiting.fetch_add(1, Ordering::SeqCst);
        let waiting_gauge = metrics
            .num_requests_waiting
            .with_label_values(&[self.model.as_str()]);
        waiting_gauge.inc();
        let guard = WaitGuard {
            count: &self.waiting,
            gauge: waiting_gauge,
        };
        if prev >= self.max_waiting {
            drop(guard);
            return Err(ApiError::queue_full(&self.model, self.retry_after_secs));
        }
        let permit =
            self.running.clone().acquire_owned().await.map_err(|_| {
                ApiError::unavailable(format!("model `{}` is unloading", self.model))
            })?;
        drop(guard);
        running_gauge.inc();
        Ok(Slot {
            _permit: permit,
            gauge: running_gauge,
            queued_secs: start.elapsed().as_secs_f64(),
        })
    }

    /// Stops admitting and waits until every running request has finished, or the deadline.
    /// Returns true when all finished in time.
    pub async fn drain(&self, max_running: usize, deadline: std::time::Duration) -> bool {
        let n = u32::try_from(max_running.max(1)).unwrap_or(u32::MAX);
        let all = tokio::time::timeout(deadline, self.running.acquire_many(n)).await;
        let drained = matches!(all, Ok(Ok(_)));
        self.running.close();
        drained
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn refuses_beyond_the_line_and_counts() {
        let m = Metrics::new(prometheus::Registry::new()).expect("metrics");
        let a = Arc::new(Admission::new("m", 1, 1));
        let first = a.admit(&m).await.expect("first runs");
        let a2 = a.clone();
        let m2 = m.clone();
        let second = tokio::spawn(async move { a2.admit(&m2).await.map(|s| s.queued_secs) });
        // Wait (with a deadline) until the second is counted as waiting.
        let deadline = Instant::now() + std::time::Duration::from_secs(5);
        while m.num_requests_waiting.with_label_values(&["m"]).get() != 1 {
            assert!(Instant::now() < deadline, "second request never waited");
            tokio::task::yield_now().await;
        }
        let third = a.admit(&m).await.err().expect("third refused");
        assert_eq!(third.status, axum::http::StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(third.retry_after_secs, Some(1));
        assert_eq!(m.num_requests_running.with_label_values(&["m"]).get(), 1);
        drop(first);
        let queued = second.await.expect("join").expect("second admitted");
        assert!(queued >= 0.0);
        assert_eq!(m.num_requests_waiting.with_label_values(&["m"]).get(), 0);
        assert_eq!(m.num_requests_running.with_label_values(&["m"]).get(), 0);
    }
}
