//! The process's metrics recorder: Prometheus behind a layer that keeps per-app labels bounded
//! and exports the seeds' metric names alongside ours, so that no call site in the crates changes.
//!
//! - **Bounded `app_id`**: a metric's `app_id` label keeps its value for at most
//!   `MOZAIKS_METRICS_TOP_APPS` apps, the most active ones; every other app's samples go to
//!   `app_id="other"`. An app seen while there is room gets its own label at once (a fleet with
//!   fewer apps than the limit names them all). Every `MOZAIKS_METRICS_APPS_WINDOW_SECONDS` the
//!   apps are ranked by activity in the window (samples recorded for them, plus what their gauges
//!   hold), incumbents counting double so that the set does not flap; the top ones keep or get
//!   their own label. Gauges are moved with the app (a demoted app's open sockets go from its
//!   series to `other`, so sums stay exact); a demoted app's counters and histograms stay in the
//!   exposition with their last values (the exporter cannot drop a series), so the number of
//!   series is at most the limit plus the demotions of the process's life.
//! - **Seed names**: `mozaiks_workflow_errors_total{app_id}` counts runs ended with outcome
//!   `failed` (also in `mozaiks_runs_ended_total`); `mozaiks_mongodb_latency_seconds{op}` records
//!   every Mongo call's latency (also in `mozaiks_mongo_query_seconds` and
//!   `mozaiks_mongo_write_seconds`).
//! - **`mozaiks_build_info{version,commit}`**: 1, the binary's version and git commit.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use metrics::{
    Counter, CounterFn, Gauge, GaugeFn, Histogram, HistogramFn, Key, KeyName, Label, Metadata,
    Recorder, SharedString, Unit,
};

/// Runs ended with outcome `failed`, by app_id (the seeds' name).
pub const WORKFLOW_ERRORS: &str = "mozaiks_workflow_errors_total";
/// Every Mongo call's latency, by op (the seeds' name).
pub const MONGODB_LATENCY: &str = "mozaiks_mongodb_latency_seconds";
/// 1, with the binary's version and git commit as labels.
pub const BUILD_INFO: &str = "mozaiks_build_info";
/// Apps with their own `app_id` label in this process (at most the configured limit).
pub const LABELLED_APPS: &str = "mozaiks_metrics_labelled_apps";
/// Re-rankings that changed which apps have their own label.
pub const APP_LABEL_CHANGES: &str = "mozaiks_metrics_app_label_changes_total";

/// The label value of every app outside the top N.
pub const OTHER: &str = "other";
/// The label this layer bounds.
pub const APP_LABEL: &str = "app_id";

/// The binary's git commit (build.rs: `MOZAIKS_GIT_COMMIT` at build time, else `git rev-parse`).
pub const GIT_COMMIT: &str = env!("MOZAIKS_GIT_COMMIT");

/// Histograms in seconds get these buckets (so p95 aggregates across replicas); the others are
/// summaries.
pub const SECONDS_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    120.0, 300.0,
];

pub fn describe() {
    metrics::describe_counter!(
        WORKFLOW_ERRORS,
        "Workflow runs that failed, by app_id (the seeds' name; also in mozaiks_runs_ended_total{outcome=\"failed\"})."
    );
    metrics::describe_histogram!(
        MONGODB_LATENCY,
        Unit::Seconds,
        "Latency of every MongoDB call, by op (the seeds' name; also in mozaiks_mongo_query_seconds and mozaiks_mongo_write_seconds)."
    );
    metrics::describe_gauge!(
        BUILD_INFO,
        "1, labelled with the binary's version and git commit."
    );
    metrics::describe_gauge!(
        LABELLED_APPS,
        "Apps with their own app_id label in this process (the rest are app_id=\"other\")."
    );
    metrics::describe_counter!(
        APP_LABEL_CHANGES,
        "Apps that got or lost their own app_id label at a re-ranking, by change (promoted, demoted)."
    );
}

/// Sets `mozaiks_build_info` (once, after the recorder is installed).
pub fn record_build_info() {
    metrics::gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION"), "commit" => GIT_COMMIT)
        .set(1.0);
}

