//! Structured outputs: the JSON Schema subset an agent's `output_schema` may use, checked at
//! load, and the check of a model's reply against it at run time.
//!
//! The subset is the one OpenAI's strict structured outputs accept, so a schema that loads is
//! one the provider takes as is: every (sub)schema has a `type` (a name or a list of names among
//! `object`, `array`, `string`, `number`, `integer`, `boolean`, `null`); an object lists its
//! `properties`, all of them in `required` (an optional property is written
//! `type: [string, "null"]`), and takes no other properties (`additionalProperties` may only be
//! `false`, which is also the default); an array has `items`; `enum` lists the allowed values;
//! `description` and `title` are free text. Any other keyword is refused at load, so no
//! constraint is silently ignored. The root is an object.

use serde_json::{Map, Value};

/// Keywords of the supported subset.
pub const KEYWORDS: [&str; 8] = [
    "type",
    "properties",
    "required",
    "items",
    "enum",
    "description",
    "title",
    "additionalProperties",
];

const TYPES: [&str; 7] = [
    "object", "array", "string", "number", "integer", "boolean", "null",
];

/// Deepest nesting of schemas.
pub const MAX_DEPTH: usize = 10;

/// Checks that `schema` is in the supported subset. `(path, message)` of the first problem,
/// the path continuing `path`.
pub fn check_schema(path: &str, schema: &Value) -> Result<(), (String, String)> {
    let types = check_node(path, schema, 0)?;
    if types != ["object"] {
        return Err((
            format!("{path}.type"),
            "the root of an output schema must be `type: object`".into(),
        ));
    }
    Ok(())
}

fn problem<T>(path: String, message: impl Into<String>) -> Result<T, (String, String)> {
    Err((path, message.into()))
}

