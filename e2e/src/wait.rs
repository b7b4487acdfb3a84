//! Polling with a deadline: every wait in the harness and the tests goes through here, so a
//! timeout always says what was awaited and what was last seen.

use std::fmt::Debug;
use std::future::Future;
use std::time::{Duration, Instant};

use crate::Error;

/// Default interval between polls.
pub const POLL: Duration = Duration::from_millis(200);

/// Calls `probe` until it returns `Ok(Some(v))`, and returns `v`. `Ok(None)` and `Err(e)` are
/// "not yet": the last one is reported if `timeout` passes first.
pub async fn until<T, E, F, Fut>(what: &str, timeout: Duration, mut probe: F) -> Result<T, Error>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<T>, E>>,
    E: Debug,
{
    let start = Instant::now();
    loop {
        let last = match probe().await {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => "not yet".to_string(),
            Err(e) => format!("{e:?}"),
        };
        if start.elapsed() >= timeout {
            return Err(Error::Timeout {
                what: what.into(),
                waited: start.elapsed(),
                last,
            });
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Like [`until`], but `probe` reports what it saw as `Err(String)`, which is printed on
/// timeout.
pub async fn until_seen<T, F, Fut>(what: &str, timeout: Duration, mut probe: F) -> Result<T, Error>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let start = Instant::now();
    loop {
        let last = match probe().await {
            Ok(v) => return Ok(v),
            Err(seen) => seen,
        };
        if start.elapsed() >= timeout {
            return Err(Error::Timeout {
                what: what.into(),
                waited: start.elapsed(),
                last,
            });
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Blocking version of [`until_seen`] for code without a runtime.
pub fn blocking_until_seen<T>(
    what: &str,
    timeout: Duration,
    mut probe: impl FnMut() -> Result<T, String>,
) -> Result<T, Error> {
    let start = Instant::now();
    loop {
        let last = match probe() {
            Ok(v) => return Ok(v),
            Err(seen) => seen,
        };
        if start.elapsed() >= timeout {
            return Err(Error::Timeout {
                what: what.into(),
                waited: start.elapsed(),
                last,
            });
        }
        std::thread::sleep(POLL);
    }
}
