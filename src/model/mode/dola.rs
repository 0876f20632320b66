//! DoLa, decoding by contrasting layers (Chuang et al., ICLR 2024), as transformers 4.46.3
//! computes it (`_dola_select_contrast`, `_relative_top_filter`): per token, the premature
//! candidate whose distribution differs most from the mature one (the original head) is
//! chosen, and the next-token logits are `log p_mature - log p_premature` on the tokens the
//! mature head finds plausible (`log p >= max log p + log relative_top`), -inf elsewhere.
//!
//! A candidate's distribution is its trained exit head (`premature: exits`, the default, what
//! a multi-exit model is for) or the original head applied to the block's raw output without
//! the final norm (`premature: lm_head`, what transformers does, for comparison with the DoLa
//! literature). Transformers averages the divergence over its batch before choosing; here each
//! sequence chooses for itself, which equals transformers at batch size 1.

use std::fmt;

use serde_json::{Map, Value};

use super::params::{self, Fields, Form, FormField, ModelShape, ParamError};
use super::{DeviceChoice, Head, Inspected, Strategy};
use crate::kernels::greedy;

/// A set of layers (0..128; 0 = the embeddings' output), ascending: kept as bits so that a
/// mode stays `Copy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub struct Layers(u128);

impl Layers {
    /// Layers above this cannot be named.
    pub const LIMIT: usize = 128;

    /// None when a layer is at or past [`Layers::LIMIT`].
    pub fn from_list(layers: impl IntoIterator<Item = usize>) -> Option<Self> {
        let mut bits = 0u128;
        for l in layers {
            if l >= Self::LIMIT {
                return None;
            }
            bits |= 1 << l;
        }
        Some(Self(bits))
    }

    pub fn iter(self) -> impl Iterator<Item = usize> {
        (0..Self::LIMIT).filter(move |&l| self.0 & (1 << l) != 0)
    }

    pub fn len(self) -> usize {
        self.0.count_ones() as usize
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }
}

impl From<Layers> for Value {
    /// The layers as a JSON list, ascending.
    fn from(l: Layers) -> Self {
        l.iter().collect::<Vec<_>>().into()
    }
}

impl fmt::Display for Layers {
    /// `2-4-6`, the form model ids and flags use.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self.iter().map(|l| l.to_string()).collect();
        f.write_str(&parts.join("-"))
    }
}

/// The candidate premature layers as asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DolaLayers {
    /// The lower half of the layers, every other one (transformers' rule).
    Low,
    /// The upper half, every other one.
    High,
    /// These layers (those below the top are kept).
    List(Layers),
}

/// Where a candidate's distribution comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Premature {
    /// Its trained exit head (every candidate must be an exit).
    Exits,
    /// The original head on the block's raw output, no final norm (transformers' DoLa).
    LmHead,
}