/// Checks one schema; returns its type names.
fn check_node(path: &str, schema: &Value, depth: usize) -> Result<Vec<String>, (String, String)> {
    if depth > MAX_DEPTH {
        return problem(
            path.into(),
            format!("schemas nest at most {MAX_DEPTH} levels"),
        );
    }
    let Some(map) = schema.as_object() else {
        return problem(path.into(), "expected a JSON Schema object");
    };
    for key in map.keys() {
        if !KEYWORDS.contains(&key.as_str()) {
            return problem(
                format!("{path}.{key}"),
                format!(
                    "unsupported keyword {key:?}; output schemas use {}",
                    KEYWORDS.join(", ")
                ),
            );
        }
    }
    let types = match map.get("type") {
        Some(Value::String(t)) => vec![t.clone()],
        Some(Value::Array(list)) if !list.is_empty() => list
            .iter()
            .map(|t| t.as_str().map(String::from))
            .collect::<Option<Vec<_>>>()
            .unwrap_or_default(),
        None => return problem(path.into(), "expected `type`"),
        _ => Vec::new(),
    };
    if types.is_empty() || types.iter().any(|t| !TYPES.contains(&t.as_str())) {
        return problem(
            format!("{path}.type"),
            format!(
                "expected a type name or a list of them among {}",
                TYPES.join(", ")
            ),
        );
    }
    for key in ["description", "title"] {
        if map.get(key).is_some_and(|v| !v.is_string()) {
            return problem(format!("{path}.{key}"), "expected a string");
        }
    }
    if let Some(e) = map.get("enum") {
        match e.as_array() {
            Some(list) if !list.is_empty() => {
                if let Some(i) = list.iter().position(|v| !type_matches(&types, v)) {
                    return problem(
                        format!("{path}.enum[{i}]"),
                        format!("is not of the schema's type ({})", types.join(" or ")),
                    );
                }
            }
            _ => {
                return problem(
                    format!("{path}.enum"),
                    "expected a non-empty list of values",
                );
            }
        }
    }
    let is = |t: &str| types.iter().any(|x| x == t);
    match map.get("additionalProperties") {
        None | Some(Value::Bool(false)) => {}
        Some(_) => {
            return problem(
                format!("{path}.additionalProperties"),
                "strict structured outputs allow only `false` (the default)",
            );
        }
    }
    if is("object") {
        let props = match map.get("properties") {
            Some(Value::Object(p)) => p.clone(),
            None => Map::new(),
            Some(_) => {
                return problem(
                    format!("{path}.properties"),
                    "expected an object of schemas",
                );
            }
        };
        let required: Vec<&str> = match map.get("required") {
            None => Vec::new(),
            Some(Value::Array(r)) => {
                let names: Option<Vec<&str>> = r.iter().map(Value::as_str).collect();
                match names {
                    Some(n) => n,
                    None => {
                        return problem(
                            format!("{path}.required"),
                            "expected a list of property names",
                        );
                    }
                }
            }
            Some(_) => {
                return problem(
                    format!("{path}.required"),
                    "expected a list of property names",
                );
            }
        };
        for (i, r) in required.iter().enumerate() {
            if !props.contains_key(*r) {
                return problem(
                    format!("{path}.required[{i}]"),
                    format!("{r:?} is not one of the properties"),
                );
            }
            if required[..i].contains(r) {
                return problem(
                    format!("{path}.required[{i}]"),
                    format!("{r:?} is listed twice"),
                );
            }
        }
        for (name, sub) in &props {
            if !required.contains(&name.as_str()) {
                return problem(
                    format!("{path}.required"),
                    format!(
                        "strict structured outputs need every property in `required`; add {name:?} (make it optional with `type: [<type>, \"null\"]`)"
                    ),
                );
            }
            check_node(&format!("{path}.properties.{name}"), sub, depth + 1)?;
        }
    } else {
        for key in ["properties", "required"] {
            if map.contains_key(key) {
                return problem(format!("{path}.{key}"), "only an object schema has this");
            }
        }
    }
    match (is("array"), map.get("items")) {
        (true, Some(items)) => {
            check_node(&format!("{path}.items"), items, depth + 1)?;
        }
        (true, None) => return problem(path.into(), "an array schema needs `items`"),
        (false, Some(_)) => {
            return problem(format!("{path}.items"), "only an array schema has this");
        }
        (false, None) => {}
    }
    // Enum values match the rest of the schema too (an object's required properties, an
    // array's items), so the first one is always a valid answer.
    if let Some(Value::Array(list)) = map.get("enum") {
        let mut rest = map.clone();
        rest.remove("enum");
        let rest = Value::Object(rest);
        for (i, v) in list.iter().enumerate() {
            if let Err(e) = validate(&rest, v) {
                return problem(
                    format!("{path}.enum[{i}]"),
                    format!("does not match the schema: {e}"),
                );
            }
        }
    }
    Ok(types)
}

