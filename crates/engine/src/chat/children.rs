//! Child workflows of an agent's turn: spawn, wait, merge. Pure.
//!
//! An agent with `children` fans out before it speaks: `child.spawned` for each child (at most
//! `max_parallel_children` running at once), then the run waits ([`Next::AwaitChildren`]) until
//! the children's `child.finished` commands have become `child.completed` events; when the pack's
//! `wait` is satisfied, one `context.updated` puts the results into the `into` variable and the
//! agent's model is called as usual.

use mozaiks_events::{ChildSpawned, ContextUpdated, Event};
use mozaiks_packs::{Agent, Children, Wait};
use serde_json::json;

use super::{Chat, Next, Run};

/// `source` of the `context.updated` that merges a fan-out's results (not a valid tool name).
pub const CHILDREN_SOURCE: &str = "children.merge";

/// A spawned child whose end the run waits for.
#[derive(Clone, Debug, PartialEq)]
pub struct PendingChild {
    pub chat_id: String,
    pub workflow: String,
    pub input: String,
}

/// The id of a run's child chat: unique (the run id is a UUID v7) and deterministic, so a
/// repeated spawn is the same chat.
pub fn child_chat_id(run: &Run, index: usize) -> String {
    format!("{}-{}-{index}", run.run_id.simple(), run.step)
}

impl Chat {
    /// The next thing a fan-out needs, or `None` once its results are in the context.
    pub(super) fn fan_out(&self, agent: &Agent, spec: &Children, run: &Run) -> Option<Next> {
        if run.children_merged {
            return None;
        }
        let templates = spec.templates();
        let mine: Vec<_> = run.children.iter().filter(|c| c.step == run.step).collect();
        let done = mine.iter().filter(|c| c.status.is_some()).count();
        let satisfied = match spec.wait {
            Wait::All => done >= templates.len(),
            Wait::Any => done >= 1,
        };
        if satisfied {
            let mut finished: Vec<_> = mine.iter().filter(|c| c.status.is_some()).collect();
            finished.sort_by_key(|c| c.index);
            let value = finished
                .iter()
                .map(|c| json!({"input": c.input, "status": c.status, "output": c.output}))
                .collect();
            return Some(Next::Emit(vec![Event::ContextUpdated(ContextUpdated {
                run_id: run.run_id,
                key: spec.into.clone(),
                value,
                source: CHILDREN_SOURCE.into(),
                call_id: None,
            })]));
        }
        let running = mine.len() - done;
        let room = match self.max_parallel_children {
            0 => usize::MAX,
            n => n.saturating_sub(running),
        };
        let spawn: Vec<Event> = templates
            .iter()
            .enumerate()
            .skip(mine.len())
            .take(room)
            .map(|(i, t)| {
                Event::ChildSpawned(ChildSpawned {
                    run_id: run.run_id,
                    child_chat_id: child_chat_id(run, i),
                    workflow: spec.workflow.clone(),
                    step: run.step,
                    index: i as u32,
                    input: crate::model::fill(t, agent, self),
                })
            })
            .collect();
        if !spawn.is_empty() {
            return Some(Next::Emit(spawn));
        }
        Some(Next::AwaitChildren {
            run_id: run.run_id,
            step: run.step,
            pending: mine
                .iter()
                .filter(|c| c.status.is_none())
                .map(|c| PendingChild {
                    chat_id: c.chat_id.clone(),
                    workflow: c.workflow.clone(),
                    input: c.input.clone(),
                })
                .collect(),
        })
    }

    /// Children of the run still running (spawned, not completed).
    pub fn running_children(&self) -> Vec<PendingChild> {
        self.run
            .iter()
            .flat_map(|r| &r.children)
            .filter(|c| c.status.is_none())
            .map(|c| PendingChild {
                chat_id: c.chat_id.clone(),
                workflow: c.workflow.clone(),
                input: c.input.clone(),
            })
            .collect()
    }
}
