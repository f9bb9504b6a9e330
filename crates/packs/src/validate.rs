//! Validation of a parsed pack: every rule says where (a path inside the file) and what was
//! expected. Serde already refused unknown fields and wrong types.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use crate::{
    BUILTIN_TOOLS, Children, Condition, MAX_CHILDREN, MAX_TOOL_TIMEOUT_MS, MAX_TURNS_LIMIT, Pack,
    Pattern, TERMINATE,
};

/// `(path, message)` of the first problem.
type Problem = (String, String);

fn fail<T>(path: impl Into<String>, message: impl Into<String>) -> Result<T, Problem> {
    Err((path.into(), message.into()))
}

fn token(path: &str, what: &'static str, value: &str) -> Result<(), Problem> {
    mozaiks_events::ids::check_token(what, value).or_else(|e| fail(path, e.to_string()))
}

pub(crate) fn pack(pack: &Pack, folder_name: &str) -> Result<(), Problem> {
    token("name", "workflow name", &pack.name)?;
    if pack.name != folder_name {
        return fail(
            "name",
            format!(
                "is {:?} but the folder is {folder_name:?}; they must be equal",
                pack.name
            ),
        );
    }
    if pack.max_turns == 0 || pack.max_turns > MAX_TURNS_LIMIT {
        return fail(
            "max_turns",
            format!("must be 1 to {MAX_TURNS_LIMIT}, got {}", pack.max_turns),
        );
    }
    if pack.agents.is_empty() {
        return fail("agents", "a pack needs at least one agent");
    }
    let mut seen = HashSet::new();
    for (i, a) in pack.agents.iter().enumerate() {
        let path = format!("agents[{i}].name");
        token(&path, "agent name", &a.name)?;
        if a.name == TERMINATE {
            return fail(path, "\"terminate\" is reserved");
        }
        if !seen.insert(a.name.as_str()) {
            return fail(path, format!("duplicate agent {:?}", a.name));
        }
    }
    tools(pack)?;
    auto(pack)?;
    for (i, c) in pack.terminate_when.iter().enumerate() {
        condition(&format!("terminate_when[{i}]"), c)?;
    }
    for (i, a) in pack.agents.iter().enumerate() {
        let at = |rest: &str| format!("agents[{i}].{rest}");
        if let Some(target) = &a.handoff.after_work {
            if pack.pattern == Pattern::RoundRobin {
                return fail(
                    at("handoff.after_work"),
                    "is not used with pattern round_robin (agents speak in declaration order); remove it or use pattern sequential",
                );
            }
            target_ok(pack, &at("handoff.after_work"), target)?;
        }
        for (j, h) in a.handoff.conditions.iter().enumerate() {
            condition(&at(&format!("handoff.conditions[{j}].when")), &h.when)?;
            target_ok(
                pack,
                &at(&format!("handoff.conditions[{j}].target")),
                &h.target,
            )?;
        }
        let mut listed = HashSet::new();
        for (j, t) in a.tools.iter().enumerate() {
            let path = at(&format!("tools[{j}]"));
            if a.human_input {
                return fail(
                    path,
                    "a human_input agent does not call tools (the user answers for it)",
                );
            }
            if !BUILTIN_TOOLS.contains(&t.as_str()) && pack.tool(t).is_none() {
                return fail(
                    path,
                    format!(
                        "unknown tool {t:?}; expected one of the pack's tools ({}) or a built-in ({})",
                        quoted(pack.tools.iter().map(|t| t.name.as_str())),
                        quoted(BUILTIN_TOOLS.into_iter())
                    ),
                );
            }
            if !listed.insert(t.as_str()) {
                return fail(path, format!("tool {t:?} is listed twice"));
            }
        }
        structured(pack, i)?;
        if let Some(c) = &a.children {
            if a.human_input {
                return fail(
                    at("children"),
                    "a human_input agent does not spawn children (the user answers for it)",
                );
            }
            children_spec(&at("children"), c)?;
        }
        for (j, c) in a.offline.tool_calls.iter().enumerate() {
            let path = at(&format!("offline.tool_calls[{j}]"));
            if !a.tools.contains(&c.tool) {
                return fail(
                    format!("{path}.tool"),
                    format!(
                        "the agent does not list tool {:?} in its tools ({})",
                        c.tool,
                        quoted(a.tools.iter().map(String::as_str))
                    ),
                );
            }
            if !c.arguments.is_object() {
                return fail(
                    format!("{path}.arguments"),
                    "expected an object of arguments",
                );
            }
        }
    }
    if pack.agent(&pack.start_agent).is_none() {
        return fail(
            "start_agent",
            format!(
                "unknown agent {:?}; expected one of {}",
                pack.start_agent,
                agent_names(pack)
            ),
        );
    }
    Ok(())
}

