//! Phase 3: messages, queue by queue. The source is consumed with manual acks and a prefetch of
//! one window; each message is published to the target with `mandatory` and confirms, pipelined up
//! to a window, and acknowledged on the source only once the target confirmed it. Whatever is in
//! flight when the migrator dies stays unacknowledged, so the source delivers it again on the next
//! run: duplicates are bounded by the window, and nothing is lost.

use std::collections::VecDeque;
use std::time::Duration;

use futures::{FutureExt, StreamExt};
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicGetOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions,
};
use lapin::types::FieldTable;
use lapin::{Acker, Channel, Confirmation, Consumer, PublisherConfirm};

use super::Options;
use super::amqp::{Failure, bounded, close, connect, depth, within};
use super::budget::{self, Budget, Held};
use super::preflight::QueuePlan;
use super::progress::{Progress, QueueBar};
use super::report::QueueReport;

/// How long a queue keeps reconnecting after it lost a connection (a node restarting, a client
/// Service moving to another node) before it stops with the error.
const RECONNECT_FOR: Duration = Duration::from_secs(90);

struct InFlight {
    acker: Acker,
    redelivered: bool,
    confirm: PublisherConfirm,
    /// The message's bytes in the budget, given back once it is settled.
    _held: Held,
}

/// The target's verdicts, taken in order: the source is acknowledged with one `multiple` ack up to
/// the newest confirmed message (everything older is settled already). A message the target
/// refused (nacked: a `reject-publish` overflow, a size limit; or returned as unroutable) is left
/// unsettled: the queue stops (see `Moving::stop_if_refused`), and the message goes back to the
/// source when the channel closes, once. Requeued at once, it would come straight back to this
/// consumer and be refused again, in a loop that a source's delivery limit ends by dead-lettering
/// or dropping it. After a refusal, confirmed messages are acknowledged one by one, so that no
/// `multiple` ack covers the refused one.
#[derive(Default)]
struct Verdicts {
    confirmed: Option<Acker>,
}

impl Verdicts {
    async fn take(
        &mut self,
        message: InFlight,
        confirmation: lapin::Result<Confirmation>,
        report: &mut QueueReport,
    ) -> Result<(), Failure> {
        let confirmation = confirmation.map_err(|e| Failure::of("target confirm", &e))?;
        if confirmation.is_ack() && confirmation.take_message().is_none() {
            if report.refused > 0 {
                let one = BasicAckOptions { multiple: false };
                message.acker.ack(one).await.map_err(|e| Failure::of("source ack", &e))?;
            } else {
                self.confirmed = Some(message.acker);
            }
            report.moved += 1;
            report.possible_duplicates += u64::from(message.redelivered);
        } else {
            // Everything confirmed before it is acknowledged now, up to it and not beyond.
            if let Some(last) = self.confirmed.take() {
                last.ack(BasicAckOptions { multiple: true }).await.map_err(|e| Failure::of("source ack", &e))?;
            }
            report.refused += 1;
        }
        Ok(())
    }

    async fn acknowledge(self, bar: Option<&QueueBar>, report: &QueueReport) -> Result<(), Failure> {
        if let Some(last) = self.confirmed {
            last.ack(BasicAckOptions { multiple: true }).await.map_err(|e| Failure::of("source ack", &e))?;
        }
        if let Some(bar) = bar {
            bar.moved(report.moved);
        }
        Ok(())
    }
}

/// Waits for the target's verdict on the `count` oldest messages, in order, and settles them on
/// the source.
async fn settle(
    pending: &mut VecDeque<InFlight>,
    count: usize,
    report: &mut QueueReport,
    bar: Option<&QueueBar>,
) -> Result<(), Failure> {
    let batch: Vec<InFlight> = pending.drain(..count.min(pending.len())).collect();
    if batch.is_empty() {
        return Ok(());
    }
    bounded("target confirms", async {
        let mut verdicts = Verdicts::default();
        for mut message in batch {
            let confirmation = (&mut message.confirm).await;
            verdicts.take(message, confirmation, report).await?;
        }
        verdicts.acknowledge(bar, report).await
    })
    .await
}

