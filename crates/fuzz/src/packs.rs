//! Workflow packs and agents' output schemas.

use std::path::Path;
use std::sync::OnceLock;

use arbitrary::{Result, Unstructured};
use mozaiks_packs::{Pack, output};
use serde_json::{Map, Value, json};
use serde_norway::Value as Yaml;

use crate::make;

/// The shipped packs, `(folder, YAML)`: the seeds of the pack targets.
pub const SEEDS: [(&str, &str); 6] = [
    (
        "concierge",
        include_str!("../../../workflows/concierge/workflow.yaml"),
    ),
    (
        "hello",
        include_str!("../../../workflows/hello/workflow.yaml"),
    ),
    (
        "research",
        include_str!("../../../workflows/research/workflow.yaml"),
    ),
    (
        "research_topic",
        include_str!("../../../workflows/research_topic/workflow.yaml"),
    ),
    (
        "support_triage",
        include_str!("../../../workflows/support_triage/workflow.yaml"),
    ),
    (
        "triage_handoff",
        include_str!("../../../workflows/triage_handoff/workflow.yaml"),
    ),
];

/// Parses a pack as the loader does, in a folder named after its `name:` (so validation goes
/// past the name check); an accepted pack round-trips through YAML and its output schemas
/// hold the schema properties.
fn check_pack(text: &str) {
    let folder = serde_norway::from_str::<Yaml>(text)
        .ok()
        .and_then(|y| y.get("name").and_then(Yaml::as_str).map(str::to_string))
        .unwrap_or_else(|| "hello".into());
    check_pack_in(text, &folder);
}

fn check_pack_in(text: &str, folder: &str) {
    let file = Path::new("workflows/fuzz/workflow.yaml");
    let Ok(pack) = Pack::parse(file, folder, text) else {
        return;
    };
    let yaml = serde_norway::to_string(&pack).expect("a pack serializes");
    let again = Pack::parse(file, folder, &yaml)
        .unwrap_or_else(|e| panic!("an accepted pack is refused after a round trip: {e}\n{yaml}"));
    assert_eq!(again, pack, "{yaml}");
    for a in &pack.agents {
        if let Some(schema) = &a.output_schema {
            check_accepted_schema(schema);
        }
    }
}

/// Workflow packs, raw YAML.
pub fn pack_yaml(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        check_pack(text);
    }
}

/// A YAML scalar or small tree of any kind.
fn yaml_value(u: &mut Unstructured) -> Result<Yaml> {
    Ok(match u.int_in_range(0..=6u8)? {
        0 => Yaml::Null,
        1 => Yaml::Bool(u.arbitrary()?),
        2 => Yaml::Number(u.int_in_range(-2i64..=2000)?.into()),
        3 => Yaml::Number(u.arbitrary::<f64>()?.into()),
        4 => Yaml::Sequence(vec![yaml_value(u)?]),
        5 => {
            let mut m = serde_norway::Mapping::new();
            m.insert(Yaml::String(make::string(u)?), yaml_value(u)?);
            Yaml::Mapping(m)
        }
        _ => Yaml::String(make::string(u)?),
    })
}

/// Names a pack refers to: where a random reference most often lands on something real.
const NAMES: [&str; 12] = [
    "assistant",
    "triage",
    "billing",
    "terminate",
    "lookup_order",
    "hello",
    "research_topic",
    "all",
    "any",
    "exact",
    "GET",
    "auto",
];

/// One random edit somewhere in the tree: replace, remove, duplicate, rename or retype a node.
fn mutate(u: &mut Unstructured, node: &mut Yaml, depth: u32) -> Result<()> {
    let descend = depth < 8 && u.ratio(3u8, 4)?;
    match node {
        Yaml::Mapping(m) if descend && !m.is_empty() => {
            let i = u.choose_index(m.len())?;
            let key = m.keys().nth(i).cloned().unwrap_or(Yaml::Null);
            match u.int_in_range(0..=5u8)? {
                0 => {
                    m.remove(&key);
                }
                1 => {
                    let v = m.remove(&key).unwrap_or(Yaml::Null);
                    m.insert(Yaml::String(make::string(u)?), v);
                }
                _ => {
                    if let Some(child) = m.get_mut(&key) {
                        mutate(u, child, depth + 1)?;
                    }
                }
            }
        }
        Yaml::Sequence(s) if descend && !s.is_empty() => {
            let i = u.choose_index(s.len())?;
            match u.int_in_range(0..=5u8)? {
                0 => {
                    s.remove(i);
                }
                1 => {
                    let copy = s[i].clone();
                    s.push(copy);
                }
                2 => s.swap(i, 0),
                _ => mutate(u, &mut s[i], depth + 1)?,
            }
        }
        Yaml::String(_) if u.arbitrary()? => {
            *node = Yaml::String((*u.choose(&NAMES)?).into());
        }
        _ => *node = yaml_value(u)?,
    }
    Ok(())
}