/// `pattern: auto`: two agents at least; its settings only with it; offline selector answers
/// that name agents.
fn auto(pack: &Pack) -> Result<(), Problem> {
    let is_auto = pack.pattern == Pattern::Auto;
    if is_auto && pack.agents.len() < 2 {
        return fail(
            "pattern",
            "auto chooses the next speaker among the agents; it needs at least two (use sequential for one agent)",
        );
    }
    if let Some(m) = &pack.selector_model {
        if !is_auto {
            return fail(
                "selector_model",
                "is only used with pattern auto (it is the speaker-selection model)",
            );
        }
        if m.trim().is_empty() {
            return fail("selector_model", "expected a model name");
        }
    }
    for (i, a) in pack.agents.iter().enumerate() {
        let Some(next) = &a.offline.next_speaker else {
            continue;
        };
        let path = format!("agents[{i}].offline.next_speaker");
        if !is_auto {
            return fail(
                path,
                "is only used with pattern auto (the offline speaker selector's answer)",
            );
        }
        if !next.contains('{') && pack.agent(next.trim()).is_none() {
            return fail(
                path,
                format!(
                    "unknown agent {next:?}; expected one of {} or a template like \"{{context.KEY}}\"",
                    agent_names(pack)
                ),
            );
        }
    }
    Ok(())
}

/// Placeholders of the offline model's templates.
const TEMPLATE_MARKS: [&str; 4] = ["{input}", "{agent}", "{context.", "{tool."];

/// An agent's `output_schema`, `output_into` and its offline reply.
fn structured(pack: &Pack, i: usize) -> Result<(), Problem> {
    let a = &pack.agents[i];
    let at = |rest: &str| format!("agents[{i}].{rest}");
    let Some(schema) = &a.output_schema else {
        if a.output_into.is_some() {
            return fail(
                at("output_into"),
                "needs `output_schema` (it receives the structured output)",
            );
        }
        return Ok(());
    };
    if a.human_input {
        return fail(
            at("output_schema"),
            "a human_input agent's message is the user's text; output_schema needs a model",
        );
    }
    crate::output::check_schema(&at("output_schema"), schema).or_else(|(p, m)| fail(p, m))?;
    if let Some(var) = &a.output_into {
        token(&at("output_into"), "context variable", var)?;
    }
    if let Some(reply) = &a.offline.reply {
        let value: serde_json::Value = serde_json::from_str(reply).or_else(|e| {
            fail(
                at("offline.reply"),
                format!(
                    "an agent with output_schema replies JSON (templates go inside strings): {e}"
                ),
            )
        })?;
        if !TEMPLATE_MARKS.iter().any(|m| reply.contains(m)) {
            crate::output::validate(schema, &value).or_else(|e| {
                fail(
                    at("offline.reply"),
                    format!("does not match output_schema: {e}"),
                )
            })?;
        }
    }
    Ok(())
}

