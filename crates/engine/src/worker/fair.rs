//! Fair run slots across apps (issue 12, item 7): a worker's `MAX_CONCURRENT_WORKFLOWS` slots are
//! handed to the runs waiting for one by **smooth weighted round robin over `app_id`, weighted
//! by tier** (nginx's interleaved weighted round robin), not first come first served. One app's
//! backlog therefore cannot starve another's, however many runs it queues and however high its
//! caps: each app with a run waiting gets its weight's share of the released slots, interleaved
//! with the others', before any rule of the ops agent fires.
//!
//! Per-key caps alone fail when a noisy tenant spreads its load (many chats, each under its cap);
//! fair queueing does not, since it shares what is free among the apps waiting, by app.
//!
//! A slot is free at once when nobody waits ([`FairSlots::acquire`] does not queue then), and a
//! released slot goes straight to the next waiter. A waiter that gives up (its future dropped: a
//! cancel arrived) never loses a slot it was handed.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

/// The weight of an app of a tier whose default `max_concurrent_runs` is `tier_runs`, where the
/// smallest tier's is `smallest`: its share of a worker's slots against the smallest tier's,
/// between 1 and [`MAX_WEIGHT`] (a business app waits behind fewer starter apps).
pub fn weight_for(tier_runs: u32, smallest: u32) -> u32 {
    (tier_runs / smallest.max(1)).clamp(1, MAX_WEIGHT)
}

/// The largest weight: no tier takes more than this many slots per round.
pub const MAX_WEIGHT: u32 = 8;

struct AppQueue {
    weight: u32,
    /// Smooth weighted round robin's running credit: every pick adds each waiting app's weight
    /// to its credit and takes the total weight off the app picked.
    current: i64,
    waiters: VecDeque<oneshot::Sender<()>>,
}

#[derive(Default)]
struct State {
    free: usize,
    /// First come, first served: every run waits in one queue, whatever its app (fair
    /// scheduling switched off, to compare against; see [`FairSlots::fifo`]).
    fifo: bool,
    queues: HashMap<String, AppQueue>,
    /// Apps with runs waiting, in the order they started waiting (ties go to the earliest).
    order: VecDeque<String>,
}

impl State {
    /// The next waiter by smooth weighted round robin (unit cost per run): the app with the
    /// most credit after each waiting app gained its weight. Each app gets its weight's share
    /// of the slots, interleaved: with equal weights the apps alternate, and a run of an app
    /// that just started waiting takes the next release, not the one after a whole
    /// quantum of the app being served (deficit round robin hands an app `weight` slots in a
    /// row: up to 8 releases' wait for the others, measured in `benches/ops_fleet.rs`).
    fn pick(&mut self) -> Option<oneshot::Sender<()>> {
        let total: i64 = self
            .order
            .iter()
            .filter_map(|a| self.queues.get(a))
            .map(|q| q.weight as i64)
            .sum();
        let mut best: Option<(usize, i64)> = None;
        for (i, app) in self.order.iter().enumerate() {
            let Some(q) = self.queues.get_mut(app) else {
                continue;
            };
            q.current += q.weight as i64;
            if best.is_none_or(|(_, c)| q.current > c) {
                best = Some((i, q.current));
            }
        }
        let (i, _) = best?;
        let app = self.order[i].clone();
        let q = self.queues.get_mut(&app)?;
        q.current -= total;
        let w = q.waiters.pop_front();
        if q.waiters.is_empty() {
            self.queues.remove(&app);
            self.order.remove(i);
        }
        w
    }

    fn waiting(&self) -> usize {
        self.queues.values().map(|q| q.waiters.len()).sum()
    }
}

/// A worker's run slots. Cheap to clone.
#[derive(Clone)]
pub struct FairSlots(Arc<Mutex<State>>);

/// A slot, given back when dropped.
pub struct Slot(FairSlots);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.release();
    }
}

/// A run waiting for a slot; if dropped after it was handed one, the slot goes back.
struct Waiting {
    rx: Option<oneshot::Receiver<()>>,
    slots: FairSlots,
}

impl Drop for Waiting {
    fn drop(&mut self) {
        if let Some(mut rx) = self.rx.take() {
            rx.close();
            if rx.try_recv().is_ok() {
                self.slots.release();
            }
        }
    }
}

impl FairSlots {
    pub fn new(slots: usize) -> FairSlots {
        FairSlots(Arc::new(Mutex::new(State {
            free: slots.max(1),
            ..State::default()
        })))
    }

