//! Who is calling and what they may do.
//!
//! A caller presents a bearer JWT (`authorization: Bearer <jwt>`: HS256 with a shared
//! secret, or RS256/ES256 with public keys from a JWKS file; signature, `exp`/`nbf` with a
//! leeway, and `iss`/`aud` when configured, are checked) or an API key (`x-api-key: <key>`,
//! or as the bearer; only its SHA-256 is configured). Either yields a [`Principal`]: a
//! subject, `resource:action` permissions (`resource:*` and `*` allowed) and the namespaces
//! it may touch (`*` for all). No secret is ever part of an error or a `Debug` output.

use std::{collections::HashMap, fmt, path::PathBuf, time::Duration};

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation, jwk::JwkSet};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Every permission an RPC may require.
pub const PERMISSIONS: [&str; 11] = [
    "templates:register",
    "templates:read",
    "tasks:create",
    "tasks:read",
    "tasks:list",
    "tasks:cancel",
    "tasks:watch",
    "steps:read",
    "steps:retry",
    "steps:resolve",
    "analytics:read",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Anyone who reaches the port may do anything (development only).
    #[default]
    None,
    /// Every RPC but health needs a valid token or API key.
    Jwt,
}

/// An API key: its name (the audit trail's actor), the SHA-256 of the key (hex), and what
/// it may do.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKey {
    pub name: String,
    pub sha256: String,
    pub permissions: Vec<String>,
    pub namespaces: Vec<String>,
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApiKey").field("name", &self.name).field("permissions", &self.permissions).finish()
    }
}

/// `auth.*` configuration.
#[derive(Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    pub mode: Mode,
    /// HS256 shared secret (or `hs256_secret_file`).
    pub hs256_secret: Option<String>,
    pub hs256_secret_file: Option<PathBuf>,
    /// A JWKS file with the public keys of RS256/ES256 tokens (matched by `kid`).
    pub jwks_file: Option<PathBuf>,
    /// Required `iss` / `aud`, when set.
    pub issuer: Option<String>,
    pub audience: Option<String>,
    /// Clock skew allowed on `exp` and `nbf`.
    #[serde(with = "humantime_serde")]
    pub leeway: Duration,
    pub api_keys: Vec<ApiKey>,
    /// Serve gRPC reflection (it lists the API, not its data).
    pub reflection: bool,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            mode: Mode::None,
            hs256_secret: None,
            hs256_secret_file: None,
            jwks_file: None,
            issuer: None,
            audience: None,
            leeway: Duration::from_secs(30),
            api_keys: Vec::new(),
            reflection: true,
        }
    }
}

impl fmt::Debug for Settings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Settings")
            .field("mode", &self.mode)
            .field("hs256_secret", &self.hs256_secret.as_ref().map(|_| "<redacted>"))
            .field("jwks_file", &self.jwks_file)
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .field("api_keys", &self.api_keys)
            .finish_non_exhaustive()
    }
}

/// Why a caller was not let in (UNAUTHENTICATED). Never quotes the credential.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("credentials required: `authorization: Bearer <token>` or `x-api-key`")]
    Missing,
    #[error("invalid token: {0}")]
    InvalidToken(String),
    #[error("unknown API key")]
    UnknownKey,
}

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub subject: String,
    pub permissions: Vec<String>,
    pub namespaces: Vec<String>,
}

impl Principal {
    /// Everything, everywhere: `auth.mode = none`.
    pub fn unrestricted(subject: impl Into<String>) -> Principal {
        Principal { subject: subject.into(), permissions: vec!["*".into()], namespaces: vec!["*".into()] }
    }

    /// Whether this caller holds `permission` (`resource:action`), directly, through
    /// `resource:*`, or through `*`.
    pub fn allows(&self, permission: &str) -> bool {
        let resource = permission.split(':').next().unwrap_or_default();
        self.permissions.iter().any(|p| p == "*" || p == permission || *p == format!("{resource}:*"))
    }