/// A [`Recorder`] that bounds `app_id` and adds the seeds' names, in front of `R`.
pub struct Layer<R> {
    shared: Arc<Shared<R>>,
}

/// The part of a [`Layer`] the re-ranking task needs.
pub struct Ranker<R> {
    shared: Arc<Shared<R>>,
}

struct Shared<R> {
    inner: R,
    top: usize,
    labelled: RwLock<HashSet<String>>,
    activity: Mutex<HashMap<String, u64>>,
    gauges: Mutex<HashMap<Key, Arc<AppGauge>>>,
}

impl<R: Recorder> Layer<R> {
    /// `top`: how many apps keep their own label.
    pub fn new(inner: R, top: usize) -> (Layer<R>, Ranker<R>) {
        let shared = Arc::new(Shared {
            inner,
            top,
            labelled: RwLock::new(HashSet::new()),
            activity: Mutex::new(HashMap::new()),
            gauges: Mutex::new(HashMap::new()),
        });
        (
            Layer {
                shared: shared.clone(),
            },
            Ranker { shared },
        )
    }
}

impl<R: Recorder + Send + Sync + 'static> Ranker<R> {
    /// Re-ranks every `every` until the process ends.
    pub fn spawn(self, every: Duration) {
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.tick().await;
            loop {
                tick.tick().await;
                self.rerank();
            }
        });
    }
}

impl<R: Recorder> Ranker<R> {
    /// Ranks the apps by activity since the last call and moves labels (and gauges) to the top.
    pub fn rerank(&self) {
        let s = &self.shared;
        let mut scores = std::mem::take(&mut *lock(&s.activity));
        let gauges: Vec<Arc<AppGauge>> = lock(&s.gauges).values().cloned().collect();
        for g in &gauges {
            let v = lock(&g.state).value;
            if v > 0.0 {
                *scores.entry(g.app.clone()).or_default() += v as u64;
            }
        }
        let before = read(&s.labelled).clone();
        let mut ranked: Vec<(u64, &String)> = scores
            .iter()
            .map(|(app, n)| (if before.contains(app) { n * 2 } else { *n }, app))
            .collect();
        // Most active first; ties by name, so the choice is deterministic.
        ranked.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(b.1)));
        let mut after: HashSet<String> = ranked
            .iter()
            .take(s.top)
            .map(|(_, app)| (*app).clone())
            .collect();
        // Quiet incumbents keep their label while there is room.
        for app in &before {
            if after.len() >= s.top {
                break;
            }
            after.insert(app.clone());
        }
        let promoted = after.difference(&before).count();
        let demoted = before.difference(&after).count();
        *write(&s.labelled) = after.clone();
        for g in gauges {
            let label = if after.contains(&g.app) {
                g.app.as_str()
            } else {
                OTHER
            };
            g.move_to(label, &s.inner);
        }
        // Gauges at zero of apps without a label are dropped from the books (a new sample
        // registers them again).
        lock(&s.gauges).retain(|_, g| {
            after.contains(&g.app) || lock(&g.state).value != 0.0 || Arc::strong_count(g) > 1
        });
        if promoted > 0 {
            self.counter_changes("promoted", promoted);
        }
        if demoted > 0 {
            self.counter_changes("demoted", demoted);
        }
        let gauge = s
            .inner
            .register_gauge(&Key::from_name(LABELLED_APPS), &META);
        gauge.set(after.len() as f64);
    }

    fn counter_changes(&self, change: &'static str, n: usize) {
        let key = Key::from_parts(APP_LABEL_CHANGES, vec![Label::new("change", change)]);
        self.shared
            .inner
            .register_counter(&key, &META)
            .increment(n as u64);
    }
}

static META: Metadata<'static> = Metadata::new(module_path!(), metrics::Level::INFO, None);

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
fn read<T>(m: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    m.read().unwrap_or_else(|p| p.into_inner())
}
fn write<T>(m: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    m.write().unwrap_or_else(|p| p.into_inner())
}

