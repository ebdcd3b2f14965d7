//! Kubernetes quantities (`64Gi`, `1.5G`, `500M`, `1e9`) as whole bytes: `BaseModel` sizes,
//! and underneath [`crate::parse_bytes`], every flag that takes a byte count. Fractions of a byte round up; negative, overflowing and malformed values
//! are errors (the API server's own grammar, minus the milli suffix that bytes cannot use).

/// Why a quantity is not a byte count.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuantityError {
    #[error("quantity {0:?} is not a number with an optional suffix (e.g. 64Gi, 1.5G, 1e9)")]
    Malformed(String),
    #[error("quantity {0:?} is too large")]
    Overflow(String),
}

impl QuantityError {
    pub fn kind(&self) -> &'static str {
        match self {
            QuantityError::Malformed(_) => "malformed",
            QuantityError::Overflow(_) => "overflow",
        }
    }
}

/// Parses a quantity into bytes.
///
/// Errors: [`QuantityError::Malformed`] for anything outside the grammar (signs, `m`, garbage),
/// [`QuantityError::Overflow`] past `u64::MAX`.
pub fn to_bytes(q: &str) -> Result<u64, QuantityError> {
    let s = q.trim();
    let malformed = || QuantityError::Malformed(q.to_owned());
    let overflow = || QuantityError::Overflow(q.to_owned());
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, suffix) = s.split_at(split);
    let (int_part, frac_part) = match number.split_once('.') {
        Some((i, f)) => (i, f),
        None => (number, ""),
    };
    if (int_part.is_empty() && frac_part.is_empty()) || frac_part.contains('.') {
        return Err(malformed());
    }
    // value = mantissa / 10^frac_digits * multiplier, computed in u128 to stay exact.
    let digits = format!("{int_part}{frac_part}");
    let mantissa: u128 = digits.parse().map_err(|_| malformed())?;
    let frac_digits = u32::try_from(frac_part.len()).map_err(|_| malformed())?;
    let (mult, extra_exp): (u128, i64) = match suffix {
        "" => (1, 0),
        "Ki" => (1 << 10, 0),
        "Mi" => (1 << 20, 0),
        "Gi" => (1 << 30, 0),
        "Ti" => (1 << 40, 0),
        "Pi" => (1 << 50, 0),
        "Ei" => (1 << 60, 0),
        "k" => (1, 3),
        "M" => (1, 6),
        "G" => (1, 9),
        "T" => (1, 12),
        "P" => (1, 15),
        "E" => (1, 18),
        exp if exp.starts_with(['e', 'E']) => {
            let e: i64 = exp[1..].parse().map_err(|_| malformed())?;
            (1, e)
        }
        _ => return Err(malformed()),
    };
    let exp = extra_exp - i64::from(frac_digits);
    let scaled = mantissa.checked_mul(mult).ok_or_else(overflow)?;
    let bytes = if exp >= 0 {
        let pow = 10u128
            .checked_pow(u32::try_from(exp).map_err(|_| overflow())?)
            .ok_or_else(overflow)?;
        scaled.checked_mul(pow).ok_or_else(overflow)?
    } else {
        let pow = 10u128
            .checked_pow(u32::try_from(-exp).map_err(|_| malformed())?)
            .ok_or_else(malformed)?;
        scaled.div_ceil(pow)
    };
    u64::try_from(bytes).map_err(|_| overflow())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binary_decimal_and_exponent_suffixes() {
        assert_eq!(to_bytes("64Gi"), Ok(64 << 30));
        assert_eq!(to_bytes("1Ki"), Ok(1024));
        assert_eq!(to_bytes("1.5Gi"), Ok(3 << 29));
        assert_eq!(to_bytes("2G"), Ok(2_000_000_000));
        assert_eq!(to_bytes("500M"), Ok(500_000_000));
        assert_eq!(to_bytes("1e9"), Ok(1_000_000_000));
        assert_eq!(to_bytes("4096"), Ok(4096));
        assert_eq!(to_bytes(" 7k "), Ok(7000));
    }

    #[test]
    fn fractions_of_a_byte_round_up() {
        assert_eq!(to_bytes("1.5"), Ok(2));
        assert_eq!(to_bytes("0.001k"), Ok(1));
    }

    #[test]
    fn refuses_malformed_and_overflowing_values() {
        for bad in ["", "Gi", "-1Gi", "500m", "1.2.3", "12XB", "1e"] {
            assert_eq!(
                to_bytes(bad),
                Err(QuantityError::Malformed(bad.into())),
                "{bad}"
            );
        }
        assert_eq!(
            to_bytes("16Ei"),
            Err(QuantityError::Overflow("16Ei".into()))
        );
        assert!(matches!(to_bytes("1e30"), Err(QuantityError::Overflow(_))));
    }
}