/// Settles the oldest message, whose verdict came, and every one after it whose verdict is in
/// too, without waiting for more.
async fn settle_confirmed(
    pending: &mut VecDeque<InFlight>,
    oldest: lapin::Result<Confirmation>,
    report: &mut QueueReport,
    bar: Option<&QueueBar>,
) -> Result<(), Failure> {
    let mut verdicts = Verdicts::default();
    let mut confirmation = Some(oldest);
    while let Some(result) = confirmation.take() {
        let Some(message) = pending.pop_front() else { break };
        verdicts.take(message, result, report).await?;
        confirmation = pending.front_mut().and_then(|next| (&mut next.confirm).now_or_never());
    }
    verdicts.acknowledge(bar, report).await
}

/// One attempt at a queue. A `transport` failure (a connection to either broker could not be made
/// or is gone) is worth another attempt; a broker refusing something is not.
async fn drain_queue(
    options: &Options,
    lot: &Lot<'_>,
    plan: &QueuePlan,
    report: &mut QueueReport,
    bar: Option<&QueueBar>,
    first_attempt: bool,
) -> Result<(), Failure> {
    let lost = |failure: Failure| Failure { transport: true, ..failure };
    let source =
        connect(&options.source.amqp_for(&plan.vhost), options.source.ca.as_deref(), "source").await.map_err(lost)?;
    let target = match connect(&options.target.amqp_for(&plan.vhost), options.target.ca.as_deref(), "target").await {
        Ok(target) => target,
        Err(e) => {
            close(source, "migration done").await;
            return Err(lost(e));
        }
    };
    let outcome = async {
        let from = within("open a source channel", source.create_channel()).await?;
        let to = within("open a target channel", target.create_channel()).await?;
        within("confirm.select", to.confirm_select(ConfirmSelectOptions::default())).await?;
        depth(&to, &plan.name).await.map_err(|e| e.context("target"))?;
        // A later attempt (after a lost connection) moves what is there now; the report keeps
        // the depth the queue had when its move began.
        let there = depth(&from, &plan.name).await?;
        if first_attempt {
            report.source_before = there;
        }
        let moving = Moving { options, plan, report: &mut *report, bar, lot };
        moving.relay(&from, &to, there).await?;
        // Deliveries prefetched beyond what was moved go back to the queue with the channel.
        let _ = tokio::time::timeout(Duration::from_secs(5), from.close(200, "done".into())).await;
        let check = within("open a source channel", source.create_channel()).await?;
        report.source_after = depth(&check, &plan.name).await?;
        Ok::<(), Failure>(())
    }
    .await;
    // lapin marks a connection closed a little after its IO failed: the error kind says so first,
    // and a channel error on a connection that is gone is the connection's.
    let down = !source.status().connected() || !target.status().connected();
    close(source, "migration done").await;
    close(target, "migration done").await;
    outcome.map_err(|failure| Failure { transport: down || failure.transport, ..failure })
}

/// One queue's messages on their way: the source channel's deliveries republished on the target
/// channel, acknowledged as the target confirms.
struct Moving<'a> {
    options: &'a Options,
    plan: &'a QueuePlan,
    report: &'a mut QueueReport,
    bar: Option<&'a QueueBar>,
    /// The budget, and this queue's part of it: what its prefetch is sized to.
    lot: &'a Lot<'a>,
}

/// What came first while the queue waited.
enum Event {
    Delivery(Result<Option<lapin::Result<Delivery>>, tokio::time::error::Elapsed>),
    Confirmed(lapin::Result<Confirmation>),
}

/// A consumer on the source queue with `prefetch` unacknowledged deliveries at most (basic.qos
/// without `global` applies to the consumers started after it).
async fn subscribe(from: &Channel, queue: &str, prefetch: u16) -> Result<Consumer, Failure> {
    within("basic.qos", from.basic_qos(prefetch, BasicQosOptions::default())).await?;
    within(
        "basic.consume",
        from.basic_consume(queue.into(), "".into(), BasicConsumeOptions::default(), FieldTable::default()),
    )
    .await
}

