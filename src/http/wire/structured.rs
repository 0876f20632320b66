//! The structured-output fields as sent: OpenAI's `response_format` and vLLM's
//! `structured_outputs`, on both generation routes.

use serde::Deserialize;

use crate::engine::structured::{ConstraintRequest, ConstraintSpec};
use crate::http::ApiError;

/// OpenAI's `response_format`.
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ResponseFormat {
    Text {},
    JsonObject {},
    /// Read in [`json_schema`]: serde's paths through an internally tagged enum drop the
    /// `json_schema` step, and a refusal must name the whole field.
    JsonSchema {
        json_schema: serde_json::Value,
    },
}

/// `response_format.json_schema`: `name` (OpenAI's rule), `description`, `schema` (none:
/// any JSON value), `strict` (always enforced here: the mask admits nothing else).
fn json_schema(v: serde_json::Value) -> Result<serde_json::Value, ApiError> {
    const AT: &str = "response_format.json_schema";
    let serde_json::Value::Object(mut o) = v else {
        return Err(bad(AT, format!("`{AT}` must be an object")));
    };
    if let Some(k) = o
        .keys()
        .find(|k| !["name", "description", "schema", "strict"].contains(&k.as_str()))
    {
        let at = format!("{AT}.{k}");
        return Err(bad(&at, format!("unknown field `{at}`")));
    }
    match o.get("name").and_then(|n| n.as_str()) {
        Some(n) if valid_name(n) => {}
        _ => {
            return Err(bad(
                &format!("{AT}.name"),
                format!("`{AT}.name` is required: 1 to 64 letters, digits, `_` or `-`"),
            ))
        }
    }
    for (k, ok) in [
        (
            "description",
            o.get("description")
                .is_none_or(|d| d.is_string() || d.is_null()),
        ),
        (
            "strict",
            o.get("strict")
                .is_none_or(|d| d.is_boolean() || d.is_null()),
        ),
    ] {
        if !ok {
            let at = format!("{AT}.{k}");
            return Err(bad(&at, format!("`{at}` has the wrong type")));
        }
    }
    Ok(match o.remove("schema") {
        None | Some(serde_json::Value::Null) => serde_json::json!({}),
        Some(s) => s,
    })
}

/// vLLM's `structured_outputs`: exactly one of its constraints.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StructuredOutputsWire {
    /// A JSON schema (an object, or its JSON text).
    pub json: Option<serde_json::Value>,
    pub regex: Option<String>,
    pub choice: Option<Vec<String>>,
    /// A Lark grammar (llguidance's dialect, which also reads EBNF-style rules).
    pub grammar: Option<String>,
    pub json_object: Option<bool>,
}

fn bad(param: &str, message: impl Into<String>) -> ApiError {
    ApiError::bad(Some(param), message)
}

/// OpenAI's rule for a schema's `name`.
fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// The request's constraint, if it asks for one (at most one of the two fields may).
pub fn constraint_of(
    response_format: Option<ResponseFormat>,
    structured: Option<StructuredOutputsWire>,
) -> Result<Option<ConstraintRequest>, ApiError> {
    let from_format = match response_format {
        None | Some(ResponseFormat::Text {}) => None,
        Some(ResponseFormat::JsonObject {}) => Some(ConstraintRequest {
            spec: ConstraintSpec::JsonObject,
            param: "response_format".into(),
        }),
        Some(ResponseFormat::JsonSchema { json_schema: v }) => Some(ConstraintRequest {
            spec: ConstraintSpec::JsonSchema(json_schema(v)?),
            param: "response_format.json_schema.schema".into(),
        }),
    };
    let from_structured = match structured {
        None => None,
        Some(s) => Some(structured_constraint(s)?),
    };
    match (from_format, from_structured) {
        (Some(_), Some(_)) => Err(bad(
            "structured_outputs",
            "send `response_format` or `structured_outputs`, not both",
        )),
        (a, b) => Ok(a.or(b)),
    }
}

fn structured_constraint(s: StructuredOutputsWire) -> Result<ConstraintRequest, ApiError> {
    let mut found = Vec::new();
    if let Some(json) = s.json {
        let schema = match json {
            serde_json::Value::String(text) => serde_json::from_str(&text).map_err(|e| {
                bad(
                    "structured_outputs.json",
                    format!("`structured_outputs.json` is not a JSON schema: {e}"),
                )
            })?,
            other => other,
        };
        found.push(("json", ConstraintSpec::JsonSchema(schema)));
    }
    if let Some(r) = s.regex {
        found.push(("regex", ConstraintSpec::Regex(r)));
    }
    if let Some(c) = s.choice {
        found.push(("choice", ConstraintSpec::Choice(c)));
    }
    if let Some(g) = s.grammar {
        found.push(("grammar", ConstraintSpec::Grammar(g)));
    }
    if s.json_object == Some(true) {
        found.push(("json_object", ConstraintSpec::JsonObject));
    }
    match found.len() {
        1 => {
            let (field, spec) = found.remove(0);
            Ok(ConstraintRequest {
                spec,
                param: format!("structured_outputs.{field}"),
            })
        }
        0 => Err(bad(
            "structured_outputs",
            "`structured_outputs` needs one of `json`, `regex`, `choice`, `grammar` or `json_object: true`",
        )),
        _ => Err(bad(
            "structured_outputs",
            format!(
                "`structured_outputs` takes one constraint, got {}",
                found.iter().map(|(f, _)| *f).collect::<Vec<_>>().join(", ")
            ),
        )),
    }
}