fn tools(pack: &Pack) -> Result<(), Problem> {
    let mut seen = HashSet::new();
    for (i, t) in pack.tools.iter().enumerate() {
        let at = |rest: &str| format!("tools[{i}].{rest}");
        token(&at("name"), "tool name", &t.name)?;
        if BUILTIN_TOOLS.contains(&t.name.as_str()) {
            return fail(
                at("name"),
                format!("{:?} is a built-in tool; choose another name", t.name),
            );
        }
        if !seen.insert(t.name.as_str()) {
            return fail(at("name"), format!("duplicate tool {:?}", t.name));
        }
        if t.parameters.get("type").and_then(|v| v.as_str()) != Some("object") {
            return fail(
                at("parameters"),
                "expected a JSON Schema of an object (`type: object`)",
            );
        }
        if let Some(var) = &t.sets_context {
            token(&at("sets_context"), "context variable", var)?;
        }
        if let Some(p) = &t.plugin {
            if t.lookup.is_some() || t.http.is_some() {
                return fail(
                    format!("tools[{i}]"),
                    "expected exactly one of `lookup`, `http` or `plugin`",
                );
            }
            let ok = !p.is_empty()
                && p.len() <= 64
                && p.bytes().all(|b| {
                    b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-'
                });
            if !ok {
                return fail(
                    at("plugin"),
                    format!("{p:?} is not a plugin name (1 to 64 of a-z, 0-9, '_', '-')"),
                );
            }
            continue;
        }
        match (&t.lookup, &t.http) {
            (Some(_), Some(_)) | (None, None) => {
                return fail(
                    format!("tools[{i}]"),
                    "expected exactly one of `lookup`, `http` or `plugin`",
                );
            }
            (Some(l), None) => {
                let declared = t
                    .parameters
                    .get("properties")
                    .and_then(|p| p.get(&l.argument))
                    .is_some();
                if !declared {
                    return fail(
                        at("lookup.argument"),
                        format!(
                            "{:?} is not a property of the tool's parameters",
                            l.argument
                        ),
                    );
                }
                if l.table.is_empty() {
                    return fail(at("lookup.table"), "expected at least one entry");
                }
            }
            (None, Some(h)) => {
                if !(h.url.starts_with("http://") || h.url.starts_with("https://")) {
                    return fail(
                        at("http.url"),
                        format!("expected an http:// or https:// URL, got {:?}", h.url),
                    );
                }
                if h.timeout_ms == 0 || h.timeout_ms > MAX_TOOL_TIMEOUT_MS {
                    return fail(
                        at("http.timeout_ms"),
                        format!("must be 1 to {MAX_TOOL_TIMEOUT_MS}, got {}", h.timeout_ms),
                    );
                }
            }
        }
    }
    Ok(())
}

fn children_spec(path: &str, c: &Children) -> Result<(), Problem> {
    token(&format!("{path}.workflow"), "workflow name", &c.workflow)?;
    token(&format!("{path}.into"), "context variable", &c.into)?;
    match (c.count, c.inputs.is_empty()) {
        (Some(_), false) | (None, true) => {
            fail(path, "expected exactly one of `count` or `inputs`")
        }
        (Some(n), true) => {
            if n == 0 || n as usize > MAX_CHILDREN {
                return fail(
                    format!("{path}.count"),
                    format!("must be 1 to {MAX_CHILDREN}, got {n}"),
                );
            }
            Ok(())
        }
        (None, false) => {
            if c.inputs.len() > MAX_CHILDREN {
                return fail(
                    format!("{path}.inputs"),
                    format!("at most {MAX_CHILDREN} children, got {}", c.inputs.len()),
                );
            }
            if let Some(j) = c.inputs.iter().position(|i| i.trim().is_empty()) {
                return fail(
                    format!("{path}.inputs[{j}]"),
                    "expected a non-empty message for the child",
                );
            }
            Ok(())
        }
    }
}

