//! Where a resident adapter's weights sit in the pool, and the per-step description of which
//! token rows use which adapter: exactly what the heterogeneous LoRA kernels consume.

use std::ops::Range;

use loraplane_kernels::cpu::LoraSegment;

use crate::lora::Module;

/// One module's LoRA factors in the pool: the element offsets of the `rank` rows of A (each
/// `in_dim` long) and of Bᵀ (each `out_dim` long).
#[derive(Debug, Clone, PartialEq)]
pub struct ModuleRows {
    pub rank: usize,
    pub scale: f32,
    pub a: Vec<usize>,
    pub b: Vec<usize>,
}

/// Pool layout of a resident adapter: `layers[l][module.index()]`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AdapterRows {
    pub layers: Vec<[Option<ModuleRows>; 7]>,
}

impl AdapterRows {
    pub fn module(&self, layer: usize, module: Module) -> Option<&ModuleRows> {
        self.layers
            .get(layer)
            .and_then(|m| m[module.index()].as_ref())
    }
}

/// The adapters of one step: each entry is a run of token rows (one sequence's chunk) and the
/// adapter they use. Rows of base-model sequences appear in no entry.
#[derive(Debug, Default)]
pub struct LoraBatch<'a> {
    pub runs: Vec<(Range<usize>, &'a AdapterRows)>,
}

impl<'a> LoraBatch<'a> {
    /// Kernel segments for one (layer, module), and the largest rank among them.
    pub fn segments(&self, layer: usize, module: Module) -> (Vec<LoraSegment<'a>>, usize) {
        let mut max_rank = 0;
        let segments = self
            .runs
            .iter()
            .filter_map(|(rows, adapter)| {
                let m = adapter.module(layer, module)?;
                max_rank = max_rank.max(m.rank);
                Some(LoraSegment {
                    rows: rows.clone(),
                    a_rows: &m.a,
                    b_rows: &m.b,
                    scale: m.scale,
                })
            })
            .collect();
        (segments, max_rank)
    }

    pub fn is_empty(&self) -> bool {
        self.runs.is_empty()
    }
}
