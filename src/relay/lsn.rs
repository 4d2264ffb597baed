//! Postgres log sequence numbers: a position in the write-ahead log, written `X/Y` (two 32-bit
//! halves in hex). Pure value type, so the relay's position arithmetic is tested alone.

use std::fmt;
use std::str::FromStr;

/// A WAL position.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Lsn(pub u64);

/// Text that is not an `X/Y` LSN.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not a WAL position like 16/B374D848")]
pub struct LsnParseError(String);

impl FromStr for Lsn {
    type Err = LsnParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || LsnParseError(s.to_owned());
        let (hi, lo) = s.trim().split_once('/').ok_or_else(err)?;
        if hi.is_empty() || lo.is_empty() || hi.len() > 8 || lo.len() > 8 {
            return Err(err());
        }
        let hi = u32::from_str_radix(hi, 16).map_err(|_| err())?;
        let lo = u32::from_str_radix(lo, 16).map_err(|_| err())?;
        Ok(Lsn((u64::from(hi) << 32) | u64::from(lo)))
    }
}

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xFFFF_FFFF)
    }
}

impl Lsn {
    /// Bytes of WAL from `self` up to `later` (0 when `later` is not later).
    pub fn bytes_until(self, later: Lsn) -> u64 {
        later.0.saturating_sub(self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_and_prints_postgres_notation() {
        assert_eq!("0/0".parse::<Lsn>().unwrap(), Lsn(0));
        assert_eq!("16/B374D848".parse::<Lsn>().unwrap(), Lsn(0x16_B374_D848));
        assert_eq!("16/b374d848".parse::<Lsn>().unwrap(), Lsn(0x16_B374_D848));
        assert_eq!(Lsn(0x16_B374_D848).to_string(), "16/B374D848");
        assert_eq!(Lsn(u64::MAX).to_string(), "FFFFFFFF/FFFFFFFF");
    }

    #[test]
    fn rejects_what_is_not_an_lsn() {
        for bad in [
            "",
            "/",
            "1/",
            "/1",
            "1",
            "1/2/3",
            "G/0",
            "123456789/0",
            "-1/0",
            "1 /2",
        ] {
            assert!(bad.parse::<Lsn>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn distance_never_goes_negative() {
        assert_eq!(Lsn(10).bytes_until(Lsn(25)), 15);
        assert_eq!(Lsn(25).bytes_until(Lsn(10)), 0);
    }

    proptest! {
        #[test]
        fn text_round_trips_and_order_is_numeric(a: u64, b: u64) {
            let (la, lb) = (Lsn(a), Lsn(b));
            prop_assert_eq!(la.to_string().parse::<Lsn>().unwrap(), la);
            prop_assert_eq!(la < lb, a < b);
        }
    }
}
