//! Fuzz target `token`: arbitrary text as a bearer token to the real verifier, and arbitrary
//! header and payload texts signed with the trusted keys to reach the claim checks behind the
//! signature. The verifier must never panic, never accept a token that the key of the issuer
//! it names did not sign, and never put the token into a rejection.
//!
//! Input: one mode byte, then the rest. Mode % 4 = 0 or 1: the rest is the token. 2 or 3: the
//! rest is `header JSON \n payload JSON`, signed with the ES256 key (2) or the HS256 secret (3).

#![no_main]

use flowwarden_fuzz::{NOW, Signer, fixture};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let fx = fixture();
    let token = match mode % 4 {
        0 | 1 => String::from_utf8_lossy(rest).into_owned(),
        m => {
            let (header, payload) = match rest.iter().position(|&b| b == b'\n') {
                Some(i) => (&rest[..i], &rest[i + 1..]),
                None => (rest, &[][..]),
            };
            let signer = if m == 2 { Signer::Es256 } else { Signer::Hs256 };
            fx.sign(signer, header, payload)
        }
    };
    match fx.verifier.verify(&token, NOW) {
        Ok(identity) => fx.check_accepted(&token, &identity),
        Err(rejection) => {
            assert!(!rejection.code().is_empty());
            // Short texts can coincide with a fixed message; a token with its three parts
            // cannot (an echoed alg is shorter than the header that carries it).
            if token.len() >= 24 && token.matches('.').count() >= 2 {
                assert!(
                    !rejection.to_string().contains(&token),
                    "a rejection carries the token: {rejection}"
                );
            }
        }
    }
});
