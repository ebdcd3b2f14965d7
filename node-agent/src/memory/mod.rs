//! Device memory: the unified page pool (S-LoRA) shared by KV cache and adapter weights.

pub mod kv;
pub mod pool;
