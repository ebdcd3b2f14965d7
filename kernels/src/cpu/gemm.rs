//! Dense `y = x · Wᵀ` for the base model's linear layers, with `W` packed once at load time.
//!
//! Why not a general GEMM library: every call of a general GEMM re-packs its operands, and at
//! decode sizes (a few dozen rows of `x` against a whole weight matrix) packing the weights
//! costs as much memory traffic as the product itself. The weights never change, so they are
//! packed once into panels of [`NR`] output columns laid out `k`-major, exactly the order the
//! register-blocked micro-kernel reads them; `x` is read in place.
//!
//! Blocking (GotoBLAS order, sized for a 32 KiB L1 and ≥ 512 KiB L2 per core):
//! row blocks of [`MC`] rows × depth blocks of [`KC`] × the task's panels × row tiles of `MR`
//! rows. A panel's depth block (`KC × NR` floats, 16 KiB) stays in L1 while every row tile of
//! the row block streams past it; the row block of `x` (`MC × KC`, 120 KiB) stays in L2.
//! Threads split the panels (output columns), so every output element is computed by one
//! thread in one fixed order: results do not depend on the thread count or on which other rows
//! share the batch.
//!
//! Kernels: AVX2 + FMA (6 × 16 tile in twelve `ymm` accumulators) where the CPU has them, and a
//! portable loop elsewhere. Both sum over `k` in ascending order within a depth block and add
//! the blocks in order; FMA rounding differs from separate multiply and add, so the two paths
//! agree to rounding, not bit for bit.

use rayon::prelude::*;

use super::{PAR_MIN_WORK, check};
use crate::KernelError;

/// Output columns per packed panel (two AVX2 vectors).
pub(crate) const NR: usize = 16;
/// Depth of one block of `k`.
pub(crate) const KC: usize = 256;
/// Rows per row block (a multiple of every kernel's tile height).
const MC: usize = 120;
/// Rows per micro-kernel tile.
pub(crate) const MR: usize = 6;

/// A weight matrix `W` (`[out_dim, in_dim]`, row-major as Hugging Face stores it) repacked for
/// [`gemm_packed`]: `out_dim.div_ceil(NR)` panels, each `in_dim × NR` floats, `k`-major, with
/// the last panel's missing columns zero.
#[derive(Clone, PartialEq)]
pub struct PackedMatrix {
    data: Vec<f32>,
    out_dim: usize,
    in_dim: usize,
}

impl std::fmt::Debug for PackedMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PackedMatrix")
            .field("out_dim", &self.out_dim)
            .field("in_dim", &self.in_dim)
            .finish_non_exhaustive()
    }
}

impl PackedMatrix {
    /// Packs `w` (`[out_dim, in_dim]`, row-major).
    ///
    /// # Errors
    /// A zero dimension, or `w.len() != out_dim * in_dim`.
    pub fn pack(w: &[f32], out_dim: usize, in_dim: usize) -> Result<Self, KernelError> {
        const KERNEL: &str = "pack_matrix";
        check::nonzero(KERNEL, "out_dim", out_dim)?;
        check::nonzero(KERNEL, "in_dim", in_dim)?;
        check::len(
            KERNEL,
            "w",
            check::mul(KERNEL, "w", out_dim, in_dim)?,
            w.len(),
        )?;
        let panels = out_dim.div_ceil(NR);
        let panel_len = check::mul(KERNEL, "packed", in_dim, NR)?;
        let mut data = vec![0.0; check::mul(KERNEL, "packed", panels, panel_len)?];
        for (p, panel) in data.chunks_exact_mut(panel_len).enumerate() {
            for (j, row) in w[p * NR * in_dim..]
                .chunks_exact(in_dim)
                .take(NR)
                .enumerate()
            {
                for (k, &value) in row.iter().enumerate() {
                    panel[k * NR + j] = value;
                }
            }
        }
        Ok(PackedMatrix {
            data,
            out_dim,
            in_dim,
        })
    }

    pub fn out_dim(&self) -> usize {
        self.out_dim
    }

    pub fn in_dim(&self) -> usize {
        self.in_dim
    }
}

