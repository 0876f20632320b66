//! Parity with the reference implementation on the tiny fixture checkpoints: every mode, both
//! checkpoint formats, single and batched.

mod common;

use common::{fixture_dir, reference, Case, FIXTURE, FIXTURE_BIN};
use exitserve::model::{
    self, ContrastParams, Head, LoadOptions, LoadedModel, Mode, SeqStep, Upper,
};

type TestResult = Result<(), Box<dyn std::error::Error>>;

/// `original`, `exit:L`, `contrast:U,L` (U a layer or `original`) with the reference's defaults.
fn parse_mode(s: &str) -> Mode {
    if s == "original" {
        return Mode::Original;
    }
    if let Some(l) = s.strip_prefix("exit:") {
        return Mode::Exit(l.parse().unwrap());
    }
    let (u, l) = s
        .strip_prefix("contrast:")
        .unwrap()
        .split_once(',')
        .unwrap();
    Mode::Contrast(ContrastParams {
        upper: if u == "original" {
            Upper::Original
        } else {
            Upper::Exit(u.parse().unwrap())
        },
        lower: l.parse().unwrap(),
        alpha: model::mode::DEFAULT_ALPHA,
        minimum_candidates: model::mode::DEFAULT_MINIMUM_CANDIDATES,
    })
}

fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best as u32
}

/// Greedy decoding of several sequences in one batch; returns ids and per-step scores.
fn greedy_batch(
    m: &LoadedModel,
    cases: &[(Mode, Vec<u32>)],
    steps: usize,
) -> Vec<(Vec<u32>, Vec<Vec<f32>>)> {
    let n_layers = m.model.config().num_layers;
    let mut caches: Vec<_> = cases.iter().map(|_| m.model.new_cache()).collect();
    let heads: Vec<Vec<Head>> = cases.iter().map(|(mode, _)| mode.heads()).collect();
    let mut inputs: Vec<Vec<u32>> = cases.iter().map(|(_, p)| p.clone()).collect();
    let mut out: Vec<(Vec<u32>, Vec<Vec<f32>>)> = cases.iter().map(|_| (vec![], vec![])).collect();
    for _ in 0..steps {
        let mut batch: Vec<SeqStep> = caches
            .iter_mut()
            .zip(&inputs)
            .zip(cases.iter().zip(&heads))
            .map(|((cache, tokens), ((mode, _), heads))| SeqStep {
                tokens,
                cache,
                depth: mode.depth(n_layers),
                heads,
                all_positions: false,
            })
            .collect();
        let logits = m.model.forward(&mut batch).unwrap();
        for (i, l) in logits.iter().enumerate() {
            let last: Vec<Vec<f32>> = l.iter().map(|rows| rows.last().unwrap().clone()).collect();
            let scores = cases[i].0.scores(&last);
            let next = argmax(&scores);
            out[i].0.push(next);
            out[i].1.push(scores);
            inputs[i] = vec![next];
        }
    }
    out
}

fn load(name: &str) -> LoadedModel {
    model::load(fixture_dir(name).to_str().unwrap(), &LoadOptions::default()).unwrap()
}

fn check_case(case: &Case, ids: &[u32], scores: &[Vec<f32>]) {
    assert_eq!(
        ids,
        case.greedy_ids.as_slice(),
        "greedy ids of {} / {:?}",
        case.mode,
        case.prompt
    );
    for (step, top5) in case.top5.iter().enumerate() {
        for &(id, want) in top5 {
            let got = scores[step][id as usize];
            assert!(
                (got - want).abs() < 1e-3,
                "{} / {:?} step {step} token {id}: {got} vs {want}",
                case.mode,
                case.prompt
            );
        }
        // the reference's top-5 are our top-5, in order
        let mut ours: Vec<u32> = (0..scores[step].len() as u32).collect();
        ours.sort_by(|&a, &b| scores[step][b as usize].total_cmp(&scores[step][a as usize]));
        let want: Vec<u32> = top5.iter().map(|t| t.0).collect();
        assert_eq!(
            &ours[..5],
            want.as_slice(),
            "{} top-5 at step {step}",
            case.mode
        );
    }
}

fn check_all_cases_alone(m: &LoadedModel) {
    let r = reference();
    assert_eq!(r.cases.len(), 54);
    for case in &r.cases {
        assert_eq!(
            m.tokenizer.encode(&case.prompt).unwrap(),
            case.prompt_ids,
            "{:?}",
            case.prompt
        );
        let steps = case.greedy_ids.len();
        let res = greedy_batch(
            m,
            &[(parse_mode(&case.mode), case.prompt_ids.clone())],
            steps,
        );
        check_case(case, &res[0].0, &res[0].1);
        assert_eq!(m.tokenizer.decode(&res[0].0).unwrap(), case.greedy_text);
    }
}

#[test]
fn safetensors_fixture_matches_reference_in_every_mode() {
    check_all_cases_alone(&load(FIXTURE));
}

#[test]
fn pytorch_bin_fixture_matches_reference_in_every_mode() {
    check_all_cases_alone(&load(FIXTURE_BIN));
}

#[test]
fn logit_checksums_match() -> TestResult {
    let r = reference();
    for name in [FIXTURE, FIXTURE_BIN] {
        let m = load(name);
        let ids = m.tokenizer.encode(&r.logit_checksums.prompt)?;
        for (head, logits) in m.model.all_head_logits(&ids)? {
            let key = match head {
                Head::Original => "original".to_string(),
                Head::Exit(l) => l.to_string(),
            };
            let want = &r.logit_checksums.last_position[&key];
            let sum: f64 = logits.iter().map(|&x| x as f64).sum();
            let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            assert!(
                (sum - want.sum).abs() < 1e-3,
                "{name} {key} sum {sum} vs {}",
                want.sum
            );
            assert!((max - want.max).abs() < 1e-3, "{name} {key} max");
            assert_eq!(argmax(&logits), want.argmax, "{name} {key} argmax");
        }
    }
    Ok(())
}

#[test]
fn all_prompts_in_one_batch_with_mixed_modes_equal_single_runs() {
    let r = reference();
    let m = load(FIXTURE);
    // Six prompts of different lengths, each in a different mode, decoded together.
    let modes = [
        "original",
        "exit:1",
        "exit:4",
        "contrast:original,1",
        "contrast:4,2",
        "contrast:2,1",
    ];
    let chosen: Vec<&Case> = modes
        .iter()
        .enumerate()
        .map(|(i, mode)| {
            r.cases
                .iter()
                .filter(|c| c.mode == *mode)
                .nth(i)
                .expect("a case per mode and prompt")
        })
        .collect();
    let batch: Vec<(Mode, Vec<u32>)> = chosen
        .iter()
        .map(|c| (parse_mode(&c.mode), c.prompt_ids.clone()))
        .collect();
    let res = greedy_batch(&m, &batch, 24);
    for (case, (ids, scores)) in chosen.iter().zip(&res) {
        check_case(case, ids, scores);
    }
}

#[test]
fn exit_mode_skips_upper_layers() {
    let m = load(FIXTURE);
    let n = m.model.config().num_layers;
    let before = m
        .model
        .stats
        .block_evals
        .load(std::sync::atomic::Ordering::Relaxed);
    greedy_batch(&m, &[(Mode::Exit(1), vec![1, 2, 3])], 3);
    let after = m
        .model
        .stats
        .block_evals
        .load(std::sync::atomic::Ordering::Relaxed);
    // 3 steps, one block each, instead of `n` blocks each
    assert_eq!(after - before, 3);
    assert!(n > 1);
}
