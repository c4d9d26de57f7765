//! Bearer-token check for the `blkmesh.v1` services (`--token-file`).
//!
//! Every call must carry `authorization: Bearer <token>`; the token is
//! compared in constant time (for a given expected token, the time does not
//! depend on the bytes received). The gRPC health service is not wrapped, so
//! probes work without a token.

use std::sync::Arc;

use blkmesh_proto::client::AUTHORIZATION;
use tonic::service::Interceptor;
use tonic::{Request, Status};

/// Checks the bearer token of each call (lets everything through without one).
#[derive(Clone)]
pub(crate) struct TokenCheck {
    token: Option<Arc<[u8]>>,
}

impl std::fmt::Debug for TokenCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenCheck")
            .field("required", &self.token.is_some())
            .finish()
    }
}

impl TokenCheck {
    /// Requires `token` (None: no check).
    pub(crate) fn new(token: Option<&str>) -> TokenCheck {
        TokenCheck {
            token: token.map(|t| Arc::from(t.as_bytes())),
        }
    }

    fn check(&self, request: &Request<()>) -> Result<(), Status> {
        let Some(expected) = &self.token else {
            return Ok(());
        };
        let Some(value) = request.metadata().get(AUTHORIZATION) else {
            return Err(Status::unauthenticated(
                "missing \"authorization: Bearer <token>\" metadata: this manager requires \
                 a token (--token-file, or $BLKMESH_TOKEN_FILE)",
            ));
        };
        let bytes = value.as_bytes();
        // RFC 6750: the scheme is case-insensitive, one space before the token.
        let token = match bytes.split_at_checked(7) {
            Some((scheme, token)) if scheme.eq_ignore_ascii_case(b"bearer ") => token,
            _ => {
                return Err(Status::unauthenticated(
                    "the authorization metadata must be \"Bearer <token>\"",
                ))
            }
        };
        if constant_time_eq(expected, token) {
            Ok(())
        } else {
            Err(Status::unauthenticated("invalid bearer token"))
        }
    }
}

impl Interceptor for TokenCheck {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        self.check(&request)?;
        Ok(request)
    }
}

/// Compares `expected` with `got` touching every byte of `expected` whatever
/// `got` holds, so the time taken reveals neither where they differ nor
/// (beyond `expected`'s length, which is fixed) how long `got` is.
fn constant_time_eq(expected: &[u8], got: &[u8]) -> bool {
    let mut diff: u64 = (expected.len() ^ got.len()) as u64;
    for (i, &e) in expected.iter().enumerate() {
        // `got` shorter than `expected`: compare with a byte that is never
        // used, after the length difference already counted.
        let g = got.get(i).copied().unwrap_or(0);
        diff |= u64::from(e ^ g);
        diff = std::hint::black_box(diff);
    }
    diff == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    fn with_auth(value: &str) -> Request<()> {
        let mut r = Request::new(());
        r.metadata_mut()
            .insert(AUTHORIZATION, value.parse().unwrap());
        r
    }

    #[test]
    fn compares_exactly() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
        assert!(!constant_time_eq(b"abc", b""));
        assert!(constant_time_eq(b"", b""));
    }

    #[test]
    fn checks_the_header() {
        let mut c = TokenCheck::new(Some("s3cret"));
        assert!(c.call(with_auth("Bearer s3cret")).is_ok());
        assert!(c.call(with_auth("bearer s3cret")).is_ok());
        for (value, needle) in [
            ("Bearer s3creT", "invalid bearer token"),
            ("Bearer ", "invalid bearer token"),
            ("Bearer s3cret ", "invalid bearer token"),
            ("Basic s3cret", "must be \"Bearer <token>\""),
            ("s3cret", "must be \"Bearer <token>\""),
        ] {
            let e = c.call(with_auth(value)).unwrap_err();
            assert_eq!(e.code(), Code::Unauthenticated, "{value}");
            assert!(e.message().contains(needle), "{value}: {}", e.message());
        }
        let e = c.call(Request::new(())).unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated);
        assert!(e.message().contains("requires a token"), "{}", e.message());
        // No token configured: everything passes.
        let mut open = TokenCheck::new(None);
        assert!(open.call(Request::new(())).is_ok());
        assert!(open.call(with_auth("Bearer whatever")).is_ok());
    }
}
