//! The CUDA C of our own kernels (`*.cu` beside their Rust), compiled to PTX at start-up by
//! NVRTC (through cudarc, which candle already links): a GPU machine needs no toolkit, and the
//! driver compiles the PTX for whatever GPU it has. `.ci/nvrtc-check.py` compiles every source
//! here with the real NVRTC in CI, so one that NVRTC rejects cannot land.

use std::sync::OnceLock;

use candle_core::cuda_backend::cudarc::nvrtc;
use candle_core::Result;

/// `source`'s PTX, compiled the first time (`cell` keeps it, or the error, for the process).
pub(super) fn ptx(
    cell: &'static OnceLock<std::result::Result<String, String>>,
    file: &str,
    source: &str,
) -> Result<&'static str> {
    cell.get_or_init(|| {
        nvrtc::compile_ptx(source)
            .map(|p| p.to_src())
            .map_err(|e| format!("NVRTC could not compile {file}: {e:?}"))
    })
    .as_deref()
    .map_err(|e| candle_core::Error::Msg(e.clone()))
}
