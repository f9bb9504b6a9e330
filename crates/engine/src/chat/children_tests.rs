//! Child workflows: given events, when command, then events.

use super::tests::{World, count, drive_in, given, names, started_with, text_world};
use super::*;
use serde_json::json;
use std::path::Path;

fn fan_pack(wait: &str) -> Pack {
    Pack::parse(
        Path::new("p/workflow.yaml"),
        "p",
        &format!(
            "name: p\nstart_agent: lead\nagents:\n  - name: lead\n    children:\n      workflow: sub\n      inputs: ['{{input}} A', '{{input}} B', '{{input}} C']\n      wait: {wait}\n      into: findings\n    offline: {{reply: 'merged {{context.findings}}'}}\n"
        ),
    )
    .unwrap()
}

fn finished(chat_id: &str, status: &str, output: &str) -> Command {
    Command::ChildFinished {
        child_chat_id: chat_id.into(),
        status: status.into(),
        output: output.into(),
    }
}

fn pending(chat: &Chat, p: &Pack) -> Vec<PendingChild> {
    match chat.next(p, Uuid::now_v7()) {
        Next::AwaitChildren { pending, .. } => pending,
        other => panic!("expected to await children, got {other:?}"),
    }
}

/// Applies `cmd` and returns its events.
fn when(chat: &mut Chat, p: &Pack, cmd: &Command) -> Vec<Event> {
    let events = chat
        .handle(Uuid::now_v7(), cmd, p, &Default::default())
        .unwrap();
    for e in &events {
        chat.apply(e, None);
    }
    events
}

