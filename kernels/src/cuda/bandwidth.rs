//! Device-to-device copy bandwidth: the memory ceiling a bandwidth-bound step (a decode step
//! reads every weight, its KV and its adapters once) is measured against, taken on the same
//! device in the same run rather than from a datasheet.
//!
//! Counted as bytes read plus bytes written, as CUDA's `bandwidthTest` and the roofline suite's
//! CPU copy count it: both directions use the same memory bus, so a pure read stream can reach
//! about this figure and no more. Each round queues several copies between two buffers on the
//! device's one stream and times them with the host clock around a synchronisation; the copies
//! are long (a GiB moves in well under a millisecond only at > 2 TB/s) so the launch and
//! synchronisation overhead is a small share of a round.

use std::time::Instant;

use super::device::{CudaDevice, cuda_err};
use crate::KernelError;

/// Copies queued per timed round.
const COPIES_PER_ROUND: usize = 8;

/// The source pattern's period: prime, so no power-of-two offset error lines up with it.
const PERIOD: usize = 251;

/// Bytes checked after the timing to show the copies really moved the data.
const CHECKED_BYTES: usize = 1 << 16;

/// What [`copy_bandwidth`] measured.
#[derive(Debug, Clone, PartialEq)]
pub struct CopyBandwidth {
    /// Size of each of the two buffers copied between.
    pub buffer_bytes: usize,
    /// Bytes per second (read plus written) of each timed round, in the order measured.
    pub rates: Vec<f64>,
}

impl CopyBandwidth {
    /// The fastest round: the ceiling.
    pub fn best(&self) -> f64 {
        self.rates.iter().copied().fold(0.0, f64::max)
    }

    /// The median round.
    pub fn median(&self) -> f64 {
        let mut r = self.rates.clone();
        r.sort_by(f64::total_cmp);
        match r.len() {
            0 => 0.0,
            n if n % 2 == 1 => r[n / 2],
            n => (r[n / 2 - 1] + r[n / 2]) / 2.0,
        }
    }
}

/// Checks the arguments of [`copy_bandwidth`] before any device work.
fn check(bytes: usize, rounds: usize) -> Result<(), KernelError> {
    if bytes < CHECKED_BYTES {
        return Err(KernelError::invalid(
            "copy_bandwidth",
            "bytes",
            format!("{bytes} bytes: at least {CHECKED_BYTES} are needed for a meaningful copy"),
        ));
    }
    if rounds == 0 {
        return Err(KernelError::invalid(
            "copy_bandwidth",
            "rounds",
            "at least one timed round is needed",
        ));
    }
    Ok(())
}

/// Measures the device-to-device copy bandwidth with two buffers of `bytes` each: one
/// untimed warm-up copy, then `rounds` timed rounds of several copies each. Afterwards a
/// sample of the destination is read back and compared with the source pattern.
///
/// # Errors
/// [`KernelError::InvalidArgument`] for fewer than 64 KiB or zero rounds (nothing is
/// allocated); [`KernelError::Cuda`] when the buffers cannot be allocated (out of memory) or a
/// copy fails, or when the copied sample differs from the source.
pub fn copy_bandwidth(
    dev: &CudaDevice,
    bytes: usize,
    rounds: usize,
) -> Result<CopyBandwidth, KernelError> {
    check(bytes, rounds)?;
    // Not zeros: a pattern that a copy which moved nothing (or the wrong range) cannot match.
    let period: Vec<u8> = (0..PERIOD).map(|i| i as u8).collect();
    let mut pattern = Vec::with_capacity(bytes);
    while pattern.len() < bytes {
        let n = (bytes - pattern.len()).min(PERIOD);
        pattern.extend_from_slice(&period[..n]);
    }
    let src = dev.upload(&pattern)?;
    drop(pattern);
    let mut dst = dev.zeros::<u8>(bytes)?;
    let copy = |dst: &mut super::DeviceBuffer<u8>| {
        dev.stream()
            .memcpy_dtod(&src.slice, &mut dst.slice)
            .map_err(cuda_err("copy_bandwidth"))
    };
    copy(&mut dst)?;
    dev.synchronize()?;
    let mut rates = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let t = Instant::now();
        for _ in 0..COPIES_PER_ROUND {
            copy(&mut dst)?;
        }
        dev.synchronize()?;
        let seconds = t.elapsed().as_secs_f64().max(1e-9);
        rates.push((2 * bytes * COPIES_PER_ROUND) as f64 / seconds);
    }
    // The end of the buffer: a copy of only a prefix would be caught too.
    let offset = bytes - CHECKED_BYTES;
    let got = dev.download_range(&dst, offset, CHECKED_BYTES)?;
    if let Some(i) = (0..CHECKED_BYTES).find(|&i| got[i] != ((offset + i) % PERIOD) as u8) {
        return Err(KernelError::Cuda {
            kernel: "copy_bandwidth",
            message: format!(
                "byte {} of the destination is {}, the source has {}",
                offset + i,
                got[i],
                (offset + i) % PERIOD
            ),
        });
    }
    Ok(CopyBandwidth {
        buffer_bytes: bytes,
        rates,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_are_checked_before_any_device_work() {
        assert_eq!(
            check(1024, 3).unwrap_err().kind(),
            "invalid_argument",
            "too small to time"
        );
        assert_eq!(check(1 << 20, 0).unwrap_err().kind(), "invalid_argument");
        assert!(check(CHECKED_BYTES, 1).is_ok());
    }

    #[test]
    fn best_and_median_of_the_rounds() {
        let b = CopyBandwidth {
            buffer_bytes: 1,
            rates: vec![3.0, 1.0, 2.0, 10.0],
        };
        assert_eq!(b.best(), 10.0);
        assert_eq!(b.median(), 2.5);
        let one = CopyBandwidth {
            buffer_bytes: 1,
            rates: vec![4.0],
        };
        assert_eq!((one.best(), one.median()), (4.0, 4.0));
    }
}
