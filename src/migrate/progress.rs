//! On a terminal, `warren migrate` draws one bar per queue being moved (messages, rate, ETA) and
//! a total; elsewhere it logs. Bars are drawn on stderr, so the JSON report on stdout stays clean.

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

/// The bars of one run.
pub struct Progress {
    multi: MultiProgress,
    total: ProgressBar,
}

/// One queue's bar, which also moves the total.
pub struct QueueBar {
    bar: ProgressBar,
    total: ProgressBar,
}

fn style(template: &str) -> ProgressStyle {
    ProgressStyle::with_template(template).unwrap_or_else(|_| ProgressStyle::default_bar()).progress_chars("=> ")
}

impl Progress {
    /// Bars on stderr for `messages` planned in all.
    pub fn new(messages: u64) -> Self {
        let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr());
        let total = multi.add(ProgressBar::new(messages));
        total.set_style(style("{prefix:>32} [{bar:30}] {pos}/{len} msgs  {per_sec:>12}  ETA {eta}"));
        total.set_prefix("total");
        Self { multi, total }
    }

    /// A bar for a queue about to be moved, above the total.
    pub fn queue(&self, vhost: &str, name: &str, messages: u64) -> QueueBar {
        let bar = self.multi.insert_before(&self.total, ProgressBar::new(messages));
        bar.set_style(style("{prefix:>32} [{bar:30}] {pos}/{len} msgs  {per_sec:>12}  ETA {eta}  {msg}"));
        let label = if vhost == "/" { name.to_string() } else { format!("{vhost}/{name}") };
        bar.set_prefix(label.chars().rev().take(32).collect::<Vec<_>>().into_iter().rev().collect::<String>());
        QueueBar { bar, total: self.total.clone() }
    }

    pub fn finish(&self) {
        self.total.finish();
    }
}

impl QueueBar {
    /// `moved` so far in this queue; the total moves by the difference.
    pub fn moved(&self, moved: u64) {
        let before = self.bar.position();
        if moved > before {
            self.total.inc(moved - before);
        }
        if moved > self.bar.length().unwrap_or(0) {
            // --follow: messages published during the move.
            self.bar.set_length(moved);
            self.total.inc_length(moved - before);
        }
        self.bar.set_position(moved);
    }

    pub fn done(&self, outcome: &str) {
        self.bar.finish_with_message(outcome.to_string());
    }
}
