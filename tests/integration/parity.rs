//! Parity with the reference implementation on the tiny fixture checkpoints of both
//! architectures (GPT-Neo, GPT-2): every mode, both checkpoint formats, single and batched,
//! with our kernels and with candle's matmul, with the CPU's attention kernels and with the
//! batched attention path a GPU takes, in every dtype.

use crate::common;

use std::path::Path;

use common::{all_head_logits, Case, Fixture, ARCHS, FIXTURE};
use exitserve::model::{
    self, ContrastParams, DeviceChoice, Head, LoadOptions, LoadedModel, Logits, Mode, SeqStep,
    Upper,
};

type TestResult = Result<(), Box<dyn std::error::Error>>;

/// `original`, `exit:L`, `contrast:U,L` (U a layer or `original`) with the reference's defaults.
fn parse_mode(s: &str) -> Mode {
    if s == "original" {
        return Mode::ORIGINAL;
    }
    if let Some(l) = s.strip_prefix("exit:") {
        return Mode::exit(l.parse().unwrap());
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
                draft: false,
                verify: false,
                early_exit: None,
                choice: None,
                select_premature: false,
                sled: None,
                logprobs: None,
                choice_logprobs: None,
            })
            .collect();
        let logits = m.model.forward(&mut batch).unwrap();
        for (i, case) in cases.iter().enumerate() {
            let last: Vec<&[f32]> = logits.seq(i).iter().map(|l| l.last().unwrap()).collect();
            let scores = case.0.scores(&last);
            let next = argmax(&scores);
            out[i].0.push(next);
            out[i].1.push(scores);
            inputs[i] = vec![next];
        }
    }
    out
}

