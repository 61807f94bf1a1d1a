//! The one thing the coordinator reads from its own certificate: when it is valid.
//!
//! rustls checks that the certificate and key fit, not dates; a client checks dates and
//! refuses an expired certificate. The coordinator reads the validity itself so that it
//! can say, when it loads a certificate, that clients will refuse it. It reads just
//! enough DER for that (RFC 5280 §4.1): the certificate is a SEQUENCE whose first
//! element, the TBSCertificate, holds an optional version, the serial number, the
//! signature algorithm, the issuer and then `Validity ::= SEQUENCE { notBefore Time,
//! notAfter Time }`.

use chrono::{DateTime, NaiveDate, Utc};

/// When a certificate is valid, both ends included.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Validity {
    pub not_before: DateTime<Utc>,
    pub not_after: DateTime<Utc>,
}

const SEQUENCE: u8 = 0x30;
const INTEGER: u8 = 0x02;
const VERSION: u8 = 0xa0; // [0] EXPLICIT
const UTC_TIME: u8 = 0x17;
const GENERALIZED_TIME: u8 = 0x18;

/// The validity of the DER certificate `der`; `None` when it is not the DER this
/// module reads.
pub fn validity(der: &[u8]) -> Option<Validity> {
    let (certificate, _) = element(der, SEQUENCE)?;
    let (mut tbs, _) = element(certificate, SEQUENCE)?;
    if tbs.first() == Some(&VERSION) {
        tbs = element(tbs, VERSION)?.1;
    }
    let (_, rest) = element(tbs, INTEGER)?; // serial number
    let (_, rest) = element(rest, SEQUENCE)?; // signature algorithm
    let (_, rest) = element(rest, SEQUENCE)?; // issuer
    let (validity, _) = element(rest, SEQUENCE)?;
    let (not_before, rest) = time(validity)?;
    let (not_after, _) = time(rest)?;
    Some(Validity {
        not_before,
        not_after,
    })
}

/// The contents of the element with `tag` at the start of `input`, and what follows it.
fn element(input: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
    let (&first, rest) = input.split_first()?;
    if first != tag {
        return None;
    }
    let (&len, rest) = rest.split_first()?;
    let (len, rest) = if len < 0x80 {
        (usize::from(len), rest)
    } else {
        let n = usize::from(len & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |len, &b| (len << 8) | usize::from(b));
        (len, &rest[n..])
    };
    (rest.len() >= len).then(|| rest.split_at(len))
}

/// A `Time` (UTCTime or GeneralizedTime, in the `Z` form RFC 5280 requires), and
/// what follows it.
fn time(input: &[u8]) -> Option<(DateTime<Utc>, &[u8])> {
    let (text, rest, century) = match *input.first()? {
        UTC_TIME => {
            let (text, rest) = element(input, UTC_TIME)?;
            // RFC 5280: YY of 50 and more is 19YY, below 50 it is 20YY.
            let yy = digits(text.get(..2)?)?;
            (text, rest, Some(if yy >= 50 { 1900 } else { 2000 }))
        }
        GENERALIZED_TIME => {
            let (text, rest) = element(input, GENERALIZED_TIME)?;
            (text, rest, None)
        }
        _ => return None,
    };
    let (year, fields) = match century {
        Some(century) => (century + digits(&text[..2])?, text.get(2..)?),
        None => (digits(text.get(..4)?)?, text.get(4..)?),
    };
    if fields.len() != 11 || fields[10] != b'Z' {
        return None;
    }
    let field = |at: usize| digits(&fields[at..at + 2]);
    let at = NaiveDate::from_ymd_opt(year as i32, field(0)?, field(2)?)?
        .and_hms_opt(field(4)?, field(6)?, field(8)?)?
        .and_utc();
    Some((at, rest))
}

fn digits(text: &[u8]) -> Option<u32> {
    text.iter().try_fold(0u32, |n, &b| {
        b.is_ascii_digit().then(|| n * 10 + u32::from(b - b'0'))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn certificate(not_before: (i32, u8, u8), not_after: (i32, u8, u8)) -> Vec<u8> {
        let mut params = rcgen::CertificateParams::new(vec!["localhost".into()]).unwrap();
        params.not_before = rcgen::date_time_ymd(not_before.0, not_before.1, not_before.2);
        params.not_after = rcgen::date_time_ymd(not_after.0, not_after.1, not_after.2);
        let key = rcgen::KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().to_vec()
    }

    fn at(year: i32, month: u32, day: u32) -> DateTime<Utc> {
        NaiveDate::from_ymd_opt(year, month, day)
            .unwrap()
            .and_hms_opt(0, 0, 0)
            .unwrap()
            .and_utc()
    }

    #[test]
    fn reads_both_dates_of_a_certificate() {
        // Before 2050 the dates are UTCTime, from 2050 on GeneralizedTime.
        let der = certificate((2020, 1, 1), (2030, 6, 15));
        let dates = validity(&der).expect("a validity");
        assert_eq!(dates.not_before, at(2020, 1, 1));
        assert_eq!(dates.not_after, at(2030, 6, 15));

        let der = certificate((1999, 12, 31), (2060, 2, 29));
        let dates = validity(&der).expect("a validity");
        assert_eq!(dates.not_before, at(1999, 12, 31));
        assert_eq!(dates.not_after, at(2060, 2, 29));
    }

    #[test]
    fn what_is_not_a_certificate_has_no_validity() {
        let der = certificate((2020, 1, 1), (2030, 1, 1));
        assert_eq!(validity(b""), None);
        assert_eq!(validity(b"-----BEGIN CERTIFICATE-----"), None);
        // Cut short anywhere: no date read past the end, no panic.
        for len in 0..der.len() {
            assert_eq!(validity(&der[..len]), None, "cut at {len}");
        }
        // A length field longer than what follows.
        assert_eq!(validity(&[0x30, 0x84, 0xff, 0xff, 0xff, 0xff]), None);
    }
}