/// `y = x · Wᵀ`: `x` is `[T, in_dim]`, `y` is `[T, out_dim]` (overwritten), both row-major.
///
/// # Errors
/// `x` not a whole number of `in_dim` rows, or `y` not `T × out_dim`. `y` is untouched on error.
pub fn gemm_packed(x: &[f32], w: &PackedMatrix, y: &mut [f32]) -> Result<(), KernelError> {
    const KERNEL: &str = "gemm_packed";
    let rows = check::rows(KERNEL, "x", x.len(), w.in_dim)?;
    check::len(
        KERNEL,
        "y",
        check::mul(KERNEL, "y", rows, w.out_dim)?,
        y.len(),
    )?;
    if rows == 0 {
        return Ok(());
    }
    let isa = Isa::detect();
    let panels = w.out_dim.div_ceil(NR);
    let work = rows.saturating_mul(w.in_dim).saturating_mul(w.out_dim);
    let tasks = if work >= PAR_MIN_WORK {
        rayon::current_num_threads().clamp(1, panels)
    } else {
        1
    };
    let out = OutPtr(y.as_mut_ptr());
    let run = |task: usize| {
        let first = panels * task / tasks;
        let last = panels * (task + 1) / tasks;
        // SAFETY: `y` holds `rows × out_dim` floats (checked above) and outlives this call;
        // tasks own disjoint panel ranges, hence disjoint output columns, so no two threads
        // write the same element and nobody reads `y` until every task has joined.
        unsafe { gemm_panels(isa, x, rows, w, first..last, out) };
    };
    if tasks > 1 {
        (0..tasks).into_par_iter().for_each(run);
    } else {
        run(0);
    }
    Ok(())
}

/// The output pointer shared by the tasks of one call (each writes its own columns).
#[derive(Clone, Copy)]
pub(crate) struct OutPtr(pub(crate) *mut f32);
// SAFETY: see `gemm_packed`: tasks write disjoint elements and the call joins them all before
// the borrow of `y` ends.
unsafe impl Send for OutPtr {}
// SAFETY: as above.
unsafe impl Sync for OutPtr {}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Isa {
    #[cfg(target_arch = "x86_64")]
    Avx2Fma,
    Portable,
}

impl Isa {
    pub(crate) fn detect() -> Isa {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            return Isa::Avx2Fma;
        }
        Isa::Portable
    }
}

/// Computes the output columns of `panels` for every row.
///
/// # Safety
/// `out` points to `rows × w.out_dim` writable floats that nothing else reads or writes in the
/// columns of `panels` during the call; `x.len() == rows * w.in_dim`.
unsafe fn gemm_panels(
    isa: Isa,
    x: &[f32],
    rows: usize,
    w: &PackedMatrix,
    panels: std::ops::Range<usize>,
    out: OutPtr,
) {
    let (k_dim, n_dim) = (w.in_dim, w.out_dim);
    for r0 in (0..rows).step_by(MC) {
        let r_end = (r0 + MC).min(rows);
        for k0 in (0..k_dim).step_by(KC) {
            let kc = KC.min(k_dim - k0);
            for p in panels.clone() {
                let cols = NR.min(n_dim - p * NR);
                let b = Contiguous(&w.data[p * k_dim * NR + k0 * NR..][..kc * NR]);
                let mut r = r0;
                while r < r_end {
                    let m = MR.min(r_end - r);
                    let acc = micro(isa, m, &x[r * k_dim + k0..], k_dim, kc, b);
                    // SAFETY: rows r..r+m (< rows) and columns p*NR..p*NR+cols (<= out_dim,
                    // inside this task's panels) of `out`, which the caller lends this task.
                    unsafe {
                        store(
                            &acc,
                            m,
                            cols,
                            out.0.add(r * n_dim + p * NR),
                            n_dim,
                            |y, a| {
                                if k0 == 0 { *y = a } else { *y += a }
                            },
                        );
                    }
                    r += m;
                }
            }
        }
    }
}

