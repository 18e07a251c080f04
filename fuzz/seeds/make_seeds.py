#!/usr/bin/env python3
"""Writes the committed seed corpora under fuzz/corpus/<target>/ (run from anywhere).

Seeds are meaningful starting points, not a grown corpus: valid tokens signed with the fuzz
fixture's fixed key and secret (fuzz/src/lib.rs), each status-socket method as documented in
docs/status-socket.md, policies/example.toml, and well-formed admission requests. Needs the
`cryptography` package for the ES256 signatures (ECDSA signatures are randomised, so a rerun
rewrites the ES256 seeds with different but equally valid bytes).
"""

import base64
import hashlib
import hmac
import json
import pathlib
import re

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

ROOT = pathlib.Path(__file__).resolve().parents[2]
CORPUS = ROOT / "fuzz" / "corpus"

# Must match fuzz/src/lib.rs.
NOW = 1_800_000_000
ES_ISSUER = "https://idp.flowwarden.dev"
HS_ISSUER = "https://hs.fuzz.flowwarden.dev"
AUDIENCE = "flowwarden"
HS_SECRET = b"flowwarden-fuzz-hs256-secret-0123456789"
KID = "fuzz-es256"
SEED = bytes.fromhex("00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff")


def fixed_key():
    text = (ROOT / "fuzz" / "src" / "lib.rs").read_text()
    pem = re.search(r"-----BEGIN PRIVATE KEY-----.*?-----END PRIVATE KEY-----", text, re.S)
    return serialization.load_pem_private_key(pem.group(0).encode(), password=None)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def compact(obj) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def sign(alg: str, header: bytes, payload: bytes) -> str:
    signed = f"{b64(header)}.{b64(payload)}"
    if alg == "ES256":
        der = fixed_key().sign(signed.encode(), ec.ECDSA(hashes.SHA256()))
        r, s = decode_dss_signature(der)
        sig = r.to_bytes(32, "big") + s.to_bytes(32, "big")
    else:
        sig = hmac.new(HS_SECRET, signed.encode(), hashlib.sha256).digest()
    return f"{signed}.{b64(sig)}"


def claims(iss: str, sub: str, **extra) -> dict:
    c = {"iss": iss, "aud": AUDIENCE, "sub": sub, "iat": NOW, "exp": NOW + 3600}
    c.update(extra)
    return c


def write(target: str, name: str, data: bytes) -> None:
    path = CORPUS / target / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def tokens() -> dict:
    es_header = compact({"alg": "ES256", "kid": KID, "typ": "JWT"})
    hs_header = compact({"alg": "HS256", "typ": "JWT"})
    alice = compact(claims(ES_ISSUER, "alice", email="alice@corp.example", groups=["ops"],
                           nbf=NOW - 5, device_id="laptop-17", device_managed=True,
                           device_compliant="true", device_os="linux", amr=["hwk"]))
    bob = compact(claims(HS_ISSUER, "bob", aud=["other", AUDIENCE], groups="platform-admins",
                         exp=NOW + 60.5))
    return {
        "es256-valid": sign("ES256", es_header, alice),
        "hs256-valid": sign("HS256", hs_header, bob),
        "alg-none": f"{b64(compact({'alg': 'none'}))}.{b64(alice)}.",
        # HS256 over an ES256 issuer's claims: algorithm confusion must find no key.
        "alg-confusion": sign("HS256", compact({"alg": "HS256", "kid": KID}), alice),
        "bad-signature": sign("ES256", es_header, alice)[:-8] + "AAAAAAAA",
        "es256-expired": sign("ES256", es_header,
                              compact(claims(ES_ISSUER, "alice", exp=NOW - 3600))),
    }


def token_seeds() -> None:
    for i, (name, tok) in enumerate(tokens().items()):
        # Mode byte 0 or 1: the rest is the token as sent.
        write("token", f"raw-{name}", bytes([i % 2]) + tok.encode())
    # Mode 2 (signed with the ES256 key) and 3 (HS256): header JSON, newline, payload JSON.
    signed = {
        "es256-claims": (2, {"alg": "ES256", "kid": KID},
                         claims(ES_ISSUER, "carol", groups=["dev", 7], device_managed=False,
                                nbf=NOW + 10, exp=NOW + 1e3)),
        "es256-crit": (2, {"alg": "ES256", "crit": ["exp"]}, claims(ES_ISSUER, "carol")),
        "hs256-claims": (3, {"alg": "HS256"},
                         claims(HS_ISSUER, "dave", aud=["x", AUDIENCE], device_id=42)),
        "hs256-wrong-issuer": (3, {"alg": "HS256"}, claims(ES_ISSUER, "mallory")),
        "hs256-missing-sub": (3, {"alg": "HS256"}, {"iss": HS_ISSUER, "aud": AUDIENCE,
                                                    "exp": NOW + 10}),
    }
    for name, (mode, header, payload) in signed.items():
        write("token", name, bytes([mode]) + compact(header) + b"\n" + compact(payload))


