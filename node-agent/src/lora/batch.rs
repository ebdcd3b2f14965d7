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

/// One run of token rows (a sequence's chunk) and one adapter it applies, at `scale` (the
/// request's factor, on top of the adapter's own `lora_alpha / r`). A request that composes
/// `n` adapters has `n` runs over the same rows, its `i`-th adapter in pass `i`.
#[derive(Debug, Clone)]
pub struct LoraRun<'a> {
    pub rows: Range<usize>,
    pub adapter: &'a AdapterRows,
    pub scale: f32,
    pub pass: usize,
}

/// The adapters of one step. Rows of base-model sequences appear in no run.
///
/// The kernels take segments that never overlap, so adapters composed over the same rows go
/// in successive passes, each adding its update into the same output: pass 0 holds every
/// adapted row's first adapter (plain and composed requests share its segments), pass `i` the
/// `i`-th adapter of the requests that compose more than `i`. A batch without composition
/// runs one pass, exactly as before.
#[derive(Debug, Default)]
pub struct LoraBatch<'a> {
    pub runs: Vec<LoraRun<'a>>,
}

impl<'a> LoraBatch<'a> {
    /// How many passes the kernels run per module.
    pub fn passes(&self) -> usize {
        self.runs.iter().map(|r| r.pass + 1).max().unwrap_or(0)
    }

    /// Kernel segments of `pass` for one (layer, module), and the largest rank among them.
    /// Consecutive runs of one adapter at one scale become one segment, so the kernels read
    /// that adapter's factors once for all its rows (the engine orders a step's sequences by
    /// adapters for this).
    pub fn segments(
        &self,
        layer: usize,
        module: Module,
        pass: usize,
    ) -> (Vec<LoraSegment<'a>>, usize) {
        let mut max_rank = 0;
        let mut segments: Vec<LoraSegment<'a>> = Vec::with_capacity(self.runs.len());
        let mut last: Option<(&'a AdapterRows, f32)> = None;
        for run in self.runs.iter().filter(|r| r.pass == pass) {
            let Some(m) = run.adapter.module(layer, module) else {
                last = None;
                continue;
            };
            max_rank = max_rank.max(m.rank);
            if let Some(prev) = segments.last_mut()
                && last.is_some_and(|(l, s)| std::ptr::eq(l, run.adapter) && s == run.scale)
                && prev.rows.end == run.rows.start
            {
                prev.rows.end = run.rows.end;
                continue;
            }
            segments.push(LoraSegment {
                rows: run.rows.clone(),
                a_rows: &m.a,
                b_rows: &m.b,
                scale: m.scale * run.scale,
            });
            last = Some((run.adapter, run.scale));
        }
        (segments, max_rank)
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
        let run = |rows: Range<usize>, adapter, pass| LoraRun {
            rows,
            adapter,
            scale: 1.0,
            pass,
        };
        let batch = LoraBatch {
            runs: vec![
                run(0..1, &a, 0),
                run(1..4, &a, 0),
                run(4..5, &b, 0),
                run(6..7, &b, 0),
                run(7..8, &a, 0),
            ],
        };
        assert_eq!(batch.passes(), 1);
        let (segs, max_rank) = batch.segments(0, Module::Q, 0);
        let rows: Vec<_> = segs.iter().map(|s| s.rows.clone()).collect();
        // 4..5 and 6..7 are not adjacent (row 5 is a base-model row), and the same adapter
        // again after another one starts a new segment.
        assert_eq!(rows, vec![0..4, 4..5, 6..7, 7..8]);
        assert_eq!(max_rank, 3);
        assert_eq!(segs[1].a_rows.len(), 3);
        assert!(LoraBatch::default().segments(0, Module::Q, 0).0.is_empty());
        assert_eq!(LoraBatch::default().passes(), 0);
    }

    #[test]
    fn composed_adapters_go_in_later_passes_and_scales_split_segments() {
        let (a, b) = (adapter(2), adapter(3));
        let run = |rows: Range<usize>, adapter, scale, pass| LoraRun {
            rows,
            adapter,
            scale,
            pass,
        };
        // Rows 0..2 use a alone; rows 2..4 compose a at 0.5 with b at 2; rows 4..6 use a.
        let batch = LoraBatch {
            runs: vec![
                run(0..2, &a, 1.0, 0),
                run(2..4, &a, 0.5, 0),
                run(2..4, &b, 2.0, 1),
                run(4..6, &a, 1.0, 0),
            ],
        };
        assert_eq!(batch.passes(), 2);
        let (first, rank) = batch.segments(0, Module::Q, 0);
        let rows: Vec<_> = first.iter().map(|s| (s.rows.clone(), s.scale)).collect();
        // The adapter's own scale (0.5 here) times the request's.
        assert_eq!(rows, vec![(0..2, 0.5), (2..4, 0.25), (4..6, 0.5)]);
        assert_eq!(rank, 2);
        let (second, rank) = batch.segments(0, Module::Q, 1);
        let rows: Vec<_> = second.iter().map(|s| (s.rows.clone(), s.scale)).collect();
        assert_eq!(rows, vec![(2..4, 1.0)]);
        assert_eq!(rank, 3);
    }
}