    /// Whether this caller may touch `namespace`.
    pub fn sees(&self, namespace: &str) -> bool {
        self.namespaces.iter().any(|n| n == "*" || n == namespace)
    }

    /// The namespaces this caller is limited to; `None` for all.
    pub fn namespace_limit(&self) -> Option<Vec<String>> {
        if self.namespaces.iter().any(|n| n == "*") { None } else { Some(self.namespaces.clone()) }
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    sub: String,
    #[serde(default)]
    permissions: Vec<String>,
    #[serde(default)]
    namespaces: Vec<String>,
}

/// Checks credentials against the configuration.
pub struct Verifier {
    hs256: Option<DecodingKey>,
    jwks: Option<JwkSet>,
    validation: Validation,
    keys: HashMap<String, ApiKey>,
}

impl Verifier {
    /// Reads the secret and key files; fails (naming the setting) when `jwt` mode has
    /// nothing to verify with.
    pub fn new(settings: &Settings) -> Result<Verifier, String> {
        let secret = match (&settings.hs256_secret, &settings.hs256_secret_file) {
            (Some(secret), _) => Some(secret.trim().to_owned()),
            (None, Some(path)) => Some(
                std::fs::read_to_string(path)
                    .map_err(|e| format!("auth.hs256_secret_file `{}`: {e}", path.display()))?
                    .trim()
                    .to_owned(),
            ),
            (None, None) => None,
        };
        if secret.as_ref().is_some_and(|s| s.len() < 32) {
            return Err("auth.hs256_secret: at least 32 bytes".into());
        }
        let jwks = match &settings.jwks_file {
            Some(path) => {
                let text =
                    std::fs::read_to_string(path).map_err(|e| format!("auth.jwks_file `{}`: {e}", path.display()))?;
                Some(serde_json::from_str(&text).map_err(|e| format!("auth.jwks_file `{}`: {e}", path.display()))?)
            }
            None => None,
        };
        if secret.is_none() && jwks.is_none() && settings.api_keys.is_empty() {
            return Err("auth.mode = jwt needs auth.hs256_secret, auth.jwks_file or auth.api_keys".into());
        }
        let mut validation = Validation::new(Algorithm::HS256);
        validation.algorithms = Vec::new();
        if secret.is_some() {
            validation.algorithms.push(Algorithm::HS256);
        }
        if jwks.is_some() {
            validation.algorithms.extend([Algorithm::RS256, Algorithm::ES256]);
        }
        validation.leeway = settings.leeway.as_secs();
        validation.validate_nbf = true;
        validation.set_required_spec_claims(&["exp", "sub"]);
        match &settings.issuer {
            Some(issuer) => validation.set_issuer(&[issuer]),
            None => validation.iss = None,
        }
        match &settings.audience {
            Some(audience) => validation.set_audience(&[audience]),
            None => validation.validate_aud = false,
        }
        let mut keys = HashMap::new();
        for key in &settings.api_keys {
            let hash = key.sha256.trim().to_ascii_lowercase();
            if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(format!("auth.api_keys `{}`: sha256 must be 64 hex digits", key.name));
            }
            keys.insert(hash, key.clone());
        }
        Ok(Verifier { hs256: secret.map(|s| DecodingKey::from_secret(s.as_bytes())), jwks, validation, keys })
    }

