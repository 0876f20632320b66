//! The multi-exit model, whatever its architecture: token and position embeddings, the
//! blocks, the shared final norm `ln_f`, the original head and the exit heads, and the forward
//! step over a packed batch.
//!
//! The forward works on a *packed* batch: the new tokens of every sequence are concatenated
//! into one `(tokens, hidden)` matrix, so the dense layers run once for the whole batch while
//! attention runs per sequence against its own cache (no padding, so a sequence computes the
//! same values alone or in any batch). Sequences are ordered by depth, deepest first: the rows
//! still needed at a layer are a prefix, and a sequence decoding from exit L is dropped from the
//! matrix after block L.

use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{layer_norm, LayerNorm, VarBuilder};

use super::batched_attention::{self, Plans};
use super::block::Block;
use super::config::ModelConfig;
use super::error::{ModelError, Result};
use super::head_copies::{HeadCopies, HeadUser, Reads};
use super::kv_cache::KvCache;
use super::kv_pool::KvPool;
use super::mode::{ContrastRule, DeviceChoice, EarlyExitParams, Head};
use super::step::{ForwardStats, Logits, LogprobTargets, Packed, Segment, SeqStep, StepLogits};
use super::weights::{DraftWeights, Weight, WeightDtype, WeightSpec};
use crate::kernels::fused_epilogue::{self, add_norm};
use crate::kernels::sled::SledRule;
use crate::kernels::{greedy, logprob, sample, sled, wide_product};

pub struct MultiExitModel {
    cfg: ModelConfig,
    /// `(vocab, hidden)`: the token embedding, and the original head when tied.
    wte: Weight,
    wpe: Tensor, // (positions, hidden)
    blocks: Vec<Block>,
    ln_f: LayerNorm,
    /// `lm_head.weight` when the checkpoint has one; None = tied to `wte` (as on the hub).
    lm_head: Option<Weight>, // (vocab, hidden)
    /// `(layer, weight (vocab, hidden))`, ascending by layer.
    exit_heads: Vec<(usize, Weight)>,
    device: Device,
    /// See `WeightDtype::kv_dtype`.
    kv_dtype: DType,
    wdtype: WeightDtype,
    /// What drafts read, when not the model's own weights.
    drafts: Option<DraftCopies>,
    /// The paged store of the batched attention path; None: the CPU's attention kernels on
    /// per-sequence buffers.
    kv_pool: Option<Arc<KvPool>>,
    /// On the batched path, `kernels::paged_attention` writes the keys and values and attends
    /// the rows attended query by query (checked against the tensor ops at start-up).
    fused_attention: bool,
    /// On the batched path, what follows each product runs fused (`kernels::fused_epilogue`,
    /// checked against candle's ops at start-up): in the blocks, and `ln_f` before a head.
    fused_epilogues: bool,
    /// On the batched path, greedy choices, early exit's margins and DoLa's divergences are
    /// computed where the logits are (`SeqStep::choice`, `decide_exits`,
    /// `SeqStep::select_premature`, `kernels::greedy`, checked against the CPU's at start-up).
    device_choices: bool,
    /// Where `device_choices` holds, sampled sequences draw there too (`kernels::sample`,
    /// checked against the CPU's draws at start-up).
    device_draws: bool,
    /// On the batched path, echo's prompt positions are scored where the logits are
    /// (`SeqStep::logprobs`, `kernels::logprob`, checked against the CPU's at start-up).
    device_logprobs: bool,
    /// On the batched path, SLED's scores are computed where the logits are (`SeqStep::sled`,
    /// `kernels::sled`, checked against the CPU's at start-up).
    device_sled: bool,
    pub stats: ForwardStats,
}

/// Int8 copies of the blocks and exit heads drafts read (`DraftWeights::Int8`), each made the
/// first time a draft needs it, so only the layers requests draft from take memory.
struct DraftCopies {
    blocks: Vec<OnceLock<Block>>,
    /// Parallel to `MultiExitModel::exit_heads`.
    exit_heads: Vec<OnceLock<Weight>>,
}

/// The value in `cell`, made by `make` the first time (the engine's one thread makes it).
fn once<T>(cell: &OnceLock<T>, make: impl FnOnce() -> candle_core::Result<T>) -> Result<&T> {
    if let Some(v) = cell.get() {
        return Ok(v);
    }
    let v = named("(draft copy)", make())?;
    Ok(cell.get_or_init(|| v))
}

/// Maps candle's loading errors (missing tensor, shape mismatch) to one naming the tensor.
fn named<T>(name: &str, r: candle_core::Result<T>) -> Result<T> {
    r.map_err(|e| ModelError::Tensor {
        name: name.to_string(),
        message: e.to_string().lines().next().unwrap_or_default().to_string(),
    })
}

