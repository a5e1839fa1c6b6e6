//! Phase 4: what left the source and what arrived, per queue; the JSON of `--report`.

use serde::{Deserialize, Serialize};

use crate::api::MigrationQueueStatus;

use super::declarations::RefusedDeclaration;
use super::definitions::{DefinitionsReport, HaLost};
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
    /// Attempts to reconnect after a connection to either broker was lost.
    pub reconnects: u64,
    pub error: Option<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub source_version: String,
    pub target_version: String,
    pub dry_run: bool,
    /// The plan: the queues and their depths at preflight.
    pub planned: Vec<QueuePlan>,
    /// Queues not replicated on the target (a target without classic mirroring), with the reason.
    pub ha_lost: Vec<HaLost>,
    /// Declarations the apps make that the target refuses (tried after the import).
    pub refused_declarations: Vec<RefusedDeclaration>,
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
            ha_lost: plan.ha_lost.clone(),
            refused_declarations: Vec::new(),
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

    /// The plan for people, one line per queue (its type on either side, whether it is replicated
    /// on the target), then each queue that loses HA, with why.
    pub fn plan_lines(&self) -> Vec<String> {
        let mut lines: Vec<String> = self
            .planned
            .iter()
            .map(|q| {
                format!(
                    "queue {} (vhost {}): {}{} -> {}, {}",
                    q.name,
                    q.vhost,
                    q.queue_type,
                    if q.source_mirrored { " mirrored by a policy" } else { "" },
                    q.target_type,
                    if q.replicated { "replicated" } else { "NOT replicated" }
                )
            })
            .collect();
        lines.extend(self.ha_lost.iter().map(|lost| format!("warning: {lost}")));
        lines.extend(self.refused_declarations.iter().map(|r| {
            format!(
                "warning: the apps' declaration of {} {} (vhost {}) is refused by the target: {}; {}",
                r.kind, r.name, r.vhost, r.error, r.advice
            )
        }));
        lines
    }

    pub fn moved(&self) -> u64 {
        self.queues.iter().map(|q| q.moved).sum()
    }
}

/// What the migration Job leaves as its pod's termination message, for the operator to put in the
/// RabbitMigration's status: totals, per-queue counts and the error that stopped it. Kept within the
/// 4 KiB the kubelet keeps of a termination message.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub complete: bool,
    pub moved: u64,
    #[serde(default)]
    pub queues: Vec<MigrationQueueStatus>,
    #[serde(default)]
    pub omitted_queues: u64,
    /// Queues left unreplicated on the target, with why (the first few; the last entry counts the rest).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ha_lost: Vec<String>,
    /// The apps' declarations the target refuses, with the fix (the first few, then a count).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub refused_declarations: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<SummaryError>,
}

/// HA-lost entries a summary lists before it counts the rest.
const HA_LOST_SHOWN: usize = 8;

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SummaryError {
    pub phase: String,
    pub reason: String,
    pub message: String,
}

/// The kubelet keeps at most this much of a termination message.
pub const TERMINATION_MESSAGE_LIMIT: usize = 4096;

fn clip(text: &str, limit: usize) -> String {
    match text.char_indices().nth(limit) {
        Some((end, _)) => format!("{}...", &text[..end]),
        None => text.to_string(),
    }
}