impl Premature {
    pub const NAMES: [(&'static str, Premature); 2] =
        [("exits", Premature::Exits), ("lm_head", Premature::LmHead)];

    /// The head that reads premature layer `layer`.
    pub fn head(self, layer: usize) -> super::Head {
        match self {
            Premature::Exits => super::Head::Exit(layer),
            Premature::LmHead => super::Head::LmHeadAt(layer),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Premature::Exits => "exits",
            Premature::LmHead => "lm_head",
        }
    }

    /// The one `name` names.
    pub fn named(name: &str) -> Option<Self> {
        Self::NAMES.iter().find(|(n, _)| *n == name).map(|(_, p)| *p)
    }
}

pub const DEFAULT_RELATIVE_TOP: f32 = 0.1;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DolaParams {
    pub layers: DolaLayers,
    pub premature: Premature,
    /// The plausibility threshold, relative to the mature head's top probability, in (0, 1].
    pub relative_top: f32,
    /// `layers` resolved against the model (`DolaParams::resolve`); empty until then.
    pub candidates: Layers,
}

impl DolaParams {
    /// As `layers` asks, with the defaults, unresolved.
    pub fn new(layers: DolaLayers) -> Self {
        Self {
            layers,
            premature: Premature::Exits,
            relative_top: DEFAULT_RELATIVE_TOP,
            candidates: Layers::default(),
        }
    }

    /// The candidates for a model of `num_layers` blocks, `tied` when its original head is
    /// the token embedding (transformers' rule: "low" is range(start, N/2, 2) and "high"
    /// range(N/2, N, 2) up to 40 layers, range(start, 20, 2) and range(N-20, N, 2) above;
    /// start 2 when tied and N > 2, 1 when tied and N == 2, else 0; a list keeps the layers
    /// below N).
    pub fn with_candidates(mut self, num_layers: usize, tied: bool) -> Self {
        let n = num_layers;
        let start = first_premature_layer(n, tied);
        let range = |from: usize, to: usize| Layers::from_list((from..to).step_by(2));
        self.candidates = match self.layers {
            DolaLayers::Low if start == n / 2 => Layers::from_list([start]),
            DolaLayers::Low if n <= 40 => range(start, n / 2),
            DolaLayers::Low => range(start, 20),
            DolaLayers::High if n <= 40 => range(n / 2, n),
            DolaLayers::High => range(n - 20, n),
            DolaLayers::List(l) => Layers::from_list(l.iter().filter(|&l| l < n)),
        }
        .unwrap_or_default();
        self
    }

    fn has_default_params(&self) -> bool {
        self.premature == Premature::Exits && self.relative_top == DEFAULT_RELATIVE_TOP
    }
}

impl fmt::Display for DolaLayers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DolaLayers::Low => f.write_str("low"),
            DolaLayers::High => f.write_str("high"),
            DolaLayers::List(l) => write!(f, "{l}"),
        }
    }
}

impl fmt::Display for DolaParams {
    /// The flag form: `dola:low`, `dola:2-4-6`, plus the parameters that are not defaults.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "dola:{}", self.layers)?;
        if self.premature != Premature::Exits {
            write!(f, ",premature={}", self.premature.name())?;
        }
        if self.relative_top != DEFAULT_RELATIVE_TOP {
            write!(f, ",relative_top={}", self.relative_top)?;
        }
        Ok(())
    }
}

/// The lowest layer transformers reads a premature distribution from through the top head:
/// 2 when the head is the tied embedding and N > 2 (layer 0 would read the embedding back),
/// 1 when tied and N == 2, else 0.
pub(super) fn first_premature_layer(num_layers: usize, tied: bool) -> usize {
    match (tied, num_layers) {
        (false, _) => 0,
        (true, n) if n > 2 => 2,
        (true, 2) => 1,
        (true, _) => 0,
    }
}

/// `low`, `high` or `L-L-...` (canonical numbers only, ascending, no repeats: one spelling
/// per set).
pub fn parse_layers(s: &str) -> Option<DolaLayers> {
    match s {
        "low" => Some(DolaLayers::Low),
        "high" => Some(DolaLayers::High),
        _ => {
            let nums: Vec<usize> = s
                .split('-')
                .map(|p| p.parse().ok().filter(|n: &usize| n.to_string() == p))
                .collect::<Option<_>>()?;
            let set = Layers::from_list(nums.iter().copied())?;
            (nums.windows(2).all(|w| w[0] < w[1]) && !nums.is_empty())
                .then_some(DolaLayers::List(set))
        }
    }
}

