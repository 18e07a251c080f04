//! The JWS algorithms an issuer may allow (RFC 7518 names) and the key family each one needs.

use std::fmt;

/// An algorithm the agent can verify. `none` is not one of them, by construction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Alg {
    Rs256,
    Rs384,
    Rs512,
    Ps256,
    Ps384,
    Ps512,
    Es256,
    Es384,
    EdDsa,
    Hs256,
}

/// The kind of key an algorithm verifies with. An algorithm is only ever checked with a key of
/// its own family, which is what defeats algorithm confusion (an RSA public key used as an
/// HMAC secret).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Family {
    Rsa,
    EcP256,
    EcP384,
    Ed25519,
    Hmac,
}

impl Alg {
    pub(crate) const ALL: [Alg; 10] = [
        Alg::Rs256,
        Alg::Rs384,
        Alg::Rs512,
        Alg::Ps256,
        Alg::Ps384,
        Alg::Ps512,
        Alg::Es256,
        Alg::Es384,
        Alg::EdDsa,
        Alg::Hs256,
    ];

    /// The list operators are told to pick from.
    pub(crate) const CHOICES: &'static str =
        "RS256, RS384, RS512, PS256, PS384, PS512, ES256, ES384, EdDSA or HS256";

    pub(crate) fn name(self) -> &'static str {
        match self {
            Alg::Rs256 => "RS256",
            Alg::Rs384 => "RS384",
            Alg::Rs512 => "RS512",
            Alg::Ps256 => "PS256",
            Alg::Ps384 => "PS384",
            Alg::Ps512 => "PS512",
            Alg::Es256 => "ES256",
            Alg::Es384 => "ES384",
            Alg::EdDsa => "EdDSA",
            Alg::Hs256 => "HS256",
        }
    }

    /// Exact, case-sensitive match: JWS algorithm names are case-sensitive (RFC 7515 4.1.1).
    pub(crate) fn from_name(name: &str) -> Option<Alg> {
        Alg::ALL.into_iter().find(|a| a.name() == name)
    }

    pub(crate) fn family(self) -> Family {
        match self {
            Alg::Rs256 | Alg::Rs384 | Alg::Rs512 | Alg::Ps256 | Alg::Ps384 | Alg::Ps512 => {
                Family::Rsa
            }
            Alg::Es256 => Family::EcP256,
            Alg::Es384 => Family::EcP384,
            Alg::EdDsa => Family::Ed25519,
            Alg::Hs256 => Family::Hmac,
        }
    }
}

impl fmt::Display for Alg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_none_is_not_an_algorithm() {
        for a in Alg::ALL {
            assert_eq!(Alg::from_name(a.name()), Some(a));
        }
        for bad in ["none", "None", "NONE", "rs256", "HS512", "ES512", ""] {
            assert_eq!(Alg::from_name(bad), None, "{bad:?}");
        }
    }
}
