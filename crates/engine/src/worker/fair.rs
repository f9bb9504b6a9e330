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
//! **A reserve for apps that come back.** Runs are not preempted, so the order in which waiting
//! runs get slots cannot help a light app whose run arrives while a busy app holds every slot: it
//! waits for the next release, up to a whole run when the busy app's runs end in step
//! (`benches/ops_fleet.rs`). So while an app holds no slot and either ran a moment ago (within
//! the *linger*, [`RESERVE_LINGER`]) or waits for one, an app that already holds a slot may not
//! take the last free slot (the last `reserve` ones, at most one per such app): it stays free for
//! the light app's next run, which takes it at once. An app that holds no slot may always take a
//! free one. This is work-conserving except for at most `reserve` slots, and only while another
//! app lingers: a lone app, or busy apps among themselves, use every slot, and a slot held back
//! is handed to the busy app as soon as the linger lapses.
//!
//! A slot is free at once when nobody waits ([`FairSlots::acquire`] does not wait then), and a
//! released slot goes straight to the next waiter. A waiter that gives up (its future dropped: a
//! cancel arrived) never loses a slot it was handed.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

/// The weight of an app of a tier whose default `max_concurrent_runs` is `tier_runs`, where the
/// smallest tier's is `smallest`: its share of a worker's slots against the smallest tier's,
/// between 1 and [`MAX_WEIGHT`] (a business app waits behind fewer starter apps).
pub fn weight_for(tier_runs: u32, smallest: u32) -> u32 {
    (tier_runs / smallest.max(1)).clamp(1, MAX_WEIGHT)
}

/// The largest weight: no tier takes more than this many slots per round.
pub const MAX_WEIGHT: u32 = 8;

/// How long after its last run ended an app that holds no slot still has one kept free for it
/// (see the module docs): long enough for an app with steady traffic to come back (a few of its
/// runs), short enough that a slot does not stay idle long for an app that is gone.
pub const RESERVE_LINGER: Duration = Duration::from_secs(2);

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
    /// Slots at most kept free for lingering apps (0: none).
    reserve: usize,
    linger: Duration,
    queues: HashMap<String, AppQueue>,
    /// Apps with runs waiting, in the order they started waiting (ties go to the earliest).
    order: VecDeque<String>,
    /// Slots held, by app (apps holding none are not kept).
    held: HashMap<String, usize>,
    /// Apps that hold no slot, by when their last slot was released (within the linger; older
    /// entries are dropped). One of them that waits again stays here until it takes a slot.
    lingering: HashMap<String, Instant>,
    /// When the timer that hands out slots held back for a reserve fires, if armed.
    timer: Option<Instant>,
}

impl State {
    /// Apps a slot is kept for: those that hold none and either linger or wait for one.
    fn claimants(&self) -> usize {
        let waiting = self
            .order
            .iter()
            .filter(|a| !self.held.contains_key(*a) && !self.lingering.contains_key(*a))
            .count();
        self.lingering.len() + waiting
    }

    /// Whether `app` may take a slot now, given [`State::claimants`]: an app that holds none
    /// always may; one that holds some only if a slot stays free for each claimant (at most
    /// `reserve`).
    fn may_take(&self, app: &str, claimants: usize) -> bool {
        if !self.held.contains_key(app) {
            return self.free > 0;
        }
        self.free > claimants.min(self.reserve)
    }