impl MultiExitModel {
    /// Builds the model from a float32 `VarBuilder` rooted at the checkpoint's top level;
    /// projection and vocabulary weights are kept in `wdtype`, multiplied by the skinny CPU
    /// kernels when `skinny` (and the CPU has them), else with float32 results when `wide`
    /// (and the device's products hold). Attention takes the batched path on a paged cache
    /// off the CPU, and on the CPU when `batched_attention`.
    pub fn new(
        cfg: ModelConfig,
        vb: VarBuilder,
        wdtype: WeightDtype,
        (skinny, wide): (bool, bool),
        batched_attention: bool,
    ) -> Result<Self> {
        let (v, h) = (cfg.vocab_size, cfg.hidden_size);
        let t = vb.pp("transformer");
        let vw = vb.to_dtype(wdtype.load_dtype());
        let device = vb.device().clone();
        let reduced = matches!(wdtype.load_dtype(), DType::BF16 | DType::F16);
        let spec = WeightSpec {
            dtype: wdtype,
            skinny,
            wide: wide && reduced && wide_products_hold(&device, wdtype.load_dtype())?,
        };
        // One copy of wte serves as the embedding and as the tied original head.
        let wte = named(
            "transformer.wte.weight",
            vw.get((v, h), "transformer.wte.weight"),
        )?;
        let wte = named("transformer.wte.weight", Weight::new(wte, spec))?;
        // The vocabulary-sized matrices load first, while little else is resident: each
        // passes through a transient copy (read, pack) that then counts the least.
        let weight = |name: &str| -> Result<Weight> {
            let w = named(name, vw.get((v, h), name))?;
            named(name, Weight::new(w, spec))
        };
        let lm_head = if vb.contains_tensor("lm_head.weight") {
            Some(weight("lm_head.weight")?)
        } else {
            None
        };
        let exit_heads = cfg
            .exit_layers
            .iter()
            .map(|&l| {
                Ok((
                    l,
                    weight(&format!("name_to_lm_exit_head.lm_head_{l}.weight"))?,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        let wpe = named(
            "transformer.wpe.weight",
            t.get((cfg.max_position_embeddings, h), "wpe.weight"),
        )?;
        let batched = batched_attention || !device.is_cpu();
        let fused_epilogues = batched && fused_epilogues_hold(&device, &cfg, &wte)?;
        let blocks = (0..cfg.num_layers)
            .map(|i| {
                let name = format!("transformer.h.{i}");
                let vb = t.pp(format!("h.{i}"));
                named(&name, Block::new(&cfg, i, vb, spec, fused_epilogues))
            })
            .collect::<Result<Vec<_>>>()?;
        let ln_f = named(
            "transformer.ln_f",
            layer_norm(h, cfg.layer_norm_epsilon, t.pp("ln_f")),
        )?;
        let kv_pool =
            batched.then(|| KvPool::new(cfg.num_layers, h, wdtype.kv_dtype(), device.clone()));
        let fused_attention =
            kv_pool.is_some() && fused_attention_holds(&device, wdtype.kv_dtype())?;
        // The ids travel as float32 among the logits: exact below 2^24.
        let device_choices =
            batched && cfg.vocab_size < 1 << 24 && device_choices_hold(&device, cfg.vocab_size)?;
        let device_draws = device_choices && device_draws_hold(&device, cfg.vocab_size)?;
        let device_logprobs =
            batched && cfg.vocab_size < 1 << 24 && device_logprobs_hold(&device, cfg.vocab_size)?;
        let device_sled =
            batched && cfg.vocab_size < 1 << 24 && device_sled_holds(&device, cfg.vocab_size)?;
        Ok(Self {
            fused_attention,
            fused_epilogues,
            device_choices,
            device_draws,
            device_logprobs,
            device_sled,
            device,
            kv_pool,
            kv_dtype: wdtype.kv_dtype(),
            wdtype,
            drafts: None,
            cfg,
            wte,
            wpe,
            blocks,
            ln_f,
            lm_head,
            exit_heads,
            stats: ForwardStats::default(),
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// Chooses what drafts read. Int8 copies need weights packed in f32 or bf16 for the CPU
    /// kernels (and a CPU with int8 kernels); elsewhere drafts read the model's own weights.
    /// Returns whether drafts now read copies.
    pub fn set_draft_weights(&mut self, choice: DraftWeights) -> bool {
        let copyable = match &self.wte {
            Weight::Packed(p) => !p.is_int8() && crate::kernels::matmul::supports_int8(),
            Weight::Plain(_) | Weight::Wide(_) => false,
        };
        self.drafts = (choice == DraftWeights::Int8 && copyable).then(|| DraftCopies {
            blocks: (0..self.cfg.num_layers).map(|_| OnceLock::new()).collect(),
            exit_heads: self.exit_heads.iter().map(|_| OnceLock::new()).collect(),
        });
        self.drafts.is_some()
    }

    /// The time a draft spends per weight it reads, against the time the model's own weights
    /// take: 1 when drafts read the model's weights.
    pub fn draft_read_cost(&self) -> f64 {
        match self.drafts {
            Some(_) => WeightDtype::Int8.decode_cost() / self.wdtype.decode_cost(),
            None => 1.0,
        }
    }

    /// Makes the draft copies drafting from exit `layer` reads now (else its first draft
    /// does): the blocks below it and its head.
    pub fn prepare_draft(&self, layer: usize) -> Result<()> {
        if self.drafts.is_some() {
            for l in 0..layer.min(self.cfg.num_layers) {
                self.block(l, true)?;
            }
            self.head_weight(Head::Exit(layer), true)?;
        }
        Ok(())
    }

    /// Block `layer`, or its draft copy for a draft pass.
    fn block(&self, layer: usize, draft: bool) -> Result<&Block> {
        match (&self.drafts, draft) {
            (Some(d), true) => once(&d.blocks[layer], || self.blocks[layer].int8_copy()),
            _ => Ok(&self.blocks[layer]),
        }
    }

    pub fn new_cache(&self) -> KvCache {
        self.new_cache_for(self.cfg.max_position_embeddings)
    }

    /// A cache that never grows past `positions` (what the sequence reserved), so that the
    /// engine's KV-token budget bounds the memory actually allocated.
    pub fn new_cache_for(&self, positions: usize) -> KvCache {
        let max_len = positions.min(self.cfg.max_position_embeddings);
        match &self.kv_pool {
            Some(pool) => KvCache::paged(pool.clone(), max_len),
            None => KvCache::new(self.cfg.num_layers, max_len, self.kv_dtype),
        }
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Bounds the paged pool's doubling by the engine's KV budget (`kv_pool.rs`).
    pub fn limit_kv_pool(&self, positions: usize, sequences: usize) {
        if let Some(pool) = &self.kv_pool {
            pool.limit_growth(positions, sequences);
        }
    }

    /// The paged pool's blocks and free blocks, when attention takes the batched path.
    pub fn kv_pool_usage(&self) -> Option<(usize, usize)> {
        self.kv_pool.as_ref().map(|p| p.usage())
    }

    /// Bytes one cached position takes in every layer (keys and values).
    pub fn kv_bytes_per_token(&self) -> usize {
        2 * self.cfg.num_layers * self.cfg.hidden_size * self.kv_dtype.size_in_bytes()
    }

    /// Whether the original head is the token embedding (no `lm_head.weight` of its own).
    pub fn has_tied_head(&self) -> bool {
        self.lm_head.is_none()
    }

    /// A head's weight, or for a draft pass the draft copy of an exit head.
    fn head_weight(&self, head: Head, draft: bool) -> Result<&Weight> {
        match head {
            Head::Original | Head::LmHeadAt(_) => Ok(self.lm_head.as_ref().unwrap_or(&self.wte)),
            Head::Exit(layer) => {
                let i = self
                    .exit_heads
                    .iter()
                    .position(|(l, _)| *l == layer)
                    .ok_or_else(|| ModelError::NotAnExit {
                        layer,
                        available: self.cfg.exit_layers.clone(),
                    })?;
                let own = &self.exit_heads[i].1;
                match (&self.drafts, draft) {
                    (Some(d), true) => once(&d.exit_heads[i], || {
                        Ok(own.int8_copy()?.unwrap_or_else(|| own.clone()))
                    }),
                    _ => Ok(own),
                }
            }
        }
    }

    /// Runs one step for a batch of sequences, appending to their caches. Returns, per
    /// sequence and per head of `SeqStep::heads` (in that order), the logits
    /// at its last new position, or at every new position with `all_positions`.
    pub fn forward(&self, steps: &mut [SeqStep<'_>]) -> Result<StepLogits> {
        for s in steps.iter() {
            self.check_step(s)?;
        }
        let mut outputs = StepLogits {
            per_seq: steps
                .iter()
                .map(|s| vec![Logits::default(); s.heads.len()])
                .collect(),
        };
        // Drafts that read copies of their own make a pass of their own.
        let (drafts, rest): (Vec<usize>, Vec<usize>) =
            (0..steps.len()).partition(|&i| steps[i].draft && self.drafts.is_some());
        for (group, draft) in [(drafts, true), (rest, false)] {
            if !group.is_empty() {
                self.forward_pass(steps, group, draft, &mut outputs)?;
            }
        }
        Ok(outputs)
    }

    /// One pass over the blocks for the steps `order` (indices into `steps`), reading the
    /// draft copies when `draft`.
    fn forward_pass(
        &self,
        steps: &mut [SeqStep<'_>],
        mut order: Vec<usize>,
        draft: bool,
        outputs: &mut StepLogits,
    ) -> Result<()> {
        // Deepest first, so the rows still needed at each layer are a prefix.
        order.sort_by_key(|&i| std::cmp::Reverse(steps[i].depth));

        let mut ids = Vec::new();
        let mut positions = Vec::new();
        let mut starts = Vec::with_capacity(order.len());
        for &i in &order {
            let s = &steps[i];
            starts.push(ids.len());
            let offset = s.cache.len() as u32;
            ids.extend_from_slice(s.tokens);
            positions.extend((0..s.tokens.len() as u32).map(|p| offset + p));
        }
        let total_rows = ids.len();
        if total_rows == 0 {
            return Ok(());
        }
        for &i in &order {
            let s = &mut steps[i];
            s.cache.reserve(s.cache.len() + s.tokens.len())?;
        }
        let positions = Tensor::new(positions.as_slice(), &self.device)?;
        // (rows, hidden)
        let tokens = self.wte.rows(&ids, &self.device)?;
        let mut x = (tokens + self.wpe.index_select(&positions, 0)?)?;

        let max_depth = order.first().map_or(0, |&i| steps[i].depth);
        let depths: Vec<usize> = order.iter().map(|&i| steps[i].depth).collect();
        let lens: Vec<usize> = order.iter().map(|&i| steps[i].tokens.len()).collect();
        let heads: Vec<&[Head]> = order.iter().map(|&i| steps[i].heads).collect();
        let all_positions: Vec<bool> = order.iter().map(|&i| steps[i].all_positions).collect();
        // DoLa's candidate chosen where the logits are, from its heads at the last row.
        let select_premature: Vec<bool> = order
            .iter()
            .map(|&i| {
                let s = &steps[i];
                s.select_premature
                    && self.device_choices
                    && !s.all_positions
                    && s.early_exit.is_none()
                    && s.heads.len() > 2
            })
            .collect();
        let verify: Vec<bool> = order.iter().map(|&i| steps[i].verify).collect();
        // Echo's scoring of a head's rows, read where the logits are.
        let logprobs: Vec<Option<LogprobTargets>> = order
            .iter()
            .map(|&i| {
                let s = &steps[i];
                s.logprobs.filter(|l| {
                    self.device_logprobs
                        && s.all_positions
                        && !s.verify
                        && l.read.reads(s.heads.len())
                        && l.targets.len() <= s.tokens.len()
                        && l.read.top <= logprob::MAX_TOP
                        // DoLa's candidates chosen there by the divergence kernel
                        && (s.heads.len() <= 2 || self.device_choices)
                })
            })
            .collect();
        // Early exit is decided here for decode positions only (see `SeqStep::early_exit`).
        let early: Vec<Option<EarlyExitParams>> = order
            .iter()
            .map(|&i| {
                let s = &steps[i];
                s.early_exit
                    .filter(|_| s.tokens.len() == 1 && !s.all_positions && !s.verify)
            })
            .collect();
        // Only the choice comes back (greedy or drawn): at the last row, from the heads it is
        // made of (or the one a per-token exit leaves at).
        let choices: Vec<Option<DeviceChoice>> = order
            .iter()
            .enumerate()
            .map(|(slot, &i)| {
                let s = &steps[i];
                s.choice.filter(|&c| {
                    self.device_choices
                        && (self.device_draws || !c.is_draw())
                        && s.choice_logprobs
                            .is_none_or(|top| self.device_logprobs && top <= logprob::MAX_TOP)
                        && !s.all_positions
                        && match early[slot] {
                            // the argmax or draw of the one head it leaves at
                            Some(_) => c.made_of(1, false),
                            None => {
                                s.early_exit.is_none()
                                    && c.made_of(s.heads.len(), select_premature[slot])
                            }
                        }
                })
            })
            .collect();
        // SLED's scores computed where the logits are, from its heads at each row they read.
        let sled: Vec<Option<SledRule>> = order
            .iter()
            .map(|&i| {
                let s = &steps[i];
                s.sled.filter(|rule| {
                    self.device_sled
                        && !s.verify
                        && s.early_exit.is_none()
                        && s.choice.is_none()
                        && rule.fits(s.heads.len().saturating_sub(1))
                })
            })
            .collect();
        let choice_logprobs: Vec<Option<usize>> = order
            .iter()
            .zip(&choices)
            .map(|(&i, c)| c.and(steps[i].choice_logprobs))
            .collect();
        {
            // Segments borrow the caches; slot k is the k-th sequence in packed order.
            let mut by_index: Vec<Option<&mut KvCache>> =
                steps.iter_mut().map(|s| Some(&mut *s.cache)).collect();
            let mut segments: Vec<Option<Segment<'_>>> = order
                .iter()
                .enumerate()
                .map(|(slot, &i)| {
                    Some(Segment {
                        start: starts[slot],
                        len: lens[slot],
                        cache: by_index[i].take().expect("each index once"),
                        per_query: verify[slot],
                    })
                })
                .collect();
            // The slots whose rows `x` holds, in row order (depth order: the ones a block
            // leaves out are a suffix), and where each one's rows start in `x`.
            let mut alive: Vec<usize> = (0..order.len()).collect();
            let mut row_in_x = starts.clone();
            // What `eval_heads` reads of the alive slots; remade only when they change.
            let view = |alive: &[usize], row_in_x: &[usize]| Rows {
                order: alive.iter().map(|&s| order[s]).collect(),
                starts: alive.iter().map(|&s| row_in_x[s]).collect(),
                lens: alive.iter().map(|&s| lens[s]).collect(),
                heads: alive.iter().map(|&s| heads[s]).collect(),
                all_positions: alive.iter().map(|&s| all_positions[s]).collect(),
                choices: alive.iter().map(|&s| choices[s]).collect(),
                select_premature: alive.iter().map(|&s| select_premature[s]).collect(),
                logprobs: alive.iter().map(|&s| logprobs[s]).collect(),
                choice_logprobs: alive.iter().map(|&s| choice_logprobs[s]).collect(),
                sled: alive.iter().map(|&s| sled[s]).collect(),
            };
            let mut rows = view(&alive, &row_in_x);
            // The batched attention path's layout of each set of segments, made once for
            // every layer.
            let mut plans = Plans::new(self.fused_attention);
            let mut copies = HeadCopies::new(self.cfg.vocab_size, self.kv_pool.is_some());
            // heads on the embeddings' output (DoLa's layer 0)
            self.eval_heads(
                0,
                &x,
                &rows.packed(),
                draft,
                &mut copies,
                &mut outputs.per_seq,
            )?;
            for layer in 0..max_depth {
                alive.retain(|&s| depths[s] > layer);
                if alive.is_empty() {
                    break; // every row left at an exit
                }
                if alive.len() < rows.order.len() {
                    rows = view(&alive, &row_in_x);
                }
                let kept: usize = rows.lens.iter().sum();
                if kept < x.dim(0)? {
                    x = x.narrow(0, 0, kept)?;
                }
                let mut run = take_segments(&mut segments, &alive, &row_in_x);
                let out = self
                    .block(layer, draft)?
                    .forward(&x, &mut run, layer, &mut plans);
                put_back(&mut segments, &alive, run);
                x = out?;
                self.stats
                    .block_evals
                    .fetch_add(alive.len() as u64, Ordering::Relaxed);
                self.eval_heads(
                    layer + 1,
                    &x,
                    &rows.packed(),
                    draft,
                    &mut copies,
                    &mut outputs.per_seq,
                )?;

                // Early exits: a confident exit ends the token here.
                let exited = self.decide_exits(
                    Head::Exit(layer + 1),
                    &alive,
                    (&order, &heads, &early),
                    &mut copies,
                    &mut outputs.per_seq,
                )?;
                if exited.is_empty() {
                    continue;
                }
                self.propagate(
                    &x,
                    &exited,
                    (&depths, &lens, &row_in_x),
                    layer + 1,
                    draft,
                    (&mut segments, &mut plans),
                )?;
                alive.retain(|s| !exited.contains(s));
                if alive.is_empty() {
                    break;
                }
                let kept = row_ids(&alive, &row_in_x, &lens);
                x = x.index_select(&Tensor::new(kept.as_slice(), &self.device)?, 0)?;
                pack_rows(&alive, &lens, &mut row_in_x);
                rows = view(&alive, &row_in_x);
            }
            copies.flush(&mut outputs.per_seq)?;
            for seg in segments.iter_mut().flatten() {
                seg.cache.advance(seg.len);
            }
        }
        Ok(())
    }

    /// The slots of `alive` (in that order) whose token leaves at `exit`: those with a per-token
    /// exit rule that reads `exit` and finds it confident. Where greedy choices are made on
    /// the device, the margins are computed there and copied alone (a float per row), and the
    /// rows of an exit a token goes on from are never copied; elsewhere the rows are copied and
    /// judged on the host.
    fn decide_exits(
        &self,
        exit: Head,
        alive: &[usize],
        (order, heads, early): (&[usize], &[&[Head]], &[Option<EarlyExitParams>]),
        copies: &mut HeadCopies,
        outputs: &mut [Vec<Logits>],
    ) -> Result<Vec<usize>> {
        // (slot, its index of `exit` among its heads, its rule)
        let deciding: Vec<(usize, usize, EarlyExitParams)> = alive
            .iter()
            .filter_map(|&s| {
                let e = early[s]?;
                let k = heads[s].iter().position(|&h| h == exit)?;
                Some((s, k, e))
            })
            .collect();
        if deciding.is_empty() {
            return Ok(Vec::new());
        }
        let on_host = |s: usize, k: usize, e: EarlyExitParams, outputs: &[Vec<Logits>]| {
            outputs[order[s]][k]
                .last()
                .is_some_and(|row| e.confident(row))
        };
        let confident: Vec<bool> = if self.device_choices {
            let users: Vec<(usize, usize)> =
                deciding.iter().map(|&(s, k, _)| (order[s], k)).collect();
            let margins = copies.margins(&users)?;
            let confident: Vec<bool> = deciding
                .iter()
                .zip(margins)
                .map(|(&(s, k, e), m)| match m {
                    Some(m) => e.confident_at(m),
                    // copied already (the held bytes ran out): judged where its rows are
                    None => on_host(s, k, e, outputs),
                })
                .collect();
            for (&(seq, k), &c) in users.iter().zip(&confident) {
                if !c {
                    copies.drop_user(seq, k);
                }
            }
            confident
        } else {
            copies.flush(outputs)?;
            deciding
                .iter()
                .map(|&(s, k, e)| on_host(s, k, e, outputs))
                .collect()
        };
        Ok(deciding
            .iter()
            .zip(confident)
            .filter(|(_, c)| *c)
            .map(|(&(s, _, _), _)| s)
            .collect())
    }

    /// The keys and values the blocks from `from` up to each exited slot's depth cache for
    /// its position, from its hidden state in `x` (where it left).
    fn propagate(
        &self,
        x: &Tensor,
        exited: &[usize],
        (depths, lens, row_in_x): (&[usize], &[usize], &[usize]),
        from: usize,
        draft: bool,
        (segments, plans): (&mut [Option<Segment<'_>>], &mut Plans),
    ) -> Result<()> {
        let rows = row_ids(exited, row_in_x, lens);
        let mut h = x.index_select(&Tensor::new(rows.as_slice(), &self.device)?, 0)?;
        let mut starts = vec![0; segments.len()];
        pack_rows(exited, lens, &mut starts);
        let mut going: Vec<usize> = exited.to_vec();
        let top = exited.iter().map(|&s| depths[s]).max().unwrap_or(0);
        for block in from..top {
            // in depth order: the ones that stop below this block are a suffix
            going.retain(|&s| depths[s] > block);
            let rows: usize = going.iter().map(|&s| lens[s]).sum();
            if rows < h.dim(0)? {
                h = h.narrow(0, 0, rows)?;
            }
            let mut run = take_segments(segments, &going, &starts);
            let r = self
                .block(block, draft)?
                .propagate_kv(&h, &mut run, block, plans);
            put_back(segments, &going, run);
            r?;
        }
        Ok(())
    }

    fn check_step(&self, s: &SeqStep<'_>) -> Result<()> {
        let n = self.cfg.num_layers;
        let bad = |m: String| ModelError::Tensor {
            name: "(step)".into(),
            message: m,
        };
        if s.depth == 0 || s.depth > n {
            return Err(bad(format!("depth {} outside 1..={n}", s.depth)));
        }
        if let Some(h) = s.heads.iter().find(|h| h.layer(n) > s.depth) {
            return Err(bad(format!("head {h:?} lies above depth {}", s.depth)));
        }
        let end = s.cache.len() + s.tokens.len();
        if end > self.cfg.max_position_embeddings {
            return Err(bad(format!(
                "{end} positions exceed max_position_embeddings {}",
                self.cfg.max_position_embeddings
            )));
        }
        if let Some(&t) = s
            .tokens
            .iter()
            .find(|&&t| t as usize >= self.cfg.vocab_size)
        {
            return Err(bad(format!(
                "token id {t} >= vocab size {}",
                self.cfg.vocab_size
            )));
        }
        Ok(())
    }

    /// Evaluates, after block `layer`, every head reading that layer, batched over the
    /// sequences that want it, on their last rows only (or all rows with `all_positions`).
    fn eval_heads(
        &self,
        layer: usize,
        x: &Tensor,
        p: &Packed<'_>,
        draft: bool,
        copies: &mut HeadCopies,
        outputs: &mut [Vec<Logits>],
    ) -> Result<()> {
        let n_layers = self.cfg.num_layers;
        let mut wanted: Vec<Head> = Vec::new();
        for hs in p.heads {
            for &h in hs.iter() {
                if h.layer(n_layers) == layer && !wanted.contains(&h) {
                    wanted.push(h);
                }
            }
        }
        for head in wanted {
            // (slot in packed order, index into that sequence's head list, rows wanted)
            let mut users: Vec<(usize, usize, usize)> = Vec::new();
            let mut rows: Vec<u32> = Vec::new();
            for (slot, hs) in p.heads.iter().enumerate() {
                for (k, _) in hs.iter().enumerate().filter(|(_, &h)| h == head) {
                    let end = p.starts[slot] + p.lens[slot];
                    let first = if p.all_positions[slot] {
                        p.starts[slot]
                    } else {
                        end - 1
                    };
                    rows.extend(first as u32..end as u32);
                    users.push((slot, k, end - first));
                }
            }
            let rows_t = Tensor::new(rows.as_slice(), &self.device)?;
            // (rows, hidden) -> (rows, vocab); the final norm except on a block's raw output
            let hidden = x.index_select(&rows_t, 0)?;
            let weight = self.head_weight(head, draft)?;
            let hidden = match head {
                Head::LmHeadAt(_) => hidden,
                // the norm written in the dtype the head's product reads
                _ if self.fused_epilogues => {
                    add_norm(&hidden, None, None, &self.ln_f, weight.input_dtype())?
                }
                _ => self.ln_f.forward(&hidden)?,
            };
            let logits = weight.xwt(&hidden)?;
            let users = users
                .into_iter()
                .map(|(slot, k, rows)| {
                    let reads = Reads {
                        choice: p.choices[slot],
                        premature_of: premature_chosen(p, slot).then_some(p.heads[slot].len()),
                        logprobs: p.logprobs[slot],
                        choice_top: p.choice_logprobs[slot],
                        sled: p.sled[slot].map(|rule| (rule, p.heads[slot].len())),
                    };
                    HeadUser::new(p.order[slot], k, rows, reads)
                })
                .collect();
            copies.push(logits, users, outputs)?;
        }
        Ok(())
    }
}

/// Whether the step chooses slot `slot`'s DoLa candidate where the logits are: at its last
/// row (`SeqStep::select_premature`), or at each position echo scores (`SeqStep::logprobs`
/// with DoLa's rule, more than one candidate).
fn premature_chosen(p: &Packed<'_>, slot: usize) -> bool {
    let dola_read = p.logprobs[slot]
        .is_some_and(|l| matches!(l.read.contrast, Some(ContrastRule::Dola { .. })));
    p.select_premature[slot] || (dola_read && p.heads[slot].len() > 2)
}

/// Whether reduced-precision products with a float32 result (`kernels::wide_product`) compute
/// on `device` what the CPU's do in `dtype`.
fn wide_products_hold(device: &Device, dtype: DType) -> candle_core::Result<bool> {
    kernels_hold(
        device,
        wide_product::check(device, dtype),
        // float32 sums of a few hundred terms, in another order
        1e-4,
        "products with float32 results (cuBLAS GemmEx)",
        "the products with float32 results",
        "the CPU's",
    )
}

/// Whether the fused paged-attention kernels compute what the tensor ops do on `device`.
fn fused_attention_holds(device: &Device, kv_dtype: DType) -> candle_core::Result<bool> {
    kernels_hold(
        device,
        batched_attention::check_fused_attention(device, kv_dtype),
        batched_attention::FUSED_TOLERANCE,
        "batched attention: the fused paged-attention kernels",
        "the fused paged-attention kernels",
        "the tensor ops",
    )
}

/// Whether the fused epilogues compute what candle's ops do on `device` for this model's
/// shapes, its products' dtype and the dtype they read.
fn fused_epilogues_hold(
    device: &Device,
    cfg: &ModelConfig,
    weights: &Weight,
) -> candle_core::Result<bool> {
    let (hidden, inner, act) = (cfg.hidden_size, cfg.intermediate_size, cfg.activation);
    let dtypes = (weights.output_dtype(), weights.input_dtype());
    // A 16-bit output may round the other way on a last-bit difference of its float32.
    let tolerance = if dtypes == (DType::F32, DType::F32) {
        1e-5
    } else {
        1e-2
    };
    kernels_hold(
        device,
        fused_epilogue::check(device, hidden, inner, act, dtypes),
        tolerance,
        "fused epilogues (bias, activation, residual, norm)",
        "the fused epilogues",
        "candle's ops",
    )
}

/// Whether the greedy choices made on `device` are the CPU's, for rows of `vocab` logits.
fn device_choices_hold(device: &Device, vocab: usize) -> candle_core::Result<bool> {
    kernels_hold(
        device,
        greedy::check(device, vocab),
        1e-5,
        "greedy choices (argmax, contrast, DoLa), exit margins and DoLa divergences made where the logits are",
        "the greedy choice kernels",
        "the CPU's choices",
    )
}

/// Whether the prompt logprobs read on `device` are the CPU's, for rows of `vocab` logits.
fn device_logprobs_hold(device: &Device, vocab: usize) -> candle_core::Result<bool> {
    kernels_hold(
        device,
        logprob::check(device, vocab),
        1e-5,
        "prompt logprobs (echo) read where the logits are",
        "the logprob kernel",
        "the CPU's log-softmax",
    )
}

/// Whether SLED's scores computed on `device` are the CPU's, for rows of `vocab` logits.
fn device_sled_holds(device: &Device, vocab: usize) -> candle_core::Result<bool> {
    kernels_hold(
        device,
        sled::check(device, vocab),
        // evolved logits of trained heads' size, made of float32 softmaxes
        1e-4,
        "SLED's scores (candidates, evolved logits) computed where the logits are",
        "the SLED kernel",
        "the CPU's SLED",
    )
}

/// Whether the draws made on `device` are the CPU's, for rows of `vocab` logits.
fn device_draws_hold(device: &Device, vocab: usize) -> candle_core::Result<bool> {
    kernels_hold(
        device,
        sample::check(device, vocab),
        1e-5,
        "sampled tokens (temperature, top-k, top-p) drawn where the logits are",
        "the draw kernel",
        "the CPU's draws",
    )
}

/// Whether a start-up check of our own `kernels` against `oracle` came within `tolerance`,
/// logged either way (as `used` when it did): a GPU whose kernels fail or differ keeps the
/// candle ops and says so. A check that failed with an error is followed by a probe of the
/// device (`device_computes`); where that fails too, the start-up stops with both errors.
fn kernels_hold(
    device: &Device,
    check: candle_core::Result<f32>,
    tolerance: f32,
    used: &str,
    kernels: &str,
    oracle: &str,
) -> candle_core::Result<bool> {
    hold_or_refuse(check, tolerance, (used, kernels, oracle), || {
        device_computes(device)
    })
}

/// [`kernels_hold`]'s decision, `probe` telling whether the device still computes.
fn hold_or_refuse(
    check: candle_core::Result<f32>,
    tolerance: f32,
    (used, kernels, oracle): (&str, &str, &str),
    probe: impl FnOnce() -> candle_core::Result<()>,
) -> candle_core::Result<bool> {
    match check {
        Ok(diff) if diff <= tolerance => {
            tracing::info!(max_difference = diff, "{used}");
            Ok(true)
        }
        Ok(diff) => {
            tracing::error!(
                max_difference = diff,
                tolerance,
                "{kernels} differ from {oracle}: not used"
            );
            Ok(false)
        }
        Err(e) => match probe() {
            Ok(()) => {
                tracing::error!(error = %e, "{kernels} failed: not used");
                Ok(false)
            }
            // Some CUDA errors (an illegal address, a launch that ran past its bounds) leave
            // the whole context failing every later call: the fallbacks would fail at the first
            // request instead of here.
            Err(probe) => candle_core::bail!(
                "{kernels} failed at start-up ({e}), and the device no longer computes \
                 afterwards ({probe}): not starting"
            ),
        },
    }
}

/// Whether `device` still computes: a small product summed there and read back.
fn device_computes(device: &Device) -> candle_core::Result<()> {
    let x = Tensor::new(&[1f32, 2.0, 3.0], device)?;
    let sum = (&x * &x)?.sum_all()?.to_scalar::<f32>()?;
    if sum != 14.0 {
        candle_core::bail!("1² + 2² + 3² came back as {sum}");
    }
    Ok(())
}

/// The slots a block's output holds, in row order: what [`Packed`] borrows.
struct Rows<'h> {
    /// Each one's index in the caller's step list.
    order: Vec<usize>,
    starts: Vec<usize>,
    lens: Vec<usize>,
    heads: Vec<&'h [Head]>,
    all_positions: Vec<bool>,
    choices: Vec<Option<DeviceChoice>>,
    select_premature: Vec<bool>,
    logprobs: Vec<Option<LogprobTargets<'h>>>,
    choice_logprobs: Vec<Option<usize>>,
    sled: Vec<Option<SledRule>>,
}

impl Rows<'_> {
    fn packed(&self) -> Packed<'_> {
        Packed {
            starts: &self.starts,
            lens: &self.lens,
            heads: &self.heads,
            all_positions: &self.all_positions,
            choices: &self.choices,
            select_premature: &self.select_premature,
            logprobs: &self.logprobs,
            choice_logprobs: &self.choice_logprobs,
            sled: &self.sled,
            order: &self.order,
        }
    }
}

/// The row indices of `slots` (each `lens[s]` rows from `starts[s]`), in that order.
fn row_ids(slots: &[usize], starts: &[usize], lens: &[usize]) -> Vec<u32> {
    slots
        .iter()
        .flat_map(|&s| (starts[s]..starts[s] + lens[s]).map(|r| r as u32))
        .collect()
}

/// Sets `starts` of `slots` to where their rows lie once packed together in that order.
fn pack_rows(slots: &[usize], lens: &[usize], starts: &mut [usize]) {
    let mut next = 0;
    for &s in slots {
        starts[s] = next;
        next += lens[s];
    }
}

/// The segments of `slots`, in that order, each starting at its row in `starts`.
fn take_segments<'s>(
    segments: &mut [Option<Segment<'s>>],
    slots: &[usize],
    starts: &[usize],
) -> Vec<Segment<'s>> {
    slots
        .iter()
        .map(|&s| {
            let mut seg = segments[s].take().expect("a segment runs once per block");
            seg.start = starts[s];
            seg
        })
        .collect()
}

fn put_back<'s>(segments: &mut [Option<Segment<'s>>], slots: &[usize], run: Vec<Segment<'s>>) {
    for (&s, seg) in slots.iter().zip(run) {
        segments[s] = Some(seg);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_check_on_a_device_that_no_longer_computes_stops_the_start_up() {
        let names = ("used", "the kernels", "the oracle");
        let fine = || Ok(());
        let broken = || Err(candle_core::Error::msg("CUDA_ERROR_ILLEGAL_ADDRESS"));
        let failed = || Err(candle_core::Error::msg("launch failed"));
        // a check that passes or differs says nothing of the device: it is not probed
        assert!(hold_or_refuse(Ok(0.0), 1e-5, names, broken).unwrap());
        assert!(!hold_or_refuse(Ok(1.0), 1e-5, names, broken).unwrap());
        // one that fails: the fallback, where the device still computes
        assert!(!hold_or_refuse(failed(), 1e-5, names, fine).unwrap());
        let e = hold_or_refuse(failed(), 1e-5, names, broken)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("launch failed")
                && e.contains("ILLEGAL_ADDRESS")
                && e.contains("the kernels"),
            "{e}"
        );
        device_computes(&Device::Cpu).unwrap();
    }
}
