//! Given events, when command (or model reply, or tool result), then events.

use super::*;
use mozaiks_events::{AgentMessage, RequestedToolCall, RunStarted, StepStarted, UsageCharged};
use std::path::Path;

fn pack(yaml: &str) -> Pack {
    Pack::parse(Path::new("p/workflow.yaml"), "p", yaml).unwrap()
}

fn two_agents() -> Pack {
    pack(
        "name: p\nstart_agent: a\nmax_turns: 4\nagents:\n  - name: a\n    handoff: {after_work: b}\n  - name: b\n",
    )
}

fn reply(text: &str) -> Reply {
    Reply {
        text: text.into(),
        model: "offline".into(),
        prompt_tokens: 3,
        completion_tokens: 2,
        tool_calls: Vec::new(),
    }
}

fn calls(list: &[(&str, &str, serde_json::Value)]) -> Reply {
    Reply {
        tool_calls: list
            .iter()
            .map(|(id, tool, args)| RequestedToolCall {
                call_id: id.to_string(),
                tool: tool.to_string(),
                arguments: args.clone(),
            })
            .collect(),
        ..reply("")
    }
}

/// given events
pub(super) fn given(events: &[Event]) -> Chat {
    Chat::from_events(events.iter().map(|e| (e, None)))
}

fn start() -> Command {
    Command::StartSession {
        context: Default::default(),
        parent_chat_id: None,
        message: None,
    }
}

pub(super) fn names(events: &[Event]) -> Vec<&'static str> {
    events.iter().map(|e| e.type_name()).collect()
}

pub(super) fn started_with(text: &str) -> Vec<Event> {
    vec![
        Event::SessionStarted(SessionStarted::default()),
        Event::MessageUser(MessageUser {
            text: text.into(),
            client_msg_id: None,
        }),
    ]
}

/// A scripted world: the model answers with `model(agent, round)`, HTTP tools with `tool(name)`.
pub(super) struct World<'a> {
    pub(super) model: &'a dyn Fn(&str, u32) -> Reply,
    pub(super) tool: &'a dyn Fn(&str) -> Result<serde_json::Value, String>,
}

pub(super) fn text_world() -> World<'static> {
    World {
        model: &|agent, _| reply(&format!("from {agent}")),
        tool: &|_| Ok(serde_json::json!("ok")),
    }
}

/// Drives a chat until it is idle, collecting every event.
pub(super) fn drive_in(chat: &mut Chat, p: &Pack, w: &World) -> Vec<Event> {
    let mut all = Vec::new();
    for _ in 0..200 {
        let events = match chat.next(p, Uuid::now_v7()) {
            Next::Idle | Next::AwaitChildren { .. } => return all,
            Next::Emit(ev) => ev,
            Next::CallModel { agent, round, .. } => chat.on_reply(round, &(w.model)(&agent, round)),
            Next::CallTool { call_id, tool, .. } => {
                chat.on_tool_result(p, &call_id, (w.tool)(&tool))
            }
        };
        assert!(!events.is_empty(), "next produced no events");
        for e in &events {
            chat.apply(e, None);
        }
        all.extend(events);
    }
    panic!("run did not end");
}

fn drive(mut chat: Chat, p: &Pack) -> Vec<Event> {
    drive_in(&mut chat, p, &text_world())
}

pub(super) fn count(events: &[Event], kind: &str) -> usize {
    events.iter().filter(|e| e.type_name() == kind).count()
}

#[test]
fn start_opens_the_session_once() {
    let p = two_agents();
    let chat = given(&[]);
    let events = chat
        .handle(Uuid::now_v7(), &start(), &p, &Default::default())
        .unwrap();
    assert_eq!(names(&events), ["session.started"]);
    let chat = given(&events);
    assert!(
        chat.handle(Uuid::now_v7(), &start(), &p, &Default::default())
            .unwrap()
            .is_empty()
    );
}

