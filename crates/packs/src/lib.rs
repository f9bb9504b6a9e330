//! Workflow packs: `workflows/<name>/workflow.yaml`.
//!
//! A pack declares agents, the tools they may call, and how they take turns: AG2's sequential
//! handoffs (conditions on context variables, then `after_work`) or round robin, terminate
//! conditions, a turn limit, default context variables, human input, and the script the
//! built-in offline model follows. Packs are validated completely at load: a catalog is either
//! loaded whole or refused with the file, the path inside it and what was expected.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub mod output;
mod validate;

/// The file a pack lives in, inside `workflows/<name>/`.
pub const PACK_FILE: &str = "workflow.yaml";

/// A workflow pack.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Pack {
    /// Equal to the folder name; a valid token (`[A-Za-z0-9_-]`, 1 to 64).
    pub name: String,
    #[serde(default)]
    pub description: String,
    #[serde(default = "one")]
    pub version: u32,
    /// The agent that speaks first.
    pub start_agent: String,
    /// How the next speaker is chosen after a turn.
    #[serde(default)]
    pub pattern: Pattern,
    /// The model of `pattern: auto`'s speaker-selection calls; `None` uses the configured
    /// default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector_model: Option<String>,
    /// Agent turns per run, at most.
    #[serde(default = "default_max_turns")]
    pub max_turns: u32,
    /// The run ends after a turn when any of these holds.
    #[serde(default)]
    pub terminate_when: Vec<Condition>,
    /// Default context variables of every chat of this pack.
    #[serde(default)]
    pub context: serde_json::Map<String, serde_json::Value>,
    /// Tools agents may call, besides the built-in ones ([`BUILTIN_TOOLS`]).
    #[serde(default)]
    pub tools: Vec<Tool>,
    pub agents: Vec<Agent>,
}

/// How the next speaker is chosen.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Pattern {
    /// The speaking agent's handoff decides: its `conditions` in order, then `after_work`.
    #[default]
    Sequential,
    /// Agents speak in the order they are declared (a matching handoff condition still wins),
    /// until a terminate condition or `max_turns`.
    RoundRobin,
    /// AG2's `auto`: after a turn whose handoff conditions do not hold, a model chooses the next
    /// speaker from the agents' names and descriptions and the conversation. An answer that
    /// names no agent falls back to the agent's `after_work`, else to declaration order. Needs
    /// at least two agents.
    Auto,
}

/// One agent.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Agent {
    pub name: String,
    /// What the agent does, for `pattern: auto`'s speaker selection (the system message's
    /// first line when empty).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
    /// The model's instructions; for a `human_input` agent, the prompt shown to the user.
    #[serde(default)]
    pub system_message: String,
    /// Model name for the OpenAI-compatible provider; `None` uses the configured default.
    #[serde(default)]
    pub model: Option<String>,
    /// Names of the tools this agent may call: the pack's `tools` or built-in ones.
    #[serde(default)]
    pub tools: Vec<String>,
    /// The agent is the user: its turn asks for input (`input.requested`) and the user's
    /// answer (`input.response`) is its message. No model is called.
    #[serde(default)]
    pub human_input: bool,
    #[serde(default)]
    pub handoff: Handoff,
    /// Child workflows this agent fans out on its turn, before it speaks: their outputs are in
    /// the context variable `into` when its model is called.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub children: Option<Children>,
    /// The agent answers with JSON matching this schema (the subset in [`output`]); the value
    /// is the `structured` field of its `agent.message`. A reply that does not match is retried
    /// once with the error in the prompt, then the run fails (`invalid_structured_output`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_schema: Option<serde_json::Value>,
    /// The context variable that receives the structured output (needs `output_schema`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_into: Option<String>,
    /// What the built-in offline model answers for this agent.
    #[serde(default)]
    pub offline: OfflineScript,
}

