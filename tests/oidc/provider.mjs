// A real OpenID provider (panva/oidc-provider, OpenID Certified) for flowwarden's acceptance
// tests: HTTPS with the certificate the test made from its private CA, JWT access tokens
// (client_credentials + resource indicators) with nested posture claims, and one fresh EC key
// per start under the kid the test names, so that a restart rotates the key with a new kid
// or under the same one.
//
// usage: node provider.mjs PORT CERT_PEM KEY_PEM KID
import { generateKeyPairSync } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { createServer } from 'node:https';

import Provider from 'oidc-provider';

const [port, certFile, keyFile, kid] = process.argv.slice(2);
const issuer = `https://127.0.0.1:${port}`;
const { privateKey } = generateKeyPairSync('ec', { namedCurve: 'P-256' });
const signingKey = { ...privateKey.export({ format: 'jwk' }), kid, use: 'sig', alg: 'ES256' };

const provider = new Provider(issuer, {
  clients: [{
    client_id: 'laptop-7',
    client_secret: 'acceptance-test-secret-not-for-production',
    grant_types: ['client_credentials'],
    redirect_uris: [],
    response_types: [],
    id_token_signed_response_alg: 'ES256',
  }],
  jwks: { keys: [signingKey] },
  features: {
    devInteractions: { enabled: false },
    clientCredentials: { enabled: true },
    resourceIndicators: {
      enabled: true,
      defaultResource: () => 'urn:flowwarden:agent',
      useGrantedResource: () => true,
      getResourceServerInfo: () => ({
        scope: 'ssh',
        audience: 'flowwarden',
        accessTokenFormat: 'jwt',
        accessTokenTTL: 600,
        jwt: { sign: { alg: 'ES256' } },
      }),
    },
  },
  // Where real providers put posture and groups: a nested object and a namespaced name.
  extraTokenClaims: () => ({
    device: { id: 'laptop-7', managed: true, compliant: true, os: 'linux' },
    'https://corp.example/claims/groups': ['ops'],
  }),
});

createServer({ cert: readFileSync(certFile), key: readFileSync(keyFile) }, provider.callback())
  .listen(Number(port), '127.0.0.1', () => console.log(`ready ${issuer}`));
