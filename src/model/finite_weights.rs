//! Refuses a checkpoint whose float weights hold NaN or infinity, naming the tensor: such a
//! model loads "fine" and then serves the same token ("!!!") for every prompt.

use candle_core::{DType, Device, Result, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;

/// Wraps a weight source; every float tensor read through it is checked.
pub struct FiniteWeights(pub Box<dyn SimpleBackend>);

/// Elements checked at a time: the check copies no more than this many floats at once.
const CHUNK: usize = 1 << 20;

fn check(name: &str, t: Tensor) -> Result<Tensor> {
    if !matches!(
        t.dtype(),
        DType::F32 | DType::F16 | DType::BF16 | DType::F64
    ) {
        return Ok(t);
    }
    let flat = t.flatten_all()?;
    let n = flat.elem_count();
    let mut start = 0;
    while start < n {
        let len = CHUNK.min(n - start);
        let chunk = flat
            .narrow(0, start, len)?
            .to_dtype(DType::F32)?
            .to_vec1::<f32>()?;
        if let Some(i) = chunk.iter().position(|x| !x.is_finite()) {
            candle_core::bail!(
                "tensor `{name}` holds a non-finite value ({}) at flat index {}: the checkpoint is corrupt",
                chunk[i],
                start + i
            );
        }
        start += len;
    }
    Ok(t)
}

impl SimpleBackend for FiniteWeights {
    fn get(
        &self,
        s: Shape,
        name: &str,
        h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> Result<Tensor> {
        check(name, self.0.get(s, name, h, dtype, dev)?)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> Result<Tensor> {
        check(name, self.0.get_unchecked(name, dtype, dev)?)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.0.contains_tensor(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn nan_and_inf_are_refused_by_name_and_finite_weights_pass() -> Result<()> {
        let dev = Device::Cpu;
        let mut bad = vec![0.5f32; 3 * CHUNK / 2];
        bad[CHUNK + 7] = f32::NAN;
        let tensors: HashMap<String, Tensor> = [
            ("ok".to_string(), Tensor::new(&[1f32, -2.0, 3.0], &dev)?),
            (
                "nan".to_string(),
                Tensor::from_vec(bad, 3 * CHUNK / 2, &dev)?,
            ),
            (
                "inf".to_string(),
                Tensor::new(&[1f32, f32::INFINITY], &dev)?.to_dtype(DType::BF16)?,
            ),
            ("mask".to_string(), Tensor::new(&[1u8, 0], &dev)?),
        ]
        .into_iter()
        .collect();
        let w = FiniteWeights(Box::new(tensors));
        assert!(w.get_unchecked("ok", DType::F32, &dev).is_ok());
        assert!(w.get_unchecked("mask", DType::U8, &dev).is_ok());
        let e = w
            .get_unchecked("nan", DType::F32, &dev)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("tensor `nan`") && e.contains(&format!("index {}", CHUNK + 7)),
            "{e}"
        );
        let e = w
            .get_unchecked("inf", DType::BF16, &dev)
            .unwrap_err()
            .to_string();
        assert!(e.contains("tensor `inf`") && e.contains("inf"), "{e}");
        Ok(())
    }
}
