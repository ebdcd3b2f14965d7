//! Tensor elements as the agent reads them from safetensors files (checkpoints and adapters):
//! little-endian f32, f16 or bf16, decoded to f32.

use safetensors::Dtype;

/// Decodes little-endian f32/f16/bf16 bytes; `None` for other dtypes.
pub fn to_f32(dtype: Dtype, bytes: &[u8]) -> Option<Vec<f32>> {
    match dtype {
        Dtype::F32 => Some(
            bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
        ),
        Dtype::F16 => Some(
            bytes
                .chunks_exact(2)
                .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
        ),
        Dtype::BF16 => Some(
            bytes
                .chunks_exact(2)
                .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
        ),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_the_three_float_dtypes() {
        let x = [1.5f32, -2.0];
        let f32_bytes: Vec<u8> = x.iter().flat_map(|v| v.to_le_bytes()).collect();
        let f16_bytes: Vec<u8> = x
            .iter()
            .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
            .collect();
        let bf16_bytes: Vec<u8> = x
            .iter()
            .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
            .collect();
        for (dtype, bytes) in [
            (Dtype::F32, f32_bytes),
            (Dtype::F16, f16_bytes),
            (Dtype::BF16, bf16_bytes),
        ] {
            assert_eq!(to_f32(dtype, &bytes).as_deref(), Some(&x[..]), "{dtype:?}");
        }
        assert_eq!(to_f32(Dtype::I64, &[0; 8]), None);
    }
}