    /// The caller behind a bearer token or an API key.
    pub fn authenticate(&self, bearer: Option<&str>, api_key: Option<&str>) -> Result<Principal, Error> {
        if let Some(key) = api_key {
            return self.api_key(key);
        }
        let token = bearer.ok_or(Error::Missing)?;
        if token.split('.').count() != 3 {
            return self.api_key(token);
        }
        let header = jsonwebtoken::decode_header(token).map_err(|e| Error::InvalidToken(e.to_string()))?;
        let key = match header.alg {
            Algorithm::HS256 => {
                self.hs256.clone().ok_or_else(|| Error::InvalidToken("HS256 is not accepted".into()))?
            }
            Algorithm::RS256 | Algorithm::ES256 => {
                let jwks = self.jwks.as_ref().ok_or_else(|| Error::InvalidToken("no JWKS configured".into()))?;
                let kid = header.kid.as_deref().ok_or_else(|| Error::InvalidToken("no `kid`".into()))?;
                let jwk = jwks.find(kid).ok_or_else(|| Error::InvalidToken("unknown `kid`".into()))?;
                DecodingKey::from_jwk(jwk).map_err(|e| Error::InvalidToken(e.to_string()))?
            }
            other => return Err(Error::InvalidToken(format!("{other:?} is not accepted"))),
        };
        // accepted above; the validation names only this algorithm, since jsonwebtoken wants
        // every algorithm it lists to fit the key
        let mut validation = self.validation.clone();
        validation.algorithms = vec![header.alg];
        let data =
            jsonwebtoken::decode::<Claims>(token, &key, &validation).map_err(|e| Error::InvalidToken(e.to_string()))?;
        let claims = data.claims;
        Ok(Principal { subject: claims.sub, permissions: claims.permissions, namespaces: claims.namespaces })
    }

    fn api_key(&self, key: &str) -> Result<Principal, Error> {
        let hash = sha256_hex(key);
        let key = self.keys.get(&hash).ok_or(Error::UnknownKey)?;
        Ok(Principal {
            subject: key.name.clone(),
            permissions: key.permissions.clone(),
            namespaces: key.namespaces.clone(),
        })
    }
}

/// The SHA-256 of an API key, as configured (`auth.api_keys[].sha256`).
pub fn sha256_hex(key: &str) -> String {
    Sha256::digest(key.as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
}

/// What a development token says (`taskerctl token mint`).
#[derive(Debug, Clone)]
pub struct Mint<'a> {
    pub secret: &'a str,
    pub subject: &'a str,
    pub permissions: &'a [String],
    pub namespaces: &'a [String],
    pub lifetime: Duration,
    pub issuer: Option<&'a str>,
    pub audience: Option<&'a str>,
    /// Seconds since the Unix epoch (`now`, or in the past for tests).
    pub issued_at: u64,
}

/// An HS256 token.
pub fn mint(m: &Mint<'_>) -> Result<String, String> {
    let mut claims = serde_json::json!({
        "sub": m.subject,
        "permissions": m.permissions,
        "namespaces": m.namespaces,
        "iat": m.issued_at,
        "nbf": m.issued_at,
        "exp": m.issued_at + m.lifetime.as_secs(),
    });
    if let Some(issuer) = m.issuer {
        claims["iss"] = issuer.into();
    }
    if let Some(audience) = m.audience {
        claims["aud"] = audience.into();
    }
    jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(m.secret.as_bytes()))
        .map_err(|e| e.to_string())
}