/// Child workflows of an agent's turn: each child is a chat of `workflow` (with the parent's
/// user and app, and `parent_chat_id`) whose first message is one of `inputs` (or the parent's
/// input, `count` times). They run in parallel (at most the app's `max_parallel_children` at
/// once); when `wait` is satisfied their outputs, in `inputs` order, go into the context variable
/// `into` as a list of `{input, status, output}`, and the agent speaks.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Children {
    /// The child workflow pack (another pack of the catalog).
    pub workflow: String,
    /// Spawn this many children, each with the parent's input (1 to [`MAX_CHILDREN`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<u32>,
    /// One child per entry, whose first message is the entry: a template like the offline
    /// model's (`{input}`, `{context.KEY}`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub inputs: Vec<String>,
    /// `all` (the default): continue once every child ended; `any`: once the first ended (the
    /// others are cancelled).
    #[serde(default)]
    pub wait: Wait,
    /// The context variable that receives the results.
    pub into: String,
}

/// When a fan-out is over.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Wait {
    #[default]
    All,
    Any,
}

impl Children {
    /// The input templates, one per child.
    pub fn templates(&self) -> Vec<String> {
        match self.count {
            Some(n) => vec!["{input}".to_string(); n as usize],
            None => self.inputs.clone(),
        }
    }
}

/// Who speaks after an agent (AG2's OnContextCondition, then after-work).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Handoff {
    /// Evaluated in order after the agent's turn; the first that holds picks the next agent.
    #[serde(default)]
    pub conditions: Vec<ConditionalHandoff>,
    /// The next agent when no condition holds, or `terminate` (the default).
    #[serde(default)]
    pub after_work: Option<String>,
}

/// A handoff taken when a condition holds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ConditionalHandoff {
    pub when: Condition,
    /// An agent, or `terminate`.
    pub target: String,
}

/// A condition on a context variable (`var` with exactly one of `equals`, `in`, `exists`) or on
/// the agent's message (`keyword`: the message contains it). `var` may be a dotted path into an
/// object variable, e.g. `request.topic`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Condition {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub var: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub equals: Option<serde_json::Value>,
    #[serde(default, rename = "in", skip_serializing_if = "Option::is_none")]
    pub one_of: Option<Vec<serde_json::Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exists: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keyword: Option<String>,
}

impl Condition {
    /// Whether the condition holds for these context variables and the agent's message.
    pub fn holds(
        &self,
        context: &serde_json::Map<String, serde_json::Value>,
        message: &str,
    ) -> bool {
        if let Some(k) = &self.keyword {
            return message.contains(k.as_str());
        }
        let Some(var) = &self.var else { return false };
        let value = context_path(context, var);
        if let Some(want) = &self.equals {
            return value == Some(want);
        }
        if let Some(set) = &self.one_of {
            return value.is_some_and(|v| set.contains(v));
        }
        if let Some(exists) = self.exists {
            return value.is_some_and(|v| !v.is_null()) == exists;
        }
        false
    }
}

/// The value at a dotted path of context variables (`request.topic`: the `topic` property of
/// the variable `request`).
pub fn context_path<'a>(
    context: &'a serde_json::Map<String, serde_json::Value>,
    path: &str,
) -> Option<&'a serde_json::Value> {
    let mut parts = path.split('.');
    let mut value = context.get(parts.next()?)?;
    for p in parts {
        value = value.get(p)?;
    }
    Some(value)
}

/// Built-in tools every agent may list in `tools`.
pub const BUILTIN_TOOLS: [&str; 2] = [SET_CONTEXT, ASK_USER];
/// `set_context {key, value}`: sets a context variable of the chat.
pub const SET_CONTEXT: &str = "set_context";
/// `ask_user {question}`: asks the user (`input.requested`); the answer is the tool's result.
pub const ASK_USER: &str = "ask_user";

/// A tool declared in the pack: exactly one of `lookup`, `http` or `plugin`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Tool {
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// JSON Schema of the arguments (an object schema), sent to the model as is.
    #[serde(default = "object_schema")]
    pub parameters: serde_json::Value,
    /// A deterministic lookup in a table declared here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lookup: Option<Lookup>,
    /// An HTTP endpoint called with the arguments.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpTool>,
    /// A plugin (`plugins/<name>` or the app's upload) run with the arguments as its input and
    /// the chat's app and user as its `_context`; its JSON answer is the result.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plugin: Option<String>,
    /// A successful result is also stored in this context variable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sets_context: Option<String>,
}

