//! `cancel` before a run has started: given events, when cancel, then events.

use super::tests::{given, names, started_with, text_world};
use super::*;
use std::path::Path;

fn pack() -> Pack {
    Pack::parse(
        Path::new("p/workflow.yaml"),
        "p",
        "name: p\nstart_agent: a\nmax_turns: 2\nagents:\n  - name: a\n",
    )
    .unwrap()
}

fn cancel(reason: &str) -> Command {
    Command::Cancel {
        reason: reason.into(),
    }
}

#[test]
fn a_cancel_before_the_queued_run_starts_cancels_that_run() {
    // given a session whose first message is queued (the run has not started: no slot yet, or
    // a child chat whose cancel overtook its start)
    let chat = given(&started_with("look this up"));
    assert!(chat.run.is_none());
    // when cancel
    let id = Uuid::now_v7();
    let events = chat
        .handle(
            id,
            &cancel("the parent run ended"),
            &pack(),
            &Default::default(),
        )
        .unwrap();
    // then the run that message would start starts and ends cancelled, without a step
    assert_eq!(names(&events), ["run.started", "run.cancelled"]);
    let Event::RunStarted(started) = &events[0] else {
        unreachable!()
    };
    assert_eq!((started.run_id, started.trigger_seq), (id, 2));
    let Event::RunCancelled(c) = &events[1] else {
        unreachable!()
    };
    assert_eq!(c.run_id, id);
    assert_eq!(c.reason, "the parent run ended");
    let mut after = chat.clone();
    for e in &events {
        after.apply(e, Some(id));
    }
    // nothing is left to run, and the same cancel again changes nothing
    assert!(after.run.is_none() && after.pending.is_empty());
    assert_eq!(after.next(&pack(), Uuid::now_v7()), Next::Idle);
    assert!(
        after
            .handle(id, &cancel(""), &pack(), &Default::default())
            .unwrap()
            .is_empty()
    );
}

#[test]
fn a_cancel_with_nothing_queued_or_running_does_nothing() {
    let p = pack();
    let mut chat = given(&started_with("hi"));
    super::tests::drive_in(&mut chat, &p, &text_world());
    assert!(chat.run.is_none() && chat.pending.is_empty());
    let events = chat
        .handle(Uuid::now_v7(), &cancel(""), &p, &Default::default())
        .unwrap();
    assert!(events.is_empty());
    // a session that has not started: nothing either (the worker holds such a cancel until the
    // session starts)
    let events = Chat::default()
        .handle(Uuid::now_v7(), &cancel(""), &p, &Default::default())
        .unwrap();
    assert!(events.is_empty());
}

#[test]
fn a_cancel_with_no_reason_says_the_user_cancelled() {
    let chat = given(&started_with("x"));
    let events = chat
        .handle(Uuid::now_v7(), &cancel(""), &pack(), &Default::default())
        .unwrap();
    let Event::RunCancelled(c) = &events[1] else {
        unreachable!()
    };
    assert_eq!(c.reason, "cancelled by the user");
}