fn type_matches(types: &[String], v: &Value) -> bool {
    types.iter().any(|t| match t.as_str() {
        "object" => v.is_object(),
        "array" => v.is_array(),
        "string" => v.is_string(),
        "number" => v.is_number(),
        "integer" => v.is_i64() || v.is_u64() || v.as_f64().is_some_and(|f| f.fract() == 0.0),
        "boolean" => v.is_boolean(),
        "null" => v.is_null(),
        _ => false,
    })
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// Checks `value` against a schema of the subset. The error says where (`$.a.b[2]`) and what.
pub fn validate(schema: &Value, value: &Value) -> Result<(), String> {
    validate_at("$", schema, value)
}

fn validate_at(path: &str, schema: &Value, value: &Value) -> Result<(), String> {
    let types: Vec<String> = match schema.get("type") {
        Some(Value::String(t)) => vec![t.clone()],
        Some(Value::Array(l)) => l
            .iter()
            .filter_map(|t| t.as_str().map(String::from))
            .collect(),
        _ => Vec::new(),
    };
    if !types.is_empty() && !type_matches(&types, value) {
        return Err(format!(
            "{path}: expected {}, got {}",
            types.join(" or "),
            kind(value)
        ));
    }
    if let Some(Value::Array(allowed)) = schema.get("enum")
        && !allowed.contains(value)
    {
        let list: Vec<String> = allowed.iter().map(Value::to_string).collect();
        return Err(format!("{path}: {value} is not one of {}", list.join(", ")));
    }
    match value {
        Value::Object(obj) => {
            let empty = Map::new();
            let props = schema
                .get("properties")
                .and_then(Value::as_object)
                .unwrap_or(&empty);
            if let Some(Value::Array(required)) = schema.get("required") {
                for r in required.iter().filter_map(Value::as_str) {
                    if !obj.contains_key(r) {
                        return Err(format!("{path}: missing property {r:?}"));
                    }
                }
            }
            for (k, v) in obj {
                match props.get(k) {
                    Some(sub) => validate_at(&format!("{path}.{k}"), sub, v)?,
                    None => return Err(format!("{path}: unexpected property {k:?}")),
                }
            }
            Ok(())
        }
        Value::Array(list) => {
            if let Some(items) = schema.get("items") {
                for (i, v) in list.iter().enumerate() {
                    validate_at(&format!("{path}[{i}]"), items, v)?;
                }
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

/// Parses a model's reply as JSON (a surrounding Markdown code fence is tolerated) and checks
/// it against `schema`.
pub fn parse_reply(schema: &Value, text: &str) -> Result<Value, String> {
    let mut t = text.trim();
    if let Some(rest) = t.strip_prefix("```") {
        let rest = rest.strip_prefix("json").unwrap_or(rest);
        t = rest.strip_suffix("```").unwrap_or(rest).trim();
    }
    if t.is_empty() {
        return Err("the reply is empty, not JSON".into());
    }
    let value: Value =
        serde_json::from_str(t).map_err(|e| format!("the reply is not JSON: {e}"))?;
    validate(schema, &value)?;
    Ok(value)
}

/// The schema as sent to the provider: `additionalProperties: false` written out on every
/// object (strict mode requires it; it is the subset's default).
pub fn wire_schema(schema: &Value) -> Value {
    match schema {
        Value::Object(map) => {
            let mut out = Map::new();
            for (k, v) in map {
                let v = match k.as_str() {
                    "properties" => match v {
                        Value::Object(p) => Value::Object(
                            p.iter().map(|(n, s)| (n.clone(), wire_schema(s))).collect(),
                        ),
                        other => other.clone(),
                    },
                    "items" => wire_schema(v),
                    _ => v.clone(),
                };
                out.insert(k.clone(), v);
            }
            let object = match map.get("type") {
                Some(Value::String(t)) => t == "object",
                Some(Value::Array(l)) => l.iter().any(|t| t == "object"),
                _ => false,
            };
            if object {
                out.insert("additionalProperties".into(), Value::Bool(false));
            }
            Value::Object(out)
        }
        other => other.clone(),
    }
}

/// The smallest value that matches a schema of the subset: the first `enum` value, else an
/// empty string, 0, false, an empty list, null, or an object of its required properties. The
/// offline model's answer for an agent with an output schema and no scripted reply.
pub fn sample(schema: &Value) -> Value {
    if let Some(Value::Array(e)) = schema.get("enum")
        && let Some(first) = e.first()
    {
        return first.clone();
    }
    let first_type = match schema.get("type") {
        Some(Value::String(t)) => t.as_str(),
        Some(Value::Array(l)) => l.first().and_then(Value::as_str).unwrap_or("null"),
        _ => "null",
    };
    match first_type {
        "object" => {
            let mut out = Map::new();
            if let Some(props) = schema.get("properties").and_then(Value::as_object) {
                for (k, s) in props {
                    out.insert(k.clone(), sample(s));
                }
            }
            Value::Object(out)
        }
        "array" => Value::Array(Vec::new()),
        "string" => Value::String(String::new()),
        "number" | "integer" => Value::from(0),
        "boolean" => Value::Bool(false),
        _ => Value::Null,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn schema() -> Value {
        json!({
            "type": "object",
            "properties": {
                "topic": {"type": "string", "enum": ["dining", "transport"]},
                "guests": {"type": ["integer", "null"]},
                "tags": {"type": "array", "items": {"type": "string"}},
                "where": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
            },
            "required": ["topic", "guests", "tags", "where"]
        })
    }

    #[test]
    fn a_subset_schema_loads_and_samples_to_a_valid_value() {
        check_schema("s", &schema()).unwrap();
        let s = sample(&schema());
        assert_eq!(
            s,
            json!({"topic": "dining", "guests": 0, "tags": [], "where": {"city": ""}})
        );
        validate(&schema(), &s).unwrap();
    }

    #[test]
    fn schemas_outside_the_subset_are_refused_with_a_path() {
        let at = |s: Value| check_schema("o", &s).unwrap_err().0;
        assert_eq!(at(json!({"type": "string"})), "o.type");
        assert_eq!(at(json!({"properties": {}})), "o");
        assert_eq!(at(json!({"type": "object", "oneOf": []})), "o.oneOf");
        assert_eq!(at(json!({"type": "thing"})), "o.type");
        assert_eq!(
            at(json!({"type": "object", "properties": {"a": {"type": "string"}}})),
            "o.required"
        );
        assert_eq!(
            at(
                json!({"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a", "b"]})
            ),
            "o.required[1]"
        );
        assert_eq!(
            at(
                json!({"type": "object", "properties": {"a": {"type": "array"}}, "required": ["a"]})
            ),
            "o.properties.a"
        );
        assert_eq!(
            at(json!({"type": "object", "additionalProperties": true})),
            "o.additionalProperties"
        );
        assert_eq!(
            at(
                json!({"type": "object", "properties": {"a": {"type": "string", "enum": [1]}}, "required": ["a"]})
            ),
            "o.properties.a.enum[0]"
        );
        assert_eq!(
            at(json!({"type": "object", "items": {"type": "string"}})),
            "o.items"
        );
        assert_eq!(at(json!([1])), "o");
    }

    #[test]
    fn enum_values_must_match_the_whole_schema() {
        // Found by fuzzing (fuzz/README.md, target output_schema): the sample of this schema,
        // its first enum value, failed the schema, so the offline model's answer was invalid.
        let s = json!({
            "type": "object",
            "properties": {"k": {"type": "string"}},
            "required": ["k"],
            "enum": [{}]
        });
        let (path, message) = check_schema("o", &s).unwrap_err();
        assert_eq!(path, "o.enum[0]");
        assert!(message.contains("missing property"), "{message}");
        let nested = json!({
            "type": "object",
            "properties": {"l": {"type": "array", "items": {"type": "string"}, "enum": [[1]]}},
            "required": ["l"]
        });
        assert_eq!(
            check_schema("o", &nested).unwrap_err().0,
            "o.properties.l.enum[0]"
        );
        let fine = json!({
            "type": "object",
            "properties": {"k": {"type": "string"}},
            "required": ["k"],
            "enum": [{"k": "a"}]
        });
        check_schema("o", &fine).unwrap();
        validate(&fine, &sample(&fine)).unwrap();
    }

    #[test]
    fn replies_are_parsed_and_checked() {
        let ok =
            r#"{"topic": "transport", "guests": null, "tags": ["x"], "where": {"city": "Oslo"}}"#;
        assert_eq!(parse_reply(&schema(), ok).unwrap()["topic"], "transport");
        assert!(parse_reply(&schema(), &format!("```json\n{ok}\n```")).is_ok());
        let err = |t: &str| parse_reply(&schema(), t).unwrap_err();
        assert!(err("").contains("empty"));
        assert!(err("sure! here it is").contains("not JSON"));
        assert!(err(&ok.replace("transport", "boat")).starts_with("$.topic: "));
        assert!(err(&ok.replace("null", "1.5")).starts_with("$.guests: expected integer or null"));
        assert!(err(&ok.replace("[\"x\"]", "[3]")).starts_with("$.tags[0]"));
        assert!(err(r#"{"topic": "dining"}"#).contains("missing property \"guests\""));
        assert!(
            err(&ok.replace("\"Oslo\"}", "\"Oslo\", \"zip\": 1}"))
                .contains("unexpected property \"zip\"")
        );
    }

    #[test]
    fn the_wire_schema_closes_every_object() {
        let w = wire_schema(&schema());
        assert_eq!(w["additionalProperties"], false);
        assert_eq!(w["properties"]["where"]["additionalProperties"], false);
        assert!(
            w["properties"]["topic"]
                .get("additionalProperties")
                .is_none()
        );
    }
}
