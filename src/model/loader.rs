//! Puts config, weights and tokenizer together into a ready model.

use candle_core::{DType, Device};
use candle_nn::VarBuilder;

use super::config::ModelConfig;
use super::error::{ModelError, Result};
use super::finite_weights::FiniteWeights;
use super::multi_exit::MultiExitModel;
use super::safetensors_file::SafetensorsFiles;
use super::source::{self, ModelFiles, WeightFiles};
use super::tokenizer::TextTokenizer;
use super::weights::WeightDtype;

#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Hub revision (branch, tag, commit or `refs/pr/N`); ignored for local folders.
    pub revision: Option<String>,
    /// How the matmul weights (projections and vocabulary heads) are kept. Norms, position
    /// embeddings, biases and attention stay float32; stored float16/bfloat16 is upcast.
    pub dtype: WeightDtype,
    pub device: Device,
    /// Use the skinny AVX-512 matmul kernels where the CPU has them (else candle's gemm).
    pub skinny_kernels: bool,
    /// Multiply bfloat16/float16 weights the skinny kernels do not take with float32 results
    /// (`kernels::wide_product`: a GPU's products, where they hold at start-up) rather than by
    /// candle's matmul.
    pub wide_products: bool,
    /// Attention on the CPU takes the batched path over a paged cache (every other device's
    /// path) instead of the CPU kernels.
    pub batched_attention: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            revision: None,
            dtype: WeightDtype::F32,
            device: Device::Cpu,
            skinny_kernels: true,
            wide_products: false,
            batched_attention: false,
        }
    }
}

pub struct LoadedModel {
    pub model: MultiExitModel,
    pub tokenizer: TextTokenizer,
    pub files: ModelFiles,
}

/// Loads `model` (a local folder or a hub repo id).
pub fn load(model: &str, opts: &LoadOptions) -> Result<LoadedModel> {
    let files = source::resolve(model, opts.revision.as_deref())?;
    load_files(files, opts)
}

pub fn load_files(files: ModelFiles, opts: &LoadOptions) -> Result<LoadedModel> {
    let cfg = ModelConfig::from_file(&files.config)?;
    let vb = match &files.weights {
        WeightFiles::Safetensors(paths) => VarBuilder::from_backend(
            Box::new(FiniteWeights(Box::new(SafetensorsFiles::open(paths)?))),
            DType::F32,
            opts.device.clone(),
        ),
        WeightFiles::Pth(path) => {
            let pth = candle_core::pickle::PthTensors::new(path, None)
                .map_err(|e| file_error(path, e))?;
            VarBuilder::from_backend(
                Box::new(FiniteWeights(Box::new(pth))),
                opts.dtype.load_dtype(),
                opts.device.clone(),
            )
        }
    };
    let model = MultiExitModel::new(
        cfg,
        vb,
        opts.dtype,
        (opts.skinny_kernels, opts.wide_products),
        opts.batched_attention,
    )?;
    let tokenizer = TextTokenizer::from_files(&files.tokenizer)?;
    Ok(LoadedModel {
        model,
        tokenizer,
        files,
    })
}

fn file_error(path: &std::path::Path, e: candle_core::Error) -> ModelError {
    ModelError::File {
        path: path.to_path_buf(),
        message: format!(
            "cannot read weights: {}",
            e.to_string().lines().next().unwrap_or_default()
        ),
    }
}
