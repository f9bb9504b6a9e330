//! Given/when/then: `pattern: auto` (model-selected speaker) and structured outputs.

use super::tests::{World, count, drive_in, given, names, started_with};
use super::*;
use mozaiks_events::SpeakerSelected;
use serde_json::json;
use std::path::Path;

fn pack(yaml: &str) -> Pack {
    Pack::parse(Path::new("p/workflow.yaml"), "p", yaml).unwrap()
}

fn reply(text: &str) -> Reply {
    Reply {
        text: text.into(),
        model: "m".into(),
        prompt_tokens: 5,
        completion_tokens: 1,
        tool_calls: Vec::new(),
    }
}

const AUTO: &str = "name: p\nstart_agent: a\npattern: auto\nmax_turns: 5\nterminate_when: [{keyword: DONE}]\nagents:\n  - {name: a, description: Greets}\n  - {name: b, description: Bills}\n  - {name: c, description: Closes}\n";

fn selected(events: &[Event]) -> Vec<SpeakerSelected> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::SpeakerSelected(s) => Some(s.clone()),
            _ => None,
        })
        .collect()
}

fn no_tools(_: &str) -> Result<serde_json::Value, String> {
    Err("no tools here".into())
}

/// Runs `p` on "hi" with `model`, to the end.
fn run(p: &Pack, model: &dyn Fn(&str, u32) -> Reply) -> (Chat, Vec<Event>) {
    let mut chat = given(&started_with("hi"));
    let events = drive_in(
        &mut chat,
        p,
        &World {
            model,
            tool: &no_tools,
        },
    );
    (chat, events)
}

#[test]
fn auto_asks_the_model_who_speaks_next_and_charges_the_call_once() {
    let p = pack(AUTO);
    let model = |agent: &str, round: u32| match (agent, round) {
        ("a", SELECT_SPEAKER_ROUND) => reply("c"),
        ("a", _) => reply("hello"),
        ("c", _) => reply("DONE"),
        other => panic!("unexpected call {other:?}"),
    };
    let (_, events) = run(&p, &model);
    assert_eq!(
        names(&events),
        [
            "run.started",
            "step.started",
            "model.replied",
            "agent.message",
            "usage.charged",
            "model.replied",
            "usage.charged",
            "speaker.selected",
            "step.completed",
            "step.started",
            "model.replied",
            "agent.message",
            "usage.charged",
            "speaker.selected",
            "step.completed",
            "run.completed",
        ]
    );
    let Event::ModelReplied(sel) = &events[5] else {
        panic!()
    };
    assert_eq!((sel.round, sel.text.as_str()), (SELECT_SPEAKER_ROUND, "c"));
    let s = selected(&events);
    assert_eq!(
        (
            s[0].next.as_deref(),
            s[0].reason.as_str(),
            s[0].by.as_deref()
        ),
        (Some("c"), "auto", Some("model"))
    );
    assert_eq!(
        (s[1].reason.as_str(), s[1].by.as_deref()),
        ("terminate_when", None)
    );
    // the selector's reply is not an agent's speech
    assert_eq!(count(&events, "agent.message"), 2);
    // billing can tell the selector's tokens from the agents' turns
    let purposes: Vec<Option<&str>> = events
        .iter()
        .filter_map(|e| match e {
            Event::UsageCharged(u) => Some(u.purpose.as_deref()),
            _ => None,
        })
        .collect();
    assert_eq!(purposes, [None, Some("speaker_selection"), None]);
}

#[test]
fn a_selector_answer_that_names_no_single_agent_falls_back() {
    let cases = [
        // (after_work of a, selector answer, expected next, reason)
        ("", "  \"c\". ", Some("c"), "auto"),
        ("", "I would pick c now", Some("c"), "auto"),
        ("", "nobody", Some("b"), "auto_fallback"),
        ("", "b or c", Some("b"), "auto_fallback"),
        ("", "abc", Some("b"), "auto_fallback"),
        (
            "    handoff: {after_work: c}\n",
            "nobody",
            Some("c"),
            "auto_fallback",
        ),
        (
            "    handoff: {after_work: terminate}\n",
            "",
            None,
            "auto_fallback",
        ),
    ];
    for (after_work, answer, next, reason) in cases {
        let p = pack(&format!(
            "name: p\nstart_agent: a\npattern: auto\nmax_turns: 2\nagents:\n  - name: a\n{after_work}  - name: b\n  - name: c\n"
        ));
        let model = |agent: &str, round: u32| match (agent, round) {
            ("a", SELECT_SPEAKER_ROUND) => reply(answer),
            _ => reply("said"),
        };
        let (_, events) = run(&p, &model);
        let first = &selected(&events)[0];
        assert_eq!(
            (first.next.as_deref(), first.reason.as_str()),
            (next, reason),
            "answer {answer:?}"
        );
        assert_eq!(first.by.as_deref(), Some("model"));
        if reason == "auto_fallback" {
            let detail = first.detail.as_deref().unwrap();
            assert!(detail.contains(&format!("{answer:?}")), "{detail}");
        } else {
            assert!(first.detail.is_none());
        }
        assert_eq!(events.last().unwrap().type_name(), "run.completed");
    }
}

