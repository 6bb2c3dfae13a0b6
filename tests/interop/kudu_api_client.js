// Drives webjobsd with the `kudu-api` npm package (a third-party Kudu REST client) and prints
// what it saw as JSON. The one adaptation: kudu-api hard-codes
// https://{site}.scm.azurewebsites.net/ as its base URL, so `request.defaults` is wrapped to point
// it at KUDU_URL instead. Everything else is the library as published.
"use strict";

const request = require("request");
const originalDefaults = request.defaults;
request.defaults = (options) =>
  originalDefaults.call(request, { ...options, baseUrl: process.env.KUDU_URL });

const kudu = require("kudu-api")({
  website: "ignored",
  username: process.env.KUDU_USER,
  password: process.env.KUDU_PASSWORD,
});
const jobs = kudu.webjobs;

const call = (fn, ...args) =>
  new Promise((resolve, reject) =>
    fn(...args, (err, data, response) => (err ? reject(err) : resolve([data, response]))));

async function main() {
  const seen = {};
  const [uploaded] = await call(jobs.uploadTriggered, "interop-task", process.env.TASK_ZIP);
  seen.uploaded = uploaded.name;
  const [continuous] = await call(jobs.uploadContinuous, "interop-svc", process.env.SVC_SCRIPT);
  seen.continuous = continuous.name;
  const [all] = await call(jobs.listAll);
  seen.listed = all.map((job) => `${job.type}/${job.name}`);
  // Calls without a body answer (err, response): the response comes first here.
  const [runResponse] = await call(jobs.runTriggered, "interop-task", '"one two" three');
  seen.runStatus = runResponse.statusCode;
  seen.location = runResponse.headers.location;
  let history;
  for (let i = 0; i < 200; i++) {
    [history] = await call(jobs.listTriggeredHistory, "interop-task");
    if (history.runs.length && history.runs[0].status === "Success") break;
    await new Promise((r) => setTimeout(r, 50));
  }
  seen.historyStatus = history.runs[0].status;
  const [run] = await call(jobs.getTriggeredHistory, "interop-task", history.runs[0].id);
  seen.runTrigger = run.trigger;
  const [swagger] = await call(jobs.listTriggeredAsSwagger);
  seen.swaggerPaths = Object.keys(swagger.paths);
  await call(jobs.setContinuousSettings, "interop-svc", { stopping_wait_time: 3 });
  const [settings] = await call(jobs.getContinuousSettings, "interop-svc");
  seen.settings = settings;
  const [stopResponse] = await call(jobs.stopContinuous, "interop-svc");
  seen.stopStatus = stopResponse.statusCode;
  const [startResponse] = await call(jobs.startContinuous, "interop-svc");
  seen.startStatus = startResponse.statusCode;
  await call(jobs.deleteTriggered, "interop-task");
  await call(jobs.deleteContinuous, "interop-svc");
  const [after] = await call(jobs.listAll);
  seen.afterDelete = after.length;
  process.stdout.write(JSON.stringify(seen));
}

main().catch((err) => {
  process.stderr.write(String(err && err.stack ? err.stack : err));
  process.exit(1);
});
