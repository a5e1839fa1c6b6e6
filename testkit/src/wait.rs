//! Bounded waiting on real systems, shared by the tier-2 harness and the e2e tests.

use std::time::Duration;

/// Polls `probe` every 250 ms until it returns `Ok`, or panics after `limit` with `what` and the
/// last thing the probe saw.
pub async fn wait_for<T, F, Fut>(what: &str, limit: Duration, probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    match try_wait_for(limit, probe).await {
        Ok(value) => value,
        Err(last) => panic!("waited {} s for {what}; last seen: {last}", limit.as_secs()),
    }
}

/// As `wait_for`, but a timeout returns the last thing the probe saw, for a caller that explains
/// the failure further before it panics.
pub async fn try_wait_for<T, F, Fut>(limit: Duration, mut probe: F) -> Result<T, String>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match probe().await {
            Ok(value) => return Ok(value),
            Err(last) if tokio::time::Instant::now() >= deadline => return Err(last),
            Err(_) => tokio::time::sleep(Duration::from_millis(250)).await,
        }
    }
}