#[test]
fn rules_decide_before_the_selector_is_asked() {
    // A handoff condition holds, then max_turns: the model is never asked who is next.
    let p = pack(
        "name: p\nstart_agent: a\npattern: auto\nmax_turns: 2\nagents:\n  - name: a\n    handoff: {conditions: [{when: {keyword: bill}, target: b}]}\n  - name: b\n",
    );
    let model = |agent: &str, round: u32| {
        assert_ne!(round, SELECT_SPEAKER_ROUND, "{agent} asked the selector");
        reply("the bill")
    };
    let (_, events) = run(&p, &model);
    let s = selected(&events);
    assert_eq!(
        s.iter()
            .map(|s| (s.next.as_deref(), s.reason.as_str()))
            .collect::<Vec<_>>(),
        [(Some("b"), "condition"), (None, "max_turns")]
    );
    assert_eq!(count(&events, "usage.charged"), 2);
}

#[test]
fn a_human_input_agent_of_an_auto_pack_is_followed_by_a_selection() {
    let p = pack(
        "name: p\nstart_agent: h\npattern: auto\nmax_turns: 2\nagents:\n  - {name: h, human_input: true}\n  - {name: b}\n",
    );
    let mut chat = given(&started_with("hi"));
    let model = |agent: &str, round: u32| match round {
        SELECT_SPEAKER_ROUND => reply(if agent == "h" { "b" } else { "h" }),
        _ => reply("ok"),
    };
    let w = World {
        model: &model,
        tool: &no_tools,
    };
    let events = drive_in(&mut chat, &p, &w);
    assert_eq!(events.last().unwrap().type_name(), "input.requested");
    let answer = chat
        .handle(
            Uuid::now_v7(),
            &Command::InputResponse {
                request_id: None,
                text: "yes".into(),
            },
            &p,
            &Default::default(),
        )
        .unwrap();
    chat.apply(&answer[0], None);
    let rest = drive_in(&mut chat, &p, &w);
    let s = selected(&rest);
    assert_eq!(
        (s[0].next.as_deref(), s[0].reason.as_str()),
        (Some("b"), "auto")
    );
    assert_eq!(rest.last().unwrap().type_name(), "run.completed");
}

const STRUCTURED: &str = "name: p\nstart_agent: a\nmax_turns: 3\nagents:\n  - name: a\n    output_schema: {type: object, properties: {topic: {type: string, enum: [x, y]}}, required: [topic]}\n    output_into: req\n    handoff:\n      conditions: [{when: {var: req.topic, equals: y}, target: b}]\n      after_work: terminate\n  - name: b\n";

#[test]
fn a_valid_structured_output_is_spoken_stored_and_routes_the_handoff() {
    let p = pack(STRUCTURED);
    let model = |agent: &str, _: u32| match agent {
        "a" => reply("```json\n{\"topic\": \"y\"}\n```"),
        _ => reply("b here"),
    };
    let (chat, events) = run(&p, &model);
    let Some(Event::AgentMessage(m)) = events
        .iter()
        .find(|e| matches!(e, Event::AgentMessage(m) if m.agent == "a"))
    else {
        panic!("{:?}", names(&events))
    };
    assert_eq!(m.structured, Some(json!({"topic": "y"})));
    let Some(Event::ContextUpdated(u)) = events
        .iter()
        .find(|e| matches!(e, Event::ContextUpdated(_)))
    else {
        panic!()
    };
    assert_eq!(
        (u.key.as_str(), u.source.as_str(), &u.value),
        ("req", OUTPUT_SOURCE, &json!({"topic": "y"}))
    );
    assert_eq!(chat.context["req"], json!({"topic": "y"}));
    let s = selected(&events);
    assert_eq!(
        (s[0].next.as_deref(), s[0].reason.as_str()),
        (Some("b"), "condition")
    );
    assert_eq!(events.last().unwrap().type_name(), "run.completed");
}