/// Writes tile `acc` (rows `0..m`, columns `0..cols`) into `y` (row stride `ldy`) through
/// `op(y_element, acc_element)`.
///
/// # Safety
/// `y` is valid for writes of rows `0..m` (stride `ldy`) × columns `0..cols`, and no other
/// thread touches them during the call.
#[inline]
pub(crate) unsafe fn store(
    acc: &[[f32; NR]; MR],
    m: usize,
    cols: usize,
    y: *mut f32,
    ldy: usize,
    op: impl Fn(&mut f32, f32),
) {
    for (r, acc) in acc.iter().enumerate().take(m) {
        // SAFETY: row r < m and columns 0..cols, as the caller guarantees.
        let y = unsafe { std::slice::from_raw_parts_mut(y.add(r * ldy), cols) };
        for (y, &a) in y.iter_mut().zip(acc) {
            op(y, a);
        }
    }
}

/// Where the micro-kernel finds row `k` (of `NR` floats) of its right-hand block.
pub(crate) trait PanelRows: Copy {
    /// Whether rows `0..kc` all lie inside the backing slice.
    fn covers(&self, kc: usize) -> bool;
    /// The first of row `k`'s `NR` floats.
    ///
    /// # Safety
    /// `self.covers(k + 1)`.
    unsafe fn row(&self, k: usize) -> *const f32;
}

/// A packed panel block: row `k` at `k * NR`.
#[derive(Clone, Copy)]
pub(crate) struct Contiguous<'a>(pub(crate) &'a [f32]);

impl PanelRows for Contiguous<'_> {
    fn covers(&self, kc: usize) -> bool {
        kc.checked_mul(NR).is_some_and(|n| n <= self.0.len())
    }

    #[inline(always)]
    unsafe fn row(&self, k: usize) -> *const f32 {
        // SAFETY: `covers(k + 1)`: (k + 1) * NR <= len.
        unsafe { self.0.as_ptr().add(k * NR) }
    }
}

/// `acc[r][j] = Σ_{k < kc} x[r·ldx + k] · b.row(k)[j]` for `r < m` (≤ MR), in ascending `k`.
///
/// # Panics
/// If `x` holds fewer than `(m - 1)·ldx + kc` floats or `b` does not cover `kc` rows: the
/// callers check every shape first, so this guards memory safety, not input.
#[inline]
pub(crate) fn micro(
    isa: Isa,
    m: usize,
    x: &[f32],
    ldx: usize,
    kc: usize,
    b: impl PanelRows,
) -> [[f32; NR]; MR] {
    let mut acc = [[0.0f32; NR]; MR];
    assert!(
        (1..=MR).contains(&m) && x.len() >= (m - 1) * ldx + kc && b.covers(kc),
        "gemm micro-kernel called outside its operands"
    );
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Isa::Avx2Fma` is only chosen when the CPU reports AVX2 and FMA; the operand
        // bounds were asserted above.
        Isa::Avx2Fma => unsafe {
            match m {
                1 => avx2::tile::<1>(x, ldx, kc, b, &mut acc),
                2 => avx2::tile::<2>(x, ldx, kc, b, &mut acc),
                3 => avx2::tile::<3>(x, ldx, kc, b, &mut acc),
                4 => avx2::tile::<4>(x, ldx, kc, b, &mut acc),
                5 => avx2::tile::<5>(x, ldx, kc, b, &mut acc),
                _ => avx2::tile::<6>(x, ldx, kc, b, &mut acc),
            }
        },
        Isa::Portable => {
            for (r, acc) in acc.iter_mut().enumerate().take(m) {
                for (k, &xk) in x[r * ldx..r * ldx + kc].iter().enumerate() {
                    // SAFETY: k < kc and `b.covers(kc)` (asserted above).
                    let row = unsafe { std::slice::from_raw_parts(b.row(k), NR) };
                    for (acc, &b) in acc.iter_mut().zip(row) {
                        *acc += xk * b;
                    }
                }
            }
        }
    }
    acc
}

/// `y[r·ldy + j] += alpha · acc[r][j]` for `r < m`, `j < NR`, where `acc` is
/// [`micro`]`(isa, m, x, ldx, kc, b)`: one fused multiply-add per element, the rounding of
/// [`axpy`], so a tile's update equals the decode path's row-by-row one bit for bit.
///
/// # Panics
/// As [`micro`], and if `y` holds fewer than `(m - 1)·ldy + NR` floats.
#[inline]
#[allow(clippy::too_many_arguments)] // the micro-kernel's operands plus its epilogue's
pub(crate) fn micro_axpy(
    isa: Isa,
    m: usize,
    x: &[f32],
    ldx: usize,
    kc: usize,
    b: impl PanelRows,
    alpha: f32,
    y: &mut [f32],
    ldy: usize,
) {
    assert!(
        (1..=MR).contains(&m)
            && x.len() >= (m - 1) * ldx + kc
            && b.covers(kc)
            && y.len() >= (m - 1) * ldy + NR,
        "gemm micro-kernel called outside its operands"
    );
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Isa::Avx2Fma` is only chosen when the CPU reports AVX2 and FMA; the operand
        // bounds were asserted above.
        Isa::Avx2Fma => unsafe {
            match m {
                1 => avx2::tile_axpy::<1>(x, ldx, kc, b, alpha, y, ldy),
                2 => avx2::tile_axpy::<2>(x, ldx, kc, b, alpha, y, ldy),
                3 => avx2::tile_axpy::<3>(x, ldx, kc, b, alpha, y, ldy),
                4 => avx2::tile_axpy::<4>(x, ldx, kc, b, alpha, y, ldy),
                5 => avx2::tile_axpy::<5>(x, ldx, kc, b, alpha, y, ldy),
                _ => avx2::tile_axpy::<6>(x, ldx, kc, b, alpha, y, ldy),
            }
        },
        Isa::Portable => {
            let acc = micro(isa, m, x, ldx, kc, b);
            for (r, acc) in acc.iter().enumerate().take(m) {
                axpy(isa, &mut y[r * ldy..r * ldy + NR], alpha, acc);
            }
        }
    }
}

