// A real OpenID provider (panva/oidc-provider, OpenID Certified) for flowwarden's acceptance
// tests: HTTPS with the certificate the test made from its private CA, JWT access tokens
// (client_credentials + resource indicators) with nested posture claims, and one fresh EC key
// per start under the kid the test names, so that a restart rotates the key with a new kid
// or under the same one.
//
// usage: node provider.mjs PORT CERT_PEM KEY_PEM KID
//
// With CONSOLE_REDIRECT_URI set, it also serves the web console's sign-in: a public client
// `flowwarden-console` (authorization code + PKCE), a login page a browser fills in (any
// account name; its groups come from CONSOLE_ACCOUNTS below), and no consent step for that
// first-party client.
import { generateKeyPairSync } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { createServer } from 'node:https';

import Provider from 'oidc-provider';

const [port, certFile, keyFile, kid] = process.argv.slice(2);
const issuer = `https://127.0.0.1:${port}`;
const { privateKey } = generateKeyPairSync('ec', { namedCurve: 'P-256' });
const signingKey = { ...privateKey.export({ format: 'jwk' }), kid, use: 'sig', alg: 'ES256' };

const consoleRedirect = process.env.CONSOLE_REDIRECT_URI;
const CONSOLE_CLIENT = 'flowwarden-console';
// The console's administrators: their groups claim decides admin or read-only.
const CONSOLE_ACCOUNTS = {
  'admin@corp.example': ['flowwarden-console-admins'],
  'reader@corp.example': ['flowwarden-console-readers'],
};
const consoleClients = consoleRedirect ? [{
  client_id: CONSOLE_CLIENT,
  token_endpoint_auth_method: 'none',
  grant_types: ['authorization_code'],
  response_types: ['code'],
  redirect_uris: [consoleRedirect],
  id_token_signed_response_alg: 'ES256',
}] : [];

const provider = new Provider(issuer, {
  clients: [...consoleClients, {
    client_id: 'laptop-7',
    client_secret: 'acceptance-test-secret-not-for-production',
    grant_types: ['client_credentials'],
    redirect_uris: [],
    response_types: [],
    id_token_signed_response_alg: 'ES256',
  }],
  jwks: { keys: [signingKey] },
  claims: { openid: ['sub'], email: ['email', 'email_verified'], groups: ['groups'] },
  // The console reads email and groups from the ID token itself.
  conformIdTokenClaims: false,
  findAccount: (ctx, id) => ({
    accountId: id,
    claims: () => ({ sub: id, email: id, email_verified: true, groups: CONSOLE_ACCOUNTS[id] ?? ['ops'] }),
  }),
  // A first-party client: its grant is made here instead of asking for consent.
  loadExistingGrant: async (ctx) => {
    const grantId = ctx.oidc.result?.consent?.grantId
      || ctx.oidc.session.grantIdFor(ctx.oidc.client.clientId);
    if (grantId) return ctx.oidc.provider.Grant.find(grantId);
    if (ctx.oidc.client.clientId !== CONSOLE_CLIENT) return undefined;
    const grant = new ctx.oidc.provider.Grant({
      clientId: CONSOLE_CLIENT,
      accountId: ctx.oidc.session.accountId,
    });
    grant.addOIDCScope('openid email groups');
    grant.addOIDCClaims(['email', 'email_verified', 'groups']);
    await grant.save();
    return grant;
  },
  features: {
    devInteractions: { enabled: false },
    clientCredentials: { enabled: true },
    resourceIndicators: {
      enabled: true,
      defaultResource: (ctx, client) => (client?.clientId === CONSOLE_CLIENT ? undefined : 'urn:flowwarden:agent'),
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

// The console's login page: a form a browser fills in with an account name.
async function interaction(req, res) {
  const details = await provider.interactionDetails(req, res);
  if (req.method === 'GET') {
    res.writeHead(200, { 'content-type': 'text/html; charset=utf-8' });
    res.end(`<!DOCTYPE html><html><head><title>Sign in</title></head><body>
<h1>Acceptance IdP: sign in</h1>
<form method="post" action="/interaction/${details.uid}">
<label>Account <input name="login" autofocus></label>
<button type="submit" id="idp-sign-in">Sign in</button></form></body></html>`);
    return;
  }
  let body = '';
  for await (const chunk of req) body += chunk;
  const login = new URLSearchParams(body).get('login');
  if (!login) {
    res.writeHead(400);
    res.end('login is required');
    return;
  }
  await provider.interactionFinished(req, res, { login: { accountId: login } },
    { mergeWithLastSubmission: false });
}

const callback = provider.callback();
createServer({ cert: readFileSync(certFile), key: readFileSync(keyFile) }, (req, res) => {
  if (consoleRedirect && req.url.startsWith('/interaction/')) {
    interaction(req, res).catch((e) => { res.writeHead(400); res.end(String(e)); });
    return;
  }
  callback(req, res);
})
  .listen(Number(port), '127.0.0.1', () => console.log(`ready ${issuer}`));
