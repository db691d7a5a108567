// The BullMQ peer of citadel's burn-down benchmark (tests/bench.rs runs it;
// `npm ci` in this folder installs the pinned version).
//
//   node bullmq_burn.js enqueue PORT JOBS       # pre-enqueue JOBS no-op jobs
//   node bullmq_burn.js work PORT JOBS CONC     # one Worker, concurrency CONC
//
// `work` prints one line, `bullmq: N jobs in S s, cpu C s`, timed from the
// Worker's creation to its N-th `completed` event (C: this process's user +
// system CPU over the same time), and exits. Default job options:
// completed jobs are kept (as citadel keeps a status hash per job).
'use strict';
const { Queue, Worker } = require('bullmq');

const [mode, port, jobsArg, concArg] = process.argv.slice(2);
const connection = { host: '127.0.0.1', port: Number(port) };
const jobs = Number(jobsArg);
const name = 'bench';

async function enqueue() {
  const queue = new Queue(name, { connection });
  for (let i = 0; i < jobs; i += 1000) {
    const batch = [];
    for (let j = i; j < Math.min(i + 1000, jobs); j++) {
      batch.push({ name: 'echo', data: { n: 1 } });
    }
    await queue.addBulk(batch);
  }
  await queue.close();
}

async function work() {
  let done = 0;
  const t0 = process.hrtime.bigint();
  const cpu0 = process.cpuUsage();
  await new Promise((resolve, reject) => {
    const worker = new Worker(name, async () => ({ n: 1 }), {
      connection,
      concurrency: Number(concArg),
    });
    worker.on('error', reject);
    worker.on('completed', () => {
      done += 1;
      if (done === jobs) {
        const secs = Number(process.hrtime.bigint() - t0) / 1e9;
        const used = process.cpuUsage(cpu0);
        const cpu = (used.user + used.system) / 1e6;
        console.log(`bullmq: ${jobs} jobs in ${secs.toFixed(3)} s, cpu ${cpu.toFixed(3)} s`);
        worker.close().then(resolve, reject);
      }
    });
  });
}

const run = { enqueue, work }[mode];
if (!run || !Number.isFinite(jobs) || jobs <= 0) {
  console.error('usage: bullmq_burn.js enqueue|work PORT JOBS [CONCURRENCY]');
  process.exit(2);
}
run().then(
  () => process.exit(0),
  (e) => {
    console.error(`bullmq_burn: ${e && e.stack ? e.stack : e}`);
    process.exit(1);
  },
);