impl Moving<'_> {
    /// Consumes the source queue and publishes each message, with every property, to the queue of
    /// the same name on the target, up to a window (and the budget's bytes) unconfirmed: until
    /// `there` messages came (the depth when the attempt began) or, with --follow, until the queue
    /// stayed empty for the idle timeout.
    ///
    /// The prefetch is sized for the largest message seen (the queue's average before the first):
    /// when a larger one comes, the consumer is cancelled, what it was already sent is moved, and a
    /// new consumer with a smaller prefetch takes over, so the order of the queue is kept. Messages
    /// larger than the queue's share of the budget are fetched one at a time (`pull`).
    async fn relay(mut self, from: &Channel, to: &Channel, there: u64) -> Result<(), Failure> {
        let mut flow = Flow {
            pending: VecDeque::with_capacity(usize::from(self.options.window)),
            received: 0,
            largest: self.plan.average_message_bytes(),
        };
        let too_large = |flow: &Flow| flow.largest.is_some_and(|bytes| bytes > self.lot.share);
        // An auto-delete queue would be deleted by the source, with what is left in it, when this
        // consumer went away: it is fetched one message at a time instead.
        let consumable = !too_large(&flow) && !self.plan.auto_delete;
        if consumable && self.consume(from, to, there, &mut flow).await? {
            self.settle_all(&mut flow.pending).await?;
            return self.stop_if_refused(&mut flow.pending).await;
        }
        self.pull(from, to, there, &mut flow).await?;
        self.stop_if_refused(&mut flow.pending).await
    }

    /// The consumer's part of `relay`; `false` when it stopped for messages too large for it.
    async fn consume(&mut self, from: &Channel, to: &Channel, there: u64, flow: &mut Flow) -> Result<bool, Failure> {
        let (options, share) = (self.options, self.lot.share);
        let idle = if options.follow { options.idle_timeout } else { Duration::from_secs(3) };
        let mut prefetch = flow.largest.map_or(1, |bytes| budget::prefetch(share, bytes, options.window));
        let mut consumer = subscribe(from, &self.plan.name, prefetch).await?;
        let mut resubscribing = false;
        loop {
            self.stop_if_refused(&mut flow.pending).await?;
            // Without --follow, what arrives after preflight is left for the next run.
            if !options.follow && flow.received >= there {
                return Ok(true);
            }
            // A delivery already buffered is taken without arming a timer. Otherwise, once a
            // quarter of the prefetch is unconfirmed (the source sends no more than the prefetch
            // unacknowledged) or another queue waits for bytes, the oldest confirm is awaited
            // beside the next delivery, so bytes go back to the budget (and acks to the source)
            // as soon as the target confirmed; below that, acks wait to be batched (one
            // `multiple` ack each time costs the source less than many).
            let settle_early = flow.pending.len() > usize::from(prefetch) / 4 || self.lot.budget.contended();
            let event = match consumer.next().now_or_never() {
                Some(next) => Event::Delivery(Ok(next)),
                None => match flow.pending.front_mut().filter(|_| settle_early) {
                    None => Event::Delivery(tokio::time::timeout(idle, consumer.next()).await),
                    Some(oldest) => tokio::select! {
                        next = tokio::time::timeout(idle, consumer.next()) => Event::Delivery(next),
                        confirmation = &mut oldest.confirm => Event::Confirmed(confirmation),
                    },
                },
            };
            match event {
                Event::Confirmed(confirmation) => {
                    settle_confirmed(&mut flow.pending, confirmation, self.report, self.bar).await?
                }
                Event::Delivery(Err(_)) => {
                    self.settle_all(&mut flow.pending).await?;
                    if !options.follow || depth(from, &self.plan.name).await? == 0 {
                        return Ok(true);
                    }
                }
                Event::Delivery(Ok(None)) if resubscribing => {
                    resubscribing = false;
                    let sized_for = flow.largest.unwrap_or(share);
                    if sized_for > share {
                        self.settle_all(&mut flow.pending).await?;
                        return Ok(false);
                    }
                    prefetch = budget::prefetch(share, sized_for, options.window);
                    consumer = subscribe(from, &self.plan.name, prefetch).await?;
                }
                Event::Delivery(Ok(None)) => {
                    return Err(Failure::refused("the source cancelled the consumer (queue deleted?)"));
                }
                Event::Delivery(Ok(Some(Err(e)))) => return Err(Failure::of("source", &e)),
                Event::Delivery(Ok(Some(Ok(delivery)))) => {
                    flow.received += 1;
                    let size = delivery.data.len() as u64;
                    let sized_for = flow.largest.map_or(size, |bytes| bytes.max(size));
                    flow.largest = Some(sized_for);
                    let wanted = budget::prefetch(share, sized_for, options.window);
                    let too_large = sized_for > share;
                    if !resubscribing && (too_large || wanted < prefetch || wanted / 2 >= prefetch) {
                        let tag = consumer.tag();
                        within("basic.cancel", from.basic_cancel(tag, BasicCancelOptions::default())).await?;
                        resubscribing = true;
                    }
                    let held = self.hold(size, &mut flow.pending).await?;
                    self.forward(to, delivery, held, &mut flow.pending).await?;
                }
            }
        }
    }

    /// Messages larger than the queue's share of the budget, one basic.get at a time: the bytes of
    /// the largest seen are taken from the budget before a message is fetched, so a queue waiting
    /// for the budget holds no message (a consumer's prefetch of one would have the source push it
    /// anyway).
    async fn pull(&mut self, from: &Channel, to: &Channel, there: u64, flow: &mut Flow) -> Result<(), Failure> {
        let mut empty_since: Option<tokio::time::Instant> = None;
        let mut largest = flow.largest.unwrap_or(self.lot.share);
        while self.options.follow || flow.received < there {
            self.stop_if_refused(&mut flow.pending).await?;
            let held = self.hold(largest, &mut flow.pending).await?;
            let get = from.basic_get(self.plan.name.as_str().into(), BasicGetOptions::default());
            let Some(message) = within("basic.get", get).await? else {
                drop(held);
                self.settle_all(&mut flow.pending).await?;
                let since = *empty_since.get_or_insert_with(tokio::time::Instant::now);
                if !self.options.follow || since.elapsed() >= self.options.idle_timeout {
                    break;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            };
            empty_since = None;
            flow.received += 1;
            let delivery = message.delivery;
            let size = delivery.data.len() as u64;
            let held = if size > largest {
                // Larger than any before: it is here already; its bytes are taken now.
                largest = size;
                drop(held);
                self.hold(size, &mut flow.pending).await?
            } else {
                held
            };
            self.forward(to, delivery, held, &mut flow.pending).await?;
            if self.lot.budget.contended() {
                self.settle_all(&mut flow.pending).await?;
            }
        }
        self.settle_all(&mut flow.pending).await
    }

    /// `size` bytes from the budget; when it is spent, what this queue holds goes back first: two
    /// queues each waiting for the other's bytes would wait forever.
    async fn hold(&mut self, size: u64, pending: &mut VecDeque<InFlight>) -> Result<Held, Failure> {
        let size = usize::try_from(size).unwrap_or(usize::MAX);
        if let Some(held) = self.lot.budget.try_take(size) {
            return Ok(held);
        }
        self.settle_all(pending).await?;
        Ok(self.lot.budget.take(size).await)
    }

    /// Publishes one delivery to the queue of the same name on the target: same properties and
    /// body, byte for byte, `mandatory`, confirmed later.
    async fn forward(
        &mut self,
        to: &Channel,
        delivery: Delivery,
        held: Held,
        pending: &mut VecDeque<InFlight>,
    ) -> Result<(), Failure> {
        let publish = BasicPublishOptions { mandatory: true, ..Default::default() };
        let confirm = to
            .basic_publish("".into(), self.plan.name.as_str().into(), publish, &delivery.data, delivery.properties)
            .await
            .map_err(|e| Failure::of("publish to the target", &e))?;
        let redelivered = delivery.redelivered;
        pending.push_back(InFlight { acker: delivery.acker, redelivered, confirm, _held: held });
        let window = usize::from(self.options.window);
        if pending.len() >= window {
            settle(pending, window / 4 + 1, self.report, self.bar).await?;
        }
        Ok(())
    }

    async fn settle_all(&mut self, pending: &mut VecDeque<InFlight>) -> Result<(), Failure> {
        let all = pending.len();
        settle(pending, all, self.report, self.bar).await
    }

    /// Once the target refused a message, the queue stops: what is in flight is settled, and the
    /// queue's move ends with an error naming the refusal (the run is then not complete).
    async fn stop_if_refused(&mut self, pending: &mut VecDeque<InFlight>) -> Result<(), Failure> {
        if self.report.refused == 0 {
            return Ok(());
        }
        self.settle_all(pending).await?;
        Err(Failure::refused(format!(
            "the target refused {} message(s) (nacked: a max-length with reject-publish, a message size limit; or \
             unroutable); the queue stopped there, and each refused message is back on the source, not redelivered \
             in a loop: make room on the target (or change its limit) and run again",
            self.report.refused
        )))
    }
}