/// Checks across a catalog: every `children.workflow` is a pack of it, and no pack spawns
/// itself, directly or through others. `(pack, path, message)` of the first problem.
pub(crate) fn children(
    packs: &BTreeMap<String, Arc<Pack>>,
) -> Result<(), (String, String, String)> {
    for (name, pack) in packs {
        for (i, a) in pack.agents.iter().enumerate() {
            let Some(c) = &a.children else { continue };
            let path = format!("agents[{i}].children.workflow");
            if !packs.contains_key(&c.workflow) {
                return Err((
                    name.clone(),
                    path,
                    format!(
                        "unknown workflow {:?}; expected one of {}",
                        c.workflow,
                        quoted(packs.keys().map(String::as_str))
                    ),
                ));
            }
            // Depth-first through the packs the child spawns in turn.
            let mut stack = vec![(
                c.workflow.as_str(),
                vec![name.as_str(), c.workflow.as_str()],
            )];
            let mut seen = HashSet::new();
            while let Some((w, trail)) = stack.pop() {
                if w == name {
                    return Err((
                        name.clone(),
                        path,
                        format!("child workflows form a cycle: {}", trail.join(" -> ")),
                    ));
                }
                if !seen.insert(w) {
                    continue;
                }
                let Some(p) = packs.get(w) else { continue };
                for next in p.agents.iter().filter_map(|a| a.children.as_ref()) {
                    let mut t = trail.clone();
                    t.push(next.workflow.as_str());
                    stack.push((next.workflow.as_str(), t));
                }
            }
        }
    }
    Ok(())
}

fn condition(path: &str, c: &Condition) -> Result<(), Problem> {
    match (&c.var, &c.keyword) {
        (Some(_), Some(_)) | (None, None) => {
            fail(path, "expected exactly one of `var` or `keyword`")
        }
        (None, Some(k)) => {
            if k.is_empty() {
                return fail(format!("{path}.keyword"), "expected a non-empty keyword");
            }
            if c.equals.is_some() || c.one_of.is_some() || c.exists.is_some() {
                return fail(
                    path,
                    "`equals`, `in` and `exists` go with `var`, not `keyword`",
                );
            }
            Ok(())
        }
        (Some(var), None) => {
            for part in var.split('.') {
                token(&format!("{path}.var"), "context variable", part)?;
            }
            let tests = [c.equals.is_some(), c.one_of.is_some(), c.exists.is_some()];
            if tests.iter().filter(|t| **t).count() != 1 {
                return fail(
                    path,
                    "expected exactly one of `equals`, `in` or `exists` with `var`",
                );
            }
            Ok(())
        }
    }
}

fn target_ok(pack: &Pack, path: &str, target: &str) -> Result<(), Problem> {
    if target != TERMINATE && pack.agent(target).is_none() {
        return fail(
            path,
            format!(
                "unknown agent {target:?}; expected one of {} or \"terminate\"",
                agent_names(pack)
            ),
        );
    }
    Ok(())
}

fn quoted<'a>(names: impl Iterator<Item = &'a str>) -> String {
    let v: Vec<String> = names.map(|n| format!("{n:?}")).collect();
    if v.is_empty() {
        "none".into()
    } else {
        v.join(", ")
    }
}

fn agent_names(pack: &Pack) -> String {
    quoted(pack.agents.iter().map(|a| a.name.as_str()))
}

#[cfg(test)]
mod tests {
    use crate::{Error, Pack};
    use std::path::Path;

    fn parse(text: &str) -> Result<Pack, Error> {
        Pack::parse(Path::new("w/workflow.yaml"), "w", text)
    }

    const HEAD: &str = "name: w\nstart_agent: a\n";

    /// The path of the error a pack with `body` after [`HEAD`] gets.
    fn path_of(body: &str) -> String {
        match parse(&format!("{HEAD}{body}")) {
            Ok(_) => panic!("accepted:\n{body}"),
            Err(e) => e.path,
        }
    }

    const LOOKUP: &str = "tools:\n  - name: find\n    parameters: {type: object, properties: {q: {type: string}}}\n    lookup: {argument: q, table: {x: 1}}\n";