#[test]
fn context_layers_pack_then_app_then_request() {
    let p = pack("name: p\nstart_agent: a\ncontext: {x: 1, y: 1, z: 1}\nagents:\n  - name: a\n");
    let app: serde_json::Map<_, _> = serde_json::from_str(r#"{"y": 2, "z": 2}"#).unwrap();
    let cmd = Command::StartSession {
        context: serde_json::from_str(r#"{"z": 3}"#).unwrap(),
        parent_chat_id: None,
        message: None,
    };
    let events = given(&[]).handle(Uuid::now_v7(), &cmd, &p, &app).unwrap();
    let Event::SessionStarted(s) = &events[0] else {
        panic!()
    };
    assert_eq!(
        serde_json::Value::Object(s.context.clone()),
        serde_json::json!({"x":1,"y":2,"z":3})
    );
}

#[test]
fn messages_before_start_are_refused() {
    let cmd = Command::UserMessage {
        text: "hi".into(),
        client_msg_id: None,
    };
    assert_eq!(
        given(&[]).handle(Uuid::now_v7(), &cmd, &two_agents(), &Default::default()),
        Err(Refusal::NotStarted)
    );
}

#[test]
fn client_msg_id_and_command_id_make_messages_idempotent() {
    let p = two_agents();
    let started = Event::SessionStarted(SessionStarted::default());
    let msg = Command::UserMessage {
        text: "hi".into(),
        client_msg_id: Some("m1".into()),
    };
    let id = Uuid::now_v7();
    let events = given(std::slice::from_ref(&started))
        .handle(id, &msg, &p, &Default::default())
        .unwrap();
    assert_eq!(names(&events), ["message.user"]);
    let mut chat = given(&[started]);
    chat.apply(&events[0], Some(id));
    assert!(
        chat.handle(Uuid::now_v7(), &msg, &p, &Default::default())
            .unwrap()
            .is_empty()
    );
    let bare = Command::UserMessage {
        text: "x".into(),
        client_msg_id: None,
    };
    assert!(
        chat.handle(id, &bare, &p, &Default::default())
            .unwrap()
            .is_empty()
    );
}

#[test]
fn a_message_runs_the_handoff_chain() {
    let events = drive(given(&started_with("hi")), &two_agents());
    assert_eq!(
        names(&events),
        [
            "run.started",
            "step.started",
            "model.replied",
            "agent.message",
            "usage.charged",
            "speaker.selected",
            "step.completed",
            "step.started",
            "model.replied",
            "agent.message",
            "usage.charged",
            "speaker.selected",
            "step.completed",
            "run.completed"
        ]
    );
    let Event::RunCompleted(done) = events.last().unwrap() else {
        panic!()
    };
    assert_eq!(done.steps, 2);
    assert_eq!(done.output, "from b");
}

fn selections(events: &[Event]) -> Vec<(String, Option<String>, String)> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::SpeakerSelected(s) => Some((s.from.clone(), s.next.clone(), s.reason.clone())),
            _ => None,
        })
        .collect()
}

fn sel(from: &str, next: Option<&str>, reason: &str) -> (String, Option<String>, String) {
    (from.into(), next.map(String::from), reason.into())
}

#[test]
fn max_turns_bounds_a_loop() {
    let p = pack(
        "name: p\nstart_agent: a\nmax_turns: 3\nagents:\n  - name: a\n    handoff: {after_work: b}\n  - name: b\n    handoff: {after_work: a}\n",
    );
    let events = drive(given(&started_with("hi")), &p);
    assert_eq!(count(&events, "agent.message"), 3);
    assert_eq!(
        selections(&events).last().unwrap(),
        &sel("a", None, "max_turns")
    );
    assert_eq!(events.last().unwrap().type_name(), "run.completed");
}

#[test]
fn round_robin_takes_turns_until_a_keyword_terminates() {
    let p = pack(
        "name: p\nstart_agent: a\npattern: round_robin\nmax_turns: 10\nterminate_when: [{keyword: DONE}]\nagents:\n  - name: a\n  - name: b\n  - name: c\n",
    );
    let model = |agent: &str, _round: u32| reply(if agent == "c" { "all DONE" } else { "working" });
    let mut chat = given(&started_with("hi"));
    let events = drive_in(
        &mut chat,
        &p,
        &World {
            model: &model,
            tool: &|_| Ok(serde_json::Value::Null),
        },
    );
    assert_eq!(
        selections(&events),
        [
            sel("a", Some("b"), "round_robin"),
            sel("b", Some("c"), "round_robin"),
            sel("c", None, "terminate_when"),
        ]
    );
}

