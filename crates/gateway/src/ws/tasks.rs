//! What one connection holds, released on every exit path, a panic included.
//!
//! A connection runs as three tasks: the reader (the upgrade's own task, which also watches the
//! token's expiry, idleness and the replica's drain), the writer (the only one touching the
//! sink) and the pump (replay, then live events). The reader owns the other two through
//! [`Tasks`], a [`JoinSet`]: when the reader ends, however it ends, dropping the set aborts the
//! writer and the pump, so no task keeps streaming to a socket nobody watches any more. The
//! connection gauge is a [`Counted`] guard and the per-user and per-app slots an
//! [`crate::hub::Admission`], both released by `Drop`.

use std::future::Future;

use tokio::task::{AbortHandle, Id, JoinError, JoinSet};
use tracing::{info, warn};

use crate::metrics as m;

/// Counts one open connection in `mozaiks_active_connections` for as long as it lives.
pub(super) struct Counted {
    app_id: String,
}

impl Counted {
    pub(super) fn new(app_id: &str) -> Counted {
        metrics::gauge!(m::ACTIVE_CONNECTIONS, "app_id" => app_id.to_string()).increment(1.0);
        Counted {
            app_id: app_id.to_string(),
        }
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        metrics::gauge!(m::ACTIVE_CONNECTIONS, "app_id" => std::mem::take(&mut self.app_id))
            .decrement(1.0);
        if std::thread::panicking() {
            warn!("Client disconnected: its connection task panicked.");
        } else {
            info!("Client disconnected.");
        }
    }
}

/// The writer and pump of one connection; dropping this aborts both.
pub(super) struct Tasks {
    set: JoinSet<()>,
    writer: Id,
    pump: AbortHandle,
}

/// One of a connection's tasks ended.
pub(super) enum Ended {
    /// The writer ended: the socket is closed or cannot be written.
    Writer,
    /// The pump ended by itself (it asked for the close it wanted, if any).
    Pump,
    /// A task panicked.
    Panicked { writer: bool },
}

impl Tasks {
    pub(super) fn spawn(
        writer: impl Future<Output = ()> + Send + 'static,
        pump: impl Future<Output = ()> + Send + 'static,
    ) -> Tasks {
        let mut set = JoinSet::new();
        let writer = set.spawn(writer).id();
        let pump = set.spawn(pump);
        Tasks { set, writer, pump }
    }

    /// Waits for the next task to end; pending for ever once none is left.
    pub(super) async fn ended(&mut self) -> Ended {
        match self.set.join_next_with_id().await {
            Some(Ok((id, ()))) if id == self.writer => Ended::Writer,
            Some(Ok(_)) => Ended::Pump,
            Some(Err(e)) => self.failed(e),
            None => std::future::pending().await,
        }
    }

    fn failed(&self, e: JoinError) -> Ended {
        let writer = e.id() == self.writer;
        if e.is_panic() {
            warn!(
                task = if writer { "writer" } else { "pump" },
                "A connection task panicked; closing the connection."
            );
            Ended::Panicked { writer }
        } else if writer {
            Ended::Writer
        } else {
            Ended::Pump
        }
    }

    /// Stops the pump (the connection is closing).
    pub(super) fn stop_pump(&self) {
        self.pump.abort();
    }

    /// Waits until every task has ended (the caller bounds how long).
    pub(super) async fn join(&mut self) {
        while self.set.join_next().await.is_some() {}
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;

    /// Holds `alive` until dropped, never ending by itself.
    async fn forever(alive: Arc<()>) {
        std::future::pending::<()>().await;
        drop(alive);
    }

    async fn released(alive: &Arc<()>) {
        tokio::time::timeout(Duration::from_secs(10), async {
            while Arc::strong_count(alive) > 1 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("the connection's tasks were not torn down");
    }

    #[tokio::test]
    async fn a_panicking_reader_tears_down_the_writer_and_the_pump() {
        let alive = Arc::new(());
        let (a, b) = (alive.clone(), alive.clone());
        let reader = tokio::spawn(async move {
            let _tasks = Tasks::spawn(forever(a), forever(b));
            tokio::task::yield_now().await;
            panic!("a bug in a frame handler");
        });
        assert!(reader.await.unwrap_err().is_panic());
        released(&alive).await;
    }

    #[tokio::test]
    async fn a_reader_that_returns_or_is_aborted_tears_them_down_too() {
        let alive = Arc::new(());
        let (a, b) = (alive.clone(), alive.clone());
        tokio::spawn(async move {
            let _tasks = Tasks::spawn(forever(a), forever(b));
        })
        .await
        .unwrap();
        released(&alive).await;

        let (a, b) = (alive.clone(), alive.clone());
        let reader = tokio::spawn(async move {
            let _tasks = Tasks::spawn(forever(a), forever(b));
            std::future::pending::<()>().await;
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        reader.abort();
        assert!(reader.await.unwrap_err().is_cancelled());
        released(&alive).await;
    }

    #[tokio::test]
    async fn the_reader_learns_which_task_ended_and_whether_it_panicked() {
        let mut tasks = Tasks::spawn(std::future::pending(), async { panic!("pump bug") });
        assert!(matches!(
            tasks.ended().await,
            Ended::Panicked { writer: false }
        ));
        let mut tasks = Tasks::spawn(async {}, std::future::pending());
        assert!(matches!(tasks.ended().await, Ended::Writer));
        let mut tasks = Tasks::spawn(std::future::pending(), async {});
        assert!(matches!(tasks.ended().await, Ended::Pump));
        tasks.stop_pump();
        drop(tasks);
    }
}
