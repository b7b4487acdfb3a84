//! Reads a GGUF header (metadata and tensor table, no weights) and estimates memory.

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::GgmlDType;
use candle_core::quantized::gguf_file::{Content, Value};

use super::EngineError;

/// What the header tells about a model.
#[derive(Debug, Clone, PartialEq)]
pub struct GgufHeader {
    /// `general.architecture`, e.g. `llama`.
    pub architecture: String,
    /// `<arch>.context_length`: the context the model was trained for.
    pub context_length: Option<usize>,
    pub parameter_count: u64,
    /// The quantization most weight elements use, e.g. `Q4_1`.
    pub quantization: String,
    pub block_count: Option<usize>,
    pub embedding_length: Option<usize>,
    pub head_count: Option<usize>,
    pub head_count_kv: Option<usize>,
    /// Bytes of tensor data (the weights themselves).
    pub weights_bytes: u64,
}

fn as_u64(v: &Value) -> Option<u64> {
    match v {
        Value::U8(x) => Some(u64::from(*x)),
        Value::U16(x) => Some(u64::from(*x)),
        Value::U32(x) => Some(u64::from(*x)),
        Value::U64(x) => Some(*x),
        Value::I8(x) => u64::try_from(*x).ok(),
        Value::I16(x) => u64::try_from(*x).ok(),
        Value::I32(x) => u64::try_from(*x).ok(),
        Value::I64(x) => u64::try_from(*x).ok(),
        // Some files store per-layer head counts as arrays; take the first.
        Value::Array(a) => a.first().and_then(as_u64),
        _ => None,
    }
}

fn dtype_name(d: GgmlDType) -> &'static str {
    match d {
        GgmlDType::F32 => "F32",
        GgmlDType::F16 => "F16",
        GgmlDType::BF16 => "BF16",
        GgmlDType::Q4_0 => "Q4_0",
        GgmlDType::Q4_1 => "Q4_1",
        GgmlDType::Q5_0 => "Q5_0",
        GgmlDType::Q5_1 => "Q5_1",
        GgmlDType::Q8_0 => "Q8_0",
        GgmlDType::Q8_1 => "Q8_1",
        GgmlDType::Q2K => "Q2_K",
        GgmlDType::Q3K => "Q3_K",
        GgmlDType::Q4K => "Q4_K",
        GgmlDType::Q5K => "Q5_K",
        GgmlDType::Q6K => "Q6_K",
        GgmlDType::Q8K => "Q8_K",
    }
}

/// Reads the header of a GGUF file.
pub fn read_header(path: &Path) -> Result<GgufHeader, EngineError> {
    let bad = |message: String| EngineError::BadFile {
        path: path.display().to_string(),
        message,
    };
    let mut f = std::fs::File::open(path).map_err(|e| bad(e.to_string()))?;
    let file_len = f.metadata().map_err(|e| bad(e.to_string()))?.len();
    let content =
        Content::read(&mut f).map_err(|e| bad(format!("not a readable GGUF file: {e}")))?;
    let md = &content.metadata;
    let architecture = match md.get("general.architecture") {
        Some(Value::String(s)) => s.clone(),
        _ => return Err(bad("has no general.architecture".into())),
    };
    let get = |key: &str| {
        md.get(&format!("{architecture}.{key}"))
            .and_then(as_u64)
            .and_then(|v| usize::try_from(v).ok())
    };
    let mut by_dtype: HashMap<&'static str, u64> = HashMap::new();
    let mut params = 0u64;
    for info in content.tensor_infos.values() {
        let n = info.shape.elem_count() as u64;
        params += n;
        if info.shape.rank() >= 2 {
            *by_dtype.entry(dtype_name(info.ggml_dtype)).or_default() += n;
        }
    }
    let quantization = by_dtype
        .into_iter()
        .max_by_key(|(_, n)| *n)
        .map(|(d, _)| d.to_string())
        .unwrap_or_else(|| "unknown".into());
    Ok(GgufHeader {
        context_length: get("context_length"),
        block_count: get("block_count"),
        embedding_length: get("embedding_length"),
        head_count: get("attention.head_count"),
        head_count_kv: get("attention.head_count_kv").or(get("attention.head_count")),
        architecture,
        parameter_count: params,
        quantization,
        weights_bytes: file_len.saturating_sub(content.tensor_data_offset),
    })
}

/// Bytes needed to serve a model: weights, plus the KV cache for `context` tokens in each of
/// `seqs` sequences at `kv_bytes_per_elem` (4 for F32 on CPU, 2 for F16 on GPU), plus 10%
/// and a fixed 256 MiB for activations and the runtime.
pub fn estimate_memory(h: &GgufHeader, context: usize, seqs: usize, kv_bytes_per_elem: u64) -> u64 {
    let layers = h.block_count.unwrap_or(0) as u64;
    let kv_dim = match (h.embedding_length, h.head_count, h.head_count_kv) {
        (Some(e), Some(heads), Some(kv)) if heads > 0 => (e / heads * kv) as u64,
        (Some(e), _, _) => e as u64,
        _ => 0,
    };
    let kv = 2 * layers * kv_dim * context as u64 * seqs as u64 * kv_bytes_per_elem;
    let base = h.weights_bytes + kv;
    base + base / 10 + 256 * 1024 * 1024
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn estimate_counts_weights_and_kv_cache() {
        let h = GgufHeader {
            architecture: "llama".into(),
            context_length: Some(8192),
            parameter_count: 134_515_008,
            quantization: "Q4_1".into(),
            block_count: Some(30),
            embedding_length: Some(576),
            head_count: Some(9),
            head_count_kv: Some(3),
            weights_bytes: 98_000_000,
        };
        // kv_dim = 576 / 9 * 3 = 192; KV = 2 * 30 * 192 * 2048 * 4 * 2 bytes.
        let kv = 2 * 30 * 192 * 2048 * 4 * 2u64;
        let base = 98_000_000 + kv;
        assert_eq!(
            estimate_memory(&h, 2048, 4, 2),
            base + base / 10 + 256 * 1024 * 1024
        );
        assert!(estimate_memory(&h, 4096, 4, 2) > estimate_memory(&h, 2048, 4, 2));
    }

    #[test]
    fn a_file_that_is_not_gguf_is_refused_clearly() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("x.gguf");
        std::fs::write(&p, b"<html>not found</html>").expect("write");
        let e = read_header(&p).expect_err("not gguf");
        assert!(e.to_string().contains("not a readable GGUF file"), "{e}");
    }
}
