//! Every rule, without a server: each refusal's field and exact message.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{Limits, ValidationError, Validator};
use crate::engine::request::{
    GenerateRequest, InspectRequest, ModeSpec, PromptInput, SpeculativeRequest, SpeculativeSpec,
};
use crate::engine::scheduler::{Budget, StepBudget};
use crate::model::source::TokenizerFiles;
use crate::model::{ContrastParams, Mode, TextTokenizer, Upper};

const VOCAB: usize = 50257;

fn validator() -> Validator {
    validator_with(|_| {})
}

/// The test validator with `edit` made to its limits.
fn validator_with(edit: impl FnOnce(&mut Limits)) -> Validator {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/tiny-gpt-neo-multiexit/tokenizer.json");
    let tok = TextTokenizer::from_files(&TokenizerFiles::Json(dir)).expect("fixture tokenizer");
    let mut limits = Limits {
        max_input_tokens: 64,
        max_best_of: 4,
        max_positions: 128,
        vocab_size: VOCAB,
        exit_layers: vec![1, 2, 4],
        num_layers: 4,
        tied_head: true,
        default_mode: Mode::ORIGINAL,
        request_timeout: Duration::from_secs(60),
        budget: Budget {
            max_sequences: 3,
            max_tokens: 100,
            step: StepBudget {
                prefill: 64,
                prefill_beside_higher: 64,
                sequences_beside_higher: 3,
            },
        },
        max_sequences_per_request: 8,
        max_stop_sequences: 2,
        max_stop_length: 5,
        max_logit_bias: 2,
        max_inspect_positions: 3,
        max_token_bytes: 8,
        speculative_default: None,
        speculative_max_draft_tokens: 4,
    };
    edit(&mut limits);
    Validator::new(limits, Arc::new(tok))
}

fn request() -> GenerateRequest {
    GenerateRequest {
        prompts: vec![PromptInput::Tokens(vec![1, 2, 3])],
        ..Default::default()
    }
}

fn refusal(req: GenerateRequest) -> (String, String) {
    let e = validator()
        .validate(req, Instant::now())
        .expect_err("refused");
    (e.param(), e.to_string())
}

/// Checks that `edit` applied to a valid request is refused on `param` with `message`.
#[track_caller]
fn refused(edit: impl FnOnce(&mut GenerateRequest), param: &str, message: &str) {
    let mut req = request();
    edit(&mut req);
    assert_eq!(refusal(req), (param.to_string(), message.to_string()));
}

/// A mode object as a client sends it (`mode` and its fields).
fn spec(object: serde_json::Value) -> ModeSpec {
    let mut fields = object.as_object().unwrap().clone();
    let mode = fields.remove("mode").unwrap();
    ModeSpec {
        mode: Mode::known_label(mode.as_str().unwrap()).unwrap(),
        fields,
    }
}

fn contrast(upper: serde_json::Value, lower: serde_json::Value) -> ModeSpec {
    spec(serde_json::json!({"mode": "contrast", "upper": upper, "lower": lower}))
}

#[test]
fn a_valid_request_gets_its_defaults() {
    let v = validator().validate(request(), Instant::now()).unwrap();
    assert_eq!(v.prompts, vec![vec![1, 2, 3]]);
    assert_eq!(v.mode, Mode::ORIGINAL);
    assert_eq!((v.max_tokens, v.n, v.best_of), (16, 1, 1));
    assert_eq!(v.sampling.temperature, 1.0);
    assert_eq!(v.logprobs, None);
    assert_eq!(v.speculative, None);
}

#[test]
fn sampling_ranges() {
    refused(
        |r| r.temperature = Some(2.5),
        "temperature",
        "`temperature` must be in [0, 2], got 2.5",
    );
    refused(
        |r| r.temperature = Some(f64::NAN),
        "temperature",
        "`temperature` must be in [0, 2], got NaN",
    );
    refused(
        |r| r.top_p = Some(0.0),
        "top_p",
        "`top_p` must be in (0, 1], got 0",
    );
    refused(
        |r| r.presence_penalty = Some(-3.0),
        "presence_penalty",
        "`presence_penalty` must be in [-2, 2], got -3",
    );
    refused(
        |r| r.frequency_penalty = Some(2.1),
        "frequency_penalty",
        "`frequency_penalty` must be in [-2, 2], got 2.1",
    );
    refused(
        |r| r.repetition_penalty = Some(0.0),
        "repetition_penalty",
        "`repetition_penalty` must be in (0, 10], got 0",
    );
    refused(
        |r| r.top_k = Some(-2),
        "top_k",
        "`top_k` must be -1, 0 (disabled) or positive, got -2",
    );
    refused(
        |r| r.logprobs = Some(6),
        "logprobs",
        "`logprobs` must be in [0, 5], got 6",
    );
}

