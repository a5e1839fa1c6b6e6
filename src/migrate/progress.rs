//! On a terminal, `warren migrate` draws one bar per queue being moved (messages, rate, ETA) and
//! a total; elsewhere it logs. Bars are drawn on stderr, so the JSON report on stdout stays clean.

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressState, ProgressStyle};

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
    ProgressStyle::with_template(template)
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .with_key("rate", |state: &ProgressState, w: &mut dyn std::fmt::Write| {
            let _ = write!(w, "{:.0} msg/s", state.per_sec());
        })
        .progress_chars("=> ")
}

impl Progress {
    /// Bars on stderr for `messages` planned in all.
    pub fn new(messages: u64) -> Self {
        let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr());
        let total = multi.add(ProgressBar::new(messages));
        total.set_style(style("{prefix:>32} [{bar:30}] {pos}/{len} msgs  {rate:>12}  ETA {eta}"));
        total.set_prefix("total");
        Self { multi, total }
    }

    /// A bar for a queue about to be moved, above the total.
    pub fn queue(&self, vhost: &str, name: &str, messages: u64) -> QueueBar {
        let bar = self.multi.insert_before(&self.total, ProgressBar::new(messages));
        bar.set_style(style("{prefix:>32} [{bar:30}] {pos}/{len} msgs  {rate:>12}  ETA {eta}  {msg}"));
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
        let length = self.bar.length().unwrap_or(0);
        if moved > length {
            // More than planned: statistics that lagged, or --follow picking up new messages.
            self.bar.set_length(moved);
            self.total.inc_length(moved - length);
        }
        self.bar.set_position(moved);
    }

    /// The queue's move ended: its bar shows what moved, and the total forgets what did not come.
    pub fn done(&self, outcome: &str) {
        let (moved, length) = (self.bar.position(), self.bar.length().unwrap_or(0));
        if length > moved {
            self.bar.set_length(moved);
            let total = self.total.length().unwrap_or(0);
            self.total.set_length(total.saturating_sub(length - moved));
        }
        self.bar.finish_with_message(outcome.to_string());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_total_follows_what_each_queue_really_moved() {
        let progress = Progress::new(150);
        // Planned from lagging statistics: 100 and 50; the first really has 120, the second 30.
        let a = progress.queue("/", "a", 100);
        let b = progress.queue("billing", "b", 50);
        a.moved(60);
        b.moved(30);
        assert_eq!((progress.total.position(), progress.total.length()), (90, Some(150)));
        a.moved(120);
        assert_eq!((a.bar.length(), progress.total.length()), (Some(120), Some(170)));
        a.done("done");
        b.done("done");
        assert_eq!((progress.total.position(), progress.total.length()), (150, Some(150)));
        assert_eq!(b.bar.length(), Some(30));
    }
}