#[test]
fn an_invalid_structured_output_is_retried_once_then_fails_the_run() {
    let p = pack(STRUCTURED);
    // invalid, then valid: one retry, both calls charged, one message
    let model = |_: &str, round: u32| {
        reply(if round == 1 {
            "sure: topic x"
        } else {
            "{\"topic\": \"x\"}"
        })
    };
    let (_, events) = run(&p, &model);
    assert_eq!(
        names(&events)[..9],
        [
            "run.started",
            "step.started",
            "model.replied",
            "usage.charged",
            "model.replied",
            "agent.message",
            "usage.charged",
            "context.updated",
            "speaker.selected",
        ]
    );
    // invalid twice: run.failed with the stable code, no message spoken
    let model = |_: &str, _: u32| reply("{\"topic\": \"z\"}");
    let (chat, events) = run(&p, &model);
    assert_eq!(count(&events, "model.replied"), 2);
    assert_eq!(count(&events, "usage.charged"), 2);
    assert_eq!(count(&events, "agent.message"), 0);
    let Some(Event::RunFailed(f)) = events.last() else {
        panic!("{:?}", names(&events))
    };
    assert_eq!(f.code, INVALID_STRUCTURED_OUTPUT);
    assert!(f.reason.contains("$.topic"), "{}", f.reason);
    assert!(chat.run.is_none());
    assert!(!chat.context.contains_key("req"));
}

#[test]
fn the_retry_prompt_carries_the_validation_error() {
    let p = pack(STRUCTURED);
    let mut chat = given(&started_with("hi"));
    for _ in 0..10 {
        let events = match chat.next(&p, Uuid::now_v7()) {
            Next::Emit(ev) => ev,
            Next::CallModel { round: 1, .. } => chat.on_reply(1, &reply("not json")),
            Next::CallModel { round: 2, .. } => break,
            other => panic!("{other:?}"),
        };
        for e in &events {
            chat.apply(e, None);
        }
    }
    let m = crate::model::prompt::messages(&p.agents[0], &chat);
    let last = m.last().unwrap();
    assert_eq!(last["role"], "user");
    let text = last["content"].as_str().unwrap();
    assert!(
        text.contains("not JSON") && text.contains("schema"),
        "{text}"
    );
}

/// Every prefix of a full run, taken over by a new owner, ends with the same events: no model
/// call (selector or agent) is made or charged twice.
fn assert_takeover_safe(p: &Pack, model: &dyn Fn(&str, u32) -> Reply) {
    let (_, all) = run(p, model);
    for cut in 0..all.len() {
        let mut log = started_with("hi");
        log.extend(all[..cut].iter().cloned());
        let mut chat = given(&log);
        let rest = drive_in(
            &mut chat,
            p,
            &World {
                model,
                tool: &no_tools,
            },
        );
        let mut joined = all[..cut].to_vec();
        joined.extend(rest);
        assert_eq!(names(&joined), names(&all), "cut at {cut}");
        assert_eq!(
            count(&joined, "usage.charged"),
            count(&all, "model.replied"),
            "cut at {cut}"
        );
    }
}

#[test]
fn a_taken_over_auto_run_does_not_ask_the_selector_again() {
    let p = pack(AUTO);
    let model = |agent: &str, round: u32| match (agent, round) {
        ("a", SELECT_SPEAKER_ROUND) => reply("b"),
        ("b", SELECT_SPEAKER_ROUND) => reply("who knows"),
        ("c", _) => reply("DONE"),
        _ => reply("talk"),
    };
    let (_, all) = run(&p, &model);
    assert_eq!(count(&all, "model.replied"), 5);
    assert_takeover_safe(&p, &model);
}

#[test]
fn a_taken_over_structured_retry_is_not_repeated() {
    let p = pack(STRUCTURED);
    let model = |agent: &str, round: u32| match (agent, round) {
        ("a", 1) => reply("oops"),
        ("a", _) => reply("{\"topic\": \"y\"}"),
        _ => reply("fine"),
    };
    assert_takeover_safe(&p, &model);
    let failing = |_: &str, _: u32| reply("[]");
    assert_takeover_safe(&p, &failing);
}