#[test]
fn candidates() {
    refused(|r| r.n = Some(0), "n", "`n` must be in [1, 4], got 0");
    refused(|r| r.n = Some(5), "n", "`n` must be in [1, 4], got 5");
    refused(
        |r| (r.n, r.best_of) = (Some(2), Some(1)),
        "best_of",
        "`best_of` must be in [n = 2, 4], got 1",
    );
    refused(
        |r| (r.best_of, r.stream) = (Some(2), true),
        "best_of",
        "`best_of` > 1 cannot be used with `stream`",
    );
    refused(
        |r| {
            r.prompts = vec![PromptInput::Tokens(vec![1]); 3];
            r.best_of = Some(3);
        },
        "best_of",
        "this request asks for 3 prompts x `best_of` 3 = 9 sequences, more than --max-sequences-per-request 8",
    );
    refused(
        |r| r.prompts = vec![PromptInput::Tokens(vec![1]); 9],
        "prompt",
        "this request asks for 9 prompts x `best_of` 1 = 9 sequences, more than --max-sequences-per-request 8",
    );
}

#[test]
fn stops_and_logit_bias() {
    refused(
        |r| r.stop = vec!["a".into(), "b".into(), "c".into()],
        "stop",
        "`stop` takes at most 2 sequences (--max-stop-sequences), got 3",
    );
    refused(
        |r| r.stop = vec![String::new()],
        "stop",
        "`stop` sequences must not be empty",
    );
    refused(
        |r| r.stop = vec!["ééééé!".into()],
        "stop",
        "each `stop` sequence may have at most 5 characters (--max-stop-length), got 6",
    );
    refused(
        |r| r.logit_bias = vec![("1".into(), 1.0); 3],
        "logit_bias",
        "`logit_bias` takes at most 2 entries (--max-logit-bias), got 3",
    );
    refused(
        |r| r.logit_bias = vec![("50257".into(), 1.0)],
        "logit_bias",
        "`logit_bias` keys must be token ids in [0, 50257), got \"50257\"",
    );
    refused(
        |r| r.logit_bias = vec![("7".into(), -101.0)],
        "logit_bias",
        "`logit_bias` values must be in [-100, 100], got -101 for 7",
    );
}

#[test]
fn lengths_and_the_budget() {
    refused(
        |r| r.max_tokens = Some(0),
        "max_tokens",
        "`max_tokens` must be at least 1, got 0",
    );
    refused(
        |r| (r.max_tokens, r.echo) = (Some(-1), true),
        "max_tokens",
        "`max_tokens` must be at least 0, got -1",
    );
    refused(
        |r| r.max_tokens = Some(i64::MAX),
        "max_tokens",
        &format!("this model's maximum context length is 128 tokens; `max_tokens` is {}, which leaves no room for a prompt", i64::MAX),
    );
    refused(
        |r| {
            r.prompts = vec![PromptInput::Tokens(vec![1; 60])];
            r.max_tokens = Some(100);
        },
        "max_tokens",
        "this model's maximum context length is 128 tokens; the prompt has 60 tokens and `max_tokens` is 100 (160 in all)",
    );
    refused(
        |r| (r.n, r.best_of) = (Some(1), Some(4)),
        "best_of",
        "each prompt runs as 4 sequences (`best_of`), more than the batch holds (--max-batch-size 3)",
    );
    refused(
        |r| r.n = Some(4),
        "n",
        "each prompt runs as 4 sequences (`n`), more than the batch holds (--max-batch-size 3)",
    );
    refused(
        |r| {
            r.prompts = vec![PromptInput::Tokens(vec![1; 60])];
            r.max_tokens = Some(50);
        },
        "max_tokens",
        "a prompt of 60 tokens with `max_tokens` 50 x 1 sequences needs 110 KV-cache tokens, more than the server's budget (--max-batch-total-tokens 100)",
    );
}