const TOOLS: &str = "name: p\nstart_agent: triage\nmax_turns: 5\ntools:\n  - name: classify\n    parameters: {type: object, properties: {text: {type: string}}}\n    lookup: {argument: text, match: contains, table: {invoice: billing, crash: tech}, default: general}\n    sets_context: category\n  - name: status\n    http: {url: 'http://127.0.0.1:9/status'}\nagents:\n  - name: triage\n    tools: [classify, set_context, status]\n    handoff:\n      conditions:\n        - {when: {var: category, equals: billing}, target: billing}\n        - {when: {var: category, in: [tech]}, target: tech}\n      after_work: terminate\n  - name: billing\n  - name: tech\n";

#[test]
fn tools_update_context_and_conditions_pick_the_handoff() {
    let p = pack(TOOLS);
    let model = |agent: &str, round: u32| match (agent, round) {
        ("triage", 1) => calls(&[
            (
                "c1",
                "classify",
                serde_json::json!({"text": "My INVOICE is wrong"}),
            ),
            (
                "c2",
                "set_context",
                serde_json::json!({"key": "priority", "value": "high"}),
            ),
            ("c3", "status", serde_json::json!({})),
        ]),
        (a, _) => reply(&format!("{a} answers")),
    };
    let tool = |name: &str| match name {
        "status" => Err("HTTP 503".to_string()),
        other => panic!("{other} is not an HTTP tool"),
    };
    let mut chat = given(&started_with("invoice"));
    let events = drive_in(
        &mut chat,
        &p,
        &World {
            model: &model,
            tool: &tool,
        },
    );
    assert_eq!(
        names(&events)[..14],
        [
            "run.started",
            "step.started",
            "model.replied",
            "usage.charged",
            "tool.call",
            "tool.call",
            "tool.call",
            "tool.result",
            "context.updated",
            "tool.result",
            "context.updated",
            "tool.result",
            "model.replied",
            "agent.message",
        ]
    );
    // the HTTP tool's failure is a result, and the run went on
    let errors: Vec<_> = events
        .iter()
        .filter_map(|e| match e {
            Event::ToolResult(t) => t.error.clone(),
            _ => None,
        })
        .collect();
    assert_eq!(errors, ["HTTP 503"]);
    assert_eq!(chat.context["category"], "billing");
    assert_eq!(chat.context["priority"], "high");
    assert_eq!(
        selections(&events),
        [
            sel("triage", Some("billing"), "condition"),
            sel("billing", None, "after_work"),
        ]
    );
    assert_eq!(count(&events, "usage.charged"), 3);
}

#[test]
fn bad_tool_calls_become_tool_errors() {
    let p = pack(TOOLS);
    let model = |agent: &str, round: u32| match (agent, round) {
        ("triage", 1) => calls(&[
            ("c1", "nope", serde_json::json!({})),
            ("c2", "set_context", serde_json::json!({"value": 1})),
            ("c3", "classify", serde_json::json!({})),
        ]),
        _ => reply("fine"),
    };
    let mut chat = given(&started_with("x"));
    let events = drive_in(
        &mut chat,
        &p,
        &World {
            model: &model,
            tool: &|_| Ok(serde_json::Value::Null),
        },
    );
    let errors = events
        .iter()
        .filter(|e| matches!(e, Event::ToolResult(t) if t.error.is_some()))
        .count();
    assert_eq!(errors, 3);
    assert_eq!(events.last().unwrap().type_name(), "run.completed");
}

#[test]
fn a_model_that_keeps_calling_tools_is_stopped_after_max_rounds() {
    let p = pack(TOOLS);
    let model = |_: &str, round: u32| {
        calls(&[(
            &format!("c{round}"),
            "set_context",
            serde_json::json!({"key": "n", "value": round}),
        )])
    };
    let mut chat = given(&started_with("x"));
    let events = drive_in(
        &mut chat,
        &p,
        &World {
            model: &model,
            tool: &|_| Ok(serde_json::Value::Null),
        },
    );
    assert_eq!(count(&events, "model.replied"), run::MAX_ROUNDS as usize);
    assert_eq!(events.last().unwrap().type_name(), "run.completed");
}