/// Where a queue's move stands: what is unconfirmed, how many came, the largest message seen.
struct Flow {
    pending: VecDeque<InFlight>,
    received: u64,
    largest: Option<u64>,
}

/// Ready messages on the source after a queue stopped with an error (on a connection of its own);
/// when the source cannot say, what was there less what moved.
async fn left_on_source(options: &Options, plan: &QueuePlan, report: &QueueReport) -> u64 {
    let measured = async {
        let connection = connect(&options.source.amqp_for(&plan.vhost), options.source.ca.as_deref(), "source").await?;
        let channel = within("open a source channel", connection.create_channel()).await;
        let left = match channel {
            Ok(channel) => depth(&channel, &plan.name).await,
            Err(e) => Err(e),
        };
        close(connection, "migration done").await;
        left
    };
    measured.await.unwrap_or_else(|_| report.source_before.saturating_sub(report.moved + report.refused))
}

/// Adds what to do where RabbitMQ's own words do not say it.
fn explain(error: String) -> String {
    if error.contains("user_id property set to") {
        // RabbitMQ validates user_id against the publishing user, except for impersonators.
        format!("{error}; to keep messages' user_id, give the target user the `impersonator` tag")
    } else {
        error
    }
}

/// The budget and each queue's part of it: the budget split between the queues that move at once.
struct Lot<'a> {
    budget: &'a Budget,
    share: u64,
}

