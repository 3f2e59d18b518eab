//! ISO 4217: the currencies a payment may be in.
//!
//! The one list the consumer's decoder and the PSP's validation both use, so
//! that "three capital letters" can never again stand in for "a currency":
//! `QQQ` has the shape of a code and is none.

/// The active ISO 4217 alphabetic codes (the list maintained by SIX on
/// behalf of ISO, as of its 2025 amendments), sorted for a binary search.
///
/// Left out on purpose: `XTS` (reserved for testing) and `XXX` ("no
/// currency involved"). Both are valid ISO 4217 codes, and neither can be
/// charged.
pub const ISO_4217: &[&str] = &[
    "AED", "AFN", "ALL", "AMD", "ANG", "AOA", "ARS", "AUD", "AWG", "AZN", "BAM", "BBD", "BDT",
    "BGN", "BHD", "BIF", "BMD", "BND", "BOB", "BOV", "BRL", "BSD", "BTN", "BWP", "BYN", "BZD",
    "CAD", "CDF", "CHE", "CHF", "CHW", "CLF", "CLP", "CNY", "COP", "COU", "CRC", "CUC", "CUP",
    "CVE", "CZK", "DJF", "DKK", "DOP", "DZD", "EGP", "ERN", "ETB", "EUR", "FJD", "FKP", "GBP",
    "GEL", "GHS", "GIP", "GMD", "GNF", "GTQ", "GYD", "HKD", "HNL", "HTG", "HUF", "IDR", "ILS",
    "INR", "IQD", "IRR", "ISK", "JMD", "JOD", "JPY", "KES", "KGS", "KHR", "KMF", "KPW", "KRW",
    "KWD", "KYD", "KZT", "LAK", "LBP", "LKR", "LRD", "LSL", "LYD", "MAD", "MDL", "MGA", "MKD",
    "MMK", "MNT", "MOP", "MRU", "MUR", "MVR", "MWK", "MXN", "MXV", "MYR", "MZN", "NAD", "NGN",
    "NIO", "NOK", "NPR", "NZD", "OMR", "PAB", "PEN", "PGK", "PHP", "PKR", "PLN", "PYG", "QAR",
    "RON", "RSD", "RUB", "RWF", "SAR", "SBD", "SCR", "SDG", "SEK", "SGD", "SHP", "SLE", "SLL",
    "SOS", "SRD", "SSP", "STN", "SVC", "SYP", "SZL", "THB", "TJS", "TMT", "TND", "TOP", "TRY",
    "TTD", "TWD", "TZS", "UAH", "UGX", "USD", "USN", "UYI", "UYU", "UYW", "UZS", "VED", "VES",
    "VND", "VUV", "WST", "XAF", "XAG", "XAU", "XBA", "XBB", "XBC", "XBD", "XCD", "XCG", "XDR",
    "XOF", "XPD", "XPF", "XPT", "XSU", "XUA", "YER", "ZAR", "ZMW", "ZWG", "ZWL",
];

/// Why a string is not a currency we can charge.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CurrencyError {
    #[error("currency must be three upper-case letters (ISO 4217), got {0:?}")]
    Shape(String),
    #[error("unknown currency {0} (not an ISO 4217 code)")]
    Unknown(String),
}

/// Checks that `code` is an active ISO 4217 code. The shape is checked
/// first so that `eur` gets the more useful of the two reasons.
pub fn check(code: &str) -> Result<(), CurrencyError> {
    let shaped = code.len() == 3 && code.bytes().all(|b| b.is_ascii_uppercase());
    if !shaped {
        return Err(CurrencyError::Shape(code.to_owned()));
    }
    if ISO_4217.binary_search(&code).is_err() {
        return Err(CurrencyError::Unknown(code.to_owned()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_list_is_sorted_and_well_formed() {
        assert!(ISO_4217.windows(2).all(|pair| pair[0] < pair[1]));
        assert!(ISO_4217
            .iter()
            .all(|code| code.len() == 3 && code.bytes().all(|b| b.is_ascii_uppercase())));
    }

    #[test]
    fn real_codes_pass_and_invented_ones_do_not() {
        for code in ["EUR", "USD", "GBP", "JPY", "CHF", "AED", "ZWL"] {
            assert_eq!(check(code), Ok(()), "{code}");
        }
        for code in ["QQQ", "ABC", "EUX", "XTS", "XXX"] {
            assert_eq!(check(code), Err(CurrencyError::Unknown(code.into())));
        }
        assert_eq!(
            check("QQQ").unwrap_err().to_string(),
            "unknown currency QQQ (not an ISO 4217 code)"
        );
        for code in ["eur", "EURO", "E1R", ""] {
            assert_eq!(check(code), Err(CurrencyError::Shape(code.into())));
        }
    }
}
