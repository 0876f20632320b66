//! `/v1/chat/completions` through the real server: the prompt is the chat template's
//! rendering (the shipped base template, a checkpoint's own `tokenizer_config.json` template),
//! the response and chunk shapes, streamed deltas reassembling the whole response, logprobs,
//! modes by model id and by `multi_exit`, `/tokenize` with `messages`, and the refusals.

use crate::common;

use common::client::{get, post, post_stream};
use common::server::TestServer;
use common::{fixture_dir, ARCHS, MODEL};
use serde_json::{json, Value};

pub fn base_template() -> String {
    concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/config/chat-template-base.jinja"
    )
    .to_string()
}

pub fn chat_server() -> TestServer {
    TestServer::start(&["--chat-template", &base_template()])
}

fn conversation() -> Value {
    json!([
        {"role": "system", "content": "You answer questions."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4."},
        {"role": "user", "content": [{"type": "text", "text": "And 3+3?"}]},
    ])
}

const RENDERED: &str =
    "You answer questions.\n\nUser: What is 2+2?\nAssistant: 4.\nUser: And 3+3?\nAssistant:";

async fn chat(server: &TestServer, body: &Value) -> Value {
    let (status, out) = post(&server.url("/v1/chat/completions"), body).await;
    assert_eq!(status, 200, "{body} -> {out}");
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chat_is_the_completion_of_its_rendered_prompt_on_both_architectures() {
    for fixture in ARCHS {
        let server =
            TestServer::start_model(&fixture.dir(), &["--chat-template", &base_template()]);
        let body = json!({"model": fixture.name, "messages": conversation(), "max_tokens": 6,
            "temperature": 0, "return_token_ids": true});
        let out = chat(&server, &body).await;
        assert_eq!(out["object"], "chat.completion");
        assert!(out["id"].as_str().unwrap().starts_with("chatcmpl-"));
        let choice = &out["choices"][0];
        assert_eq!(choice["message"]["role"], "assistant");
        assert_eq!(choice["finish_reason"], "length");
        let (_, tokens) = post(&server.url("/tokenize"), &json!({"prompt": RENDERED})).await;
        assert_eq!(
            choice["prompt_token_ids"], tokens["tokens"],
            "{}",
            fixture.name
        );
        // The same as a completion of the rendered text.
        let (_, completion) = post(
            &server.url("/v1/completions"),
            &json!({"model": fixture.name, "prompt": RENDERED, "max_tokens": 6, "temperature": 0,
                "return_token_ids": true}),
        )
        .await;
        assert_eq!(
            choice["message"]["content"],
            completion["choices"][0]["text"]
        );
        assert_eq!(choice["token_ids"], completion["choices"][0]["token_ids"]);
        assert_eq!(out["usage"]["prompt_tokens"], tokens["count"]);
        // /tokenize counts a conversation as the chat route renders it.
        let (status, counted) = post(
            &server.url("/tokenize"),
            &json!({"model": fixture.name, "messages": conversation()}),
        )
        .await;
        assert_eq!(status, 200, "{counted}");
        assert_eq!(counted["tokens"], tokens["tokens"]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_deltas_reassemble_the_response_with_logprobs_and_usage() {
    let server = chat_server();
    let body = json!({"model": MODEL, "messages": conversation(), "max_tokens": 8,
        "temperature": 0, "n": 2, "logprobs": true, "top_logprobs": 3});
    let whole = chat(&server, &body).await;
    let mut stream_body = body.clone();
    stream_body["stream"] = json!(true);
    stream_body["stream_options"] = json!({"include_usage": true});
    let (status, ctype, events) =
        post_stream(&server.url("/v1/chat/completions"), &stream_body).await;
    assert_eq!(status, 200);
    assert!(ctype.starts_with("text/event-stream"));
    assert_eq!(events.last().unwrap(), "[DONE]");
    let mut text = [String::new(), String::new()];
    let mut roles = [0, 0];
    let mut finish = [Value::Null, Value::Null];
    let mut logprobs = [0, 0];
    for e in &events[..events.len() - 2] {
        assert_eq!(e["object"], "chat.completion.chunk");
        assert!(e["usage"].is_null());
        let c = &e["choices"][0];
        let i = c["index"].as_u64().unwrap() as usize;
        if c["delta"]["role"] == "assistant" {
            roles[i] += 1;
        }
        text[i].push_str(c["delta"]["content"].as_str().unwrap_or(""));
        if !c["finish_reason"].is_null() {
            finish[i] = c["finish_reason"].clone();
        }
        if let Some(lp) = c["logprobs"]["content"].as_array() {
            logprobs[i] += lp.len();
        }
    }
    let usage = &events[events.len() - 2];
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"]["completion_tokens"], 16);
    for i in 0..2 {
        let c = &whole["choices"][i];
        assert_eq!(roles[i], 1, "the role comes once, first");
        assert_eq!(text[i], c["message"]["content"].as_str().unwrap());
        assert_eq!(finish[i], c["finish_reason"]);
        assert_eq!(logprobs[i], 8);
        let content = c["logprobs"]["content"].as_array().unwrap();
        assert_eq!(content.len(), 8);
        for t in content {
            let tok = t["token"].as_str().unwrap();
            assert_eq!(t["bytes"], json!(tok.as_bytes()));
            let top = t["top_logprobs"].as_array().unwrap();
            assert_eq!(top.len(), 3);
            // Greedy: the token is the best alternative.
            assert_eq!(top[0]["token"], t["token"]);
            assert!(t["logprob"].as_f64().unwrap() <= 0.0);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn modes_come_from_multi_exit_or_the_model_id() {
    let server = chat_server();
    let messages = json!([{"role": "user", "content": "Hello"}]);
    let base = json!({"model": MODEL, "messages": messages, "max_tokens": 4, "temperature": 0});
    for (extra, mode) in [
        (json!({"multi_exit": {"mode": "exit", "layer": 2}}), "exit"),
        (json!({"model": format!("{MODEL}:exit-2")}), "exit"),
        (
            json!({"multi_exit": {"mode": "contrast", "upper": "original", "lower": 1}}),
            "contrast",
        ),
        (
            json!({"multi_exit": {"mode": "dola", "layers": "low", "premature": "lm_head"}}),
            "dola",
        ),
        (
            json!({"multi_exit": {"mode": "early_exit", "threshold": 0.5}}),
            "early_exit",
        ),
        (json!({"speculative": {"draft_layer": 1}}), "original"),
    ] {
        let mut body = base.clone();
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        let out = chat(&server, &body).await;
        assert_eq!(out["multi_exit"]["mode"], mode, "{body}");
        assert_eq!(out["usage"]["completion_tokens"], 4, "{body}");
    }
    // The exit mode's chat equals its completion of the rendered prompt.
    let exit = chat(
        &server,
        &json!({"model": format!("{MODEL}:exit-2"), "messages": messages, "max_tokens": 4,
            "temperature": 0}),
    )
    .await;
    let (_, completion) = post(
        &server.url("/v1/completions"),
        &json!({"model": MODEL, "prompt": "User: Hello\nAssistant:", "max_tokens": 4,
            "temperature": 0, "multi_exit": {"mode": "exit", "layer": 2}}),
    )
    .await;
    assert_eq!(
        exit["choices"][0]["message"]["content"],
        completion["choices"][0]["text"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_checkpoints_own_template_is_used_and_without_one_chat_is_refused() {
    // A copy of the fixture whose tokenizer_config.json carries an HF-style template.
    let src = fixture_dir(common::FIXTURE);
    let dir = std::env::temp_dir().join(format!("exitserve-chat-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for entry in std::fs::read_dir(&src).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.join(entry.file_name())).unwrap();
    }
    let cfg_path = dir.join("tokenizer_config.json");
    let mut cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["chat_template"] = json!(
        "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}{% set messages = messages[1:] %}{% else %}{% set system = 'Default system.' %}{% endif %}\
{{ bos_token }}[SYS] {{ system.strip() }}\n\
{% for m in messages %}{% if m['role'] not in ['user', 'assistant'] %}{{ raise_exception('roles are user and assistant') }}{% endif %}\
[{{ m['role'].upper() }}] {{ m['content'] }}\n{% endfor %}\
{% if add_generation_prompt %}[ASSISTANT]{% endif %}"
    );
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let server = TestServer::start_model(&dir, &[]);
    let model = dir.file_name().unwrap().to_str().unwrap().to_string();
    let (_, info) = get(&server.url("/tokenizer_info")).await;
    assert_eq!(info["chat_template"], cfg["chat_template"]);
    let expected = "<|endoftext|>[SYS] Be terse.\n[USER] Hi\n[ASSISTANT]";
    for (messages, text) in [
        (
            json!([{"role": "system", "content": " Be terse. "}, {"role": "user", "content": "Hi"}]),
            expected,
        ),
        (
            json!([{"role": "user", "content": "Hi"}]),
            "<|endoftext|>[SYS] Default system.\n[USER] Hi\n[ASSISTANT]",
        ),
    ] {
        let out = chat(
            &server,
            &json!({"model": model, "messages": messages, "max_tokens": 2, "temperature": 0,
                "return_token_ids": true}),
        )
        .await;
        let (_, tokens) = post(&server.url("/tokenize"), &json!({"prompt": text})).await;
        assert_eq!(
            out["choices"][0]["prompt_token_ids"], tokens["tokens"],
            "{text:?}"
        );
    }
    // No generation prompt; the template's own refusal is a 400 on `messages`.
    let (_, counted) = post(
        &server.url("/tokenize"),
        &json!({"messages": [{"role": "user", "content": "Hi"}], "add_generation_prompt": false,
            "return_token_strs": true}),
    )
    .await;
    assert!(!counted["token_strs"]
        .as_array()
        .unwrap()
        .iter()
        .any(|t| t.as_str().unwrap().contains("ASS")));
    let (status, err) = post(
        &server.url("/v1/chat/completions"),
        &json!({"model": model, "messages": [{"role": "system", "content": "a"}, {"role": "system", "content": "b"}]}),
    )
    .await;
    assert_eq!(status, 400, "{err}");
    assert_eq!(err["error"]["param"], "messages");
    assert!(err["error"]["message"]
        .as_str()
        .unwrap()
        .contains("roles are user and assistant"));
    std::fs::remove_dir_all(&dir).ok();

    // The released checkpoints have no template: chat is a 400 that names the flag.
    let plain = TestServer::start(&[]);
    let (status, err) = post(
        &plain.url("/v1/chat/completions"),
        &json!({"model": MODEL, "messages": [{"role": "user", "content": "Hi"}]}),
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(err["error"]["param"], "messages");
    assert!(err["error"]["message"]
        .as_str()
        .unwrap()
        .contains("--chat-template"));
    let (_, info) = get(&plain.url("/tokenizer_info")).await;
    assert!(info["chat_template"].is_null());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_max_tokens_a_chat_may_fill_the_context() {
    let server = chat_server();
    let out = chat(
        &server,
        &json!({"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "temperature": 0,
            "ignore_eos": true}),
    )
    .await;
    let usage = &out["usage"];
    let (_, models) = get(&server.url("/v1/models")).await;
    let context = models["data"][0]["max_model_len"].as_u64().unwrap();
    assert_eq!(
        usage["total_tokens"].as_u64().unwrap(),
        context,
        "{usage}: more than completions' default of 16"
    );
    assert_eq!(out["choices"][0]["finish_reason"], "length");
    // max_completion_tokens is OpenAI's newer name for max_tokens.
    let out = chat(
        &server,
        &json!({"model": MODEL, "messages": [{"role": "user", "content": "Hi"}],
            "max_completion_tokens": 3, "max_tokens": 3}),
    )
    .await;
    assert_eq!(out["usage"]["completion_tokens"], 3);
}

/// (name, fields merged over a valid chat request, param named)
fn bad_chats() -> Vec<(&'static str, Value, &'static str)> {
    let user = |content: Value| json!({"messages": [{"role": "user", "content": content}]});
    vec![
        ("no messages", json!({"messages": null}), "messages"),
        ("empty messages", json!({"messages": []}), "messages"),
        (
            "tool role",
            json!({"messages": [{"role": "tool", "content": "x"}]}),
            "messages[0].role",
        ),
        (
            "unknown role",
            json!({"messages": [{"role": "bot", "content": "x"}]}),
            "messages[0].role",
        ),
        (
            "null user content",
            user(Value::Null),
            "messages[0].content",
        ),
        ("number content", user(json!(3)), "messages[0].content"),
        (
            "image part",
            user(json!([{"type": "image_url", "image_url": {"url": "http://x"}}])),
            "messages[0].content[0].type",
        ),
        (
            "part without text",
            user(json!([{"type": "text"}])),
            "messages[0].content[0]",
        ),
        (
            "message unknown field",
            json!({"messages": [{"role": "user", "content": "x", "tool_calls": []}]}),
            "messages[0].tool_calls",
        ),
        ("tools", json!({"tools": [{"type": "function"}]}), "tools"),
        ("tool_choice", json!({"tool_choice": "auto"}), "tool_choice"),
        (
            "top_logprobs without logprobs",
            json!({"top_logprobs": 2}),
            "top_logprobs",
        ),
        (
            "top_logprobs 21",
            json!({"logprobs": true, "top_logprobs": 21}),
            "top_logprobs",
        ),
        (
            "max_tokens differ",
            json!({"max_tokens": 3, "max_completion_tokens": 4}),
            "max_completion_tokens",
        ),
        ("best_of", json!({"best_of": 2}), "best_of"),
        ("echo", json!({"echo": true}), "echo"),
        ("prompt", json!({"prompt": "x"}), "prompt"),
        (
            "stream_options without stream",
            json!({"stream_options": {"include_usage": true}}),
            "stream_options",
        ),
        (
            "continue a user message",
            json!({"continue_final_message": true}),
            "continue_final_message",
        ),
        (
            "kwargs not an object",
            json!({"chat_template_kwargs": 3}),
            "chat_template_kwargs",
        ),
        ("temperature", json!({"temperature": 3}), "temperature"),
        (
            "multi_exit",
            json!({"multi_exit": {"mode": "exit", "layer": 3}}),
            "multi_exit.layer",
        ),
        (
            "response_format unknown",
            json!({"response_format": {"type": "xml"}}),
            "response_format.type",
        ),
        (
            "json_schema name",
            json!({"response_format": {"type": "json_schema", "json_schema": {"name": "a b", "schema": {}}}}),
            "response_format.json_schema.name",
        ),
        (
            "invalid schema",
            json!({"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": {"type": "bogus"}}}}),
            "response_format.json_schema.schema",
        ),
        (
            "bad regex",
            json!({"structured_outputs": {"regex": "(a"}}),
            "structured_outputs.regex",
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_chat_requests_get_a_400_naming_the_field() {
    let server = chat_server();
    let url = server.url("/v1/chat/completions");
    for (name, extra, param) in bad_chats() {
        let mut body = json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        let (status, v) = post(&url, &body).await;
        assert_eq!(status, 400, "{name}: {v}");
        assert_eq!(v["error"]["type"], "invalid_request_error", "{name}: {v}");
        assert_eq!(v["error"]["param"], param, "{name}: {v}");
        let field = param.rsplit('.').next().unwrap();
        let field = field.split('[').next().unwrap();
        assert!(
            v["error"]["message"].as_str().unwrap().contains(field),
            "{name}: the message does not name `{field}`: {v}"
        );
    }
    let (status, _) = get(&server.url("/health")).await;
    assert_eq!(status, 200);
    assert_eq!(server.metric("exitserve_model_steps_total"), 0.0);
}