#[test]
fn prompts() {
    refused(
        |r| r.prompts.clear(),
        "prompt",
        "`prompt` must not be an empty list",
    );
    refused(
        |r| r.prompts = vec![PromptInput::Text(String::new())],
        "prompt",
        "`prompt` must not be empty",
    );
    refused(
        |r| r.prompts = vec![PromptInput::Tokens(vec![1, -1])],
        "prompt",
        "token ids in `prompt` must be in [0, 50257), got -1",
    );
    refused(
        |r| r.prompts = vec![PromptInput::Tokens(vec![50257])],
        "prompt",
        "token ids in `prompt` must be in [0, 50257), got 50257",
    );
    refused(
        |r| r.prompts = vec![PromptInput::Tokens(vec![1; 65])],
        "prompt",
        "`prompt` has 65 tokens, more than --max-input-tokens 64",
    );
    // Refused from its length alone: 8 bytes at most per token.
    refused(
        |r| r.prompts = vec![PromptInput::Text("x".repeat(513))],
        "prompt",
        "`prompt` has at least 65 (513 bytes) tokens, more than --max-input-tokens 64",
    );
    // Short enough in bytes, too long once tokenized (" a" is one token each).
    refused(
        |r| r.prompts = vec![PromptInput::Text(" a".repeat(65))],
        "prompt",
        "`prompt` has 65 tokens, more than --max-input-tokens 64",
    );
    let v = validator();
    let ok = v
        .validate(
            GenerateRequest {
                prompts: vec![PromptInput::Text("Hello world".into())],
                ..request()
            },
            Instant::now(),
        )
        .unwrap();
    assert_eq!(ok.prompts, vec![vec![15496, 995]]);
}

/// DoLa's layers resolved against the test model (4 layers, exits 1, 2 and 4, tied head).
#[test]
fn dola_modes() {
    use crate::model::mode::{DolaLayers, DolaParams, Layers, Premature};
    use serde_json::{json, Value};
    let v = validator();
    let dola = |layers: Value, premature: Option<&str>, rt: Option<f64>| {
        v.mode(&spec(
            json!({"mode": "dola", "layers": layers, "premature": premature, "relative_top": rt}),
        ))
        .map(|m| match m {
            Mode::Dola(d) => (d.candidates.iter().collect::<Vec<_>>(), d.premature),
            other => panic!("{other:?}"),
        })
        .map_err(|e| (e.param(), e.to_string()))
    };
    let named = |n: &str| json!(n);
    let list = |l: &[i64]| json!(l);
    // N = 4, tied: start 2 = N/2, so "low" is [2]; "high" is range(2, 4, 2)
    assert_eq!(
        dola(named("low"), None, None),
        Ok((vec![2], Premature::Exits))
    );
    assert_eq!(
        dola(Value::Null, None, None),
        Ok((vec![2], Premature::Exits)),
        "high by default"
    );
    assert_eq!(
        dola(list(&[2, 1, 2, 7]), None, None),
        Ok((vec![1, 2], Premature::Exits))
    );
    assert_eq!(
        dola(list(&[0, 3]), Some("lm_head"), None),
        Ok((vec![0, 3], Premature::LmHead)),
        "any layer through the top head, the embeddings too"
    );
    let param = |r: Result<_, (String, String)>| r.unwrap_err().0;
    assert_eq!(param(dola(list(&[3]), None, None)), "multi_exit.layers");
    assert_eq!(param(dola(list(&[]), None, None)), "multi_exit.layers");
    assert_eq!(param(dola(list(&[4, 5]), None, None)), "multi_exit.layers");
    assert_eq!(param(dola(named("mid"), None, None)), "multi_exit.layers");
    assert_eq!(
        param(dola(list(&[1]), Some("x"), None)),
        "multi_exit.premature"
    );
    assert_eq!(
        param(dola(list(&[1]), None, Some(0.0))),
        "multi_exit.relative_top"
    );
    assert_eq!(
        param(dola(json!({"x": 1}), None, None)),
        "multi_exit.layers"
    );
    assert_eq!(param(dola(json!([1.5]), None, None)), "multi_exit.layers");
    // a mode parsed from text validates as the request's would
    let parsed: Mode = "dola:1-2,relative_top=0.5".parse().unwrap();
    let Mode::Dola(p) = v.check_mode(parsed).unwrap() else {
        panic!()
    };
    assert_eq!(
        p,
        DolaParams {
            layers: DolaLayers::List(Layers::from_list([1, 2]).unwrap()),
            premature: Premature::Exits,
            relative_top: 0.5,
            candidates: Layers::from_list([1, 2]).unwrap(),
        }
    );
}

