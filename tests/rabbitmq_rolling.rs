//! Tier 2: a rolling restart (highest ordinal first, as the StatefulSet controller does), each node
//! stopped through the preStop hook, while a publisher with confirms and a consumer keep running
//! and move to another node when theirs goes away. No confirmed message may be lost.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use support::amqp;
use support::rabbit_nodes::{BOOT, NodeCluster, THREE_NODES};
use tokio::sync::Mutex;

const QUEUE: &str = "rolling";

/// Publishes batches of 100 until `stop`, starting on `urls[0]` and moving on when a node fails;
/// returns how many times it had to move.
async fn publisher(urls: Vec<String>, confirmed: Arc<Mutex<BTreeSet<u32>>>, stop: Arc<AtomicBool>) -> usize {
    let (mut next, mut target, mut moves) = (0u32, 0usize, 0usize);
    while !stop.load(Ordering::Relaxed) {
        let (acked, error) = amqp::publish(&urls[target % urls.len()], QUEUE, next..next + 100, 50).await;
        // Confirms are awaited in order: what was acked is a prefix; the rest is published again.
        next += acked.len() as u32;
        confirmed.lock().await.extend(acked);
        if error.is_some() {
            target += 1;
            moves += 1;
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }
    moves
}

/// Consumes until `stop` and an idle queue, moving to another node when its node fails.
async fn consumer(urls: Vec<String>, seen: Arc<Mutex<BTreeMap<u32, u32>>>, stop: Arc<AtomicBool>) -> usize {
    let (mut target, mut moves) = (0usize, 0usize);
    loop {
        let (got, error) = amqp::consume(&urls[target % urls.len()], QUEUE, usize::MAX, Duration::from_secs(3)).await;
        let mut all = seen.lock().await;
        for (id, n) in got {
            *all.entry(id).or_default() += n;
        }
        drop(all);
        match error {
            Some(_) => {
                target += 1;
                moves += 1;
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            None if stop.load(Ordering::Relaxed) => return moves,
            None => {}
        }
    }
}

#[tokio::test]
async fn a_rolling_restart_through_pre_stop_loses_no_confirmed_message() {
    let mut nodes = NodeCluster::started(THREE_NODES).await;
    nodes.declare_mirrored_queue(1, QUEUE, &[0, 2]).await;
    let url = |i: usize| nodes.nodes[i].amqp_url(&nodes.credentials);
    // The publisher starts on node 0 and the consumer on node 2: both see their node restart.
    let (publisher_urls, consumer_urls) = (vec![url(0), url(1), url(2)], vec![url(2), url(0), url(1)]);
    let confirmed = Arc::new(Mutex::new(BTreeSet::new()));
    let seen = Arc::new(Mutex::new(BTreeMap::new()));
    let (stop_publishing, stop_consuming) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicBool::new(false)));
    let publishing = tokio::spawn(publisher(publisher_urls, confirmed.clone(), stop_publishing.clone()));
    let consuming = tokio::spawn(consumer(consumer_urls, seen.clone(), stop_consuming.clone()));

    let mut confirmed_during = Vec::new();
    for i in [2, 1, 0] {
        let before = confirmed.lock().await.len();
        nodes.nodes[i].stop_gracefully(Duration::from_secs(180)).await;
        nodes.start(&[i]);
        nodes.wait_members(i, &[0, 1, 2], BOOT).await;
        confirmed_during.push(confirmed.lock().await.len() - before);
    }
    stop_publishing.store(true, Ordering::Relaxed);
    let publisher_moves = publishing.await.expect("publisher task");
    stop_consuming.store(true, Ordering::Relaxed);
    let consumer_moves = consuming.await.expect("consumer task");

    let confirmed = confirmed.lock().await;
    let seen = seen.lock().await;
    let lost: Vec<&u32> = confirmed.iter().filter(|id| !seen.contains_key(id)).take(20).collect();
    let duplicates = seen.values().filter(|n| **n > 1).count();
    eprintln!(
        "rolling restart: {} confirmed, {} consumed, {duplicates} delivered more than once (republished after a lost \
         confirm or redelivered after a lost ack); confirmed while restarting nodes 2, 1, 0: {confirmed_during:?}",
        confirmed.len(),
        seen.len()
    );
    assert!(lost.is_empty(), "confirmed messages lost: {lost:?} (of {})", confirmed.len());
    assert!(confirmed_during.iter().all(|n| *n > 0), "the publisher stalled during a restart: {confirmed_during:?}");
    assert!(
        publisher_moves >= 1 && consumer_moves >= 1,
        "clients never lost their node: {publisher_moves}, {consumer_moves}"
    );
}