    /// The next waiter by smooth weighted round robin (unit cost per run) among the apps that
    /// may take a slot now: the app with the most credit after each of them gained its weight.
    /// Each app gets its weight's share of the slots, interleaved: with equal weights the apps
    /// alternate, and a run of an app that just started waiting takes the next release, not the
    /// one after a whole quantum of the app being served (deficit round robin hands an app
    /// `weight` slots in a row: up to 8 releases' wait for the others, measured in
    /// `benches/ops_fleet.rs`).
    fn pick(&mut self) -> Option<(String, oneshot::Sender<()>)> {
        let claimants = if self.reserve == 0 {
            0
        } else {
            self.claimants()
        };
        let eligible: Vec<bool> = self
            .order
            .iter()
            .map(|a| self.may_take(a, claimants))
            .collect();
        let total: i64 = self
            .order
            .iter()
            .zip(&eligible)
            .filter(|(_, e)| **e)
            .filter_map(|(a, _)| self.queues.get(a))
            .map(|q| q.weight as i64)
            .sum();
        let mut best: Option<(usize, i64)> = None;
        for (i, app) in self.order.iter().enumerate() {
            if !eligible[i] {
                continue;
            }
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
        Some((app, w?))
    }

    /// Hands free slots to waiters while one may take one. Returns when a slot held back for a
    /// reserve is to be looked at again (the first lingering app's linger lapses), if any is.
    fn dispatch(&mut self) -> Option<Instant> {
        let linger = self.linger;
        self.lingering.retain(|_, at| at.elapsed() < linger);
        while self.free > 0 {
            let Some((app, w)) = self.pick() else { break };
            if w.send(()).is_ok() {
                self.take(app);
            }
        }
        if self.free == 0 || self.order.is_empty() {
            return None;
        }
        self.lingering.values().min().map(|at| *at + linger)
    }

    /// `app` takes a free slot.
    fn take(&mut self, app: String) {
        self.free -= 1;
        self.lingering.remove(&app);
        *self.held.entry(app).or_default() += 1;
    }

    /// `app` gives a slot back; holding none now, it lingers.
    fn give_back(&mut self, app: &str) {
        self.free += 1;
        let Some(n) = self.held.get_mut(app) else {
            return;
        };
        *n -= 1;
        if *n == 0 {
            self.held.remove(app);
            if self.reserve > 0 {
                self.lingering.insert(app.to_string(), Instant::now());
            }
        }
    }

    fn waiting(&self) -> usize {
        self.queues.values().map(|q| q.waiters.len()).sum()
    }
}

/// A worker's run slots. Cheap to clone.
#[derive(Clone)]
pub struct FairSlots(Arc<Mutex<State>>);

/// A slot, given back when dropped.
pub struct Slot {
    slots: FairSlots,
    /// The app it counts against (its queue's key).
    app: String,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.slots.release(&self.app);
    }
}

/// A run waiting for a slot; if dropped after it was handed one, the slot goes back.
struct Waiting {
    rx: Option<oneshot::Receiver<()>>,
    slots: FairSlots,
    app: String,
}

impl Drop for Waiting {
    fn drop(&mut self) {
        if let Some(mut rx) = self.rx.take() {
            rx.close();
            if rx.try_recv().is_ok() {
                self.slots.release(&self.app);
            }
        }
    }
}

impl FairSlots {
    /// Fair slots without a reserve.
    pub fn new(slots: usize) -> FairSlots {
        FairSlots::with_reserve(slots, 0, RESERVE_LINGER)
    }