/// Seconds since the Unix epoch.
pub fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "0123456789abcdef0123456789abcdef";

    fn settings() -> Settings {
        Settings {
            mode: Mode::Jwt,
            hs256_secret: Some(SECRET.into()),
            issuer: Some("tasker-test".into()),
            audience: Some("tasker".into()),
            api_keys: vec![ApiKey {
                name: "ci-bot".into(),
                sha256: sha256_hex("key-123"),
                permissions: vec!["tasks:*".into()],
                namespaces: vec!["payments".into()],
            }],
            ..Settings::default()
        }
    }

    fn token(secret: &str, issued_at: u64, lifetime: u64, audience: &str) -> String {
        let permissions = vec!["tasks:create".to_owned()];
        let namespaces = vec!["payments".to_owned()];
        mint(&Mint {
            secret,
            subject: "alice",
            permissions: &permissions,
            namespaces: &namespaces,
            lifetime: Duration::from_secs(lifetime),
            issuer: Some("tasker-test"),
            audience: Some(audience),
            issued_at,
        })
        .unwrap()
    }

    #[test]
    fn accepts_a_valid_token_and_refuses_bad_ones() {
        let verifier = Verifier::new(&settings()).unwrap();
        let good = verifier.authenticate(Some(&token(SECRET, now(), 600, "tasker")), None).unwrap();
        assert_eq!(good.subject, "alice");
        assert!(good.allows("tasks:create") && !good.allows("tasks:cancel"));
        assert!(good.sees("payments") && !good.sees("shipping"));
        let refused = |t: &str| verifier.authenticate(Some(t), None).unwrap_err();
        assert!(matches!(
            refused(&token("another-secret-another-secret-xx", now(), 600, "tasker")),
            Error::InvalidToken(_)
        ));
        assert!(matches!(refused(&token(SECRET, now() - 7200, 600, "tasker")), Error::InvalidToken(_)), "expired");
        assert!(matches!(refused(&token(SECRET, now(), 600, "elsewhere")), Error::InvalidToken(_)), "audience");
        assert!(
            matches!(refused(&token(SECRET, now() + 3600, 600, "tasker")), Error::InvalidToken(_)),
            "not yet valid"
        );
        assert!(matches!(refused("not.a.jwt"), Error::InvalidToken(_)), "malformed");
        assert_eq!(verifier.authenticate(None, None).unwrap_err(), Error::Missing);
    }

    #[test]
    fn api_keys_are_matched_by_hash() {
        let verifier = Verifier::new(&settings()).unwrap();
        let bot = verifier.authenticate(None, Some("key-123")).unwrap();
        assert_eq!(
            (bot.subject.as_str(), bot.allows("tasks:cancel"), bot.allows("steps:retry")),
            ("ci-bot", true, false)
        );
        assert_eq!(verifier.authenticate(Some("key-123"), None).unwrap().subject, "ci-bot", "as the bearer too");
        assert_eq!(verifier.authenticate(None, Some("key-124")).unwrap_err(), Error::UnknownKey);
    }

    #[test]
    fn es256_tokens_are_checked_against_the_jwks_file() {
        use p256::pkcs8::EncodePrivateKey;
        // a key made here (a fixed scalar: no key file is committed)
        let secret = p256::SecretKey::from_slice(&[7u8; 32]).unwrap();
        let mut jwk: serde_json::Value = serde_json::from_str(&secret.public_key().to_jwk_string()).unwrap();
        jwk["kid"] = "k1".into();
        jwk["alg"] = "ES256".into();
        jwk["use"] = "sig".into();
        let dir = std::env::temp_dir().join(format!("tasker-auth-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let jwks = dir.join("jwks.json");
        std::fs::write(&jwks, serde_json::json!({ "keys": [jwk] }).to_string()).unwrap();
        let settings = Settings { mode: Mode::Jwt, jwks_file: Some(jwks), ..Settings::default() };
        let verifier = Verifier::new(&settings).unwrap();

        let der = secret.to_pkcs8_der().unwrap();
        let key = EncodingKey::from_ec_der(der.as_bytes());
        let sign = |kid: &str| {
            let mut header = Header::new(Algorithm::ES256);
            header.kid = Some(kid.to_owned());
            let claims = serde_json::json!({ "sub": "svc", "exp": now() + 600, "permissions": ["tasks:read"], "namespaces": ["*"] });
            jsonwebtoken::encode(&header, &claims, &key).unwrap()
        };
        let principal = verifier.authenticate(Some(&sign("k1")), None).unwrap();
        assert_eq!((principal.subject.as_str(), principal.sees("anything")), ("svc", true));
        assert!(matches!(verifier.authenticate(Some(&sign("k2")), None), Err(Error::InvalidToken(_))), "unknown kid");
        // an HS256 token is refused when only the JWKS is configured
        assert!(matches!(
            verifier.authenticate(Some(&token(SECRET, now(), 600, "tasker")), None),
            Err(Error::InvalidToken(_))
        ));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn secrets_stay_out_of_debug_output() {
        let printed = format!("{:?}", settings());
        assert!(!printed.contains(SECRET) && !printed.contains(&sha256_hex("key-123")), "{printed}");
    }
}