    #[test]
    fn a_full_pack_loads() {
        let p = parse(&format!(
            "{HEAD}pattern: sequential\nterminate_when:\n  - {{keyword: DONE}}\n  - {{var: solved, equals: true}}\n{LOOKUP}  - name: web\n    http: {{method: GET, url: 'http://127.0.0.1:1/x', timeout_ms: 500}}\n    sets_context: page\nagents:\n  - name: a\n    tools: [find, web, set_context, ask_user]\n    handoff:\n      conditions:\n        - {{when: {{var: k, in: [1, 2]}}, target: b}}\n        - {{when: {{var: k, exists: true}}, target: terminate}}\n      after_work: b\n    offline:\n      tool_calls: [{{tool: find, arguments: {{q: '{{input}}'}}}}]\n      reply: ok\n  - name: b\n    human_input: true\n"
        ))
        .unwrap();
        assert_eq!(p.tools.len(), 2);
        assert!(p.agents[1].human_input);
    }

    #[test]
    fn pattern_must_be_known() {
        assert!(path_of("pattern: magic\nagents: [{name: a}]\n").starts_with("line "));
    }

    const AUTO: &str =
        "pattern: auto\nagents:\n  - {name: a, description: Greets}\n  - {name: b}\n";

    #[test]
    fn auto_chooses_among_two_agents_or_more() {
        let p = parse(&format!("{HEAD}selector_model: gpt-4o\n{AUTO}")).unwrap();
        assert_eq!(p.pattern, crate::Pattern::Auto);
        assert_eq!(p.agents[0].description, "Greets");
        let e = parse(&format!("{HEAD}pattern: auto\nagents: [{{name: a}}]\n")).unwrap_err();
        assert_eq!(e.path, "pattern");
        assert!(e.message.contains("at least two"), "{e}");
        assert_eq!(
            path_of("selector_model: gpt-4o\nagents: [{name: a}]\n"),
            "selector_model"
        );
        assert_eq!(
            path_of(&format!("selector_model: ' '\n{AUTO}")),
            "selector_model"
        );
    }

    #[test]
    fn offline_next_speaker_names_an_agent_of_an_auto_pack() {
        let with = |next: &str| {
            format!(
                "pattern: auto\nagents:\n  - {{name: a, offline: {{next_speaker: '{next}'}}}}\n  - {{name: b}}\n"
            )
        };
        assert!(parse(&format!("{HEAD}{}", with("b"))).is_ok());
        assert!(parse(&format!("{HEAD}{}", with("{context.route}"))).is_ok());
        let e = parse(&format!("{HEAD}{}", with("nobody"))).unwrap_err();
        assert_eq!(e.path, "agents[0].offline.next_speaker");
        assert!(e.message.contains("\"nobody\""), "{e}");
        assert_eq!(
            path_of("agents:\n  - {name: a, offline: {next_speaker: a}}\n"),
            "agents[0].offline.next_speaker"
        );
    }

    const SCHEMA: &str =
        "{type: object, properties: {topic: {type: string, enum: [x, y]}}, required: [topic]}";