    /// Fair slots keeping up to `reserve` of them free for apps that ran within `linger` (see
    /// the module docs).
    pub fn with_reserve(slots: usize, reserve: usize, linger: Duration) -> FairSlots {
        FairSlots(Arc::new(Mutex::new(State {
            free: slots.max(1),
            reserve,
            linger,
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

    /// Fair slots with `reserve` ([`FairSlots::with_reserve`], the linger
    /// [`RESERVE_LINGER`]) when `fair`, else [`FairSlots::fifo`].
    pub fn with_policy(slots: usize, fair: bool, reserve: usize) -> FairSlots {
        if fair {
            FairSlots::with_reserve(slots, reserve, RESERVE_LINGER)
        } else {
            FairSlots::fifo(slots)
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Hands out what may be handed out now, and arms the timer that looks again when a
    /// reserve lapses.
    fn dispatch(&self, st: &mut State) {
        let Some(at) = st.dispatch() else { return };
        if st.timer.is_some_and(|t| t <= at) {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            // No runtime to wait on (a slot dropped outside one): the next acquire or release
            // looks again.
            return;
        };
        st.timer = Some(at);
        let weak: Weak<Mutex<State>> = Arc::downgrade(&self.0);
        rt.spawn(async move {
            tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await;
            if let Some(state) = weak.upgrade() {
                let slots = FairSlots(state);
                let mut st = slots.lock();
                if st.timer == Some(at) {
                    st.timer = None;
                }
                slots.dispatch(&mut st);
            }
        });
    }

    /// Waits for a slot for a run of `app_id` (of `weight`, see [`weight_for`]).
    pub async fn acquire(&self, app_id: &str, weight: u32) -> Slot {
        let (rx, app) = {
            let mut st = self.lock();
            let app_id = if st.fifo { "" } else { app_id };
            let claimants = st.claimants();
            if st.order.is_empty() && st.may_take(app_id, claimants) {
                st.take(app_id.to_string());
                return Slot {
                    slots: self.clone(),
                    app: app_id.to_string(),
                };
            }
            let (tx, rx) = oneshot::channel();
            let weight = weight.clamp(1, MAX_WEIGHT);
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
            // A slot may be free with others waiting: a release racing an enqueue, or a slot
            // kept for a lingering app, which this app may take if it holds none.
            self.dispatch(&mut st);
            (rx, app_id.to_string())
        };
        let mut waiting = Waiting {
            rx: Some(rx),
            slots: self.clone(),
            app,
        };
        let got = waiting.rx.as_mut().expect("set above").await;
        waiting.rx = None;
        match got {
            Ok(()) => Slot {
                slots: self.clone(),
                app: std::mem::take(&mut waiting.app),
            },
            // The sender is only dropped without a send when the slots are dropped.
            Err(_) => std::future::pending().await,
        }
    }

    fn release(&self, app: &str) {
        let mut st = self.lock();
        st.give_back(app);
        self.dispatch(&mut st);
    }

    /// Runs waiting for a slot.
    pub fn waiting(&self) -> usize {
        self.lock().waiting()
    }

    /// Slots free now (some may be kept for lingering apps).
    pub fn free(&self) -> usize {
        self.lock().free
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
        let slots = FairSlots::with_policy(1, false, 1);
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

    /// The log's count of `app`.
    fn count(log: &Arc<Mutex<Vec<&'static str>>>, app: &str) -> usize {
        log.lock().unwrap().iter().filter(|a| **a == app).count()
    }

    /// Waits (on the state, not a duration) until `log` holds `n` runs, up to 10 s.
    async fn until_started(log: &Arc<Mutex<Vec<&'static str>>>, n: usize) -> bool {
        for _ in 0..1000 {
            if log.lock().unwrap().len() >= n {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        false
    }

    #[tokio::test]
    async fn a_light_app_finds_a_slot_kept_free_while_a_backlog_waits() {
        // Given four slots with a reserve of one, and Y, whose run ended a moment ago,
        let slots = FairSlots::with_reserve(4, 1, Duration::from_secs(600));
        drop(slots.acquire("y", 1).await);
        let log = Arc::new(Mutex::new(Vec::new()));
        let release = Arc::new(tokio::sync::Semaphore::new(0));
        let mut set = tokio::task::JoinSet::new();
        // when X queues ten runs,
        queue(&slots, "x", 8, 10, &log, &mut set, &release);
        settle().await;
        // then X runs three and the fourth slot stays free for Y;
        assert_eq!(count(&log, "x"), 3);
        assert_eq!((slots.waiting(), slots.free()), (7, 1));
        // when Y's next run comes, it takes that slot at once (no run of X has ended).
        let y = tokio::time::timeout(Duration::from_secs(5), slots.acquire("y", 1)).await;
        assert!(y.is_ok());
        assert_eq!(slots.free(), 0);
        // Once Y runs, nobody lingers: X's next release goes to X.
        release.add_permits(1);
        settle().await;
        assert_eq!(count(&log, "x"), 4);
        release.add_permits(100);
        drop(y);
        while set.join_next().await.is_some() {}
    }

    #[tokio::test]
    async fn a_lone_app_uses_every_slot() {
        // Given four slots with a reserve and no other app seen,
        let slots = FairSlots::with_reserve(4, 1, Duration::from_secs(600));
        let log = Arc::new(Mutex::new(Vec::new()));
        let release = Arc::new(tokio::sync::Semaphore::new(0));
        let mut set = tokio::task::JoinSet::new();
        // when X queues ten runs,
        queue(&slots, "x", 1, 10, &log, &mut set, &release);
        settle().await;
        // then it runs four: nothing is kept back.
        assert_eq!(count(&log, "x"), 4);
        assert_eq!((slots.waiting(), slots.free()), (6, 0));
        release.add_permits(100);
        while set.join_next().await.is_some() {}
    }

    #[tokio::test]
    async fn busy_apps_among_themselves_use_every_slot() {
        // Given four slots with a reserve, X running four runs with more waiting,
        let slots = FairSlots::with_reserve(4, 1, Duration::from_secs(600));
        let log = Arc::new(Mutex::new(Vec::new()));
        let release = Arc::new(tokio::sync::Semaphore::new(0));
        let mut set = tokio::task::JoinSet::new();
        queue(&slots, "x", 1, 10, &log, &mut set, &release);
        settle().await;
        // and Z queueing a backlog too,
        queue(&slots, "z", 1, 10, &log, &mut set, &release);
        settle().await;
        // when runs end, the slots go to both and none stays free: the first to Z (holding
        // none, it has the last free slot kept for it against X), then the two alternate.
        for _ in 0..4 {
            release.add_permits(1);
            settle().await;
        }
        assert_eq!(log.lock().unwrap()[4..], ["z", "z", "x", "z"]);
        assert_eq!(slots.free(), 0);
        release.add_permits(100);
        while set.join_next().await.is_some() {}
    }

    #[tokio::test]
    async fn a_slot_kept_free_goes_to_the_backlog_once_the_linger_lapses() {
        // Given four slots with a reserve of one lingering for 100 ms after Y's run,
        let slots = FairSlots::with_reserve(4, 1, Duration::from_millis(100));
        drop(slots.acquire("y", 1).await);
        let log = Arc::new(Mutex::new(Vec::new()));
        let release = Arc::new(tokio::sync::Semaphore::new(0));
        let mut set = tokio::task::JoinSet::new();
        // when X queues ten runs and Y does not come back,
        queue(&slots, "x", 1, 10, &log, &mut set, &release);
        // then X gets the fourth slot too once Y's linger lapsed, with no run ending.
        assert!(until_started(&log, 4).await);
        assert_eq!(count(&log, "x"), 4);
        assert_eq!((slots.waiting(), slots.free()), (6, 0));
        release.add_permits(100);
        while set.join_next().await.is_some() {}
    }

    #[tokio::test]
    async fn the_reserve_keeps_one_slot_per_lingering_app() {
        // Given six slots with a reserve of two and one app (Y) lingering,
        let slots = FairSlots::with_reserve(6, 2, Duration::from_secs(600));
        drop(slots.acquire("y", 1).await);
        let log = Arc::new(Mutex::new(Vec::new()));
        let release = Arc::new(tokio::sync::Semaphore::new(0));
        let mut set = tokio::task::JoinSet::new();
        // when X queues ten runs,
        queue(&slots, "x", 1, 10, &log, &mut set, &release);
        settle().await;
        // then one slot is kept, not two.
        assert_eq!(count(&log, "x"), 5);
        assert_eq!(slots.free(), 1);
        // When a second app lingers (W ran while X waited: an app holding no slot may take the
        // kept one), the next release is kept for it too.
        drop(slots.acquire("w", 1).await);
        release.add_permits(1);
        settle().await;
        assert_eq!(count(&log, "x"), 5);
        assert_eq!(slots.free(), 2);
        release.add_permits(100);
        while set.join_next().await.is_some() {}
    }

    #[test]
    fn weights_follow_the_tiers_runs() {
        assert_eq!(weight_for(5, 5), 1);
        assert_eq!(weight_for(10, 5), 2);
        assert_eq!(weight_for(50, 5), MAX_WEIGHT);
        assert_eq!(weight_for(1, 0), 1);
    }
}
