//! Packing an adapter's factor rows into pool pages: the plan (pure, from the host weights
//! and the page size) and the allocation that turns it into absolute pool offsets.

use crate::lora::Module;
use crate::lora::batch::{AdapterRows, ModuleRows};
use crate::lora::host::HostAdapter;
use crate::memory::pool::{PageAllocator, PageKind, Pages};

/// One module's rows in a [`Placement`], as (page index within the allocation, element offset).
#[derive(Debug)]
struct PlannedModule {
    layer: usize,
    module: Module,
    rank: usize,
    scale: f32,
    a: Vec<(usize, usize)>,
    b: Vec<(usize, usize)>,
}

/// Where each row of an adapter goes: rows never straddle a page boundary.
#[derive(Debug)]
pub struct Placement {
    pub pages: usize,
    modules: Vec<PlannedModule>,
}

/// Plans how `adapter` packs into pages of `page_elems` elements.
///
/// Errors: a row longer than a page (the pool's page size is configured too small).
pub fn plan_placement(adapter: &HostAdapter, page_elems: usize) -> Result<Placement, String> {
    let (mut page, mut used) = (0usize, 0usize);
    let mut place = |len: usize| -> Result<(usize, usize), String> {
        if len > page_elems {
            return Err(format!(
                "an adapter row of {len} elements exceeds the page of {page_elems}"
            ));
        }
        if used + len > page_elems {
            page += 1;
            used = 0;
        }
        let at = (page, used);
        used += len;
        Ok(at)
    };
    let mut modules = Vec::new();
    for (layer, module, w) in adapter.modules() {
        let (in_dim, out_dim) = (w.a.len() / w.rank, w.bt.len() / w.rank);
        let a = (0..w.rank)
            .map(|_| place(in_dim))
            .collect::<Result<Vec<_>, _>>()?;
        let b = (0..w.rank)
            .map(|_| place(out_dim))
            .collect::<Result<Vec<_>, _>>()?;
        modules.push(PlannedModule {
            layer,
            module,
            rank: w.rank,
            scale: w.scale,
            a,
            b,
        });
    }
    let pages = if modules.is_empty() { 0 } else { page + 1 };
    Ok(Placement { pages, modules })
}

impl Placement {
    /// Allocates the pages and returns them with the absolute pool offset of every row; the
    /// caller copies row `r` of each module's A and Bᵀ to `rows.a[r]` / `rows.b[r]`.
    pub fn allocate(
        &self,
        pool: &PageAllocator,
        page_elems: usize,
        num_layers: usize,
    ) -> Option<(Pages, AdapterRows)> {
        let pages = pool.allocate(self.pages, PageKind::Adapter)?;
        let abs = |&(p, off): &(usize, usize)| pages.ids()[p] as usize * page_elems + off;
        let mut rows = AdapterRows {
            layers: vec![Default::default(); num_layers],
        };
        for m in &self.modules {
            rows.layers[m.layer][m.module.index()] = Some(ModuleRows {
                rank: m.rank,
                scale: m.scale,
                a: m.a.iter().map(abs).collect(),
                b: m.b.iter().map(abs).collect(),
            });
        }
        Some((pages, rows))
    }
}