impl<R: Recorder> Shared<R> {
    /// The label an app's samples go to now; counts the sample as the app's activity.
    fn label_for(&self, app: &str) -> String {
        *lock(&self.activity).entry(app.to_string()).or_default() += 1;
        if read(&self.labelled).contains(app) {
            return app.to_string();
        }
        let mut labelled = write(&self.labelled);
        if labelled.contains(app) {
            return app.to_string();
        }
        if labelled.len() < self.top {
            labelled.insert(app.to_string());
            return app.to_string();
        }
        OTHER.to_string()
    }

    /// `key` with its `app_id` bounded, and the app it named.
    fn relabel(&self, key: &Key) -> (Key, Option<String>) {
        let Some(app) = key
            .labels()
            .find(|l| l.key() == APP_LABEL)
            .map(|l| l.value().to_string())
        else {
            return (key.clone(), None);
        };
        let label = self.label_for(&app);
        if label == app {
            return (key.clone(), Some(app));
        }
        (with_app(key.name_shared(), key.labels(), &label), Some(app))
    }
}

/// `name{labels}` with `app_id` set to `app`.
fn with_app<'a>(name: KeyName, labels: impl Iterator<Item = &'a Label>, app: &str) -> Key {
    let labels: Vec<Label> = labels
        .map(|l| {
            if l.key() == APP_LABEL {
                Label::new(APP_LABEL, app.to_string())
            } else {
                l.clone()
            }
        })
        .collect();
    Key::from_parts(name, labels)
}

impl<R: Recorder> Recorder for Layer<R> {
    fn describe_counter(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        self.shared.inner.describe_counter(key, unit, description)
    }
    fn describe_gauge(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        self.shared.inner.describe_gauge(key, unit, description)
    }
    fn describe_histogram(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        self.shared.inner.describe_histogram(key, unit, description)
    }

    fn register_counter(&self, key: &Key, metadata: &Metadata<'_>) -> Counter {
        let (bounded, _) = self.shared.relabel(key);
        let counter = self.shared.inner.register_counter(&bounded, metadata);
        let failed_run = key.name() == mozaiks_engine::metrics::RUNS_ENDED
            && key
                .labels()
                .any(|l| l.key() == "outcome" && l.value() == "failed");
        if !failed_run {
            return counter;
        }
        let app: Vec<Label> = bounded
            .labels()
            .filter(|l| l.key() == APP_LABEL)
            .cloned()
            .collect();
        let alias = self
            .shared
            .inner
            .register_counter(&Key::from_parts(WORKFLOW_ERRORS, app), metadata);
        Counter::from_arc(Arc::new(Both(counter, alias)))
    }

    fn register_gauge(&self, key: &Key, metadata: &Metadata<'_>) -> Gauge {
        let (bounded, app) = self.shared.relabel(key);
        let Some(app) = app else {
            return self.shared.inner.register_gauge(key, metadata);
        };
        let mut gauges = lock(&self.shared.gauges);
        if let Some(g) = gauges.get(key) {
            return Gauge::from_arc(g.clone());
        }
        let label = bounded
            .labels()
            .find(|l| l.key() == APP_LABEL)
            .map(|l| l.value().to_string())
            .unwrap_or_else(|| OTHER.into());
        let downstream = self.shared.inner.register_gauge(&bounded, metadata);
        let g = Arc::new(AppGauge {
            app,
            name: key.name_shared(),
            labels: key.labels().cloned().collect(),
            state: Mutex::new(GaugeState {
                value: 0.0,
                label,
                downstream,
            }),
        });
        gauges.insert(key.clone(), g.clone());
        Gauge::from_arc(g)
    }

    fn register_histogram(&self, key: &Key, metadata: &Metadata<'_>) -> Histogram {
        let (bounded, _) = self.shared.relabel(key);
        let histogram = self.shared.inner.register_histogram(&bounded, metadata);
        let name = key.name();
        if name != mozaiks_store::metrics::QUERY_SECONDS
            && name != mozaiks_store::metrics::WRITE_SECONDS
        {
            return histogram;
        }
        let op: Vec<Label> = key.labels().filter(|l| l.key() == "op").cloned().collect();
        let alias = self
            .shared
            .inner
            .register_histogram(&Key::from_parts(MONGODB_LATENCY, op), metadata);
        Histogram::from_arc(Arc::new(Both(histogram, alias)))
    }
}