async fn move_queue(options: &Options, lot: &Lot<'_>, plan: QueuePlan, progress: Option<&Progress>) -> QueueReport {
    let mut report = QueueReport {
        vhost: plan.vhost.clone(),
        name: plan.name.clone(),
        source_before: plan.messages,
        ..Default::default()
    };
    tracing::info!(vhost = %plan.vhost, queue = %plan.name, messages = plan.messages, "moving queue");
    let bar = progress.map(|p| p.queue(&plan.vhost, &plan.name, plan.messages));
    let mut outcome = drain_queue(options, lot, &plan, &mut report, bar.as_ref(), true).await;
    // A lost connection: what was unconfirmed went back to the source queue (redelivered, so
    // counted as a possible duplicate when it comes again); reconnect and go on from there.
    let mut lost_since: Option<tokio::time::Instant> = None;
    let mut pause = Duration::from_secs(1);
    while let Err(Failure { message: error, transport: true }) = &outcome {
        let since = *lost_since.get_or_insert_with(tokio::time::Instant::now);
        if since.elapsed() >= options.reconnect_for {
            break;
        }
        tracing::warn!(vhost = %plan.vhost, queue = %plan.name, moved = report.moved, error = %error, "connection lost; reconnecting");
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(10));
        let moved_before = report.moved;
        outcome = drain_queue(options, lot, &plan, &mut report, bar.as_ref(), false).await;
        if report.moved > moved_before {
            // Progress again: a later loss gets the whole budget anew.
            lost_since = None;
            pause = Duration::from_secs(1);
        }
        report.reconnects += 1;
    }
    if let Err(Failure { message: error, .. }) = outcome {
        report.source_after = left_on_source(options, &plan, &report).await;
        tracing::warn!(vhost = %plan.vhost, queue = %plan.name, moved = report.moved, error = %explain(error.clone()), "queue stopped");
        if let Some(bar) = &bar {
            bar.done("stopped: see the report");
        }
        report.error = Some(explain(error));
    } else {
        tracing::info!(vhost = %plan.vhost, queue = %plan.name, moved = report.moved, left = report.source_after, "queue done");
        if let Some(bar) = &bar {
            bar.done(&format!("done, {} left", report.source_after));
        }
    }
    report
}

/// Default for [`Options::reconnect_for`].
pub const DEFAULT_RECONNECT_FOR: Duration = RECONNECT_FOR;

/// Moves every planned queue, `parallel_queues` at a time; order is kept within each queue.
/// With `options.progress`, bars on the terminal.
pub async fn move_all(options: &Options, queues: &[QueuePlan]) -> Vec<QueueReport> {
    let progress = options.progress.then(|| Progress::new(queues.iter().map(|q| q.messages).sum()));
    let budget = Budget::new(options.max_in_flight_bytes);
    let at_once = options.parallel_queues.clamp(1, queues.len().max(1));
    let lot = Lot { budget: &budget, share: budget.bytes() / at_once as u64 };
    tracing::info!(bytes = budget.bytes(), share = lot.share, queues_at_once = at_once, "in-flight budget");
    let reports = futures::stream::iter(queues.iter().cloned())
        .map(|plan| move_queue(options, &lot, plan, progress.as_ref()))
        .buffer_unordered(options.parallel_queues.max(1))
        .collect()
        .await;
    if let Some(progress) = &progress {
        progress.finish();
    }
    reports
}
