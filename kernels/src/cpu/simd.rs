//! Vectorisable inner loops: fixed-width lane arrays with one accumulator per lane, which LLVM
//! turns into packed SIMD on any target without `unsafe` or intrinsics.
//!
//! Sixteen lanes keep several independent vector accumulators in flight (4 SSE or 2 AVX
//! registers), hiding the latency of the add chain. Lane sums are reduced pairwise at the end;
//! that summation order is part of the reference's numerics (tests use tolerances, not bits).

const LANES: usize = 16;

/// `Σ a[i] * b[i]` over the common length of `a` and `b` (callers pass equal lengths).
#[inline]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a_chunks, a_tail) = a[..n].as_chunks::<LANES>();
    let (b_chunks, b_tail) = b[..n].as_chunks::<LANES>();
    let mut acc = [0.0f32; LANES];
    for (x, y) in a_chunks.iter().zip(b_chunks) {
        for ((acc, x), y) in acc.iter_mut().zip(x).zip(y) {
            *acc += x * y;
        }
    }
    let tail: f32 = a_tail.iter().zip(b_tail).map(|(x, y)| x * y).sum();
    reduce(acc) + tail
}

/// `Σ a[i]²`.
#[inline]
pub(crate) fn sum_squares(a: &[f32]) -> f32 {
    dot(a, a)
}

/// `y[i] += alpha * x[i]` over the common length.
#[inline]
pub(crate) fn axpy(y: &mut [f32], alpha: f32, x: &[f32]) {
    for (y, x) in y.iter_mut().zip(x) {
        *y += alpha * x;
    }
}

/// `y[i] *= alpha`.
#[inline]
pub(crate) fn scale(y: &mut [f32], alpha: f32) {
    for y in y {
        *y *= alpha;
    }
}

#[inline]
fn reduce(mut acc: [f32; LANES]) -> f32 {
    let mut width = LANES;
    while width > 1 {
        width /= 2;
        let (lo, hi) = acc.split_at_mut(width);
        for (lo, hi) in lo.iter_mut().zip(hi.iter()) {
            *lo += *hi;
        }
    }
    acc[0]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_matches_naive_sum_for_every_tail_length() {
        for n in 0..70 {
            let a: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
            let b: Vec<f32> = (0..n).map(|i| (i as f32 * 1.3 + 0.2).cos()).collect();
            let naive: f64 = a
                .iter()
                .zip(&b)
                .map(|(x, y)| f64::from(*x) * f64::from(*y))
                .sum();
            let got = dot(&a, &b);
            assert!(
                (f64::from(got) - naive).abs() <= 1e-5 * (1.0 + naive.abs()),
                "n={n}: {got} vs {naive}"
            );
        }
    }

    #[test]
    fn axpy_and_scale() {
        let mut y = vec![1.0, 2.0, 3.0];
        axpy(&mut y, 2.0, &[1.0, -1.0, 0.5]);
        assert_eq!(y, vec![3.0, 0.0, 4.0]);
        scale(&mut y, 0.5);
        assert_eq!(y, vec![1.5, 0.0, 2.0]);
        assert_eq!(sum_squares(&[3.0, 4.0]), 25.0);
    }
}