/// The events of a run of TOOLS up to `cut` types in, then what a new owner does.
fn takeover_after(cut: usize) -> (Vec<Event>, Vec<Event>) {
    let p = pack(TOOLS);
    let model = |agent: &str, round: u32| match (agent, round) {
        ("triage", 1) => calls(&[
            ("c1", "classify", serde_json::json!({"text": "crash"})),
            ("c2", "status", serde_json::json!({})),
        ]),
        _ => reply("done"),
    };
    let tool = |_: &str| Ok(serde_json::json!({"up": true}));
    let w = World {
        model: &model,
        tool: &tool,
    };
    let mut full = given(&started_with("x"));
    let all = drive_in(&mut full, &p, &w);
    let mut log = started_with("x");
    log.extend(all[..cut].iter().cloned());
    let mut chat = given(&log);
    // The new owner must not call the model for a recorded round, nor a tool with a result.
    let recorded_rounds = count(&all[..cut], "model.replied") as u32;
    let results: Vec<String> = all[..cut]
        .iter()
        .filter_map(|e| match e {
            Event::ToolResult(t) => Some(t.call_id.clone()),
            _ => None,
        })
        .collect();
    let guarded_model = |agent: &str, round: u32| {
        assert!(
            agent != "triage" || round > recorded_rounds,
            "round {round} of {agent} was called again"
        );
        model(agent, round)
    };
    let guarded_tool = |name: &str| {
        assert!(
            !results.contains(&"c2".to_string()),
            "{name} was called again"
        );
        tool(name)
    };
    let rest = drive_in(
        &mut chat,
        &p,
        &World {
            model: &guarded_model,
            tool: &guarded_tool,
        },
    );
    (all, rest)
}

#[test]
fn a_taken_over_run_never_repeats_a_recorded_call_nor_charges_twice() {
    let (all, _) = takeover_after(0);
    for cut in 0..all.len() {
        let (all, rest) = takeover_after(cut);
        let mut joined: Vec<Event> = all[..cut].to_vec();
        joined.extend(rest);
        // The same sequence of types as an uninterrupted run, so each charge exactly once.
        assert_eq!(names(&joined), names(&all), "cut at {cut}");
        assert_eq!(count(&joined, "usage.charged"), 3, "cut at {cut}");
    }
}

#[test]
fn a_log_from_before_model_replied_still_completes() {
    let p = two_agents();
    let run_id = Uuid::now_v7();
    let mut log = started_with("hi");
    log.extend([
        Event::RunStarted(RunStarted {
            run_id,
            trigger_seq: 2,
        }),
        Event::StepStarted(StepStarted {
            run_id,
            step: 1,
            agent: "a".into(),
        }),
        Event::AgentMessage(AgentMessage {
            run_id,
            step: 1,
            agent: "a".into(),
            text: "x".into(),
            structured: None,
        }),
        Event::UsageCharged(UsageCharged {
            run_id,
            step: 1,
            agent: "a".into(),
            model: "m".into(),
            prompt_tokens: 1,
            completion_tokens: 1,
            total_tokens: 2,
            purpose: None,
            credits: None,
            price: None,
        }),
    ]);
    let events = drive(given(&log), &p);
    assert_eq!(
        names(&events)[..3],
        ["speaker.selected", "step.completed", "step.started"]
    );
    assert_eq!(count(&events, "usage.charged"), 1);
}

#[test]
fn messages_during_a_run_queue_in_order() {
    let p = two_agents();
    let mut chat = given(&started_with("one"));
    let Next::Emit(start) = chat.next(&p, Uuid::now_v7()) else {
        panic!()
    };
    for e in &start {
        chat.apply(e, None);
    }
    chat.apply(
        &Event::MessageUser(MessageUser {
            text: "two".into(),
            client_msg_id: None,
        }),
        None,
    );
    assert_eq!(chat.pending.len(), 1);
    assert_eq!(chat.last_user_text(), "one");
    let events = drive(chat, &p);
    assert_eq!(count(&events, "run.completed"), 2);
}