/// A lookup tool: the value of the table entry that matches the argument.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Lookup {
    /// The argument looked up (a property of `parameters`).
    pub argument: String,
    pub table: BTreeMap<String, serde_json::Value>,
    /// `exact` (the default): the key equals the argument; `contains`: the longest key that the
    /// argument contains, case-insensitive (ties: the first in alphabetical order).
    #[serde(default, rename = "match")]
    pub matching: Matching,
    /// The result when nothing matches; without it, no match is a tool error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default: Option<serde_json::Value>,
}

/// How a lookup matches.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Matching {
    #[default]
    Exact,
    Contains,
}

impl Lookup {
    /// The lookup's answer for `arguments`.
    pub fn run(&self, arguments: &serde_json::Value) -> Result<serde_json::Value, String> {
        let arg = match arguments.get(&self.argument) {
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(v) if !v.is_null() => v.to_string(),
            _ => return Err(format!("missing argument {:?}", self.argument)),
        };
        let found = match self.matching {
            Matching::Exact => self.table.get(&arg),
            Matching::Contains => {
                let hay = arg.to_lowercase();
                let mut best: Option<(&String, &serde_json::Value)> = None;
                for (k, v) in &self.table {
                    if hay.contains(&k.to_lowercase())
                        && best.is_none_or(|(b, _)| k.len() > b.len())
                    {
                        best = Some((k, v));
                    }
                }
                best.map(|(_, v)| v)
            }
        };
        found
            .or(self.default.as_ref())
            .cloned()
            .ok_or_else(|| format!("no entry for {arg:?}"))
    }
}

/// An HTTP tool. `GET` and `DELETE` send the arguments as query parameters, the other methods
/// as a JSON body. A 2xx answer is the result (JSON, or text); anything else is a tool error.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HttpTool {
    #[serde(default)]
    pub method: HttpMethod,
    /// `http://` or `https://`.
    pub url: String,
    /// The call fails with a tool error after this long (1 to 300000).
    #[serde(default = "default_tool_timeout")]
    pub timeout_ms: u64,
    /// Extra request headers.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "UPPERCASE")]
pub enum HttpMethod {
    Get,
    #[default]
    Post,
    Put,
    Patch,
    Delete,
}

/// The script of the built-in offline model for one agent.
///
/// The first model call of a turn returns `tool_calls` (if any); the next one returns `reply`.
/// Templates: `{input}` is the user's last message, `{agent}` the agent's name,
/// `{context.KEY}` a context variable (or a dotted path into one), `{tool.NAME}` the result of
/// the turn's call of tool NAME. For an agent with an `output_schema`, `reply` is JSON whose
/// strings are templates (without `reply`, the smallest value matching the schema).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct OfflineScript {
    #[serde(default)]
    pub reply: Option<String>,
    #[serde(default)]
    pub tool_calls: Vec<ScriptedCall>,
    /// With `pattern: auto`: the offline selector's answer after this agent's turn, a template
    /// (e.g. `"{context.request.topic}"`) that should name an agent. Without it, the next agent
    /// in declaration order.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_speaker: Option<String>,
}

/// A tool call of the offline model. String values in `arguments` are templates.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ScriptedCall {
    pub tool: String,
    #[serde(default = "empty_object")]
    pub arguments: serde_json::Value,
}

fn one() -> u32 {
    1
}
fn default_max_turns() -> u32 {
    8
}
fn default_tool_timeout() -> u64 {
    10_000
}
fn object_schema() -> serde_json::Value {
    serde_json::json!({"type": "object", "properties": {}})
}
fn empty_object() -> serde_json::Value {
    serde_json::json!({})
}

/// The target that ends a run.
pub const TERMINATE: &str = "terminate";
/// Most turns a pack may allow.
pub const MAX_TURNS_LIMIT: u32 = 100;
/// Longest HTTP tool timeout.
pub const MAX_TOOL_TIMEOUT_MS: u64 = 300_000;
/// Most children one agent turn may spawn.
pub const MAX_CHILDREN: usize = 32;

/// Why a pack was refused. Shown as `{file}: {path}: {message}`, or `{file}: {message}` when
/// the error is about the file or folder as a whole.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}: {}{message}", file.display(), at(path))]
pub struct Error {
    pub file: PathBuf,
    /// Where in the file, e.g. `agents[1].handoff.after_work`, or `line 4 column 3`; empty for
    /// the whole file or folder (it cannot be read, a folder has no packs).
    pub path: String,
    pub message: String,
}