impl Strategy for DolaParams {
    const NAME: &'static str = "dola";
    const TITLE: &'static str = "DoLa";
    const FIELDS: &'static [&'static str] = &["layers", "premature", "relative_top"];
    const ID_WORD: &'static str = "dola";
    const ID_FORMS: &'static str =
        "`{b}:dola-low`, `{b}:dola-high`, `{b}:dola-L-L` (DoLa over those exits)";
    const FLAG_FORMS: &'static str =
        "dola:LAYERS[,premature=exits|lm_head][,relative_top=R] (LAYERS: low, high or L-L-...)";

    /// The mature head, then each candidate's.
    fn heads(&self) -> Vec<Head> {
        std::iter::once(Head::Original)
            .chain(self.candidates.iter().map(|l| self.premature.head(l)))
            .collect()
    }

    /// Unnormalised: transformers' repetition penalty edits DoLa's logits.
    fn scores(&self, logits: &[&[f32]]) -> Vec<f32> {
        dola_logits(logits[0], &logits[1..], self.relative_top).0
    }

    fn scores_are_logprobs(&self) -> bool {
        false
    }

    fn selects_premature(&self) -> bool {
        true
    }

    /// The best difference inside the relative top over the candidate chosen in the step
    /// (greedy), or the draw from DoLa's logits.
    fn device_choice(&self) -> Option<DeviceChoice> {
        Some(DeviceChoice::Dola {
            relative_top: self.relative_top,
            draw: None,
        })
    }

    /// With the premature layer each position chose.
    fn inspect(&self, logits: &[&[f32]]) -> Inspected {
        let (scores, chosen) = dola_logits(logits[0], &logits[1..], self.relative_top);
        Inspected {
            logprobs: super::log_softmax(&scores),
            chosen: self
                .candidates
                .iter()
                .nth(chosen)
                .map(|l| ("premature_layer", l)),
        }
    }

    /// `dola:low`, `dola:2-4-6`, plus the parameters that are not defaults.
    fn write_flag(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self}")
    }

    /// `LAYERS[,premature=P][,relative_top=R]`.
    fn parse_flag(rest: Option<&str>) -> Option<Self> {
        let mut parts = rest?.split(',');
        let mut p = DolaParams::new(parse_layers(parts.next()?.trim())?);
        for part in parts {
            match part.trim().split_once('=') {
                Some(("premature", v)) => p.premature = Premature::named(v.trim())?,
                Some(("relative_top", v)) => p.relative_top = v.trim().parse().ok()?,
                _ => return None,
            }
        }
        Some(p)
    }

    /// `dola-low`, `dola-2-4-6`, for default parameters only.
    fn id_suffix(&self) -> Option<String> {
        self.has_default_params()
            .then(|| format!("dola-{}", self.layers))
    }

    fn from_id_suffix(suffix: &str) -> Option<Self> {
        Some(DolaParams::new(parse_layers(suffix.strip_prefix("dola-")?)?))
    }

    fn to_request(&self) -> Map<String, Value> {
        let layers: Value = match self.layers {
            DolaLayers::Low => "low".into(),
            DolaLayers::High => "high".into(),
            DolaLayers::List(l) => l.into(),
        };
        Map::from_iter([
            ("layers".into(), layers),
            ("premature".into(), self.premature.name().into()),
            ("relative_top".into(), params::number(self.relative_top)),
        ])
    }

    /// The candidates "low" or "high" meant for this model.
    fn resolved(&self) -> Map<String, Value> {
        Map::from_iter([("layers".into(), self.candidates.into())])
    }

    fn from_request(f: &mut Fields, shape: &ModelShape) -> Result<Self, ParamError> {
        let param = f.param("layers");
        let bad = |got: String| {
            ParamError::new(
                param.clone(),
                format!("`{param}` must be \"low\", \"high\" or a list of layers, got {got}"),
            )
        };
        let layers = match f.value("layers") {
            None => DolaLayers::High,
            Some(Value::String(n)) => match n.as_str() {
                "low" => DolaLayers::Low,
                "high" => DolaLayers::High,
                _ => return Err(bad(format!("{n:?}"))),
            },
            Some(Value::Array(a)) => {
                let list: Vec<i64> = a
                    .iter()
                    .map(Value::as_i64)
                    .collect::<Option<_>>()
                    .ok_or_else(|| bad(Value::Array(a.clone()).to_string()))?;
                if let Some(&neg) = list.iter().find(|&&x| x < 0) {
                    return Err(bad(format!("a negative layer ({neg})")));
                }
                // Layers at or above the top are dropped (transformers' rule).
                let below = list
                    .iter()
                    .map(|&x| x as u64)
                    .filter(|&x| x < shape.num_layers as u64)
                    .map(|x| x as usize);
                DolaLayers::List(
                    Layers::from_list(below).ok_or_else(|| bad("a layer past 127".into()))?,
                )
            }
            Some(other) => return Err(bad(other.to_string())),
        };
        Ok(DolaParams {
            premature: f.choice("premature", &Premature::NAMES, Premature::Exits)?,
            relative_top: f.number_in(
                "relative_top",
                DEFAULT_RELATIVE_TOP as f64,
                (0.0, 1.0),
                true,
            )?,
            ..DolaParams::new(layers)
        })
    }

    /// Its candidates for this model: at least one, each an exit with `premature: exits`.
    fn resolve(self, object: &str, shape: &ModelShape) -> Result<Self, ParamError> {
        params::in_range(
            &format!("{object}.relative_top"),
            self.relative_top as f64,
            (0.0, 1.0),
            true,
        )?;
        let p = self.with_candidates(shape.num_layers, shape.tied_head);
        let param = format!("{object}.layers");
        if p.candidates.is_empty() {
            return Err(ParamError::new(
                param.clone(),
                format!(
                    "`{param}` leaves no premature layer below the top ({}): name layers from 0 (the embeddings) to {}",
                    shape.num_layers,
                    shape.num_layers.saturating_sub(1)
                ),
            ));
        }
        if p.premature == Premature::Exits {
            if let Some(layer) = p.candidates.iter().find(|c| !shape.exits.contains(c)) {
                params::exit_layer(&param, layer as i64, shape)?;
            }
        }
        Ok(p)
    }

    /// The lower and upper halves, and every exit below the top.
    fn listed(shape: &ModelShape) -> Vec<Self> {
        let mut sets = vec![DolaLayers::Low, DolaLayers::High];
        if let Some(set) = Layers::from_list(shape.exits_below_top()).filter(|s| !s.is_empty()) {
            sets.push(DolaLayers::List(set));
        }
        sets.into_iter().map(DolaParams::new).collect()
    }

    fn form(shape: &ModelShape) -> Option<Form> {
        let mut sets: Vec<(Value, String)> = vec![
            ("high".into(), "upper half".into()),
            ("low".into(), "lower half".into()),
        ];
        let below: Vec<usize> = shape.exits_below_top().collect();
        let default: Value = if below.is_empty() {
            "high".into()
        } else {
            let names: Vec<String> = below.iter().map(|l| l.to_string()).collect();
            sets.push((below.clone().into(), format!("exits {}", names.join(", "))));
            below.into()
        };
        Some(Form {
            mode: Self::NAME,
            title: Self::TITLE,
            single_head: false,
            parameters: vec![
                FormField::choice("layers", "premature", sets, default),
                FormField::choice(
                    "premature",
                    "heads",
                    vec![
                        ("exits".into(), "trained exits".into()),
                        ("lm_head".into(), "top head".into()),
                    ],
                    "exits".into(),
                ),
            ],
        })
    }
}

