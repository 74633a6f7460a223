// Node baseline for bench/bench_echo.py: a `cluster` echo server.
//
// The primary forks WORKERS workers (default 1, for per-core comparisons: mpnet is run with
// --workers 1); each worker runs `net.createServer` and writes every chunk straight back, like
// bench/echo_raw.py does for mpnet and bench/baseline_echo.py for uvloop.  Everything else is
// Node's default: the cluster's scheduling policy (round-robin on Linux: the primary accepts
// every connection and hands it to a worker over IPC; NODE_CLUSTER_SCHED_POLICY=none lets the
// workers accept on the shared socket themselves), Nagle's algorithm left on, allowHalfOpen off.
//
// Usage:
//
//     node bench/node_echo.js PORT [WORKERS] [HOST]
//
// The primary prints "listening PORT WORKERS" once every worker listens.  SIGTERM or SIGINT to
// the primary stops the workers (SIGTERM, by PID) and then the primary; a worker that dies on
// its own is not replaced: the primary logs it and, when none is left, exits with status 1.
"use strict";

const cluster = require("node:cluster");
const net = require("node:net");

const port = Number.parseInt(process.argv[2] ?? "", 10);
const workers = Number.parseInt(process.argv[3] ?? "1", 10);
const host = process.argv[4] ?? "127.0.0.1";
if (!Number.isInteger(port) || port < 0 || port > 65535 || !(workers >= 1)) {
  console.error("usage: node node_echo.js PORT [WORKERS] [HOST]");
  process.exit(2);
}

if (cluster.isPrimary) {
  let stopping = false;
  let listening = 0;
  cluster.on("listening", () => {
    listening += 1;
    if (listening === workers) {
      console.log(`listening ${port} ${workers} (scheduling: ${cluster.schedulingPolicy === cluster.SCHED_RR ? "rr" : "none"})`);
    }
  });
  cluster.on("exit", (worker, code, signal) => {
    if (!stopping) {
      console.error(`worker ${worker.process.pid} exited (code ${code}, signal ${signal})`);
    }
    if (Object.keys(cluster.workers).length === 0) {
      process.exit(stopping ? 0 : 1);
    }
  });
  const stop = () => {
    if (stopping) return;
    stopping = true;
    const alive = Object.values(cluster.workers);
    if (alive.length === 0) process.exit(0);
    for (const worker of alive) {
      worker.process.kill("SIGTERM");
    }
  };
  process.on("SIGTERM", stop);
  process.on("SIGINT", stop);
  for (let i = 0; i < workers; i += 1) {
    cluster.fork();
  }
} else {
  const server = net.createServer((sock) => {
    sock.on("data", (chunk) => {
      sock.write(chunk);
    });
    // Without a listener an ECONNRESET would be an uncaught 'error' and end the worker.
    sock.on("error", () => sock.destroy());
  });
  server.listen({ port, host, backlog: 1024 });
  // SIGTERM from the primary: stop at once (in-flight echoes do not matter to the benchmark).
  process.on("SIGTERM", () => process.exit(0));
}