    #[test]
    fn output_schemas_are_checked() {
        let agent = |rest: &str| format!("agents:\n  - name: a\n{rest}");
        let ok = parse(&format!(
            "{HEAD}{}",
            agent(&format!(
                "    output_schema: {SCHEMA}\n    output_into: req\n    offline: {{reply: '{{\"topic\": \"x\"}}'}}\n"
            ))
        ))
        .unwrap();
        assert_eq!(ok.agents[0].output_into.as_deref(), Some("req"));
        // templated replies are checked at run time
        assert!(
            parse(&format!(
                "{HEAD}{}",
                agent(&format!(
                    "    output_schema: {SCHEMA}\n    offline: {{reply: '{{\"topic\": \"{{input}}\"}}'}}\n"
                ))
            ))
            .is_ok()
        );
        assert_eq!(
            path_of(&agent("    output_into: req\n")),
            "agents[0].output_into"
        );
        assert_eq!(
            path_of(&agent(&format!(
                "    output_schema: {SCHEMA}\n    output_into: 'a b'\n"
            ))),
            "agents[0].output_into"
        );
        assert_eq!(
            path_of(&agent(&format!(
                "    human_input: true\n    output_schema: {SCHEMA}\n"
            ))),
            "agents[0].output_schema"
        );
        assert_eq!(
            path_of(&agent("    output_schema: {type: string}\n")),
            "agents[0].output_schema.type"
        );
        assert_eq!(
            path_of(&agent(
                "    output_schema: {type: object, properties: {a: {type: string, format: email}}, required: [a]}\n"
            )),
            "agents[0].output_schema.properties.a.format"
        );
        assert_eq!(
            path_of(&agent(&format!(
                "    output_schema: {SCHEMA}\n    offline: {{reply: not json}}\n"
            ))),
            "agents[0].offline.reply"
        );
        let e = parse(&format!(
            "{HEAD}{}",
            agent(&format!(
                "    output_schema: {SCHEMA}\n    offline: {{reply: '{{\"topic\": \"z\"}}'}}\n"
            ))
        ))
        .unwrap_err();
        assert_eq!(e.path, "agents[0].offline.reply");
        assert!(e.message.contains("$.topic"), "{e}");
    }

    #[test]
    fn condition_vars_may_be_dotted_paths() {
        assert!(
            parse(&format!(
                "{HEAD}terminate_when: [{{var: request.topic, equals: x}}]\nagents: [{{name: a}}]\n"
            ))
            .is_ok()
        );
        assert_eq!(
            path_of("terminate_when: [{var: 'request..topic', equals: x}]\nagents: [{name: a}]\n"),
            "terminate_when[0].var"
        );
    }

    #[test]
    fn round_robin_refuses_after_work() {
        assert_eq!(
            path_of(
                "pattern: round_robin\nagents:\n  - {name: a, handoff: {after_work: b}}\n  - {name: b}\n"
            ),
            "agents[0].handoff.after_work"
        );
    }

    #[test]
    fn conditions_need_exactly_one_test() {
        assert_eq!(
            path_of("terminate_when: [{}]\nagents: [{name: a}]\n"),
            "terminate_when[0]"
        );
        assert_eq!(
            path_of("terminate_when: [{var: x}]\nagents: [{name: a}]\n"),
            "terminate_when[0]"
        );
        assert_eq!(
            path_of("terminate_when: [{var: x, equals: 1, exists: true}]\nagents: [{name: a}]\n"),
            "terminate_when[0]"
        );
        assert_eq!(
            path_of("terminate_when: [{var: x, keyword: y, equals: 1}]\nagents: [{name: a}]\n"),
            "terminate_when[0]"
        );
        assert_eq!(
            path_of("terminate_when: [{keyword: y, exists: true}]\nagents: [{name: a}]\n"),
            "terminate_when[0]"
        );
        assert_eq!(
            path_of("terminate_when: [{keyword: ''}]\nagents: [{name: a}]\n"),
            "terminate_when[0].keyword"
        );
        assert_eq!(
            path_of("terminate_when: [{var: 'a b', exists: true}]\nagents: [{name: a}]\n"),
            "terminate_when[0].var"
        );
        assert!(
            path_of("terminate_when: [{var: x, like: 1}]\nagents: [{name: a}]\n")
                .starts_with("line ")
        );
    }

    #[test]
    fn handoff_conditions_are_checked() {
        assert_eq!(
            path_of(
                "agents:\n  - name: a\n    handoff: {conditions: [{when: {var: x, exists: true}, target: nobody}]}\n"
            ),
            "agents[0].handoff.conditions[0].target"
        );
        assert_eq!(
            path_of(
                "agents:\n  - name: a\n    handoff: {conditions: [{when: {var: x}, target: a}]}\n"
            ),
            "agents[0].handoff.conditions[0].when"
        );
        assert!(
            path_of("agents:\n  - name: a\n    handoff: {conditions: [{target: a}]}\n")
                .starts_with("line ")
        );
    }