/// SLED's premature layers and parameters against the test model (4 layers, exits 1, 2, 4).
#[test]
fn sled_modes() {
    use crate::model::mode::{Premature, SledParams};
    let sled = |v: &Validator, mut fields: serde_json::Value| {
        fields["mode"] = "sled".into();
        v.mode(&spec(fields))
            .map(|m| match m {
                Mode::Sled(p) => p,
                other => panic!("{other:?}"),
            })
            .map_err(|e| e.param())
    };
    let v = validator();
    let p = sled(&v, serde_json::json!({})).unwrap();
    assert_eq!(p.candidates.iter().collect::<Vec<_>>(), [1, 2]);
    assert_eq!((p.premature, p.evolution_scale), (Premature::Exits, 5));
    let p = sled(&v, serde_json::json!({"premature": "lm_head"})).unwrap();
    assert_eq!(p.candidates.iter().collect::<Vec<_>>(), [2, 3]);
    for (fields, param) in [
        (serde_json::json!({"evolution_scale": 0}), "evolution_scale"),
        (
            serde_json::json!({"evolution_scale": VOCAB as i64 + 1}),
            "evolution_scale",
        ),
        (
            serde_json::json!({"evolution_rate": -1.0}),
            "evolution_rate",
        ),
        (
            serde_json::json!({"evolution_lower_bound": 1.0}),
            "evolution_lower_bound",
        ),
        (serde_json::json!({"alpha": -0.5}), "alpha"),
        (serde_json::json!({"premature": "top"}), "premature"),
        (
            serde_json::json!({"evolution_scale": 2.5}),
            "evolution_scale",
        ),
        (serde_json::json!({"layers": [1]}), "layers"),
    ] {
        assert_eq!(
            sled(&v, fields.clone()),
            Err(format!("multi_exit.{param}")),
            "{fields}"
        );
    }
    // a model whose only exit is the top: no premature exit, refused naming `premature`
    let top_only = validator_with(|l| l.exit_layers = vec![4]);
    assert_eq!(
        sled(&top_only, serde_json::json!({})),
        Err("multi_exit.premature".into())
    );
    assert!(sled(&top_only, serde_json::json!({"premature": "lm_head"})).is_ok());
    // the flag form and the model id validate as a request would
    let parsed: Mode = "sled:evolution_scale=10,alpha=0".parse().unwrap();
    let Mode::Sled(p) = v.check_mode(parsed).unwrap() else {
        panic!()
    };
    assert_eq!(
        (p.evolution_scale, p.alpha, p.candidates.len()),
        (10, 0.0, 2)
    );
    assert_eq!(
        Mode::from_id_suffix("sled"),
        Some(Mode::Sled(SledParams::default()))
    );
}