/// Rows of `x` per [`dots`] tile.
pub(crate) const DOT_ROWS: usize = 3;
/// Rows of A per [`dots`] tile.
pub(crate) const DOT_COLS: usize = 2;

/// `out[r][j] = x[r] · a[j]` for the `m` (≤ [`DOT_ROWS`]) rows of `x` (row `r` at `r · ldx`)
/// and the `a.len()` (≤ [`DOT_COLS`]) rows `a`, each `n` long — the LoRA shrink's tile: A's
/// rows are read in place (no packing), each once per tile, and every row of `x` once per
/// tile.
///
/// Every dot is computed the same way whatever the tile's shape: sixteen lanes (two `ymm`
/// accumulators) over the 16-float body, reduced pairwise (16 → 8 → 4 → 2 → 1), then the tail
/// added — the order [`simd::dot`](super::simd) uses. A row's result therefore does not depend
/// on which rows or A rows share its tile, so prefill and decode shrink give the same bits.
///
/// # Panics
/// If `a` is empty or has more than [`DOT_COLS`] rows, the rows differ in length from `n`, `n`
/// is 0 or above `ldx`, `m` is not in `1..=DOT_ROWS`, or `x` is shorter than its rows.
pub(crate) fn dots(
    isa: Isa,
    x: &[f32],
    ldx: usize,
    m: usize,
    a: &[&[f32]],
) -> [[f32; DOT_COLS]; DOT_ROWS] {
    let n = a.first().map_or(0, |a| a.len());
    assert!(
        n > 0
            && n <= ldx
            && a.len() <= DOT_COLS
            && a.iter().all(|a| a.len() == n)
            && (1..=DOT_ROWS).contains(&m)
            && x.len() >= (m - 1) * ldx + n,
        "dots called with a partial tile"
    );
    let mut out = [[0.0f32; DOT_COLS]; DOT_ROWS];
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Isa::Avx2Fma` is only chosen when the CPU reports AVX2 and FMA; `x` holds
        // `m` rows of `n` and every row of `a` holds `n` (asserted above).
        Isa::Avx2Fma => unsafe {
            match (m, a.len()) {
                (0, _) => {}
                (1, 1) => avx2::dots::<1, 1>(x, ldx, n, a, &mut out),
                (2, 1) => avx2::dots::<2, 1>(x, ldx, n, a, &mut out),
                (3, 1) => avx2::dots::<3, 1>(x, ldx, n, a, &mut out),
                (1, _) => avx2::dots::<1, 2>(x, ldx, n, a, &mut out),
                (2, _) => avx2::dots::<2, 2>(x, ldx, n, a, &mut out),
                _ => avx2::dots::<3, 2>(x, ldx, n, a, &mut out),
            }
        },
        Isa::Portable => {
            for (r, out) in out.iter_mut().enumerate().take(m) {
                let row = &x[r * ldx..r * ldx + n];
                for (out, a) in out.iter_mut().zip(a) {
                    *out = super::simd::dot(row, a);
                }
            }
        }
    }
    out
}

/// `y[i] += alpha · x[i]` over the common length, with FMA where the CPU has it (the LoRA
/// expand's decode path, which streams adapter rows through it).
#[inline]
pub(crate) fn axpy(isa: Isa, y: &mut [f32], alpha: f32, x: &[f32]) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Isa::Avx2Fma` is only chosen when the CPU reports AVX2 and FMA.
        Isa::Avx2Fma => unsafe { avx2::axpy(y, alpha, x) },
        Isa::Portable => super::simd::axpy(y, alpha, x),
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    //! The AVX2 + FMA micro-kernel: `M` rows × 16 columns in `2·M` `ymm` accumulators; per `k`,
    //! two loads of the panel row and `M` broadcasts of `x` feed `2·M` FMAs.

    use std::arch::x86_64::{
        __m256, _mm_add_ps, _mm_add_ss, _mm_cvtss_f32, _mm_movehl_ps, _mm_shuffle_ps,
        _mm256_add_ps, _mm256_broadcast_ss, _mm256_castps256_ps128, _mm256_extractf128_ps,
        _mm256_fmadd_ps, _mm256_loadu_ps, _mm256_set1_ps, _mm256_setzero_ps, _mm256_storeu_ps,
    };

    use super::{DOT_COLS, DOT_ROWS, MR, NR, PanelRows};

    /// `y[i] += alpha · x[i]`, eight lanes at a time.
    ///
    /// # Safety
    /// The CPU supports AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn axpy(y: &mut [f32], alpha: f32, x: &[f32]) {
        let n = y.len().min(x.len());
        let (y, x) = (&mut y[..n], &x[..n]);
        let a = _mm256_set1_ps(alpha);
        let (y_body, y_tail) = y.as_chunks_mut::<8>();
        let (x_body, x_tail) = x.as_chunks::<8>();
        for (y, x) in y_body.iter_mut().zip(x_body) {
            // SAFETY: both are 8 floats.
            unsafe {
                let r =
                    _mm256_fmadd_ps(a, _mm256_loadu_ps(x.as_ptr()), _mm256_loadu_ps(y.as_ptr()));
                _mm256_storeu_ps(y.as_mut_ptr(), r);
            }
        }
        for (y, x) in y_tail.iter_mut().zip(x_tail) {
            *y = alpha.mul_add(*x, *y);
        }
    }

    /// `out[r][j] = x[r·n..] · a[j]` for `r < M`, `j < J`: sixteen lanes per dot in two `ymm`
    /// accumulators, reduced pairwise (16 → 8 → 4 → 2 → 1), then the tail added. Per 16
    /// floats of depth: `J` pairs of A loads and `M` pairs of `x` loads feed `2·M·J` FMAs.
    ///
    /// # Safety
    /// The CPU supports AVX2 and FMA; `x` holds `(M - 1) · ldx + n` floats and `a` at least
    /// `J` rows of `n` floats.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dots<const M: usize, const J: usize>(
        x: &[f32],
        ldx: usize,
        n: usize,
        a: &[&[f32]],
        out: &mut [[f32; DOT_COLS]; DOT_ROWS],
    ) {
        let body = n / 16 * 16;
        let mut acc = [[[_mm256_setzero_ps(); 2]; J]; M];
        let xp = x.as_ptr();
        let mut ap = [std::ptr::null::<f32>(); J];
        for (p, a) in ap.iter_mut().zip(a) {
            *p = a.as_ptr();
        }
        for i in (0..body).step_by(16) {
            for half in 0..2 {
                let at = i + 8 * half;
                // SAFETY: at + 8 <= body <= n: inside every row of `a`, and row r's elements
                // r·ldx + at .. r·ldx + at + 8 lie inside `x` for r < M (the caller's
                // contract: x holds (M - 1)·ldx + n floats).
                unsafe {
                    let mut av = [_mm256_setzero_ps(); J];
                    for (av, ap) in av.iter_mut().zip(&ap) {
                        *av = _mm256_loadu_ps(ap.add(at));
                    }
                    for (r, acc) in acc.iter_mut().enumerate() {
                        let xv = _mm256_loadu_ps(xp.add(r * ldx + at));
                        for (acc, av) in acc.iter_mut().zip(&av) {
                            acc[half] = _mm256_fmadd_ps(xv, *av, acc[half]);
                        }
                    }
                }
            }
        }
        for (r, (acc, out)) in acc.iter().zip(out.iter_mut()).enumerate() {
            let row = &x[r * ldx..r * ldx + n];
            for ((acc, out), a) in acc.iter().zip(out.iter_mut()).zip(a) {
                let tail: f32 = row[body..].iter().zip(&a[body..]).map(|(x, y)| x * y).sum();
                *out = reduce(acc) + tail;
            }
        }
    }

    /// The sixteen lanes of `acc` summed pairwise: lanes `i` and `i + 8`, then `i + 4`, `i + 2`
    /// and `i + 1` — element for element the order of `simd`'s scalar reduction.
    #[target_feature(enable = "avx2,fma")]
    fn reduce(acc: &[__m256; 2]) -> f32 {
        let v = _mm256_add_ps(acc[0], acc[1]);
        let w = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let u = _mm_add_ps(w, _mm_movehl_ps(w, w));
        _mm_cvtss_f32(_mm_add_ss(u, _mm_shuffle_ps::<1>(u, u)))
    }

    /// [`tile`], then `y[r·ldy ..][..NR] += alpha · acc[r]` with one FMA per element.
    ///
    /// # Safety
    /// As [`tile`], and `y` holds `(M - 1)·ldy + NR` floats.
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)] // tile's operands plus the epilogue's
    pub(super) unsafe fn tile_axpy<const M: usize>(
        x: &[f32],
        ldx: usize,
        kc: usize,
        b: impl PanelRows,
        alpha: f32,
        y: &mut [f32],
        ldy: usize,
    ) {
        let mut acc = [[0.0f32; NR]; MR];
        // SAFETY: the caller's contract is tile's.
        unsafe { tile::<M>(x, ldx, kc, b, &mut acc) };
        let a = _mm256_set1_ps(alpha);
        let y = y.as_mut_ptr();
        for (r, acc) in acc.iter().enumerate().take(M) {
            for half in 0..2 {
                // SAFETY: r < M, so r·ldy + 8·half + 8 <= (M - 1)·ldy + NR, inside `y`; `acc`
                // rows hold NR floats.
                unsafe {
                    let yp = y.add(r * ldy + 8 * half);
                    let v = _mm256_loadu_ps(acc.as_ptr().add(8 * half));
                    _mm256_storeu_ps(yp, _mm256_fmadd_ps(a, v, _mm256_loadu_ps(yp)));
                }
            }
        }
    }

    /// # Safety
    /// The CPU supports AVX2 and FMA; `x` holds `(M - 1)·ldx + kc` floats and `b` covers `kc`
    /// rows.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn tile<const M: usize>(
        x: &[f32],
        ldx: usize,
        kc: usize,
        b: impl PanelRows,
        out: &mut [[f32; NR]; MR],
    ) {
        let mut acc = [[_mm256_setzero_ps(); 2]; M];
        let x = x.as_ptr();
        for k in 0..kc {
            // SAFETY: k < kc, so row k is inside `b` and `x[r·ldx + k]` inside `x` for r < M
            // (the caller's contract).
            unsafe {
                let row = b.row(k);
                let b0 = _mm256_loadu_ps(row);
                let b1 = _mm256_loadu_ps(row.add(8));
                for (r, acc) in acc.iter_mut().enumerate() {
                    let a = _mm256_broadcast_ss(&*x.add(r * ldx + k));
                    acc[0] = _mm256_fmadd_ps(a, b0, acc[0]);
                    acc[1] = _mm256_fmadd_ps(a, b1, acc[1]);
                }
            }
        }
        for (acc, out) in acc.iter().zip(out.iter_mut()) {
            let (lo, hi) = out.split_at_mut(8);
            // SAFETY: `lo` and `hi` hold 8 floats each.
            unsafe {
                _mm256_storeu_ps(lo.as_mut_ptr(), acc[0]);
                _mm256_storeu_ps(hi.as_mut_ptr(), acc[1]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(x: &[f32], w: &[f32], rows: usize, n: usize, k: usize) -> Vec<f32> {
        let mut y = vec![0.0; rows * n];
        for r in 0..rows {
            for j in 0..n {
                let s: f64 = (0..k)
                    .map(|i| f64::from(x[r * k + i]) * f64::from(w[j * k + i]))
                    .sum();
                y[r * n + j] = s as f32;
            }
        }
        y
    }

    fn data(n: usize, seed: f32) -> Vec<f32> {
        (0..n).map(|i| (i as f32 * 0.731 + seed).sin()).collect()
    }

    #[test]
    fn matches_naive_on_ragged_shapes() {
        // Rows, outputs and depths that are and are not multiples of MR, NR, KC and MC.
        for &(rows, n, k) in &[
            (1, 1, 1),
            (1, 16, 256),
            (5, 17, 3),
            (6, 33, 257),
            (7, 48, 513),
            (121, 40, 300),
            (64, 96, 64),
            (250, 31, 19),
        ] {
            let x = data(rows * k, 0.3);
            let w = data(n * k, 1.7);
            let packed = PackedMatrix::pack(&w, n, k).expect("pack");
            let mut y = vec![f32::NAN; rows * n];
            gemm_packed(&x, &packed, &mut y).expect("gemm");
            let want = naive(&x, &w, rows, n, k);
            for (i, (got, want)) in y.iter().zip(&want).enumerate() {
                assert!(
                    (got - want).abs() <= 1e-4 * (1.0 + want.abs()),
                    "rows={rows} n={n} k={k} at {i}: {got} vs {want}"
                );
            }
        }
    }

    #[test]
    fn a_row_does_not_depend_on_its_batch() {
        // The same row alone and inside a large (multi-threaded) batch gives the same bits.
        let (n, k) = (200, 700);
        let w = data(n * k, 0.9);
        let packed = PackedMatrix::pack(&w, n, k).expect("pack");
        let x = data(70 * k, 2.2);
        let mut all = vec![0.0; 70 * n];
        gemm_packed(&x, &packed, &mut all).expect("batch");
        for r in [0, 13, 69] {
            let mut one = vec![0.0; n];
            gemm_packed(&x[r * k..(r + 1) * k], &packed, &mut one).expect("row");
            assert_eq!(one, all[r * n..(r + 1) * n], "row {r}");
        }
    }

    #[test]
    fn portable_and_simd_agree_to_rounding() {
        let (rows, n, k) = (9, 35, 300);
        let x = data(rows * k, 0.1);
        let w = data(n * k, 0.2);
        let packed = PackedMatrix::pack(&w, n, k).expect("pack");
        let mut fast = vec![0.0; rows * n];
        gemm_packed(&x, &packed, &mut fast).expect("gemm");
        let mut slow = vec![0.0; rows * n];
        let out = OutPtr(slow.as_mut_ptr());
        // SAFETY: one task owns every panel of a `rows × n` buffer.
        unsafe { gemm_panels(Isa::Portable, &x, rows, &packed, 0..n.div_ceil(NR), out) };
        for (a, b) in fast.iter().zip(&slow) {
            assert!((a - b).abs() <= 1e-4 * (1.0 + b.abs()), "{a} vs {b}");
        }
    }

    #[test]
    fn bad_shapes_are_errors_and_leave_y_untouched() {
        let packed = PackedMatrix::pack(&[1.0; 6], 2, 3).expect("pack");
        let mut y = vec![7.0; 4];
        assert!(gemm_packed(&[1.0; 5], &packed, &mut y).is_err());
        assert!(gemm_packed(&[1.0; 3], &packed, &mut y).is_err());
        assert_eq!(y, vec![7.0; 4]);
        assert!(PackedMatrix::pack(&[1.0; 5], 2, 3).is_err());
        assert!(PackedMatrix::pack(&[], 0, 3).is_err());
        let mut empty: Vec<f32> = Vec::new();
        gemm_packed(&[], &packed, &mut empty).expect("zero rows");
    }
}
