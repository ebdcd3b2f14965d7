//! Up-front shape checks shared by the CPU kernels, so that every kernel reports the same
//! [`KernelError`] for the same mistake.

use crate::KernelError;

/// `a * b`, or [`KernelError::SizeOverflow`].
pub(crate) fn mul(
    kernel: &'static str,
    what: &'static str,
    a: usize,
    b: usize,
) -> Result<usize, KernelError> {
    a.checked_mul(b)
        .ok_or(KernelError::SizeOverflow { kernel, what })
}

/// `a + b`, or [`KernelError::SizeOverflow`].
pub(crate) fn add(
    kernel: &'static str,
    what: &'static str,
    a: usize,
    b: usize,
) -> Result<usize, KernelError> {
    a.checked_add(b)
        .ok_or(KernelError::SizeOverflow { kernel, what })
}

/// `actual == expected`, or [`KernelError::ShapeMismatch`].
pub(crate) fn len(
    kernel: &'static str,
    what: &'static str,
    expected: usize,
    actual: usize,
) -> Result<(), KernelError> {
    if expected == actual {
        Ok(())
    } else {
        Err(KernelError::ShapeMismatch {
            kernel,
            what,
            expected,
            actual,
        })
    }
}

/// A size that must be at least 1.
pub(crate) fn nonzero(
    kernel: &'static str,
    what: &'static str,
    value: usize,
) -> Result<(), KernelError> {
    if value == 0 {
        Err(KernelError::invalid(kernel, what, "must be at least 1"))
    } else {
        Ok(())
    }
}

/// The number of rows of width `width` in a buffer of `len` elements (`width` must be non-zero).
pub(crate) fn rows(
    kernel: &'static str,
    what: &'static str,
    len: usize,
    width: usize,
) -> Result<usize, KernelError> {
    if width == 0 {
        return Err(KernelError::invalid(
            kernel,
            what,
            "row width must be at least 1",
        ));
    }
    if !len.is_multiple_of(width) {
        return Err(KernelError::RaggedRows {
            kernel,
            what,
            len,
            width,
        });
    }
    Ok(len / width)
}

/// `[offset, offset + len)` lies inside a pool of `pool_len` elements.
pub(crate) fn pool_range(
    kernel: &'static str,
    offset: usize,
    len: usize,
    pool_len: usize,
) -> Result<usize, KernelError> {
    match offset.checked_add(len) {
        Some(end) if end <= pool_len => Ok(end),
        _ => Err(KernelError::PoolOffsetOutOfRange {
            kernel,
            offset,
            len,
            pool_len,
        }),
    }
}

/// Maps every batch row to the index of the one range that covers it (`NO_OWNER` if none),
/// rejecting ranges outside `0..rows`, reversed ranges and overlaps.
pub(crate) fn row_owners(
    kernel: &'static str,
    rows: usize,
    ranges: impl Iterator<Item = (usize, usize)>,
) -> Result<Vec<usize>, KernelError> {
    let mut owners = vec![NO_OWNER; rows];
    for (owner, (start, end)) in ranges.enumerate() {
        if start > end || end > rows {
            return Err(KernelError::RowsOutOfRange {
                kernel,
                start,
                end,
                rows,
            });
        }
        for (row, slot) in owners[start..end].iter_mut().enumerate() {
            if *slot != NO_OWNER {
                return Err(KernelError::RowsOverlap {
                    kernel,
                    row: start + row,
                });
            }
            *slot = owner;
        }
    }
    Ok(owners)
}

/// The owner of rows that no sequence or segment covers.
pub(crate) const NO_OWNER: usize = usize::MAX;