    #[test]
    fn tools_are_checked() {
        let agents = "agents: [{name: a}]\n";
        // neither lookup nor http
        assert_eq!(
            path_of(&format!("tools: [{{name: t}}]\n{agents}")),
            "tools[0]"
        );
        // both
        assert_eq!(
            path_of(&format!(
                "tools:\n  - name: t\n    parameters: {{type: object, properties: {{q: {{}}}}}}\n    lookup: {{argument: q, table: {{x: 1}}}}\n    http: {{url: 'http://x'}}\n{agents}"
            )),
            "tools[0]"
        );
        assert_eq!(
            path_of(&format!(
                "tools: [{{name: set_context, http: {{url: 'http://x'}}}}]\n{agents}"
            )),
            "tools[0].name"
        );
        assert_eq!(
            path_of(&format!(
                "tools: [{{name: 'x y', http: {{url: 'http://x'}}}}]\n{agents}"
            )),
            "tools[0].name"
        );
        assert_eq!(
            path_of(&format!(
                "tools:\n  - {{name: t, http: {{url: 'http://x'}}}}\n  - {{name: t, http: {{url: 'http://x'}}}}\n{agents}"
            )),
            "tools[1].name"
        );
        assert_eq!(
            path_of(&format!(
                "tools: [{{name: t, parameters: {{type: string}}, http: {{url: 'http://x'}}}}]\n{agents}"
            )),
            "tools[0].parameters"
        );
        assert_eq!(
            path_of(&format!(
                "tools: [{{name: t, http: {{url: 'ftp://x'}}}}]\n{agents}"
            )),
            "tools[0].http.url"
        );
        // A plugin tool (issue 15): a plugin name, and nothing else beside it.
        assert_eq!(
            path_of(&format!("tools: [{{name: t, plugin: 'To Do'}}]\n{agents}")),
            "tools[0].plugin"
        );
        assert_eq!(
            path_of(&format!(
                "tools: [{{name: t, plugin: todo, http: {{url: 'http://x'}}}}]\n{agents}"
            )),
            "tools[0]"
        );
        assert_eq!(
            path_of(&format!(
                "tools: [{{name: t, http: {{url: 'http://x', timeout_ms: 0}}}}]\n{agents}"
            )),
            "tools[0].http.timeout_ms"
        );
        assert!(
            path_of(&format!(
                "tools: [{{name: t, http: {{url: 'http://x', method: FETCH}}}}]\n{agents}"
            ))
            .starts_with("line ")
        );
        assert_eq!(
            path_of(&format!(
                "tools: [{{name: t, sets_context: 'a b', http: {{url: 'http://x'}}}}]\n{agents}"
            )),
            "tools[0].sets_context"
        );
        assert_eq!(
            path_of(&format!(
                "tools: [{{name: t, lookup: {{argument: q, table: {{x: 1}}}}}}]\n{agents}"
            )),
            "tools[0].lookup.argument"
        );
        assert_eq!(
            path_of(&format!(
                "tools:\n  - name: t\n    parameters: {{type: object, properties: {{q: {{}}}}}}\n    lookup: {{argument: q, table: {{}}}}\n{agents}"
            )),
            "tools[0].lookup.table"
        );
        assert!(
            path_of(&format!(
                "tools:\n  - name: t\n    parameters: {{type: object, properties: {{q: {{}}}}}}\n    lookup: {{argument: q, table: {{x: 1}}, match: fuzzy}}\n{agents}"
            ))
            .starts_with("line ")
        );
    }