/// The DoLa logits from the mature head's logits and each candidate's, and the index of the
/// candidate chosen: `log_softmax(mature) - log_softmax(premature)` where the mature head
/// keeps the token, -inf elsewhere (`kernels::greedy::dola_scores`, as a step computes them
/// where the logits are).
pub fn dola_logits(mature: &[f32], candidates: &[&[f32]], relative_top: f32) -> (Vec<f32>, usize) {
    if candidates.is_empty() {
        // validation never lets this through; the mature head alone, rather than a panic
        return (super::log_softmax(mature), 0);
    }
    // A candidate left empty is one a step that chose on the device did not choose: it hands
    // over only the one it chose.
    let handed: Vec<usize> = (0..candidates.len())
        .filter(|&i| !candidates[i].is_empty())
        .collect();
    let chosen = if let [one] = handed[..] {
        one
    } else {
        // transformers' divergence (`kernels::greedy::dola_divergence`); the first largest
        // wins, as torch's argmax
        let lp_mature = super::log_softmax(mature);
        let mut best = (0, f64::NEG_INFINITY);
        for (i, c) in candidates.iter().enumerate().filter(|(_, c)| !c.is_empty()) {
            let d = greedy::divergence_of_log_probs(&lp_mature, &super::log_softmax(c));
            if d > best.1 {
                best = (i, d);
            }
        }
        best.0
    };
    let logits = greedy::dola_scores(mature, candidates[chosen], relative_top.ln());
    (logits, chosen)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transformers_layer_rule() {
        let cands = |layers, n, tied| {
            DolaParams::new(layers)
                .with_candidates(n, tied)
                .candidates
                .iter()
                .collect::<Vec<_>>()
        };
        use DolaLayers::*;
        assert_eq!(cands(Low, 12, true), [2, 4]);
        assert_eq!(cands(High, 12, true), [6, 8, 10]);
        assert_eq!(cands(Low, 24, true), [2, 4, 6, 8, 10]);
        assert_eq!(cands(High, 24, true), [12, 14, 16, 18, 20, 22]);
        assert_eq!(cands(Low, 4, true), [2], "start == N/2");
        assert_eq!(cands(High, 6, true), [3, 5]);
        assert_eq!(cands(Low, 12, false), [0, 2, 4]);
        assert_eq!(cands(Low, 2, true), [1]);
        assert_eq!(cands(Low, 48, true), (2..20).step_by(2).collect::<Vec<_>>());
        assert_eq!(
            cands(High, 48, true),
            (28..48).step_by(2).collect::<Vec<_>>()
        );
        let list = List(Layers::from_list([1, 2, 7]).unwrap());
        assert_eq!(cands(list, 4, true), [1, 2], "layers at or above N dropped");
    }

    #[test]
    fn text_forms_round_trip_and_refuse_other_spellings() {
        for (flag, suffix) in [
            ("dola:low", Some("dola-low")),
            ("dola:high", Some("dola-high")),
            ("dola:2-4-6", Some("dola-2-4-6")),
            ("dola:low,premature=lm_head", None),
            ("dola:1,relative_top=0.5", None),
        ] {
            let p = DolaParams::parse_flag(flag.strip_prefix("dola:")).unwrap();
            assert_eq!(p.to_string(), flag);
            assert_eq!(p.id_suffix().as_deref(), suffix);
            if let Some(s) = suffix {
                assert_eq!(DolaParams::from_id_suffix(s), Some(p));
            }
        }
        for bad in [
            "dola-4-2",
            "dola-2-2",
            "dola-02",
            "dola-",
            "dola-x",
            "dola-2--4",
        ] {
            assert_eq!(DolaParams::from_id_suffix(bad), None, "{bad}");
        }
        assert_eq!(DolaParams::parse_flag(Some("low,beta=1")), None);
    }

    #[test]
    fn keeps_the_plausible_tokens_and_picks_the_most_divergent_candidate() {
        let mature = [4.0, 3.5, 0.0, -2.0];
        let same = mature; // no divergence: never chosen over a different one
        let other = [0.0, 3.0, 0.0, 0.0];
        let (logits, chosen) = dola_logits(&mature, &[&same, &other], 0.1);
        assert_eq!(chosen, 1);
        // p(2), p(3) < 0.1 max p: filtered
        assert!(logits[2] == f32::NEG_INFINITY && logits[3] == f32::NEG_INFINITY);
        let (lm, lo) = (
            super::super::log_softmax(&mature),
            super::super::log_softmax(&other),
        );
        assert!((logits[0] - (lm[0] - lo[0])).abs() < 1e-6);
        // token 1 is what the premature layer already believed: token 0 wins the contrast
        assert!(logits[0] > logits[1]);
        // one candidate: no choice to make
        assert_eq!(dola_logits(&mature, &[&same], 0.1).1, 0);
        // one handed over (a step chose it on the device): taken as is
        let (handed, chosen) = dola_logits(&mature, &[&[], &same, &[]], 0.1);
        assert_eq!(chosen, 1);
        assert_eq!(handed, dola_logits(&mature, &[&same], 0.1).0);
    }
}