/// The shipped packs as YAML trees, parsed once.
fn seed_trees() -> &'static [Yaml] {
    static TREES: OnceLock<Vec<Yaml>> = OnceLock::new();
    TREES.get_or_init(|| {
        SEEDS
            .iter()
            .map(|(name, text)| {
                serde_norway::from_str(text)
                    .unwrap_or_else(|e| panic!("the shipped pack {name} is YAML: {e}"))
            })
            .collect()
    })
}

/// Workflow packs, structured: a shipped pack with up to 8 random edits to its YAML tree.
pub fn pack_mutated(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let Ok(i) = u.choose_index(SEEDS.len()) else {
        return;
    };
    let mut tree = seed_trees()[i].clone();
    let edits = u.int_in_range(1..=8u8).unwrap_or(1);
    for _ in 0..edits {
        if mutate(&mut u, &mut tree, 0).is_err() {
            break;
        }
    }
    let folder = tree
        .get("name")
        .and_then(Yaml::as_str)
        .unwrap_or(SEEDS[i].0)
        .to_string();
    if let Ok(text) = serde_norway::to_string(&tree) {
        check_pack_in(&text, &folder);
    }
}

/// The properties of a schema the loader accepted: its smallest sample matches it (the offline
/// model's answer), its wire form is an object, and a reply of that sample parses back.
fn check_accepted_schema(schema: &Value) {
    let sample = output::sample(schema);
    output::validate(schema, &sample)
        .unwrap_or_else(|e| panic!("the sample {sample} of an accepted schema fails it: {e}"));
    assert!(output::wire_schema(schema).is_object());
    let reply = format!("```json\n{sample}\n```");
    assert_eq!(output::parse_reply(schema, &reply).as_ref(), Ok(&sample));
}

const TYPES: [&str; 8] = [
    "object", "array", "string", "number", "integer", "boolean", "null", "date",
];

/// A schema-shaped JSON value: mostly the subset's keywords, sometimes not.
fn schema(u: &mut Unstructured, depth: u32) -> Result<Value> {
    if depth == 0 || u.ratio(1u8, 8)? {
        return make::json(u, 1);
    }
    let mut m = Map::new();
    let ty = if u.ratio(1u8, 4)? {
        let n = u.int_in_range(1..=2u8)?;
        Value::Array(
            (0..n)
                .map(|_| Ok(json!(u.choose(&TYPES)?)))
                .collect::<Result<_>>()?,
        )
    } else {
        json!(u.choose(&TYPES)?)
    };
    let is = |t: &str| ty == t || ty.as_array().is_some_and(|l| l.iter().any(|x| x == t));
    if is("object") {
        let mut props = Map::new();
        for _ in 0..u.int_in_range(0..=3u8)? {
            props.insert(make::string(u)?, schema(u, depth - 1)?);
        }
        let mut required: Vec<Value> = props.keys().map(|k| json!(k)).collect();
        if u.ratio(1u8, 6)? {
            required.pop();
        }
        m.insert("properties".into(), Value::Object(props));
        m.insert("required".into(), Value::Array(required));
        if u.ratio(1u8, 4)? {
            m.insert("additionalProperties".into(), json!(u.arbitrary::<bool>()?));
        }
    }
    if is("array") && !u.ratio(1u8, 8)? {
        m.insert("items".into(), schema(u, depth - 1)?);
    }
    if u.ratio(1u8, 5)? {
        let n = u.int_in_range(0..=3u8)?;
        m.insert(
            "enum".into(),
            Value::Array((0..n).map(|_| make::json(u, 1)).collect::<Result<_>>()?),
        );
    }
    if u.ratio(1u8, 6)? {
        m.insert("description".into(), json!(make::string(u)?));
    }
    if u.ratio(1u8, 12)? {
        m.insert(make::string(u)?, make::json(u, 1)?);
    }
    m.insert("type".into(), ty);
    Ok(Value::Object(m))
}

/// Output schemas, structured: checking a schema never panics; an accepted one keeps the
/// properties above; checking any reply against it never panics, and an accepted reply
/// validates.
pub fn output_schema(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let Ok(s) = schema(&mut u, 4) else {
        return;
    };
    if output::check_schema("output_schema", &s).is_err() {
        return;
    }
    check_accepted_schema(&s);
    let reply = match u.arbitrary::<bool>() {
        Ok(true) => make::json(&mut u, 3).map(|v| v.to_string()),
        _ => u.arbitrary::<String>(),
    };
    if let Ok(reply) = reply
        && let Ok(v) = output::parse_reply(&s, &reply)
    {
        output::validate(&s, &v).expect("an accepted reply validates");
    }
}