#[test]
fn a_fan_out_spawns_waits_for_all_and_merges_in_input_order() {
    let p = fan_pack("all");
    let mut chat = given(&started_with("rust"));
    let events = drive_in(&mut chat, &p, &text_world());
    assert_eq!(
        names(&events),
        [
            "run.started",
            "step.started",
            "child.spawned",
            "child.spawned",
            "child.spawned"
        ]
    );
    let spawned: Vec<_> = events
        .iter()
        .filter_map(|e| match e {
            Event::ChildSpawned(c) => Some(c.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(
        spawned.iter().map(|c| c.input.as_str()).collect::<Vec<_>>(),
        ["rust A", "rust B", "rust C"]
    );
    assert!(spawned.iter().all(|c| c.workflow == "sub" && c.step == 1));
    let ids: HashSet<_> = spawned.iter().map(|c| c.child_chat_id.clone()).collect();
    assert_eq!(ids.len(), 3);
    for id in &ids {
        mozaiks_events::ids::check_token("chat_id", id).unwrap();
    }
    assert_eq!(pending(&chat, &p).len(), 3);

    // They finish in reverse order; the run waits until the last one.
    for (i, c) in spawned.iter().enumerate().rev() {
        let out = when(
            &mut chat,
            &p,
            &finished(&c.child_chat_id, "completed", &format!("out{i}")),
        );
        assert_eq!(names(&out), ["child.completed"]);
        if i > 0 {
            assert_eq!(pending(&chat, &p).len(), i);
        }
    }
    let rest = drive_in(&mut chat, &p, &text_world());
    let Event::ContextUpdated(merge) = &rest[0] else {
        panic!("expected the merge first, got {rest:?}")
    };
    assert_eq!(merge.key, "findings");
    assert_eq!(merge.source, CHILDREN_SOURCE);
    assert_eq!(
        merge.value,
        json!([
            {"input": "rust A", "status": "completed", "output": "out0"},
            {"input": "rust B", "status": "completed", "output": "out1"},
            {"input": "rust C", "status": "completed", "output": "out2"},
        ])
    );
    assert_eq!(count(&rest, "model.replied"), 1);
    assert_eq!(rest.last().unwrap().type_name(), "run.completed");

    // A late repeat of a child's end changes nothing; a stranger is refused.
    let c0 = &spawned[0].child_chat_id;
    assert_eq!(
        chat.handle(
            Uuid::now_v7(),
            &finished(c0, "completed", "x"),
            &p,
            &Default::default()
        ),
        Err(Refusal::UnknownChild(c0.clone())),
        "the run is over"
    );
}

#[test]
fn a_repeated_child_end_is_recorded_once_and_bad_ones_are_refused() {
    let p = fan_pack("all");
    let mut chat = given(&started_with("go"));
    drive_in(&mut chat, &p, &text_world());
    let first = pending(&chat, &p)[0].chat_id.clone();
    assert_eq!(
        names(&when(&mut chat, &p, &finished(&first, "failed", "boom"))),
        ["child.completed"]
    );
    assert!(when(&mut chat, &p, &finished(&first, "completed", "again")).is_empty());
    let refuse = |cmd: &Command| {
        chat.handle(Uuid::now_v7(), cmd, &p, &Default::default())
            .unwrap_err()
            .code()
    };
    assert_eq!(
        refuse(&finished("nobody", "completed", "")),
        "unknown_child"
    );
    assert_eq!(
        refuse(&finished(&first, "exploded", "")),
        "invalid_child_status"
    );
}

#[test]
fn at_most_max_parallel_children_run_at_once() {
    let p = fan_pack("all");
    let mut chat = given(&started_with("go"));
    chat.max_parallel_children = 2;
    let events = drive_in(&mut chat, &p, &text_world());
    assert_eq!(count(&events, "child.spawned"), 2);
    let first = pending(&chat, &p)[0].chat_id.clone();
    when(&mut chat, &p, &finished(&first, "completed", "a"));
    let more = drive_in(&mut chat, &p, &text_world());
    assert_eq!(names(&more), ["child.spawned"]);
    let Event::ChildSpawned(third) = &more[0] else {
        unreachable!()
    };
    assert_eq!((third.index, third.input.as_str()), (2, "go C"));
    assert_eq!(pending(&chat, &p).len(), 2);
}

#[test]
fn wait_any_continues_with_the_first_result() {
    let p = fan_pack("any");
    let mut chat = given(&started_with("go"));
    drive_in(&mut chat, &p, &text_world());
    let second = pending(&chat, &p)[1].chat_id.clone();
    when(&mut chat, &p, &finished(&second, "completed", "fast"));
    let rest = drive_in(&mut chat, &p, &text_world());
    let Event::ContextUpdated(merge) = &rest[0] else {
        panic!("{rest:?}")
    };
    assert_eq!(
        merge.value,
        json!([{"input": "go B", "status": "completed", "output": "fast"}])
    );
    assert_eq!(rest.last().unwrap().type_name(), "run.completed");
}

#[test]
fn a_new_owner_folding_the_log_waits_for_the_same_children() {
    let p = fan_pack("all");
    let mut chat = given(&started_with("go"));
    let mut log = started_with("go");
    log.extend(drive_in(&mut chat, &p, &text_world()));
    let first = pending(&chat, &p)[0].chat_id.clone();
    log.extend(when(&mut chat, &p, &finished(&first, "completed", "a")));
    let taken_over = given(&log);
    assert_eq!(pending(&taken_over, &p), pending(&chat, &p));
    assert_eq!(taken_over.running_children().len(), 2);
    // Nothing is spawned twice.
    assert!(matches!(
        taken_over.next(&p, Uuid::now_v7()),
        Next::AwaitChildren { .. }
    ));
}

#[test]
fn cancelling_a_parent_ends_its_run_with_children_running() {
    let p = fan_pack("all");
    let mut chat = given(&started_with("go"));
    drive_in(&mut chat, &p, &text_world());
    assert_eq!(chat.running_children().len(), 3);
    let events = when(
        &mut chat,
        &p,
        &Command::Cancel {
            reason: String::new(),
        },
    );
    assert_eq!(names(&events), ["run.cancelled"]);
    assert!(chat.run.is_none());
    assert!(chat.running_children().is_empty());
}

#[test]
fn a_silent_world_never_reaches_the_model_before_the_children_end() {
    let p = fan_pack("all");
    let mut chat = given(&started_with("go"));
    let w = World {
        model: &|_, _| panic!("the model is not called while children run"),
        tool: &|_| Ok(json!(null)),
    };
    let events = drive_in(&mut chat, &p, &w);
    assert_eq!(count(&events, "child.spawned"), 3);
}
