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
    /// Kernel segments for one (layer, module), and the largest rank among them. Consecutive
    /// runs of one adapter become one segment, so the kernels read that adapter's factors once
    /// for all its rows (the engine orders a step's sequences by adapter for this).
    pub fn segments(&self, layer: usize, module: Module) -> (Vec<LoraSegment<'a>>, usize) {
        let mut max_rank = 0;
        let mut segments: Vec<LoraSegment<'a>> = Vec::with_capacity(self.runs.len());
        let mut last: Option<&'a AdapterRows> = None;
        for (rows, adapter) in &self.runs {
            let Some(m) = adapter.module(layer, module) else {
                last = None;
                continue;
            };
            max_rank = max_rank.max(m.rank);
            if let Some(prev) = segments.last_mut()
                && last.is_some_and(|l| std::ptr::eq(l, *adapter))
                && prev.rows.end == rows.start
            {
                prev.rows.end = rows.end;
                continue;
            }
            segments.push(LoraSegment {
                rows: rows.clone(),
                a_rows: &m.a,
                b_rows: &m.b,
                scale: m.scale,
            });
            last = Some(*adapter);
        }
        (segments, max_rank)
    }

    pub fn is_empty(&self) -> bool {
        self.runs.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn adapter(rank: usize) -> AdapterRows {
        let rows = ModuleRows {
            rank,
            scale: 0.5,
            a: (0..rank).collect(),
            b: (0..rank).collect(),
        };
        AdapterRows {
            layers: vec![std::array::from_fn(|_| Some(rows.clone()))],
        }
    }

    #[test]
    fn consecutive_runs_of_one_adapter_share_a_segment() {
        let (a, b) = (adapter(2), adapter(3));
        let batch = LoraBatch {
            runs: vec![(0..1, &a), (1..4, &a), (4..5, &b), (6..7, &b), (7..8, &a)],
        };
        let (segs, max_rank) = batch.segments(0, Module::Q);
        let rows: Vec<_> = segs.iter().map(|s| s.rows.clone()).collect();
        // 4..5 and 6..7 are not adjacent (row 5 is a base-model row), and the same adapter
        // again after another one starts a new segment.
        assert_eq!(rows, vec![0..4, 4..5, 6..7, 7..8]);
        assert_eq!(max_rank, 3);
        assert_eq!(segs[1].a_rows.len(), 3);
        assert!(LoraBatch::default().segments(0, Module::Q).0.is_empty());
    }
}