/// `"{path}: "`, or nothing for an empty path.
fn at(path: &str) -> String {
    if path.is_empty() {
        String::new()
    } else {
        format!("{path}: ")
    }
}

impl Pack {
    pub fn agent(&self, name: &str) -> Option<&Agent> {
        self.agents.iter().find(|a| a.name == name)
    }

    pub fn tool(&self, name: &str) -> Option<&Tool> {
        self.tools.iter().find(|t| t.name == name)
    }

    /// Parses and validates a pack from YAML text.
    pub fn parse(file: &Path, folder_name: &str, text: &str) -> Result<Pack, Error> {
        // YAML's `.nan` and `.inf` have no JSON form: inside the JSON values a pack holds
        // (conditions, context, tool parameters, tables) they would silently become `null`.
        if let Ok(tree) = serde_norway::from_str::<serde_norway::Value>(text)
            && let Some(path) = non_finite(&tree, &mut String::new())
        {
            return Err(Error {
                file: file.to_path_buf(),
                path,
                message: "not a finite number (.nan and .inf have no JSON form)".into(),
            });
        }
        let pack: Pack = serde_norway::from_str(text).map_err(|e| {
            let at = e
                .location()
                .map(|l| format!("line {} column {}", l.line(), l.column()))
                .unwrap_or_else(|| "document".into());
            Error {
                file: file.to_path_buf(),
                path: at,
                message: e.to_string(),
            }
        })?;
        validate::pack(&pack, folder_name).map_err(|(path, message)| Error {
            file: file.to_path_buf(),
            path,
            message,
        })?;
        Ok(pack)
    }
}

/// The path of the first non-finite number in a YAML tree (`agents[0].offline.reply`).
fn non_finite(v: &serde_norway::Value, path: &mut String) -> Option<String> {
    use serde_norway::Value;
    let under = |path: &mut String, step: String, v: &Value| {
        let len = path.len();
        path.push_str(&step);
        let found = non_finite(v, path);
        path.truncate(len);
        found
    };
    match v {
        Value::Number(n) => n.as_f64().filter(|f| !f.is_finite()).map(|_| path.clone()),
        Value::Sequence(items) => items
            .iter()
            .enumerate()
            .find_map(|(i, x)| under(path, format!("[{i}]"), x)),
        Value::Mapping(m) => m.iter().find_map(|(k, x)| {
            let key = match k {
                Value::String(s) => s.clone(),
                other => serde_norway::to_string(other)
                    .unwrap_or_default()
                    .trim()
                    .to_string(),
            };
            let step = if path.is_empty() {
                key
            } else {
                format!(".{key}")
            };
            under(path, step, x)
        }),
        Value::Tagged(t) => non_finite(&t.value, path),
        _ => None,
    }
}

/// Every loaded pack, by name. Cheap to clone.
#[derive(Clone, Debug, Default)]
pub struct Catalog {
    packs: Arc<BTreeMap<String, Arc<Pack>>>,
}

impl Catalog {
    /// Loads every `*/workflow.yaml` under `dir`. Any invalid pack refuses the whole catalog.
    pub fn load_dir(dir: &Path) -> Result<Catalog, Error> {
        let io = |e: std::io::Error| Error {
            file: dir.to_path_buf(),
            path: String::new(),
            message: e.to_string(),
        };
        let mut folders: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(io)?
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| p.join(PACK_FILE).is_file())
            .collect();
        folders.sort();
        let mut packs = BTreeMap::new();
        for folder in folders {
            let file = folder.join(PACK_FILE);
            let text = std::fs::read_to_string(&file).map_err(|e| Error {
                file: file.clone(),
                path: String::new(),
                message: e.to_string(),
            })?;
            let folder_name = folder
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .to_string();
            let pack = Pack::parse(&file, &folder_name, &text)?;
            packs.insert(pack.name.clone(), Arc::new(pack));
        }
        if packs.is_empty() {
            return Err(Error {
                file: dir.to_path_buf(),
                path: String::new(),
                message: format!("no workflow packs found (expected <name>/{PACK_FILE})"),
            });
        }
        validate::children(&packs).map_err(|(name, path, message)| Error {
            file: dir.join(&name).join(PACK_FILE),
            path,
            message,
        })?;
        Ok(Catalog {
            packs: Arc::new(packs),
        })
    }

    /// A catalog from packs already parsed (tests, tools).
    pub fn from_packs(packs: impl IntoIterator<Item = Pack>) -> Catalog {
        Catalog {
            packs: Arc::new(
                packs
                    .into_iter()
                    .map(|p| (p.name.clone(), Arc::new(p)))
                    .collect(),
            ),
        }
    }

    pub fn get(&self, name: &str) -> Option<Arc<Pack>> {
        self.packs.get(name).cloned()
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.packs.keys().map(String::as_str)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<Pack>> {
        self.packs.values()
    }

    pub fn len(&self) -> usize {
        self.packs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.packs.is_empty()
    }
}