#[test]
fn modes() {
    let v = validator();
    let mode = |spec: ModeSpec| v.mode(&spec).map_err(|e| (e.param(), e.to_string()));
    let err = |p: &str, m: &str| Err((p.to_string(), m.to_string()));
    use serde_json::json;
    assert_eq!(
        mode(spec(json!({"mode": "exit", "layer": 2}))),
        Ok(Mode::exit(2))
    );
    assert_eq!(
        mode(spec(json!({"mode": "exit"}))),
        err(
            "multi_exit.layer",
            "`multi_exit.layer` is required; available exits: [1, 2, 4]"
        )
    );
    assert_eq!(
        mode(spec(json!({"mode": "exit", "layer": 3}))),
        err(
            "multi_exit.layer",
            "`multi_exit.layer` = 3 is not an exit layer of this model; available exits: [1, 2, 4]"
        )
    );
    assert_eq!(
        mode(spec(json!({"mode": "exit", "layer": -1}))),
        err("multi_exit.layer", "`multi_exit.layer` = -1 is not an exit layer of this model; available exits: [1, 2, 4]")
    );
    assert_eq!(
        mode(contrast(json!("original"), json!(1))),
        Ok(Mode::Contrast(ContrastParams {
            upper: Upper::Original,
            lower: 1,
            alpha: 0.1,
            minimum_candidates: 1,
        }))
    );
    assert_eq!(
        mode(contrast(json!(null), json!(1))),
        err(
            "multi_exit.upper",
            "`multi_exit.upper` is required: an exit layer [1, 2, 4] or \"original\""
        )
    );
    assert_eq!(
        mode(contrast(json!(2), json!(null))),
        err(
            "multi_exit.lower",
            "`multi_exit.lower` is required; available exits: [1, 2, 4]"
        )
    );
    assert_eq!(
        mode(contrast(json!(2), json!(4))),
        err(
            "multi_exit.upper",
            "`multi_exit.upper` (2) must be above `multi_exit.lower` (4)"
        )
    );
    assert_eq!(
        mode(spec(
            json!({"mode": "contrast", "upper": 4, "lower": 1, "alpha": 0.0})
        )),
        err(
            "multi_exit.alpha",
            "`multi_exit.alpha` must be in (0, 1], got 0"
        )
    );
    assert_eq!(
        mode(spec(
            json!({"mode": "contrast", "upper": 4, "lower": 1, "minimum_candidates": 0})
        )),
        err(
            "multi_exit.minimum_candidates",
            "`multi_exit.minimum_candidates` must be in [1, 50257], got 0"
        )
    );
    // A mode named by the model id and a contradicting `multi_exit`.
    refused(
        |r| {
            r.named_mode = Some(Mode::exit(1));
            r.mode = Some(spec(json!({"mode": "exit", "layer": 2})));
        },
        "multi_exit",
        "`multi_exit` asks for another mode than the one named by `model`; send one of them",
    );
    // Fields the strategy does not take, and fields of the wrong type, are refused by name.
    assert_eq!(
        mode(spec(json!({"mode": "exit", "layer": 2, "lower": 1}))),
        err(
            "multi_exit.lower",
            "unknown field `multi_exit.lower`: mode `exit` takes layer"
        )
    );
    assert_eq!(
        mode(spec(
            json!({"mode": "contrast", "upper": "top", "lower": 1})
        )),
        err(
            "multi_exit.upper",
            "`multi_exit.upper` must be an exit layer or \"original\", got \"top\""
        )
    );
    assert_eq!(
        mode(spec(json!({"mode": "early_exit", "threshold": "high"}))),
        err(
            "multi_exit.threshold",
            "`multi_exit.threshold` must be a number, got \"high\""
        )
    );
    // A mode parsed from text validates as the same object would.
    assert_eq!(
        v.check_mode("exit:4".parse::<Mode>().unwrap()),
        Ok(Mode::exit(4))
    );
    assert!(v.check_mode("exit:3".parse::<Mode>().unwrap()).is_err());
    assert_eq!(
        v.check_mode("contrast:4,1,alpha=5".parse::<Mode>().unwrap())
            .unwrap_err()
            .param(),
        "multi_exit.alpha",
        "a flag's parameters are range-checked as a request's"
    );
}

#[test]
fn speculation() {
    let v = validator();
    let spec = |layer: Option<i64>, k: Option<i64>, mode: Mode| {
        v.speculative(
            Some(SpeculativeRequest {
                draft_layer: layer,
                max_draft_tokens: k,
                adaptive: None,
            }),
            &mode,
        )
        .map_err(|e| (e.param(), e.to_string()))
    };
    let err = |p: &str, m: &str| Err((p.to_string(), m.to_string()));
    assert_eq!(
        spec(None, None, Mode::ORIGINAL),
        Ok(Some(SpeculativeSpec {
            draft_layer: 2,
            max_draft_tokens: 4,
            adaptive: true
        }))
    );
    assert_eq!(
        spec(None, None, Mode::exit(1)),
        err("speculative.draft_layer", "`speculative.draft_layer` is needed: no exit lies at or below half of this mode's depth (1)")
    );
    assert_eq!(
        spec(Some(3), None, Mode::ORIGINAL),
        err(
            "speculative.draft_layer",
            "`speculative.draft_layer` must be one of the exit layers [1, 2, 4], got 3"
        )
    );
    assert_eq!(
        spec(Some(2), None, Mode::exit(2)),
        err("speculative.draft_layer", "`speculative.draft_layer` (2) must lie below the layer this mode decodes from (2): the draft is verified by the mode's own distribution")
    );
    assert_eq!(
        spec(Some(1), Some(17), Mode::ORIGINAL),
        err(
            "speculative.max_draft_tokens",
            "`speculative.max_draft_tokens` must be in [1, 16], got 17"
        )
    );
    assert_eq!(v.speculative(None, &Mode::ORIGINAL), Ok(None));
}

