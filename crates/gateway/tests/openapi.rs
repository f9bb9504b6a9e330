//! The generated `/openapi.json` keeps the published contract: every path, method, status,
//! parameter, security requirement, request body field and named schema of the document as it
//! was hand-written before the generator (`tests/fixtures/openapi_before_aide.json`, saved from
//! that table) is still there, so the document only grows.

use std::collections::BTreeSet;

use serde_json::Value;

fn published() -> Value {
    serde_json::from_str(include_str!("fixtures/openapi_before_aide.json")).unwrap()
}

/// `{"$ref": "#/components/schemas/X"}`, `anyOf: [X, null]` and `allOf: [X]` resolved to X.
fn resolve<'a>(doc: &'a Value, schema: &'a Value) -> &'a Value {
    if let Some(r) = schema["$ref"].as_str() {
        let name = r.rsplit('/').next().unwrap();
        return resolve(doc, &doc["components"]["schemas"][name]);
    }
    for key in ["anyOf", "oneOf", "allOf"] {
        if let Some(list) = schema[key].as_array()
            && let Some(s) = list.iter().find(|s| s["type"] != "null")
        {
            return resolve(doc, s);
        }
    }
    schema
}

fn names(v: &Value) -> BTreeSet<String> {
    v.as_object()
        .map(|o| o.keys().cloned().collect())
        .unwrap_or_default()
}

fn strings(v: &Value) -> BTreeSet<String> {
    v.as_array()
        .map(|a| a.iter().map(|s| s.as_str().unwrap().to_string()).collect())
        .unwrap_or_default()
}

#[test]
fn every_path_method_status_and_parameter_of_the_published_document_is_still_there() {
    let old = published();
    let new = mozaiks_gateway::openapi_document();
    assert_eq!(new["openapi"], "3.1.0");
    let mut checked = 0;
    for (path, item) in old["paths"].as_object().unwrap() {
        for (method, o) in item.as_object().unwrap() {
            let what = format!("{method} {path}");
            let n = &new["paths"][path][method];
            assert!(n.is_object(), "{what}: missing from the generated document");
            assert_eq!(n["operationId"], o["operationId"], "{what}");
            assert_eq!(n["summary"], o["summary"], "{what}");
            assert!(
                strings(&n["tags"]).is_superset(&strings(&o["tags"])),
                "{what}: tags"
            );
            assert_eq!(n["security"], o["security"], "{what}: security");
            let statuses = names(&n["responses"]);
            for (status, r) in o["responses"].as_object().unwrap() {
                assert!(statuses.contains(status), "{what}: status {status}");
                let nr = &n["responses"][status];
                for media in names(&r["content"]) {
                    assert!(
                        nr["content"][&media].is_object(),
                        "{what} {status}: {media}"
                    );
                }
                if let Some(r) = r["content"]["application/json"]["schema"]["$ref"].as_str() {
                    let nr = &nr["content"]["application/json"]["schema"]["$ref"];
                    assert_eq!(nr, r, "{what} {status}: the body's schema");
                }
                for header in names(&r["headers"]) {
                    assert!(
                        nr["headers"][&header].is_object(),
                        "{what} {status}: {header}"
                    );
                }
            }
            let params = |op: &Value| -> BTreeSet<(String, String, bool)> {
                op["parameters"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|p| {
                        (
                            p["in"].as_str().unwrap().to_string(),
                            p["name"].as_str().unwrap().to_string(),
                            p["required"].as_bool().unwrap_or(false),
                        )
                    })
                    .collect()
            };
            let missing: Vec<_> = params(o).difference(&params(n)).cloned().collect();
            assert!(missing.is_empty(), "{what}: parameters {missing:?}");
            if o["requestBody"].is_object() {
                let os = resolve(
                    &old,
                    &o["requestBody"]["content"]["application/json"]["schema"],
                );
                let ns = resolve(
                    &new,
                    &n["requestBody"]["content"]["application/json"]["schema"],
                );
                assert!(ns.is_object(), "{what}: no request body");
                assert_eq!(n["requestBody"]["required"], true, "{what}");
                assert_eq!(
                    strings(&ns["required"]),
                    strings(&os["required"]),
                    "{what}: required fields"
                );
                assert_eq!(
                    ns["additionalProperties"], os["additionalProperties"],
                    "{what}: unknown fields"
                );
                for (field, os) in os["properties"].as_object().into_iter().flatten() {
                    let ns = &ns["properties"][field];
                    assert!(!ns.is_null(), "{what}: body field {field}");
                    let (os, ns) = (resolve(&old, os), resolve(&new, ns));
                    for k in [
                        "minLength",
                        "maxLength",
                        "pattern",
                        "minimum",
                        "maximum",
                        "enum",
                        "maxItems",
                    ] {
                        if !os[k].is_null() {
                            assert_eq!(ns[k], os[k], "{what}: {field}.{k}");
                        }
                    }
                }
            }
            checked += 1;
        }
    }
    assert_eq!(checked, 50, "operations in the published document");
    for schema in names(&old["components"]["schemas"]) {
        assert!(
            new["components"]["schemas"][&schema].is_object(),
            "components.schemas.{schema}"
        );
    }
    assert_eq!(
        names(&new["components"]["securitySchemes"]),
        names(&old["components"]["securitySchemes"])
    );
}