    #[test]
    fn children_are_checked() {
        let a = |c: &str| path_of(&format!("agents:\n  - name: a\n    children: {c}\n"));
        assert_eq!(a("{workflow: w2, into: r}"), "agents[0].children");
        assert_eq!(
            a("{workflow: w2, count: 2, inputs: [x], into: r}"),
            "agents[0].children"
        );
        assert_eq!(
            a("{workflow: w2, count: 0, into: r}"),
            "agents[0].children.count"
        );
        assert_eq!(
            a("{workflow: w2, count: 33, into: r}"),
            "agents[0].children.count"
        );
        assert_eq!(
            a("{workflow: w2, inputs: [x, ' '], into: r}"),
            "agents[0].children.inputs[1]"
        );
        assert_eq!(
            a("{workflow: 'a b', count: 1, into: r}"),
            "agents[0].children.workflow"
        );
        assert_eq!(
            a("{workflow: w2, count: 1, into: 'r s'}"),
            "agents[0].children.into"
        );
        assert!(a("{workflow: w2, count: 1, into: r, wait: some}").starts_with("line "));
        assert_eq!(
            path_of(
                "agents:\n  - name: a\n    human_input: true\n    children: {workflow: w2, count: 1, into: r}\n"
            ),
            "agents[0].children"
        );
        assert!(parse(&format!(
            "{HEAD}agents:\n  - name: a\n    children: {{workflow: w2, inputs: ['{{input}} 1', '{{input}} 2'], wait: any, into: r}}\n"
        ))
        .is_ok());
    }

    fn catalog(packs: &[(&str, &str)]) -> Result<(), (String, String, String)> {
        let map = packs
            .iter()
            .map(|(name, body)| {
                let text = format!("name: {name}\nstart_agent: a\nagents:\n  - name: a\n{body}");
                let p = Pack::parse(Path::new("x"), name, &text).unwrap();
                (name.to_string(), std::sync::Arc::new(p))
            })
            .collect();
        super::children(&map)
    }

    #[test]
    fn child_workflows_must_exist_and_not_cycle() {
        let spawn = |w: &str| format!("    children: {{workflow: {w}, count: 2, into: r}}\n");
        assert!(catalog(&[("p", &spawn("c")), ("c", "")]).is_ok());
        let e = catalog(&[("p", &spawn("nope")), ("c", "")]).unwrap_err();
        assert_eq!(
            (e.0.as_str(), e.1.as_str()),
            ("p", "agents[0].children.workflow")
        );
        assert!(e.2.contains("\"nope\""), "{}", e.2);
        let e = catalog(&[("p", &spawn("p"))]).unwrap_err();
        assert!(e.2.contains("cycle: p -> p"), "{}", e.2);
        let e = catalog(&[("p", &spawn("q")), ("q", &spawn("r")), ("r", &spawn("p"))]).unwrap_err();
        assert!(e.2.contains("cycle"), "{}", e.2);
    }

    #[test]
    fn agent_tools_are_checked() {
        assert_eq!(
            path_of(&format!("{LOOKUP}agents: [{{name: a, tools: [nope]}}]\n")),
            "agents[0].tools[0]"
        );
        assert_eq!(
            path_of(&format!(
                "{LOOKUP}agents: [{{name: a, tools: [find, find]}}]\n"
            )),
            "agents[0].tools[1]"
        );
        assert_eq!(
            path_of(&format!(
                "{LOOKUP}agents: [{{name: a, human_input: true, tools: [find]}}]\n"
            )),
            "agents[0].tools[0]"
        );
        assert_eq!(
            path_of(&format!(
                "{LOOKUP}agents: [{{name: a, offline: {{tool_calls: [{{tool: find}}]}}}}]\n"
            )),
            "agents[0].offline.tool_calls[0].tool"
        );
        assert_eq!(
            path_of(&format!(
                "{LOOKUP}agents: [{{name: a, tools: [find], offline: {{tool_calls: [{{tool: find, arguments: [1]}}]}}}}]\n"
            )),
            "agents[0].offline.tool_calls[0].arguments"
        );
        assert!(path_of("agents: [{name: a, human_input: maybe}]\n").starts_with("line "));
    }
}