#[test]
fn cancel_ends_the_run() {
    let p = two_agents();
    let run_id = Uuid::now_v7();
    let mut log = started_with("hi");
    log.push(Event::RunStarted(RunStarted {
        run_id,
        trigger_seq: 2,
    }));
    let chat = given(&log);
    let cancel = Command::Cancel {
        reason: String::new(),
    };
    let events = chat
        .handle(Uuid::now_v7(), &cancel, &p, &Default::default())
        .unwrap();
    assert_eq!(names(&events), ["run.cancelled"]);
    let mut chat = chat;
    chat.apply(&events[0], None);
    assert_eq!(chat.next(&p, Uuid::now_v7()), Next::Idle);
    assert!(
        chat.handle(Uuid::now_v7(), &cancel, &p, &Default::default())
            .unwrap()
            .is_empty()
    );
}

fn respond(
    chat: &Chat,
    p: &Pack,
    request_id: Option<&str>,
    text: &str,
) -> Result<Vec<Event>, Refusal> {
    let cmd = Command::InputResponse {
        request_id: request_id.map(String::from),
        text: text.into(),
    };
    chat.handle(Uuid::now_v7(), &cmd, p, &Default::default())
}

#[test]
fn input_response_without_a_waiting_run_is_refused() {
    let chat = given(&[Event::SessionStarted(SessionStarted::default())]);
    assert_eq!(
        respond(&chat, &two_agents(), None, "yes"),
        Err(Refusal::NotWaitingForInput)
    );
}

#[test]
fn a_human_input_agent_waits_for_the_user_and_speaks_their_answer() {
    let p = pack(
        "name: p\nstart_agent: a\nagents:\n  - name: a\n    handoff: {after_work: human}\n  - name: human\n    human_input: true\n    system_message: Approve?\n    handoff: {conditions: [{when: {keyword: yes}, target: closer}]}\n  - name: closer\n",
    );
    let mut chat = given(&started_with("go"));
    let events = drive(chat.clone(), &p);
    let Event::InputRequested(req) = events.last().unwrap() else {
        panic!("{:?}", names(&events))
    };
    assert_eq!(req.prompt, "Approve?");
    for e in &events {
        chat.apply(e, None);
    }
    assert_eq!(chat.next(&p, Uuid::now_v7()), Next::Idle);
    assert!(matches!(
        respond(&chat, &p, Some("other"), "yes"),
        Err(Refusal::UnknownRequest { .. })
    ));
    let answer = respond(&chat, &p, Some(&req.request_id), "yes please").unwrap();
    assert_eq!(names(&answer), ["input.received"]);
    chat.apply(&answer[0], None);
    let rest = drive(chat, &p);
    assert_eq!(
        names(&rest)[..3],
        ["agent.message", "speaker.selected", "step.completed"]
    );
    let Event::AgentMessage(m) = &rest[0] else {
        panic!()
    };
    assert_eq!((m.agent.as_str(), m.text.as_str()), ("human", "yes please"));
    assert_eq!(
        selections(&rest)[0],
        sel("human", Some("closer"), "condition")
    );
    assert_eq!(rest.last().unwrap().type_name(), "run.completed");
}

#[test]
fn ask_user_turns_the_answer_into_the_tool_result() {
    let p = pack("name: p\nstart_agent: a\nagents:\n  - name: a\n    tools: [ask_user]\n");
    let model = |_: &str, round: u32| {
        if round == 1 {
            calls(&[(
                "q1",
                "ask_user",
                serde_json::json!({"question": "Order number?"}),
            )])
        } else {
            reply("thanks")
        }
    };
    let w = World {
        model: &model,
        tool: &|_| Ok(serde_json::Value::Null),
    };
    let mut chat = given(&started_with("where is my order"));
    let events = drive_in(&mut chat, &p, &w);
    let Event::InputRequested(req) = events.last().unwrap() else {
        panic!("{:?}", names(&events))
    };
    let run_id = chat.run.as_ref().unwrap().run_id;
    assert_eq!(
        (req.request_id.as_str(), req.prompt.as_str()),
        (format!("{run_id}:call:q1").as_str(), "Order number?")
    );
    let answer = respond(&chat, &p, None, "A-17").unwrap();
    chat.apply(&answer[0], None);
    let rest = drive_in(&mut chat, &p, &w);
    let Event::ToolResult(t) = &rest[0] else {
        panic!("{:?}", names(&rest))
    };
    assert_eq!(t.result, "A-17");
    assert_eq!(rest.last().unwrap().type_name(), "run.completed");
    // nothing waits any more
    assert_eq!(
        respond(&chat, &p, None, "again"),
        Err(Refusal::NotWaitingForInput)
    );
}