/// The JSON Schema of a pack file.
pub fn schema() -> String {
    serde_json::to_string_pretty(&schemars::schema_for!(Pack)).unwrap_or_default() + "\n"
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Pack, Error> {
        Pack::parse(Path::new("w/workflow.yaml"), "w", text)
    }

    const OK: &str = "name: w\nstart_agent: a\nagents:\n  - name: a\n    handoff: {after_work: b}\n  - name: b\n";

    #[test]
    fn a_valid_pack_loads() {
        let p = parse(OK).unwrap();
        assert_eq!(p.agents.len(), 2);
        assert_eq!(p.max_turns, 8);
    }

    #[test]
    fn errors_say_where_and_what() {
        let e = parse("name: w\nstart_agent: z\nagents:\n  - name: a\n").unwrap_err();
        assert_eq!(e.path, "start_agent");
        let e = parse(
            "name: w\nstart_agent: a\nagents:\n  - name: a\n    handoff: {after_work: nobody}\n",
        )
        .unwrap_err();
        assert_eq!(e.path, "agents[0].handoff.after_work");
        let e = parse("name: other\nstart_agent: a\nagents:\n  - name: a\n").unwrap_err();
        assert_eq!(e.path, "name");
        let e = parse("name: w\nstart_agent: a\nagents: []\n").unwrap_err();
        assert_eq!(e.path, "agents");
        let e = parse("name: w\nstart_agent: a\nmax_turns: 0\nagents:\n  - name: a\n").unwrap_err();
        assert_eq!(e.path, "max_turns");
        let e = parse("name: w\nstart_agent: a\nagents:\n  - name: a\n  - name: a\n").unwrap_err();
        assert_eq!(e.path, "agents[1].name");
        let e = parse("name: w\nstart_agent: a\nagentz: []\n").unwrap_err();
        assert!(e.path.starts_with("line "), "{e}");
        let e =
            parse("name: w\nstart_agent: a\nagents:\n  - name: a\n    color: red\n").unwrap_err();
        assert!(e.message.contains("color"), "{e}");
    }

    #[test]
    fn yaml_errors_give_the_line_column_and_the_field_path() {
        let e =
            parse("name: w\nstart_agent: a\nagents:\n  - name: a\n    color: red\n").unwrap_err();
        assert_eq!(e.path, "line 5 column 5", "{e}");
        assert!(
            e.message.starts_with("agents[0]: unknown field `color`"),
            "{e}"
        );
        let e = parse("name: w\nstart_agent: a\nmax_turns: many\nagents: []\n").unwrap_err();
        assert_eq!(e.path, "line 3 column 12", "{e}");
        assert!(e.message.starts_with("max_turns: invalid type"), "{e}");
    }

    #[test]
    fn conditions_hold_on_context_and_keywords() {
        let ctx: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(r#"{"k": "billing", "n": null}"#).unwrap();
        let c = |yaml: &str| serde_norway::from_str::<Condition>(yaml).unwrap();
        assert!(c("{var: k, equals: billing}").holds(&ctx, ""));
        assert!(!c("{var: k, equals: tech}").holds(&ctx, ""));
        assert!(c("{var: k, in: [tech, billing]}").holds(&ctx, ""));
        assert!(c("{var: k, exists: true}").holds(&ctx, ""));
        assert!(c("{var: n, exists: false}").holds(&ctx, ""));
        assert!(c("{var: zz, exists: false}").holds(&ctx, ""));
        assert!(c("{keyword: DONE}").holds(&ctx, "all DONE here"));
        assert!(!c("{keyword: DONE}").holds(&ctx, "not yet"));
    }

    #[test]
    fn conditions_follow_dotted_paths_into_objects() {
        let ctx: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(r#"{"req": {"topic": "dining", "n": {"k": 1}}}"#).unwrap();
        let c = |yaml: &str| serde_norway::from_str::<Condition>(yaml).unwrap();
        assert!(c("{var: req.topic, equals: dining}").holds(&ctx, ""));
        assert!(c("{var: req.n.k, in: [1, 2]}").holds(&ctx, ""));
        assert!(c("{var: req.missing, exists: false}").holds(&ctx, ""));
        assert!(!c("{var: req.topic.deeper, exists: true}").holds(&ctx, ""));
    }

    #[test]
    fn lookups_match_exactly_or_by_the_longest_contained_key() {
        let l: Lookup = serde_norway::from_str(
            "{argument: q, match: contains, table: {card: a, credit card: b}, default: none}",
        )
        .unwrap();
        let q = |s: &str| serde_json::json!({ "q": s });
        assert_eq!(l.run(&q("My Credit Card broke")).unwrap(), "b");
        assert_eq!(l.run(&q("card")).unwrap(), "a");
        assert_eq!(l.run(&q("other")).unwrap(), "none");
        assert!(l.run(&serde_json::json!({})).is_err());
        let exact: Lookup = serde_norway::from_str("{argument: q, table: {A1: 1}}").unwrap();
        assert_eq!(exact.run(&q("A1")).unwrap(), 1);
        assert!(exact.run(&q("A2")).unwrap_err().contains("A2"));
    }

    #[test]
    fn shipped_packs_are_valid() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../workflows");
        let c = Catalog::load_dir(&dir).unwrap();
        assert!(c.len() >= 2);
    }

    #[test]
    fn one_bad_pack_refuses_the_catalog() {
        let dir = std::env::temp_dir().join(format!("mz-packs-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("good")).unwrap();
        std::fs::create_dir_all(dir.join("bad")).unwrap();
        std::fs::write(
            dir.join("good/workflow.yaml"),
            OK.replace("name: w", "name: good"),
        )
        .unwrap();
        std::fs::write(dir.join("bad/workflow.yaml"), "name: bad\nagents: 3\n").unwrap();
        let e = Catalog::load_dir(&dir).unwrap_err();
        assert!(e.file.ends_with("bad/workflow.yaml"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn errors_about_a_whole_folder_or_file_have_no_empty_path_segment() {
        let dir = std::env::temp_dir().join(format!("mz-packs-empty-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let empty = Catalog::load_dir(&dir).unwrap_err();
        let missing = Catalog::load_dir(&dir.join("absent")).unwrap_err();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(
            empty.to_string(),
            format!(
                "{}: no workflow packs found (expected <name>/workflow.yaml)",
                dir.display()
            )
        );
        let text = missing.to_string();
        assert!(
            text.starts_with(&format!("{}: ", dir.join("absent").display())),
            "{text}"
        );
        assert!(!text.contains(": :"), "{text}");
        // A path keeps its segment.
        let e = parse("name: w\nstart_agent: z\nagents:\n  - name: a\n").unwrap_err();
        assert!(
            e.to_string().starts_with("w/workflow.yaml: start_agent: "),
            "{e}"
        );
    }

    #[test]
    fn non_finite_numbers_are_refused_with_their_path() {
        // Found by fuzzing (pack_mutated): `.nan` became `null` and read as a test for null.
        let yaml = "name: p\nstart_agent: a\nagents:\n  - name: a\nterminate_when:\n  - {var: handled, equals: .nan}\n";
        let e = Pack::parse(Path::new("p/workflow.yaml"), "p", yaml).unwrap_err();
        assert_eq!(e.path, "terminate_when[0].equals");
        assert!(e.message.contains("finite"), "{}", e.message);
        let yaml = "name: p\nstart_agent: a\ncontext:\n  limit: -.inf\nagents:\n  - name: a\n";
        let e = Pack::parse(Path::new("p/workflow.yaml"), "p", yaml).unwrap_err();
        assert_eq!(e.path, "context.limit");
        // Finite floats are fine.
        let yaml = "name: p\nstart_agent: a\ncontext:\n  limit: 1.5\nagents:\n  - name: a\n";
        Pack::parse(Path::new("p/workflow.yaml"), "p", yaml).unwrap();
    }
}