/// One sample, two series.
struct Both<T>(T, T);

impl CounterFn for Both<Counter> {
    fn increment(&self, value: u64) {
        self.0.increment(value);
        self.1.increment(value);
    }
    fn absolute(&self, value: u64) {
        self.0.absolute(value);
        self.1.absolute(value);
    }
}

impl HistogramFn for Both<Histogram> {
    fn record(&self, value: f64) {
        self.0.record(value);
        self.1.record(value);
    }
}

/// A gauge of one app: its own value, added to the series its app's label names now (its own or
/// `other`), so that it can move between them.
struct AppGauge {
    app: String,
    name: KeyName,
    labels: Vec<Label>,
    state: Mutex<GaugeState>,
}

struct GaugeState {
    value: f64,
    label: String,
    downstream: Gauge,
}

impl AppGauge {
    fn move_to<R: Recorder>(&self, label: &str, inner: &R) {
        let mut st = lock(&self.state);
        if st.label == label {
            return;
        }
        st.downstream.decrement(st.value);
        let key = with_app(self.name.clone(), self.labels.iter(), label);
        st.downstream = inner.register_gauge(&key, &META);
        st.downstream.increment(st.value);
        st.label = label.to_string();
    }
}

impl GaugeFn for AppGauge {
    fn increment(&self, value: f64) {
        let mut st = lock(&self.state);
        st.value += value;
        st.downstream.increment(value);
    }
    fn decrement(&self, value: f64) {
        let mut st = lock(&self.state);
        st.value -= value;
        st.downstream.decrement(value);
    }
    fn set(&self, value: f64) {
        // The series may be shared with other apps (`other`): only the difference goes to it.
        let mut st = lock(&self.state);
        let delta = value - st.value;
        st.value = value;
        st.downstream.increment(delta);
    }
}

#[cfg(test)]
mod tests {
    use metrics_exporter_prometheus::PrometheusBuilder;

    use super::*;

    fn layer(
        top: usize,
    ) -> (
        Layer<metrics_exporter_prometheus::PrometheusRecorder>,
        Ranker<metrics_exporter_prometheus::PrometheusRecorder>,
        metrics_exporter_prometheus::PrometheusHandle,
    ) {
        let rec = PrometheusBuilder::new().build_recorder();
        let handle = rec.handle();
        let (l, r) = Layer::new(rec, top);
        (l, r, handle)
    }

