//! Device memory: the unified page pool (S-LoRA) shared by KV cache, prefix-cache blocks and
//! adapter weights.

pub mod kv;
pub mod pool;
pub mod prefix;