def jsonrpc_seeds() -> None:
    doc = (ROOT / "docs" / "status-socket.md").read_text()
    requests = re.findall(r'^\{"jsonrpc":"2\.0","id":[^\n]*"method":[^\n]*$', doc, re.M)
    seen = {}
    for line in requests:
        method = json.loads(line)["method"]
        seen[method] = seen.get(method, 0) + 1
        name = method if seen[method] == 1 else f"{method}-{seen[method]}"
        write("jsonrpc", f"doc-{name}", line.encode() + b"\n")
    others = {
        "notification": '{"jsonrpc":"2.0","method":"sessions.terminate","params":{"ids":[]}}',
        "batch": '[{"jsonrpc":"2.0","id":1,"method":"status"}]',
        "positional": '{"jsonrpc":"2.0","id":"a","method":"sessions.get",'
                      '"params":["5e55100000000001"]}',
        "whois-v6": '{"jsonrpc":"2.0","id":null,"method":"whois","params":'
                    '{"a":"[fd00::7]:51514","b":"[fd00::2]:22","protocol":"udp"}}',
        "not-json": '{"jsonrpc":"2.0",,}',
    }
    for name, line in others.items():
        write("jsonrpc", name, line.encode() + b"\n")


def policy_seeds() -> None:
    example = (ROOT / "policies" / "example.toml").read_bytes()
    write("policy", "example", example)
    split = (b'[[resource]]\nname = "web"\nprotocol = "tcp"\nports = ["8000-8010"]\n'
             b'destinations = ["10.0.0.0/8", "10.1.0.0/16"]\n'
             b'[[resource]]\nname = "dns"\nprotocol = "udp"\nports = [53]\n'
             b'destinations = ["10.1.2.0/24"]\n'
             b'\n#---\n'
             b'[[rule]]\nname = "everyone-web"\nresources = ["web", "dns"]\neveryone = true\n'
             b'sources = ["10.0.0.0/8"]\n[rule.session]\nidle_timeout = "90s"\n'
             b'\n#---\n'
             b'[[rule]]\nname = "ops"\nresources = ["web"]\nusers = ["BOB"]\n'
             b'claims = { acr = "phr" }\n[rule.device]\nos = ["linux"]\n')
    write("policy", "three-files", split)
    write("policy", "overlap", b'[[resource]]\nname = "a"\nprotocol = "tcp"\nports = [22]\n'
                               b'[[resource]]\nname = "b"\nprotocol = "tcp"\nports = ["20-30"]\n')


def reconnect_token(session: str, counter: int, secs: int) -> str:
    body = f"fwr1.{session}.{counter}.{secs}"
    return f"{body}.{b64(hmac.new(SEED, body.encode(), hashlib.sha256).digest())}"


def admission_seeds() -> None:
    def request(method: str, path: str, headers: list, body: bytes = b"") -> bytes:
        lines = [f"{method} {path} HTTP/1.1", "Host: agent:7443", *headers,
                 f"Content-Length: {len(body)}", "", ""]
        return "\r\n".join(lines).encode() + body

    tok = tokens()
    write("admission", "admit-es256", request("POST", "/v1/sessions",
                                              [f"Authorization: Bearer {tok['es256-valid']}"]))
    write("admission", "admit-expired", request("POST", "/v1/sessions",
                                                [f"authorization: bearer {tok['es256-expired']}"]))
    write("admission", "reconnect", request(
        "POST", "/v1/sessions/reconnect",
        [f"Authorization: Reconnect {reconnect_token('5e55100000000001', 1, NOW)}"]))
    write("admission", "pipelined",
          request("GET", "/v1/sessions", []) + request("POST", "/metrics", [])
          + request("POST", "/v1/sessions", ["Authorization: Basic YWxpY2U6cHc="], b"{}"))
    write("admission", "chunked",
          b"POST /v1/sessions HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n"
          b"Authorization: Bearer " + tok["hs256-valid"].encode() + b"\r\n\r\n"
          b"4\r\nabcd\r\n0\r\n\r\n")


def main() -> None:
    token_seeds()
    jsonrpc_seeds()
    policy_seeds()
    admission_seeds()


if __name__ == "__main__":
    main()