#[test]
fn every_operation_declares_its_path_parameters_and_answers() {
    let doc = mozaiks_gateway::openapi_document();
    let paths = doc["paths"].as_object().unwrap();
    for (path, item) in paths {
        let wanted: BTreeSet<&str> = path
            .split('/')
            .filter_map(|s| s.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
            .collect();
        for (method, op) in item.as_object().unwrap() {
            let declared: BTreeSet<&str> = op["parameters"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|p| p["in"] == "path")
                .map(|p| p["name"].as_str().unwrap())
                .collect();
            assert_eq!(declared, wanted, "{method} {path}");
            let responses = op["responses"].as_object().unwrap();
            assert!(!responses.is_empty(), "{method} {path}");
            for (status, r) in responses {
                assert!(r["description"].is_string(), "{method} {path} {status}");
                if status.starts_with('4') || status.starts_with('5') {
                    assert_eq!(
                        r["content"]["application/json"]["schema"]["$ref"],
                        "#/components/schemas/Error",
                        "{method} {path} {status}"
                    );
                }
            }
        }
    }
}

#[test]
fn bodies_and_answers_come_from_the_handlers_types() {
    let doc = mozaiks_gateway::openapi_document();
    let body = |method: &str, path: &str| {
        resolve(
            &doc,
            &doc["paths"][path][method]["requestBody"]["content"]["application/json"]["schema"],
        )
        .clone()
    };
    // `StartSession`'s fields, with their doc comments as descriptions.
    let start = body("post", "/api/sessions");
    assert_eq!(start["properties"]["message"]["maxLength"], 32768);
    assert!(start["properties"]["user_id"]["description"].is_string());
    // The grant's body is read by hand and documented by its type all the same.
    let grant = body("post", "/api/apps/{app_id}/credits");
    assert_eq!(grant["properties"]["amount"]["minimum"], 1);
    // Query strings from their types.
    let list = &doc["paths"]["/api/sessions"]["get"]["parameters"];
    assert!(
        list.as_array()
            .unwrap()
            .iter()
            .any(|p| p["name"] == "limit" && p["in"] == "query")
    );
    // The session ticket, from `SessionTicket`.
    let ticket = resolve(&doc, &doc["components"]["schemas"]["SessionTicket"]);
    for field in ["chat_id", "ws_url", "runtime_token", "expires_at", "epoch"] {
        assert!(ticket["properties"][field].is_object(), "{field}");
    }
    let created = &doc["paths"]["/api/sessions"]["post"]["responses"]["201"];
    assert_eq!(
        created["content"]["application/json"]["schema"]["$ref"],
        "#/components/schemas/SessionTicket"
    );
}