    /// Slots handed out first come, first served, whatever the app: what a worker did before
    /// fair scheduling, kept to measure against (`MOZAIKS_FAIR_SLOTS=false`).
    pub fn fifo(slots: usize) -> FairSlots {
        FairSlots(Arc::new(Mutex::new(State {
            free: slots.max(1),
            fifo: true,
            ..State::default()
        })))
    }

    /// Fair slots when `fair`, else [`FairSlots::fifo`].
    pub fn with_policy(slots: usize, fair: bool) -> FairSlots {
        if fair {
            FairSlots::new(slots)
        } else {
            FairSlots::fifo(slots)
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits for a slot for a run of `app_id` (of `weight`, see [`weight_for`]).
    pub async fn acquire(&self, app_id: &str, weight: u32) -> Slot {
        let rx = {
            let mut st = self.lock();
            if st.free > 0 && st.order.is_empty() {
                st.free -= 1;
                return Slot(self.clone());
            }
            let (tx, rx) = oneshot::channel();
            let weight = weight.clamp(1, MAX_WEIGHT);
            let app_id = if st.fifo { "" } else { app_id };
            let fresh = !st.queues.contains_key(app_id);
            // An app that starts waiting (nothing of it was waiting) joins with a turn of credit
            // above the best of those waiting, so a light app's run takes the next released slot
            // instead of waiting behind a turn of the busy app (FQ-CoDel's priority to new
            // flows). A busy app always has runs waiting, so it never joins again: the long-run
            // shares stay the weights'.
            let best = st
                .queues
                .values()
                .map(|q| q.current)
                .max()
                .unwrap_or(0)
                .max(0);
            let q = st
                .queues
                .entry(app_id.to_string())
                .or_insert_with(|| AppQueue {
                    weight,
                    current: best + weight as i64,
                    waiters: VecDeque::new(),
                });
            q.weight = weight;
            q.waiters.push_back(tx);
            if fresh {
                st.order.push_back(app_id.to_string());
            }
            // A slot may be free with others waiting only for an instant (a release racing an
            // enqueue); hand it on now.
            while st.free > 0 {
                match st.pick() {
                    Some(w) => {
                        if w.send(()).is_ok() {
                            st.free -= 1;
                        }
                    }
                    None => break,
                }
            }
            rx
        };
        let mut waiting = Waiting {
            rx: Some(rx),
            slots: self.clone(),
        };
        let got = waiting.rx.as_mut().expect("set above").await;
        waiting.rx = None;
        match got {
            Ok(()) => Slot(self.clone()),
            // The sender is only dropped without a send when the slots are dropped.
            Err(_) => std::future::pending().await,
        }
    }

    fn release(&self) {
        let mut st = self.lock();
        while let Some(w) = st.pick() {
            if w.send(()).is_ok() {
                return;
            }
        }
        st.free += 1;
    }

    /// Runs waiting for a slot.
    pub fn waiting(&self) -> usize {
        self.lock().waiting()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Queues `n` runs of `app` (each records its app when it gets a slot and holds it until
    /// `release` is notified).
    fn queue(
        slots: &FairSlots,
        app: &'static str,
        weight: u32,
        n: usize,
        log: &Arc<Mutex<Vec<&'static str>>>,
        set: &mut tokio::task::JoinSet<()>,
        release: &Arc<tokio::sync::Semaphore>,
    ) {
        for _ in 0..n {
            let (s, log, release) = (slots.clone(), log.clone(), release.clone());
            set.spawn(async move {
                let _slot = s.acquire(app, weight).await;
                log.lock().unwrap().push(app);
                release.acquire().await.unwrap().forget();
            });
        }
    }

    async fn settle() {
        for _ in 0..20 {
            tokio::task::yield_now().await;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    #[tokio::test]
    async fn a_backlog_does_not_starve_another_app() {
        let slots = FairSlots::new(1);
        let log = Arc::new(Mutex::new(Vec::new()));
        let release = Arc::new(tokio::sync::Semaphore::new(0));
        let mut set = tokio::task::JoinSet::new();
        // X holds the slot and queues 20 more; Y queues 2 after them.
        queue(&slots, "x", 1, 1, &log, &mut set, &release);
        settle().await;
        queue(&slots, "x", 1, 20, &log, &mut set, &release);
        settle().await;
        queue(&slots, "y", 1, 2, &log, &mut set, &release);
        settle().await;
        assert_eq!(slots.waiting(), 22);
        for _ in 0..5 {
            release.add_permits(1);
            settle().await;
        }
        let got = log.lock().unwrap().clone();
        // First in first out would give Y its turn after X's 20; Y, starting to wait, takes the
        // next release, then the apps alternate.
        assert_eq!(got, ["x", "y", "x", "y", "x", "x"]);
        release.add_permits(100);
        while set.join_next().await.is_some() {}
        assert_eq!(log.lock().unwrap().len(), 23);
        assert_eq!(slots.waiting(), 0);
    }

    #[tokio::test]
    async fn weights_share_slots_by_tier() {
        let slots = FairSlots::new(1);
        let log = Arc::new(Mutex::new(Vec::new()));
        let release = Arc::new(tokio::sync::Semaphore::new(0));
        let mut set = tokio::task::JoinSet::new();
        queue(&slots, "hold", 1, 1, &log, &mut set, &release);
        settle().await;
        queue(&slots, "small", 1, 10, &log, &mut set, &release);
        settle().await;
        queue(&slots, "big", 3, 10, &log, &mut set, &release);
        settle().await;
        for _ in 0..8 {
            release.add_permits(1);
            settle().await;
        }
        let got: Vec<&str> = log.lock().unwrap()[1..].to_vec();
        // A quarter of the slots to the weight-1 app, three quarters to the weight-3 one,
        // interleaved (not three in a row each round).
        assert_eq!(
            got,
            ["big", "big", "big", "small", "big", "big", "big", "small"]
        );
        release.add_permits(100);
        while set.join_next().await.is_some() {}
    }

    #[tokio::test]
    async fn a_light_app_takes_the_next_release_ahead_of_a_backlog() {
        let slots = FairSlots::new(1);
        let log = Arc::new(Mutex::new(Vec::new()));
        let release = Arc::new(tokio::sync::Semaphore::new(0));
        let mut set = tokio::task::JoinSet::new();
        queue(&slots, "x", 8, 1, &log, &mut set, &release);
        settle().await;
        queue(&slots, "x", 8, 10, &log, &mut set, &release);
        settle().await;
        // X has been served alone for a while.
        for _ in 0..3 {
            release.add_permits(1);
            settle().await;
        }
        queue(&slots, "y", 8, 1, &log, &mut set, &release);
        settle().await;
        release.add_permits(1);
        settle().await;
        assert_eq!(log.lock().unwrap().last(), Some(&"y"));
        release.add_permits(100);
        while set.join_next().await.is_some() {}
    }

    #[tokio::test]
    async fn fifo_slots_serve_in_arrival_order_whatever_the_app() {
        let slots = FairSlots::with_policy(1, false);
        let log = Arc::new(Mutex::new(Vec::new()));
        let release = Arc::new(tokio::sync::Semaphore::new(0));
        let mut set = tokio::task::JoinSet::new();
        queue(&slots, "x", 1, 1, &log, &mut set, &release);
        settle().await;
        queue(&slots, "x", 1, 3, &log, &mut set, &release);
        settle().await;
        queue(&slots, "y", 1, 1, &log, &mut set, &release);
        settle().await;
        assert_eq!(slots.waiting(), 4);
        release.add_permits(100);
        while set.join_next().await.is_some() {}
        // Y after X's whole backlog: what fair scheduling avoids.
        assert_eq!(*log.lock().unwrap(), ["x", "x", "x", "x", "y"]);
    }

    #[tokio::test]
    async fn a_waiter_that_gives_up_never_loses_a_slot() {
        let slots = FairSlots::new(1);
        let held = slots.acquire("x", 1).await;
        let s = slots.clone();
        let gave_up = tokio::spawn(async move {
            let _ = s.acquire("y", 1).await;
        });
        settle().await;
        assert_eq!(slots.waiting(), 1);
        gave_up.abort();
        let _ = gave_up.await;
        drop(held);
        // The slot is free again: taken at once.
        let again = tokio::time::timeout(Duration::from_secs(1), slots.acquire("z", 1)).await;
        assert!(again.is_ok());
    }

    #[test]
    fn weights_follow_the_tiers_runs() {
        assert_eq!(weight_for(5, 5), 1);
        assert_eq!(weight_for(10, 5), 2);
        assert_eq!(weight_for(50, 5), MAX_WEIGHT);
        assert_eq!(weight_for(1, 0), 1);
    }
}