    /// The value of the exposition line that starts with `series ` (exact labels).
    fn value(text: &str, series: &str) -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    }

    #[test]
    fn apps_beyond_the_limit_are_other_and_sums_stay_exact() {
        let (l, _r, h) = layer(2);
        metrics::with_local_recorder(&l, || {
            for app in ["a", "b", "c", "d"] {
                metrics::counter!("t_total", "app_id" => app).increment(3);
                metrics::gauge!("t_open", "app_id" => app).increment(2.0);
            }
        });
        let text = h.render();
        assert_eq!(value(&text, r#"t_total{app_id="a"}"#), Some(3.0));
        assert_eq!(value(&text, r#"t_total{app_id="b"}"#), Some(3.0));
        assert_eq!(value(&text, r#"t_total{app_id="other"}"#), Some(6.0));
        assert_eq!(value(&text, r#"t_total{app_id="c"}"#), None);
        assert_eq!(value(&text, r#"t_open{app_id="other"}"#), Some(4.0));
        let series = text.lines().filter(|l| l.starts_with("t_total{")).count();
        assert_eq!(series, 3, "{text}");
    }

    #[test]
    fn a_busier_app_takes_a_quiet_ones_label_and_its_gauge_moves_with_it() {
        let (l, r, h) = layer(1);
        metrics::with_local_recorder(&l, || {
            metrics::gauge!("t_open", "app_id" => "quiet").increment(1.0);
            metrics::gauge!("t_open", "app_id" => "busy").increment(5.0);
            for _ in 0..50 {
                metrics::counter!("t_total", "app_id" => "busy").increment(1);
            }
        });
        let text = h.render();
        assert_eq!(value(&text, r#"t_open{app_id="quiet"}"#), Some(1.0));
        assert_eq!(value(&text, r#"t_open{app_id="other"}"#), Some(5.0));
        r.rerank();
        let text = h.render();
        assert_eq!(
            value(&text, r#"t_open{app_id="busy"}"#),
            Some(5.0),
            "{text}"
        );
        assert_eq!(
            value(&text, r#"t_open{app_id="other"}"#),
            Some(1.0),
            "{text}"
        );
        assert_eq!(
            value(&text, r#"t_open{app_id="quiet"}"#),
            Some(0.0),
            "{text}"
        );
        // Later samples follow the new labels; decrements land where the value is.
        metrics::with_local_recorder(&l, || {
            metrics::gauge!("t_open", "app_id" => "quiet").decrement(1.0);
            metrics::gauge!("t_open", "app_id" => "busy").set(2.0);
            metrics::counter!("t_total", "app_id" => "quiet").increment(1);
        });
        let text = h.render();
        assert_eq!(
            value(&text, r#"t_open{app_id="other"}"#),
            Some(0.0),
            "{text}"
        );
        assert_eq!(
            value(&text, r#"t_open{app_id="busy"}"#),
            Some(2.0),
            "{text}"
        );
        assert_eq!(
            value(&text, r#"t_total{app_id="other"}"#),
            Some(51.0),
            "{text}"
        );
        assert_eq!(value(&text, r#"mozaiks_metrics_labelled_apps"#), Some(1.0));
    }

    #[test]
    fn an_incumbent_keeps_its_label_against_a_slightly_busier_app() {
        let (l, r, h) = layer(1);
        metrics::with_local_recorder(&l, || {
            for _ in 0..10 {
                metrics::counter!("t_total", "app_id" => "first").increment(1);
            }
            for _ in 0..15 {
                metrics::counter!("t_total", "app_id" => "second").increment(1);
            }
        });
        r.rerank();
        metrics::with_local_recorder(&l, || {
            metrics::counter!("t_total", "app_id" => "first").increment(1);
        });
        let text = h.render();
        assert_eq!(
            value(&text, r#"t_total{app_id="first"}"#),
            Some(11.0),
            "{text}"
        );
    }

    #[test]
    fn the_seeds_names_are_exported_alongside() {
        let (l, _r, h) = layer(5);
        metrics::with_local_recorder(&l, || {
            let ended = mozaiks_engine::metrics::RUNS_ENDED;
            metrics::counter!(ended, "app_id" => "a", "outcome" => "failed").increment(2);
            metrics::counter!(ended, "app_id" => "a", "outcome" => "completed").increment(7);
            metrics::histogram!(mozaiks_store::metrics::QUERY_SECONDS, "op" => "find").record(0.01);
            metrics::histogram!(mozaiks_store::metrics::WRITE_SECONDS, "op" => "insert")
                .record(0.02);
            record_build_info();
        });
        let text = h.render();
        assert_eq!(
            value(&text, r#"mozaiks_workflow_errors_total{app_id="a"}"#),
            Some(2.0),
            "{text}"
        );
        assert!(
            text.contains(r#"mozaiks_mongodb_latency_seconds{op="find",quantile="#)
                || text.contains(r#"mozaiks_mongodb_latency_seconds_count{op="find"}"#),
            "{text}"
        );
        assert!(
            text.contains(r#"mozaiks_mongodb_latency_seconds_count{op="insert"} 1"#),
            "{text}"
        );
        let build = format!(
            r#"mozaiks_build_info{{version="{}",commit="{}"}}"#,
            env!("CARGO_PKG_VERSION"),
            GIT_COMMIT
        );
        assert_eq!(value(&text, &build), Some(1.0), "{text}");
    }
}
