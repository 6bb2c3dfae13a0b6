// A connected PM2 client for the benchmark: one JSON command per stdin line, one reply per
// command on stdout, prefixed with "@@bench " (PM2 may print its own lines in between).
//
//   PM2_MODULE=/path/to/node_modules/pm2 PM2_HOME=/tmp/x node bench/pm2_client.js
//
// Commands: {"op": "start", "apps": [...]} | {"op": "restart", "name": N} |
//           {"op": "list"} | {"op": "kill"}
// Going through PM2's own API from a live connection measures the daemon, not the start-up of
// a `pm2` CLI process (about 0.3 s of Node.js start per command).
'use strict';

const readline = require('readline');
const pm2 = require(process.env.PM2_MODULE);

function reply(id, error, result) {
  const message = { id, ok: !error, error: error ? String(error.message || error) : null, result };
  process.stdout.write('@@bench ' + JSON.stringify(message) + '\n');
}

function summary(list) {
  return list.map((proc) => ({ name: proc.name, pid: proc.pid, status: proc.pm2_env.status }));
}

const operations = {
  start: (command, done) => pm2.start({ apps: command.apps }, (error) => done(error)),
  restart: (command, done) => pm2.restart(command.name, (error) => done(error)),
  list: (command, done) => pm2.list((error, list) => done(error, error ? null : summary(list))),
  kill: (command, done) => pm2.killDaemon((error) => done(error)),
};

pm2.connect((error) => {
  if (error) {
    reply(0, error);
    process.exit(1);
  }
  reply(0, null, { ready: true });
  const input = readline.createInterface({ input: process.stdin });
  input.on('line', (line) => {
    const command = JSON.parse(line);
    const operation = operations[command.op];
    if (!operation) {
      reply(command.id, new Error('unknown op ' + command.op));
      return;
    }
    operation(command, (failure, result) => reply(command.id, failure, result));
  });
  input.on('close', () => {
    pm2.disconnect();
    process.exit(0);
  });
});
