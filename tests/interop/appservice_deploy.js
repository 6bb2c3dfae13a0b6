// Deploys a site zip to webjobsd with `azure-actions-appservice-rest`, the library of the GitHub
// `azure/webapps-deploy` action, exactly as the action calls it: a `Kudu` built from the SCM URL
// and Basic credentials of a publish profile, wrapped in a `KuduServiceUtility`, whose
// `deployUsingZipDeploy` (action v2) or `deployUsingOneDeploy` (action v3) posts the zip, polls
// the 202's Location itself until the record is finished, then reads the record and, for a failed
// one, prints its log entries (following `details_url`). Nothing in the library is changed.
//
//   node appservice_deploy.js zipdeploy ZIP
//   node appservice_deploy.js onedeploy ZIP [TYPE [CLEAN [RESTART [TARGET_PATH]]]]   ("" = unset)
//   node appservice_deploy.js probes
//
// Environment: SCM_URL (e.g. https://127.0.0.1:8443; the action builds `https://<publishUrl>`),
// SCM_USERNAME, SCM_PASSWORD; NODE_EXTRA_CA_CERTS for a self-signed certificate (what a user of
// the action would set too; ACTIONS_AZURE_REST_IGNORE_SSL_ERRORS=true would skip verification).
//
// Output: the library's own lines (console.log and @actions/core's `::debug::`/`::error::`
// workflow commands, which carry every poll's answer) on stdout, then ONE last line of JSON:
// {"operation", "ok", "id", "record" (GET /api/deployments/{id} through the library), "error",
// "elapsed_ms"}. Exit code 0 when the library reported success, 1 when it threw.
//
// The library polls every 5 s (`Kudu._getDeploymentDetailsFromPollURL`, a fixed `_sleep(5)` with
// no option to change it); its first poll follows the 202 at once, so a deployment that is over
// by then costs no wait at all. Nothing here shortens the interval: the timings a user of the
// action sees are the timings measured.
"use strict";

const { Kudu } = require("azure-actions-appservice-rest/Kudu/azure-app-kudu-service");
const {
  KuduServiceUtility,
} = require("azure-actions-appservice-rest/Utilities/KuduServiceUtility");

function kudu() {
  for (const name of ["SCM_URL", "SCM_USERNAME", "SCM_PASSWORD"]) {
    if (!process.env[name]) throw new Error(`${name} is not set`);
  }
  // The action passes the publish profile's userName/userPWD: Basic authentication.
  return new Kudu(process.env.SCM_URL.replace(/\/+$/, ""), {
    username: process.env.SCM_USERNAME,
    password: process.env.SCM_PASSWORD,
  });
}

// What the action passes as `customMessage` (its commit message and friends end up in the
// record's `message` as a JSON string).
const MESSAGE = { commitMessage: "deployed by the interoperability test" };

function unset(value) {
  return value === undefined || value === "" ? undefined : value;
}

async function deploy(service, operation, args) {
  const utility = new KuduServiceUtility(service);
  if (operation === "zipdeploy") {
    return utility.deployUsingZipDeploy(args[0], MESSAGE);
  }
  // deployUsingOneDeploy(packagePath, customMessage, targetPath, type, clean, restart)
  const [zip, type, clean, restart, targetPath] = args;
  return utility.deployUsingOneDeploy(
    zip,
    MESSAGE,
    unset(targetPath),
    unset(type),
    unset(clean),
    unset(restart),
  );
}

// The requests the action makes before deploying, through the library's own client (its
// headers: Basic auth and `Content-Type: application/json; charset=utf-8` on GETs). Each probe's
// outcome is reported on its own: `{ok, value}` or `{ok: false, error}`.
async function probes(service) {
  const client = service._client;
  const calls = {
    // Library 1.3.34's warm-up (`warmpUp`) is GET /api/settings; it swallows failures, so the
    // call it makes is made here directly to see the answer.
    settings: () => service.getAppSettings(),
    // 1.3.36+ warm up with GET /api/deployments?warmup=true instead (one request, no retries on
    // statuses); the 1.3.x the registry serves predates it, so it is sent here the same way.
    warmup: async () => {
      const uri = client.getRequestUri("/api/deployments", ["warmup=true"]);
      const options = { retriableErrorCodes: [], retriableStatusCodes: [], retryCount: 1 };
      const response = await client.beginRequest({ method: "GET", uri }, options);
      if (response.statusCode < 200 || response.statusCode > 299) throw response;
      return { statusCode: response.statusCode, body: response.body };
    },
    // The action reads the OS from here (a publish profile gives no other way to learn it).
    runtime: () => service.getAppRuntime(),
  };
  const seen = {};
  for (const [name, call] of Object.entries(calls)) {
    try {
      seen[name] = { ok: true, value: await call() };
    } catch (error) {
      seen[name] = { ok: false, error: describe(error) };
    }
  }
  return seen;
}

// The library throws Errors, strings, and raw responses (also wrapped: `Error(response)`).
function describe(error) {
  if (error instanceof Error) return error.message;
  if (typeof error === "string") return error;
  const { statusCode, body } = error || {};
  return JSON.stringify(statusCode ? { statusCode, body } : error);
}

async function main() {
  const [operation, ...args] = process.argv.slice(2);
  const service = kudu();
  const started = Date.now();
  const result = { operation, ok: false, id: null, record: null, error: null };
  try {
    if (operation === "probes") {
      result.probes = await probes(service);
      const failed = Object.keys(result.probes).filter((name) => !result.probes[name].ok);
      if (failed.length) throw new Error(`probes failed: ${failed.join(", ")}`);
    } else if (operation === "zipdeploy" || operation === "onedeploy") {
      if (!args[0]) throw new Error(`${operation} needs the path of a zip`);
      result.id = await deploy(service, operation, args);
      result.record = await service.getDeploymentDetails(result.id);
    } else {
      throw new Error(`unknown operation ${operation}: zipdeploy, onedeploy or probes`);
    }
    result.ok = true;
  } catch (error) {
    result.error = describe(error);
  }
  result.elapsed_ms = Date.now() - started;
  process.stdout.write(`\n${JSON.stringify(result)}\n`);
  process.exitCode = result.ok ? 0 : 1;
}

main();