impl Summary {
    pub fn of_report(report: &Report) -> Self {
        let queues = report
            .queues
            .iter()
            .map(|q| MigrationQueueStatus {
                vhost: q.vhost.clone(),
                name: q.name.clone(),
                total: q.source_before,
                moved: q.moved,
                left: q.source_after,
                refused: q.refused,
                error: q.error.as_deref().map(|e| clip(e, 200)),
                target_type: report
                    .planned
                    .iter()
                    .find(|p| p.vhost == q.vhost && p.name == q.name)
                    .map(|p| p.target_type.to_string()),
            })
            .collect();
        let mut ha_lost: Vec<String> =
            report.ha_lost.iter().take(HA_LOST_SHOWN).map(|lost| clip(&lost.to_string(), 200)).collect();
        if report.ha_lost.len() > HA_LOST_SHOWN {
            ha_lost.push(format!(
                "and {} more queues not replicated (see the Job's log)",
                report.ha_lost.len() - HA_LOST_SHOWN
            ));
        }
        let refused = &report.refused_declarations;
        let mut refused_declarations: Vec<String> = refused
            .iter()
            .take(HA_LOST_SHOWN)
            .map(|r| clip(&format!("{} {} in vhost {}: {}", r.kind, r.name, r.vhost, r.advice), 300))
            .collect();
        if refused.len() > HA_LOST_SHOWN {
            refused_declarations.push(format!("and {} more (see the Job's log)", refused.len() - HA_LOST_SHOWN));
        }
        Self {
            complete: report.complete,
            moved: report.moved(),
            queues,
            omitted_queues: 0,
            ha_lost,
            refused_declarations,
            error: None,
        }
    }

    pub fn of_error(error: &super::MigrateError) -> Self {
        Self {
            error: Some(SummaryError {
                phase: error.phase.to_string(),
                reason: error.reason.to_string(),
                message: clip(&error.message, 1000),
            }),
            ..Self::default()
        }
    }

    /// JSON within [`TERMINATION_MESSAGE_LIMIT`]: queues past what fits are counted, not listed.
    pub fn to_termination_message(&self) -> String {
        let mut summary = self.clone();
        loop {
            let text = serde_json::to_string(&summary).unwrap_or_default();
            if text.len() <= TERMINATION_MESSAGE_LIMIT || summary.queues.is_empty() {
                return text;
            }
            summary.queues.pop();
            summary.omitted_queues += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::migrate::definitions::HaLostReason;

    #[test]
    fn a_summary_of_many_queues_fits_a_termination_message_and_counts_what_it_left_out() {
        let queue = |i: usize| QueueReport {
            vhost: "/".into(),
            name: format!("celery-queue-with-a-long-name-{i:04}"),
            source_before: 1000,
            moved: 1000,
            ..QueueReport::default()
        };
        let report = Report {
            source_version: "3.10.8".into(),
            target_version: "3.10.8".into(),
            dry_run: false,
            planned: Vec::new(),
            ha_lost: (0..20)
                .map(|i| HaLost {
                    vhost: "/".into(),
                    name: format!("q{i}"),
                    reason: HaLostReason::Priorities(9.into()),
                })
                .collect(),
            refused_declarations: Vec::new(),
            definitions: DefinitionsReport::default(),
            queues: (0..500).map(queue).collect(),
            notes: Vec::new(),
            complete: true,
        };
        let text = Summary::of_report(&report).to_termination_message();
        assert!(text.len() <= TERMINATION_MESSAGE_LIMIT, "{} bytes", text.len());
        let back: Summary = serde_json::from_str(&text).expect("parses");
        assert_eq!(back.moved, 500_000);
        assert!(back.queues.len() > 10, "{} queues kept", back.queues.len());
        assert_eq!(back.queues.len() as u64 + back.omitted_queues, 500);
        assert_eq!(back.ha_lost.len(), HA_LOST_SHOWN + 1, "{:?}", back.ha_lost);
        assert_eq!(back.ha_lost[HA_LOST_SHOWN], "and 12 more queues not replicated (see the Job's log)");
        assert!(back.ha_lost[0].starts_with("queue q0 in vhost / is not replicated on the target (HA lost)"));
        assert_eq!(
            back.queues[0],
            MigrationQueueStatus {
                vhost: "/".into(),
                name: "celery-queue-with-a-long-name-0000".into(),
                total: 1000,
                moved: 1000,
                left: 0,
                refused: 0,
                error: None,
                target_type: None,
            }
        );
    }
}
