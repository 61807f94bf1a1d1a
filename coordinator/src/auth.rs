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

    /// Checks an `authorization` header value (`Bearer <token>`).
    pub fn check(&self, header: Option<&[u8]>) -> Result<(), &'static str> {
        let Some(expected) = &self.token else {
            return Ok(());
        };
        let Some(header) = header else {
            return Err(
                "missing token: send 'authorization: Bearer <token>' (queue-cli --token or WORKQ_TOKEN)",
            );
        };
        let presented = header
            .strip_prefix(b"Bearer ")
            .or_else(|| header.strip_prefix(b"bearer "))
            .ok_or("malformed authorization header: expected 'Bearer <token>'")?;
        Self::compare(expected, presented)
    }

    /// Checks a bare token (the wire protocol's hello); empty means none was sent.
    pub fn check_token(&self, presented: &str) -> Result<(), &'static str> {
        let Some(expected) = &self.token else {
            return Ok(());
        };
        if presented.is_empty() {
            return Err(
                "missing token: the wire hello carries none (queue-cli --token or WORKQ_TOKEN)",
            );
        }
        Self::compare(expected, presented.as_bytes())
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
        assert!(auth.check(Some(b"Bearer s3cret")).is_ok());
        assert!(auth.check(None).unwrap_err().contains("missing token"));
        assert_eq!(auth.check(Some(b"Bearer nope")), Err("invalid token"));
        assert_eq!(auth.check(Some(b"Bearer s3cre")), Err("invalid token"));
        assert!(
            auth.check(Some(b"s3cret"))
                .unwrap_err()
                .contains("malformed")
        );
        assert!(Auth::disabled().check(None).is_ok());
    }
}
