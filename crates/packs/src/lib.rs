//! Workflow packs: `workflows/<name>/workflow.yaml`.
//!
//! A pack declares agents and how they take turns. The skeleton format covers AG2's sequential
//! handoffs (`after_work`), a turn limit, default context variables and the script the built-in
//! offline model follows. Packs are validated completely at load: a catalog is either loaded
//! whole or refused with the file, the path inside it and what was expected.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

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
    /// Agent turns per run, at most.
    #[serde(default = "default_max_turns")]
    pub max_turns: u32,
    /// Default context variables of every chat of this pack.
    #[serde(default)]
    pub context: serde_json::Map<String, serde_json::Value>,
    pub agents: Vec<Agent>,
}

/// One agent.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Agent {
    pub name: String,
    #[serde(default)]
    pub system_message: String,
    /// Model name for the OpenAI-compatible provider; `None` uses the configured default.
    #[serde(default)]
    pub model: Option<String>,
    #[serde(default)]
    pub handoff: Handoff,
    /// What the built-in offline model answers for this agent.
    #[serde(default)]
    pub offline: OfflineScript,
}

/// Who speaks after an agent.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Handoff {
    /// The next agent after this one's turn, or `terminate` (the default).
    #[serde(default)]
    pub after_work: Option<String>,
}

/// The script of the built-in offline model for one agent.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct OfflineScript {
    /// A template: `{input}` is the user's last message, `{agent}` the agent's name,
    /// `{context.KEY}` a context variable.
    #[serde(default)]
    pub reply: Option<String>,
}

fn one() -> u32 {
    1
}
fn default_max_turns() -> u32 {
    8
}

/// The target that ends a run.
pub const TERMINATE: &str = "terminate";
/// Most turns a pack may allow.
pub const MAX_TURNS_LIMIT: u32 = 100;

/// Why a pack was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}: {path}: {message}")]
pub struct Error {
    pub file: PathBuf,
    /// Where in the file, e.g. `agents[1].handoff.after_work`, or `line 4 column 3`.
    pub path: String,
    pub message: String,
}

impl Pack {
    pub fn agent(&self, name: &str) -> Option<&Agent> {
        self.agents.iter().find(|a| a.name == name)
    }

    /// Parses and validates a pack from YAML text.
    pub fn parse(file: &Path, folder_name: &str, text: &str) -> Result<Pack, Error> {
        let err = |path: String, message: String| Error {
            file: file.to_path_buf(),
            path,
            message,
        };
        let pack: Pack = serde_yaml::from_str(text).map_err(|e| {
            let at = e
                .location()
                .map(|l| format!("line {} column {}", l.line(), l.column()))
                .unwrap_or_else(|| "document".into());
            err(at, e.to_string())
        })?;
        if let Err(e) = mozaiks_events::ids::check_token("workflow name", &pack.name) {
            return Err(err("name".into(), e.to_string()));
        }
        if pack.name != folder_name {
            return Err(err(
                "name".into(),
                format!(
                    "is {:?} but the folder is {folder_name:?}; they must be equal",
                    pack.name
                ),
            ));
        }
        if pack.max_turns == 0 || pack.max_turns > MAX_TURNS_LIMIT {
            return Err(err(
                "max_turns".into(),
                format!("must be 1 to {MAX_TURNS_LIMIT}, got {}", pack.max_turns),
            ));
        }
        if pack.agents.is_empty() {
            return Err(err(
                "agents".into(),
                "a pack needs at least one agent".into(),
            ));
        }
        let mut seen = std::collections::HashSet::new();
        for (i, a) in pack.agents.iter().enumerate() {
            if let Err(e) = mozaiks_events::ids::check_token("agent name", &a.name) {
                return Err(err(format!("agents[{i}].name"), e.to_string()));
            }
            if a.name == TERMINATE {
                return Err(err(
                    format!("agents[{i}].name"),
                    "\"terminate\" is reserved".into(),
                ));
            }
            if !seen.insert(a.name.as_str()) {
                return Err(err(
                    format!("agents[{i}].name"),
                    format!("duplicate agent {:?}", a.name),
                ));
            }
        }
        for (i, a) in pack.agents.iter().enumerate() {
            if let Some(target) = &a.handoff.after_work
                && target != TERMINATE
                && pack.agent(target).is_none()
            {
                return Err(err(
                    format!("agents[{i}].handoff.after_work"),
                    format!(
                        "unknown agent {target:?}; expected one of {} or \"terminate\"",
                        names(&pack)
                    ),
                ));
            }
        }
        if pack.agent(&pack.start_agent).is_none() {
            return Err(err(
                "start_agent".into(),
                format!(
                    "unknown agent {:?}; expected one of {}",
                    pack.start_agent,
                    names(&pack)
                ),
            ));
        }
        Ok(pack)
    }
}

fn names(pack: &Pack) -> String {
    pack.agents
        .iter()
        .map(|a| format!("{:?}", a.name))
        .collect::<Vec<_>>()
        .join(", ")
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
}
