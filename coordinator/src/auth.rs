//! Bearer-token authentication (`--token-file`), shared by gRPC and HTTP.
//! Tokens are compared in constant time so response timing leaks nothing about them.

use subtle::ConstantTimeEq;

/// The token every API call must present, if one is configured.
#[derive(Clone)]
pub struct Auth {
    token: Option<Vec<u8>>,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth")
            .field("enabled", &self.token.is_some())
            .finish()
    }
}

impl Auth {
    pub fn disabled() -> Auth {
        Auth { token: None }
    }

    pub fn with_token(token: &str) -> Auth {
        Auth {
            token: Some(token.trim().as_bytes().to_vec()),
        }
    }

    /// Reads the token from a file (surrounding whitespace ignored); empty is an error.
    pub fn from_file(path: &std::path::Path) -> anyhow::Result<Auth> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("cannot read token file {}: {e}", path.display()))?;
        let token = text.trim();
        if token.is_empty() {
            anyhow::bail!("token file {} is empty", path.display());
        }
        Ok(Auth::with_token(token))
    }

    pub fn enabled(&self) -> bool {
        self.token.is_some()
    }

    /// Checks a call's `authorization` header values: exactly one, `Bearer <token>`.
    /// As RFC 7235 has it, the scheme is case-insensitive, one or more spaces follow
    /// it, and whitespace around the value is not part of it (hyper already trims that
    /// from HTTP/1.1 header values, so gRPC and HTTP read a header alike).
    pub fn check<'a>(
        &self,
        mut headers: impl Iterator<Item = &'a [u8]>,
    ) -> Result<(), &'static str> {
        let Some(expected) = &self.token else {
            return Ok(());
        };
        let Some(header) = headers.next() else {
            return Err(
                "missing token: send 'authorization: Bearer <token>' (queue-cli --token or WORKQ_TOKEN)",
            );
        };
        if headers.next().is_some() {
            return Err("more than one authorization header: send exactly one");
        }
        let malformed = "malformed authorization header: expected 'Bearer <token>'";
        let header = header.trim_ascii();
        let space = header.iter().position(|&b| b == b' ').ok_or(malformed)?;
        let (scheme, token) = header.split_at(space);
        let token = token.trim_ascii_start();
        if !scheme.eq_ignore_ascii_case(b"bearer") || token.is_empty() {
            return Err(malformed);
        }
        Self::compare(expected, token)
    }

    /// Checks a bare token (the wire protocol's hello); empty means none was sent.
    /// Surrounding whitespace is not part of it, as in a header or the token file.
    pub fn check_token(&self, presented: &str) -> Result<(), &'static str> {
        let Some(expected) = &self.token else {
            return Ok(());
        };
        if presented.is_empty() {
            return Err(
                "missing token: the wire hello carries none (queue-cli --token or WORKQ_TOKEN)",
            );
        }
        Self::compare(expected, presented.trim().as_bytes())
    }

    fn compare(expected: &[u8], presented: &[u8]) -> Result<(), &'static str> {
        if bool::from(presented.ct_eq(expected)) {
            Ok(())
        } else {
            Err("invalid token")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checks_bearer_tokens() {
        let auth = Auth::with_token("s3cret\n");
        let check = |values: &[&[u8]]| auth.check(values.iter().copied());
        assert!(check(&[b"Bearer s3cret"]).is_ok());
        assert!(check(&[]).unwrap_err().contains("missing token"));
        assert_eq!(check(&[b"Bearer nope"]), Err("invalid token"));
        assert_eq!(check(&[b"Bearer s3cre"]), Err("invalid token"));
        assert_eq!(check(&[b"Bearer s3 cret"]), Err("invalid token"));
        // The scheme in any case, any number of spaces, whitespace around the value.
        for header in [
            &b"bearer s3cret"[..],
            b"BEARER s3cret",
            b"Bearer   s3cret",
            b" Bearer s3cret \t",
        ] {
            assert!(check(&[header]).is_ok(), "{header:?}");
        }
        for header in [
            &b"s3cret"[..],
            b"Basic s3cret",
            b"Bearer",
            b"Bearer   ",
            b"Bearers3cret",
        ] {
            assert!(
                check(&[header]).unwrap_err().contains("malformed"),
                "{header:?}"
            );
        }
        // Two headers are refused, whichever holds the right token.
        for pair in [
            [&b"Bearer s3cret"[..], b"Bearer nope"],
            [b"Bearer nope", b"Bearer s3cret"],
        ] {
            assert!(check(&pair).unwrap_err().contains("more than one"));
        }
        assert!(Auth::disabled().check(std::iter::empty()).is_ok());
    }

    #[test]
    fn checks_a_bare_token() {
        let auth = Auth::with_token("s3cret");
        assert!(auth.check_token(" s3cret ").is_ok());
        assert_eq!(auth.check_token("s3cre"), Err("invalid token"));
        assert!(auth.check_token("").unwrap_err().contains("missing token"));
    }
}
