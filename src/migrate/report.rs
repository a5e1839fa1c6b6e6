//! Phase 4: what left the source and what arrived, per queue; the JSON of `--report`.

use serde::Serialize;

use super::definitions::DefinitionsReport;
use super::preflight::{Plan, QueuePlan};

/// One queue's outcome.
#[derive(Clone, Debug, Default, Serialize)]
pub struct QueueReport {
    pub vhost: String,
    pub name: String,
    /// Ready messages on the source before moving.
    pub source_before: u64,
    /// Published to the target, confirmed, then acknowledged on the source.
    pub moved: u64,
    /// Of those, messages the source had delivered before (an earlier run stopped after the target
    /// confirmed them and before the source ack): possibly on the target twice.
    pub possible_duplicates: u64,
    /// Refused by the target (nack or unroutable); left on the source.
    pub refused: u64,
    /// Ready messages left on the source afterwards.
    pub source_after: u64,
    pub error: Option<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub source_version: String,
    pub target_version: String,
    pub dry_run: bool,
    /// The plan: the queues and their depths at preflight.
    pub planned: Vec<QueuePlan>,
    pub definitions: DefinitionsReport,
    pub queues: Vec<QueueReport>,
    pub notes: Vec<String>,
    /// Every queue moved without error and nothing left on the source.
    pub complete: bool,
}

impl Report {
    pub fn from_plan(plan: &Plan, dry_run: bool) -> Self {
        Self {
            source_version: plan.source_version.clone(),
            target_version: plan.target_version.clone(),
            dry_run,
            planned: plan.queues.clone(),
            definitions: DefinitionsReport { notes: plan.notes.clone(), ..Default::default() },
            queues: Vec::new(),
            notes: Vec::new(),
            complete: false,
        }
    }

    pub fn finish(&mut self) {
        self.queues.sort_by(|a, b| (&a.vhost, &a.name).cmp(&(&b.vhost, &b.name)));
        self.notes.push(
            "a message's per-message TTL (expiration) starts again on the target: it was published there anew".into(),
        );
        self.complete = self.queues.iter().all(|q| q.error.is_none() && q.refused == 0 && q.source_after == 0);
    }

    pub fn moved(&self) -> u64 {
        self.queues.iter().map(|q| q.moved).sum()
    }
}
