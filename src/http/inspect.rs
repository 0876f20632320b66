//! `POST /v1/inspect`: what every exit head (and the original, and any strategy asked for)
//! predicts at the last or every prompt position. It runs through the engine's queue and
//! batches with generation: one prefill, no second model path.

use std::sync::Arc;

use axum::extract::State;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::error::ApiError;
use super::generation::next_event;
use super::json::{JsonBody, Parsed};
use super::wire::{mode_object, MultiExitWire};
use super::AppState;
use crate::engine::request::{InspectRequest, PromptInput};
use crate::engine::Event;

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum InspectPrompt {
    Text(String),
    Tokens(Vec<i64>),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InspectWire {
    pub model: String,
    pub prompt: Option<InspectPrompt>,
    pub top_logprobs: Option<i64>,
    pub positions: Option<String>,
    /// Strategies to report as heads of their own: `multi_exit` objects.
    pub strategies: Option<Vec<MultiExitWire>>,
    /// Shorthands: a contrast, a DoLa (`multi_exit`'s fields, `mode` implied).
    pub contrast: Option<MultiExitWire>,
    pub dola: Option<MultiExitWire>,
}

pub async fn inspect(
    State(app): State<Arc<AppState>>,
    body: JsonBody,
) -> Result<Json<Value>, ApiError> {
    let limits = app.engine.validator().limits();
    let Parsed {
        req,
        slot,
        deadline,
    } = body.parse_in_slot::<InspectWire>(&app.engine).await?;
    let named_mode = app.models.resolve(&req.model)?;
    let mut strategies = Vec::new();
    for (i, m) in req.strategies.into_iter().flatten().enumerate() {
        let object = format!("strategies[{i}]");
        strategies.push((object.clone(), mode_object(&object, m, None)?));
    }
    for (object, m) in [("contrast", req.contrast), ("dola", req.dola)] {
        if let Some(m) = m {
            strategies.push((object.to_string(), mode_object(object, m, Some(object))?));
        }
    }
    let inspect = InspectRequest {
        prompt: req.prompt.map(|p| match p {
            InspectPrompt::Text(t) => PromptInput::Text(t),
            InspectPrompt::Tokens(ids) => PromptInput::Tokens(ids),
        }),
        top_logprobs: req.top_logprobs,
        positions: req.positions,
        strategies,
        named_mode,
    };
    let valid = app
        .engine
        .validate_inspect(inspect, deadline, &slot)
        .await?;
    drop(slot);
    let prompt_ids = valid.prompts[0].clone();
    let span = tracing::info_span!("inspect", id = %app.next_id());
    let mut rx = app.engine.submit(valid, span)?;
    let timeout = limits.request_timeout.as_secs_f64();
    let mut positions = None;
    loop {
        match next_event(&mut rx, deadline, timeout, &app.shutdown).await {
            Some(Event::Inspection { positions: p }) => positions = Some(p),
            Some(Event::Done { .. }) => break,
            Some(Event::Error(e)) => return Err(e.into()),
            Some(_) => {}
            None => return Err(ApiError::Internal("engine dropped the request".into())),
        }
    }
    let positions = positions.ok_or_else(|| ApiError::Internal("no inspection".into()))?;
    let positions: Vec<Value> = positions
        .into_iter()
        .map(|p| {
            let heads: Vec<Value> = p
                .heads
                .into_iter()
                .map(|h| {
                    let top: Vec<Value> = h
                        .top
                        .into_iter()
                        .map(|(id, token, logprob)| json!({"token_id": id, "token": token, "logprob": logprob}))
                        .collect();
                    let mut head = json!({
                        "head": h.head,
                        "top_logprobs": top,
                        "entropy": h.entropy,
                        "next_token_logprob": h.next_token_logprob,
                        "jsd_to_original": h.jsd_to_original,
                    });
                    if let Some((name, l)) = h.chosen {
                        head[name] = json!(l);
                    }
                    head
                })
                .collect();
            json!({
                "index": p.index,
                "token_id": p.token_id,
                "next_token_id": p.next_token_id,
                "heads": heads,
            })
        })
        .collect();
    Ok(Json(json!({
        "object": "inspection",
        "model": req.model,
        "prompt_token_ids": prompt_ids,
        "positions": positions,
    })))
}