#[test]
fn inspections() {
    let v = validator();
    let inspect = |edit: &dyn Fn(&mut InspectRequest)| {
        let mut req = InspectRequest {
            prompt: Some(PromptInput::Tokens(vec![1, 2])),
            ..Default::default()
        };
        edit(&mut req);
        v.validate_inspect(req, Instant::now())
            .map(|r| r.inspect.unwrap())
            .map_err(|e| (e.param(), e.to_string()))
    };
    let err = |p: &str, m: &str| Err((p.to_string(), m.to_string()));
    use serde_json::json;
    let ok = inspect(&|_| {}).unwrap();
    assert_eq!(
        (ok.top_logprobs, ok.all_positions, ok.strategies.len()),
        (5, false, 0)
    );
    assert_eq!(
        inspect(&|r| r.top_logprobs = Some(21)),
        err("top_logprobs", "`top_logprobs` must be in [0, 20], got 21")
    );
    assert_eq!(
        inspect(&|r| r.positions = Some("some".into())),
        err(
            "positions",
            "`positions` must be \"last\" or \"all\", got \"some\""
        )
    );
    assert_eq!(
        inspect(&|r| r.prompt = None),
        err("prompt", "`prompt` is required")
    );
    let asks = |object: &str, s: ModeSpec| vec![(object.to_string(), s)];
    assert_eq!(
        inspect(&|r| r.strategies = asks("strategies[0]", spec(json!({"mode": "exit", "layer": 2})))),
        err("strategies[0].mode", "`strategies[0].mode`: the original and exit heads are always reported; name a strategy that combines heads")
    );
    // A strategy named by the model id is reported; one of its kind asked for must agree.
    let named = "contrast:4,1".parse::<Mode>().ok();
    assert_eq!(
        inspect(&|r| {
            r.named_mode = named;
            r.strategies = asks("contrast", contrast(json!(4), json!(2)));
        }),
        err(
            "contrast",
            "`contrast` asks for another contrast than the one named by `model`; send one of them"
        )
    );
    let agreed = inspect(&|r| {
        r.named_mode = named;
        r.strategies = asks("contrast", contrast(json!(4), json!(1)));
    })
    .unwrap();
    assert_eq!(agreed.strategies.len(), 1, "reported once");
    let both = inspect(&|r| {
        r.named_mode = named;
        r.strategies = asks(
            "strategies[0]",
            spec(json!({"mode": "dola", "layers": [1, 2]})),
        );
    })
    .unwrap();
    assert_eq!(
        both.strategies
            .iter()
            .map(|m| m.to_string())
            .collect::<Vec<_>>(),
        ["dola:1-2", "contrast:4,1"]
    );
    // DoLa through the top head adds the heads it reads to those evaluated.
    let lm = inspect(&|r| {
        r.strategies = asks(
            "dola",
            spec(json!({"mode": "dola", "layers": [0, 3], "premature": "lm_head"})),
        )
    })
    .unwrap();
    assert_eq!(lm.heads(&[1, 2, 4]).len(), 4 + 2);
    // A strategy's errors name its field.
    assert_eq!(
        inspect(&|r| r.strategies = asks("contrast", contrast(json!(4), json!(3)))),
        err(
            "contrast.lower",
            "`contrast.lower` = 3 is not an exit layer of this model; available exits: [1, 2, 4]"
        )
    );
    assert_eq!(
        inspect(&|r| r.strategies = asks("strategies[1]", contrast(json!(1), json!(2)))),
        err(
            "strategies[1].upper",
            "`strategies[1].upper` (1) must be above `strategies[1].lower` (2)"
        )
    );
    assert_eq!(
        inspect(&|r| {
            r.strategies = (0..9)
                .map(|i| (format!("strategies[{i}]"), contrast(json!(4), json!(1))))
                .collect()
        }),
        err(
            "strategies",
            "`strategies` takes at most 8 strategies, got 9"
        )
    );
}

#[test]
fn context_errors_carry_their_code() {
    let mut req = request();
    req.max_tokens = Some(200);
    let e = validator().validate(req, Instant::now()).unwrap_err();
    assert_eq!(e.code(), Some("context_length_exceeded"));
    assert_eq!(ValidationError::EmptyStop.code(), None);
}