fn load_dir(dir: &Path) -> LoadedModel {
    model::load(dir.to_str().unwrap(), &LoadOptions::default()).unwrap()
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

fn check_all_cases_alone(f: Fixture, m: &LoadedModel) {
    let r = f.reference();
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
fn safetensors_fixtures_match_reference_in_every_mode() {
    for f in ARCHS {
        check_all_cases_alone(f, &load_dir(&f.dir()));
    }
}

#[test]
fn candle_gemm_path_matches_reference_in_every_mode() {
    // the same checks with the skinny CPU kernels off (`--matmul candle`, and the GPU path)
    let opts = LoadOptions {
        skinny_kernels: false,
        ..LoadOptions::default()
    };
    for f in ARCHS {
        check_all_cases_alone(f, &model::load(f.dir().to_str().unwrap(), &opts).unwrap());
    }
}

/// The path a GPU takes, on the CPU: candle's matmul, batched attention over a paged cache.
fn gpu_path(dtype: model::WeightDtype) -> LoadOptions {
    LoadOptions {
        dtype,
        skinny_kernels: false,
        batched_attention: true,
        ..LoadOptions::default()
    }
}

#[test]
fn batched_attention_path_matches_reference_in_every_mode_alone_and_batched() {
    for f in ARCHS {
        let m = model::load(
            f.dir().to_str().unwrap(),
            &gpu_path(model::WeightDtype::F32),
        )
        .unwrap();
        check_all_cases_alone(f, &m);
        let r = f.reference();
        let batch: Vec<(Mode, Vec<u32>)> = r
            .cases
            .iter()
            .map(|c| (parse_mode(&c.mode), c.prompt_ids.clone()))
            .collect();
        for (case, (ids, scores)) in r.cases.iter().zip(&greedy_batch(&m, &batch, 24)) {
            check_case(case, ids, scores);
        }
        let (blocks, free) = m.model.kv_pool_usage().expect("a paged cache");
        assert_eq!(free, blocks, "every block back once the caches are gone");
    }
}

/// Every logits row of a schedule that mixes what a step can hold: prompts in chunks, decode
/// steps, sequences leaving at an exit, prompt logprobs at every position, a forked cache.
fn mixed_schedule(m: &LoadedModel) -> Vec<Vec<Logits>> {
    mixed_schedule_reading(m, false)
}

/// [`mixed_schedule`]; with `choices`, the sequences read only their greedy choice where
/// they may (`SeqStep::choice`: the argmax of one head, the contrast of two with alpha
/// [`CHOICE_ALPHA`]), beside the others' full logits.
fn mixed_schedule_reading(m: &LoadedModel, choices: bool) -> Vec<Vec<Logits>> {
    let n = m.model.config().num_layers;
    let exit = m.model.config().exit_layers[0];
    let mut caches: Vec<_> = (0..4).map(|_| m.model.new_cache()).collect();
    let prompts: [&[u32]; 4] = [
        &[464, 3139, 286, 4881, 318, 6342, 13, 198, 40, 11, 5, 99, 7],
        &[1, 2, 3],
        &[50, 60, 70, 80, 90, 100, 110, 120, 130, 140, 150, 160],
        &[9, 8, 7, 6, 5, 4, 3],
    ];
    let depths = [n, n, exit, n];
    let heads = [
        vec![Head::Original],
        vec![Head::Original, Head::Exit(exit)],
        vec![Head::Exit(exit)],
        vec![Head::Exit(exit), Head::Original],
    ];
    let mut out = Vec::new();
    let mut run = |caches: &mut [model::KvCache], inputs: &[&[u32]], all: [bool; 4]| {
        let mut batch: Vec<SeqStep> = caches
            .iter_mut()
            .enumerate()
            .filter(|(i, _)| !inputs[*i].is_empty())
            .map(|(i, cache)| SeqStep {
                tokens: inputs[i],
                cache,
                depth: depths[i],
                heads: &heads[i],
                all_positions: all[i],
                draft: false,
                verify: false,
                early_exit: None,
                choice: choices.then(|| device_choice(heads[i].len())),
                select_premature: false,
                sled: None,
                logprobs: None,
                choice_logprobs: None,
            })
            .collect();
        out.extend(m.model.forward(&mut batch).unwrap().into_per_seq());
    };
    // prompt chunks of different lengths, one sequence still waiting
    run(
        &mut caches,
        &[&prompts[0][..5], prompts[1], &prompts[2][..7], &[]],
        [false, true, false, false],
    );
    run(
        &mut caches,
        &[&prompts[0][5..], &[17], &prompts[2][7..], prompts[3]],
        [true, false, false, true],
    );
    let fork = caches[1].fork().unwrap();
    caches.push(fork);
    for step in 0..9u32 {
        let t = [[300 + step], [400 + step], [500 + step], [600 + step]];
        run(&mut caches[..4], &[&t[0], &t[1], &t[2], &t[3]], [false; 4]);
    }
    // the fork goes on from where its original was when copied
    run(
        &mut caches[4..],
        &[&[17, 18, 19]],
        [true, false, false, false],
    );
    out
}

#[test]
fn batched_attention_equals_the_cpu_kernels_on_a_mixed_schedule() {
    for f in ARCHS {
        for (dtype, tolerance) in [
            (model::WeightDtype::F32, 1e-4),
            (model::WeightDtype::Bf16, 5e-2),
        ] {
            let path = |batched_attention| LoadOptions {
                batched_attention,
                ..gpu_path(dtype)
            };
            let load = |o| model::load(f.dir().to_str().unwrap(), &o).unwrap();
            let want = mixed_schedule(&load(path(false)));
            let got = mixed_schedule(&load(path(true)));
            assert_eq!(want.len(), got.len());
            let mut rows = 0;
            for (w, g) in want.iter().flatten().zip(got.iter().flatten()) {
                assert_eq!(w.rows(), g.rows());
                for r in 0..w.rows() {
                    let worst = w
                        .row(r)
                        .iter()
                        .zip(g.row(r))
                        .map(|(a, b)| (a - b).abs())
                        .fold(0f32, f32::max);
                    assert!(worst < tolerance, "{} {dtype:?}: {worst}", f.name);
                    rows += 1;
                }
            }
            assert!(rows > 50, "{rows} rows compared");
        }
    }
}

/// The contrast's alpha and candidate floor of the sequences of two heads that read only
/// their choice.
const CHOICE_ALPHA: f32 = 0.1;
const CHOICE_FLOOR: usize = 3;

/// What a sequence of `heads` heads reads when it reads only its greedy choice.
fn device_choice(heads: usize) -> DeviceChoice {
    match heads {
        1 => DeviceChoice::HeadArgmax,
        _ => DeviceChoice::Contrast {
            alpha: CHOICE_ALPHA,
            minimum_candidates: CHOICE_FLOOR,
            draw: None,
        },
    }
}

/// The greedy choice the host makes from a sequence's full logits (`want`, one per head) as
/// [`device_choice`] names it: the argmax of the one head, or of the contrast's scores.
fn host_choice(want: &[Logits]) -> Option<u32> {
    match want {
        [one] => one.last().map(argmax),
        [upper, lower] => {
            let c = ContrastParams {
                alpha: CHOICE_ALPHA,
                minimum_candidates: CHOICE_FLOOR,
                ..ContrastParams::new(Upper::Original, 1)
            };
            Some(argmax(
                &Mode::Contrast(c).scores(&[upper.last()?, lower.last()?]),
            ))
        }
        _ => None,
    }
}

#[test]
fn greedy_choices_made_in_the_step_are_the_host_choices_from_the_logits() {
    for f in ARCHS {
        for dtype in [model::WeightDtype::F32, model::WeightDtype::Bf16] {
            let m = model::load(f.dir().to_str().unwrap(), &gpu_path(dtype)).unwrap();
            let want = mixed_schedule_reading(&m, false);
            let got = mixed_schedule_reading(&m, true);
            let (mut chosen, mut contrasts) = (0, 0);
            assert_eq!(want.len(), got.len());
            for (w, g) in want.iter().zip(&got) {
                assert_eq!(w.len(), g.len());
                match g[0].choice() {
                    Some(id) => {
                        // every head of the sequence carries the one choice
                        assert!(g.iter().all(|h| h.choice() == Some(id)));
                        assert_eq!(Some(id), host_choice(w), "{} {dtype:?}", f.name);
                        chosen += 1;
                        contrasts += usize::from(g.len() == 2);
                    }
                    // the others in the same steps: their logits as ever
                    None => assert_eq!(w, g, "{} {dtype:?}", f.name),
                }
            }
            assert!(
                chosen > 20 && contrasts > 10,
                "{chosen} choices made in the step, {contrasts} contrasts"
            );
            // a step where every sequence reads only its choice
            let (n, low) = (m.model.config().num_layers, m.model.config().exit_layers[0]);
            let heads: [&[Head]; 3] = [
                &[Head::Original],
                &[Head::Exit(low)],
                &[Head::Original, Head::Exit(low)],
            ];
            let depths = [n, low, n];
            let decode = |choices: bool| -> Vec<Vec<Logits>> {
                let mut caches: Vec<_> = (0..3).map(|_| m.model.new_cache()).collect();
                let mut steps = Vec::new();
                for tokens in [
                    [[5u32, 6, 7], [8, 9, 10], [1, 2, 3]],
                    [[11, 0, 0], [12, 0, 0], [13, 0, 0]],
                ] {
                    let len = if steps.is_empty() { 3 } else { 1 };
                    let mut batch: Vec<SeqStep> = caches
                        .iter_mut()
                        .enumerate()
                        .map(|(i, cache)| SeqStep {
                            tokens: &tokens[i][..len],
                            cache,
                            depth: depths[i],
                            heads: heads[i],
                            all_positions: false,
                            draft: false,
                            verify: false,
                            early_exit: None,
                            choice: choices.then(|| device_choice(heads[i].len())),
                            select_premature: false,
                            sled: None,
                            logprobs: None,
                            choice_logprobs: None,
                        })
                        .collect();
                    steps.extend(m.model.forward(&mut batch).unwrap().into_per_seq());
                }
                steps
            };
            for (w, g) in decode(false).iter().zip(decode(true)) {
                assert_eq!(g[0].choice(), host_choice(w), "{} {dtype:?}", f.name);
            }
        }
    }
}

#[test]
fn pytorch_bin_fixtures_match_reference_in_every_mode() {
    for f in ARCHS {
        check_all_cases_alone(f, &load_dir(&f.bin_dir()));
    }
}

#[test]
fn logit_checksums_match() -> TestResult {
    for (f, dir) in ARCHS.iter().flat_map(|f| [(f, f.dir()), (f, f.bin_dir())]) {
        let r = f.reference();
        let name = dir.display();
        let m = load_dir(&dir);
        let ids = m.tokenizer.encode(&r.logit_checksums.prompt)?;
        for (head, logits) in all_head_logits(&m.model, &ids)? {
            let key = match head {
                Head::Original => "original".to_string(),
                Head::Exit(l) => l.to_string(),
                Head::LmHeadAt(_) => unreachable!("all_head_logits reads the trained heads"),
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
    for f in ARCHS {
        let r = f.reference();
        let m = load_dir(&f.dir());
        // Six prompts of different lengths, each in a different mode, decoded together.
        let modes = f.modes();
        let chosen: Vec<&Case> = modes
            .iter()
            .take(6)
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
}

#[test]
fn all_54_cases_in_one_batch_equal_the_reference() {
    for f in ARCHS {
        let r = f.reference();
        let m = load_dir(&f.bin_dir());
        let batch: Vec<(Mode, Vec<u32>)> = r
            .cases
            .iter()
            .map(|c| (parse_mode(&c.mode), c.prompt_ids.clone()))
            .collect();
        let res = greedy_batch(&m, &batch, 24);
        for (case, (ids, scores)) in r.cases.iter().zip(&res) {
            check_case(case, ids, scores);
        }
    }
}

#[test]
fn exit_mode_skips_upper_layers() {
    let m = load_dir(&common::fixture_dir(FIXTURE));
    let n = m.model.config().num_layers;
    let before = m
        .model
        .stats
        .block_evals
        .load(std::sync::atomic::Ordering::Relaxed);
    greedy_batch(&m, &[(Mode::exit(1), vec![1, 2, 3])], 3);
    let after = m
        .model
        .stats
        .block_evals
        .load(std::sync::atomic::Ordering::Relaxed);
    // 3 steps, one block each, instead of `n` blocks each
    assert_eq!(after - before, 3);
    assert!(n > 1);
}

#[test]
fn sharded_safetensors_load_to_the_same_logits() -> TestResult {
    use candle_core::safetensors::{load, save};
    let src = common::GPT2.dir();
    let dir = std::env::temp_dir().join(format!("exitserve-sharded-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    for f in ["config.json", "tokenizer.json"] {
        std::fs::copy(src.join(f), dir.join(f))?;
    }
    // split the tensors over two shards and write the index the hub uses
    let tensors = load(src.join("model.safetensors"), &candle_core::Device::Cpu)?;
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    let mut weight_map = serde_json::Map::new();
    let mut shards = [
        std::collections::HashMap::new(),
        std::collections::HashMap::new(),
    ];
    for (i, name) in names.iter().enumerate() {
        let shard = i % 2;
        shards[shard].insert((*name).clone(), tensors[*name].clone());
        weight_map.insert(
            (*name).clone(),
            format!("model-0000{}-of-00002.safetensors", shard + 1).into(),
        );
    }
    for (i, shard) in shards.iter().enumerate() {
        save(
            shard,
            dir.join(format!("model-0000{}-of-00002.safetensors", i + 1)),
        )?;
    }
    std::fs::write(
        dir.join("model.safetensors.index.json"),
        serde_json::json!({"metadata": {}, "weight_map": weight_map}).to_string(),
    )?;
    let sharded = model::load(dir.to_str().unwrap(), &LoadOptions::default())?;
    let single = load_dir(&src);
    let ids = single.tokenizer.encode("sharded weights")?;
    let a = all_head_logits(&single.model, &ids)?;
    let b = all_head_logits(&sharded.model, &ids)?;
    assert_eq!(a, b);
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

#[test]
fn incremental_detokenization_never_splits_a_character() -> TestResult {
    let m = load_dir(&common::fixture_dir(FIXTURE));
    let text = "Zürich café — naïve résumé 🙂 and 東京 🧑‍🚀!";
    let ids = m.tokenizer.encode(text)?;
    let mut dec = model::IncrementalDecoder::default();
    let mut out = String::new();
    let mut held_back = 0;
    for &id in &ids {
        let delta = dec.push(&m.tokenizer, id)?;
        assert!(
            !delta.contains('\u{FFFD}'),
            "broken character emitted: {delta:?}"
        );
        held_back += delta.is_empty() as usize;
        out.push_str(&delta);
    }
    out.push_str(&dec.flush(&m.tokenizer)?);
    assert_eq!(out, text);
    assert!(
        held_back > 0,
        "multi-byte characters span several tokens here"
    );
    Ok(())
}

/// Original-head logits after the prompt, then after each of `forced` fed one at a time
/// (the single-token decode path, reading the cache written so far).
fn teacher_forced_logits(
    m: &LoadedModel,
    prompt: &[u32],
    forced: &[u32],
) -> model::Result<Vec<Vec<f32>>> {
    let mut cache = m.model.new_cache();
    let depth = m.model.config().num_layers;
    let mut out = Vec::new();
    for tokens in std::iter::once(prompt).chain(forced.chunks(1)) {
        let mut step = [SeqStep {
            tokens,
            cache: &mut cache,
            depth,
            heads: &[Head::Original],
            all_positions: false,
            draft: false,
            verify: false,
            early_exit: None,
            choice: None,
            select_premature: false,
            sled: None,
            logprobs: None,
            choice_logprobs: None,
        }];
        let logits = m
            .model
            .forward(&mut step)?
            .into_per_seq()
            .remove(0)
            .remove(0);
        out.push(logits.into_last());
    }
    Ok(out)
}

#[test]
fn reduced_precision_weights_stay_close_to_float32() -> TestResult {
    // The fixtures are stored in float16, so f16 weights are exact; only the activations are
    // rounded for the matmuls (and, in bf16 and int8, the KV cache).
    for f in ARCHS {
        let dir = f.dir();
        let f32m = load_dir(&dir);
        let ids = f32m.tokenizer.encode("The capital of France is")?;
        let want = all_head_logits(&f32m.model, &ids)?;
        let forced = [464, 3139, 286, 4881, 318, 6342, 13, 198];
        let want_decode = teacher_forced_logits(&f32m, &ids, &forced)?;
        for (dtype, tolerance) in [
            (model::WeightDtype::F16, 0.02),
            (model::WeightDtype::Bf16, 0.1),
            (model::WeightDtype::Int8, 0.25),
        ] {
            if dtype == model::WeightDtype::Int8 && !exitserve::kernels::matmul::supports_int8() {
                // int8 runs on the AVX-512 VNNI kernel only (a start-up error elsewhere,
                // tested in tests/process.rs)
                eprintln!("int8 skipped: this CPU has no AVX-512 VNNI");
                continue;
            }
            let reduced = model::load(
                dir.to_str().unwrap(),
                &LoadOptions {
                    dtype,
                    ..LoadOptions::default()
                },
            )?;
            let worst = |a: &[f32], b: &[f32]| {
                a.iter()
                    .zip(b)
                    .map(|(x, y)| (x - y).abs())
                    .fold(0f32, f32::max)
            };
            for ((h1, a), (h2, b)) in want
                .iter()
                .zip(all_head_logits(&reduced.model, &ids)?.iter())
            {
                assert_eq!(h1, h2);
                let worst = worst(a, b);
                assert!(
                    worst < tolerance,
                    "{} {dtype:?} {h1:?}: max logit difference {worst}",
                    f.name
                );
                assert_ne!(worst, 0.0, "{dtype:?} really ran in reduced precision");
            }
            let got_decode = teacher_forced_logits(&reduced, &ids, &forced)?;
            for (step, (a, b)) in want_decode.iter().zip(&got_decode).enumerate() {
                let worst = worst(a, b);
                assert!(
                    worst < tolerance,
                    "{} {dtype:?} decode step {step}: max logit difference {worst}",
                    f.name
                );
            }
        }
    }
    Ok(())
}

/// Logits of `head` after `tokens` on a fresh cache, through the draft copies or not.
fn exit_logits(m: &LoadedModel, tokens: &[u32], layer: usize, draft: bool) -> Vec<f32> {
    let mut cache = m.model.new_cache();
    let mut step = [SeqStep {
        tokens,
        cache: &mut cache,
        depth: layer,
        heads: &[Head::Exit(layer)],
        all_positions: false,
        draft,
        verify: false,
        early_exit: None,
        choice: None,
        select_premature: false,
        sled: None,
        logprobs: None,
        choice_logprobs: None,
    }];
    let out = m.model.forward(&mut step).unwrap().into_per_seq().remove(0);
    out.into_iter().next().unwrap().into_last()
}

#[test]
fn drafts_read_int8_copies_close_to_the_weights_and_leave_the_model_exact() -> TestResult {
    assert!(
        exitserve::kernels::matmul::supports_int8(),
        "the int8 kernels need AVX2 or AVX-512 VNNI: every x86-64 machine this project runs on"
    );
    for f in ARCHS {
        let mut m = load_dir(&f.dir());
        let ids = m.tokenizer.encode("The capital of France is")?;
        let layer = m.model.config().exit_layers[0];
        let before = exit_logits(&m, &ids, layer, false);
        // without copies a draft reads the model's own weights
        assert_eq!(exit_logits(&m, &ids, layer, true), before);
        assert!(m.model.set_draft_weights(model::DraftWeights::Int8));
        m.model.prepare_draft(layer)?;
        let draft = exit_logits(&m, &ids, layer, true);
        let worst = draft
            .iter()
            .zip(&before)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(
            worst < 0.25 && worst > 0.0,
            "{} draft vs exit: {worst}",
            f.name
        );
        // the model's own passes are untouched by the copies
        assert_eq!(exit_logits(&m, &ids, layer, false), before);
        assert_eq!(
            all_head_logits(&m.model, &ids)?,
            all_head_logits(&load_dir(&f.dir()).model, &ids)?
        );
        // int8 weights are their own draft copies; `model` turns copies off
        assert!(!m.model.set_draft_weights(model::DraftWeights::Model));
        assert_eq!(m.model.draft_read_cost(), 1.0);
        let mut int8 = model::load(
            f.dir().to_str().unwrap(),
            &LoadOptions {
                dtype: model::WeightDtype::Int8,
                ..LoadOptions::default()
            },
        )?;
        assert!(!int8.model.set_draft_weights(model::DraftWeights::Int8));
    }
    Ok(())
}