#[test]
fn ask_user_request_ids_differ_from_run_to_run() {
    // The model reuses its call id in every run (as the offline model does); a client answering
    // the second run's question with the first run's request id must be refused, not answer it.
    let p = pack("name: p\nstart_agent: a\nagents:\n  - name: a\n    tools: [ask_user]\n");
    let model = |_: &str, round: u32| {
        if round == 1 {
            calls(&[(
                "q1",
                "ask_user",
                serde_json::json!({"question": "Order number?"}),
            )])
        } else {
            reply("thanks")
        }
    };
    let w = World {
        model: &model,
        tool: &|_| Ok(serde_json::Value::Null),
    };
    let mut chat = given(&started_with("first"));
    let events = drive_in(&mut chat, &p, &w);
    let Event::InputRequested(first) = events.last().unwrap().clone() else {
        panic!("{:?}", names(&events))
    };
    let answer = respond(&chat, &p, Some(&first.request_id), "A-1").unwrap();
    chat.apply(&answer[0], None);
    drive_in(&mut chat, &p, &w);
    assert!(chat.run.is_none(), "the first run is over");

    let msg = chat
        .handle(
            Uuid::now_v7(),
            &Command::UserMessage {
                text: "second".into(),
                client_msg_id: None,
            },
            &p,
            &Default::default(),
        )
        .unwrap();
    for e in &msg {
        chat.apply(e, None);
    }
    let events = drive_in(&mut chat, &p, &w);
    let Event::InputRequested(second) = events.last().unwrap().clone() else {
        panic!("{:?}", names(&events))
    };
    assert_ne!(first.request_id, second.request_id);
    assert!(matches!(
        respond(&chat, &p, Some(&first.request_id), "stale"),
        Err(Refusal::UnknownRequest { .. })
    ));
    let answer = respond(&chat, &p, Some(&second.request_id), "A-2").unwrap();
    chat.apply(&answer[0], None);
    let rest = drive_in(&mut chat, &p, &w);
    let Event::ToolResult(t) = &rest[0] else {
        panic!("{:?}", names(&rest))
    };
    assert_eq!(t.result, "A-2");
}

/// A command's events are appended one by one: when only the first reached the log (the worker
/// died, or the append's acknowledgement was lost with the connection), the redelivered command
/// produces the rest, once.
#[test]
fn a_command_only_partly_in_the_log_produces_the_rest_when_redelivered() {
    let p = two_agents();
    let ctx = Default::default();
    let rest_after_first = |chat: Chat, id: Uuid, cmd: &Command| {
        let events = chat.handle(id, cmd, &p, &ctx).unwrap();
        assert_eq!(events.len(), 2, "{events:?}");
        let mut partial = chat.clone();
        partial.apply(&events[0], Some(id));
        let rest = partial.handle(id, cmd, &p, &ctx).unwrap();
        assert_eq!(rest, events[1..], "the rest of the command");
        partial.apply(&rest[0], Some(id));
        assert!(
            partial.handle(id, cmd, &p, &ctx).unwrap().is_empty(),
            "once"
        );
        partial
    };

    // A session's start and its first message.
    let start = Command::StartSession {
        context: Default::default(),
        parent_chat_id: None,
        message: Some("hello".into()),
    };
    let chat = rest_after_first(Chat::default(), Uuid::now_v7(), &start);
    assert_eq!(chat.pending.len(), 1, "the message waits for its run");
    assert_eq!(names(&drive(chat, &p)).last(), Some(&"run.completed"));

    // A cancel that starts the queued run to cancel it.
    let queued = given(&[
        Event::SessionStarted(SessionStarted::default()),
        Event::MessageUser(MessageUser {
            text: "hi".into(),
            client_msg_id: None,
        }),
    ]);
    let cancel = Command::Cancel {
        reason: String::new(),
    };
    let chat = rest_after_first(queued, Uuid::now_v7(), &cancel);
    assert!(chat.run.is_none(), "cancelled");
}
