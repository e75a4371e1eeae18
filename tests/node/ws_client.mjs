#!/usr/bin/env node
// An independent WebSocket client for shardproxy's integration tests: Node's
// `ws` package, run against a proxy in front of an echo backend.
//
//   node ws_client.mjs URL              the fixed conversation below, on one connection
//   node ws_client.mjs URL --count N    N concurrent connections, each one short text echo
//
// Prints one JSON line per check ({"check": NAME, "ok": BOOL, ...}), then a
// summary line {"ok": BOOL, ...}. Exits 0 if every check passed, 1 if one
// failed, 2 on bad usage or when the overall timeout fired.

import { randomBytes } from "node:crypto";
import { readFileSync } from "node:fs";
import WebSocket from "ws";

const OVERALL_TIMEOUT_MS = 20_000;
const STEP_TIMEOUT_MS = 10_000;
const BURST = 50;
const CLOSE_CODE = 4100;
const CLOSE_REASON = "node bye";

const started = Date.now();
const checks = [];
const sent = { messages: 0, text: 0, binary: 0, bytes: 0 };
const received = { messages: 0, text: 0, binary: 0, bytes: 0 };

function emit(obj) {
  process.stdout.write(`${JSON.stringify(obj)}\n`);
}

function check(name, ok, details = {}) {
  const line = { check: name, ok: Boolean(ok), ...details };
  checks.push(line);
  emit(line);
  if (!ok) throw new CheckFailed(name, details.error ?? "check failed");
}

class CheckFailed extends Error {
  constructor(name, message) {
    super(`${name}: ${message}`);
    this.check = name;
  }
}

function wsVersion() {
  try {
    const url = new URL("./node_modules/ws/package.json", import.meta.url);
    return JSON.parse(readFileSync(url, "utf8")).version;
  } catch {
    return null;
  }
}

function summary(ok, extra = {}) {
  emit({
    ok,
    checks: checks.length,
    failed: checks.filter((c) => !c.ok).map((c) => c.check),
    sent,
    received,
    node: process.version,
    ws: wsVersion(),
    elapsed_ms: Date.now() - started,
    ...extra,
  });
}

function withTimeout(promise, what, ms = STEP_TIMEOUT_MS) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms waiting for ${what}`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

/** One connection: messages queued in arrival order, plus its close and errors. */
class Conn {
  constructor(url) {
    this.url = url;
    this.inbox = [];
    this.waiters = [];
    this.pongs = [];
    this.pongWaiters = [];
    this.errors = [];
    this.closeInfo = null;
    this.localPort = null;
    this.ws = new WebSocket(url, { perMessageDeflate: false, maxPayload: 64 << 20 });
    this.ws.on("upgrade", (res) => {
      this.localPort = res.socket?.localPort ?? null;
    });
    this.ws.on("message", (data, isBinary) => {
      const msg = { data, isBinary };
      received.messages += 1;
      received[isBinary ? "binary" : "text"] += 1;
      received.bytes += data.length;
      const w = this.waiters.shift();
      if (w) w.resolve(msg);
      else this.inbox.push(msg);
    });
    this.ws.on("pong", (data) => {
      const w = this.pongWaiters.shift();
      if (w) w.resolve(data);
      else this.pongs.push(data);
    });
    this.ws.on("error", (err) => {
      this.errors.push(String(err?.message ?? err));
    });
    this.closed = new Promise((resolve) => {
      this.ws.on("close", (code, reason) => {
        this.closeInfo = { code, reason: reason.toString("utf8") };
        const why = new Error(
          `connection closed (code ${code}${this.errors.length ? `, ${this.errors[0]}` : ""})`,
        );
        for (const w of [...this.waiters.splice(0), ...this.pongWaiters.splice(0)]) w.reject(why);
        resolve(this.closeInfo);
      });
    });
    this.opened = new Promise((resolve, reject) => {
      this.ws.once("open", resolve);
      this.ws.once("close", (code) =>
        reject(new Error(`closed before open (code ${code}): ${this.errors.join("; ")}`)),
      );
      this.ws.once("unexpected-response", (_req, res) => {
        this.errors.push(`HTTP ${res.statusCode} instead of 101`);
        res.resume();
        this.ws.terminate();
      });
    });
    this.opened.catch(() => {}); // reported by whoever awaits it
  }

  send(data) {
    const isBinary = typeof data !== "string";
    sent.messages += 1;
    sent[isBinary ? "binary" : "text"] += 1;
    sent.bytes += isBinary ? data.length : Buffer.byteLength(data);
    this.ws.send(data, { binary: isBinary });
  }

  next(what) {
    if (this.inbox.length) return Promise.resolve(this.inbox.shift());
    if (this.closeInfo) {
      return Promise.reject(new Error(`connection closed (code ${this.closeInfo.code})`));
    }
    return withTimeout(
      new Promise((resolve, reject) => this.waiters.push({ resolve, reject })),
      what,
    );
  }

  nextPong() {
    if (this.pongs.length) return Promise.resolve(this.pongs.shift());
    return withTimeout(
      new Promise((resolve, reject) => this.pongWaiters.push({ resolve, reject })),
      "a pong",
    );
  }
}

function describe(buf) {
  return `${buf.length} bytes`;
}

async function step(name, fn) {
  const t0 = Date.now();
  let details;
  try {
    details = (await fn()) ?? {};
  } catch (err) {
    if (err instanceof CheckFailed) throw err;
    check(name, false, { ms: Date.now() - t0, error: String(err?.message ?? err) });
  }
  const { ok = true, ...rest } = details;
  check(name, ok, { ms: Date.now() - t0, ...rest });
}

async function echoText(conn, name, text) {
  await step(name, async () => {
    conn.send(text);
    const { data, isBinary } = await conn.next(`the echo of ${JSON.stringify(text)}`);
    const got = data.toString("utf8");
    const ok = !isBinary && got === text;
    return { ok, sent: text, got, binary: isBinary, ...(ok ? {} : { error: "echo differs" }) };
  });
}

async function echoBinary(conn, name, size) {
  await step(name, async () => {
    const payload = randomBytes(size);
    conn.send(payload);
    const { data, isBinary } = await conn.next(`the echo of ${size} binary bytes`);
    const same = isBinary && Buffer.isBuffer(data) && data.equals(payload);
    let error;
    if (!isBinary) error = "echo came back as text";
    else if (!same) {
      let at = 0;
      while (at < Math.min(data.length, payload.length) && data[at] === payload[at]) at += 1;
      error = `echo differs: got ${describe(data)}, first difference at byte ${at}`;
    }
    return { ok: same, bytes: size, got_bytes: data.length, ...(error ? { error } : {}) };
  });
}

async function conversation(url) {
  const conn = new Conn(url);
  await step("open", async () => {
    await withTimeout(conn.opened, "the handshake");
    return { url, local_port: conn.localPort, protocol: conn.ws.protocol };
  });

  await echoText(conn, "text-echo-ascii", "hello through shardproxy");
  await echoText(conn, "text-echo-non-ascii", "héllo wörld — ünïcödé, 你好, Привет, 🌍🚀 ✓");
  await echoBinary(conn, "binary-echo-100KiB", 100 * 1024);
  await echoBinary(conn, "binary-echo-5MiB", 5 * 1024 * 1024);

  await step("ping-pong", async () => {
    const payload = Buffer.from(`node-ping-${randomBytes(8).toString("hex")}`);
    conn.ws.ping(payload);
    const pong = await conn.nextPong();
    const ok = pong.equals(payload);
    return {
      ok,
      sent: payload.toString(),
      got: pong.toString(),
      ...(ok ? {} : { error: "pong payload differs from the ping's" }),
    };
  });

  await step(`burst-${BURST}-in-order`, async () => {
    const texts = Array.from(
      { length: BURST },
      (_, i) => `burst ${i} ${randomBytes(4).toString("hex")}`,
    );
    for (const t of texts) conn.send(t); // back to back, no waiting
    const got = [];
    for (let i = 0; i < BURST; i += 1) {
      const { data, isBinary } = await conn.next(`burst echo ${i} of ${BURST}`);
      got.push(isBinary ? `<binary ${data.length}>` : data.toString("utf8"));
    }
    const bad = got.findIndex((g, i) => g !== texts[i]);
    return {
      ok: bad === -1,
      messages: BURST,
      ...(bad === -1
        ? {}
        : { error: `echo ${bad} is ${JSON.stringify(got[bad])}, sent ${JSON.stringify(texts[bad])}` }),
    };
  });

  await step("close", async () => {
    conn.ws.close(CLOSE_CODE, CLOSE_REASON);
    const { code, reason } = await withTimeout(conn.closed, "the close handshake");
    const ok = code === CLOSE_CODE;
    return {
      ok,
      sent_code: CLOSE_CODE,
      sent_reason: CLOSE_REASON,
      code,
      reason,
      unexpected_messages: conn.inbox.length,
      ...(ok ? {} : { error: `got close code ${code}, expected ${CLOSE_CODE} echoed back` }),
    };
  });
  return { close: conn.closeInfo, local_port: conn.localPort };
}

async function concurrent(url, count) {
  const one = async (i) => {
    const conn = new Conn(url);
    try {
      await withTimeout(conn.opened, `the handshake of connection ${i}`);
      const text = `concurrent ${i} ${randomBytes(4).toString("hex")}`;
      conn.send(text);
      const { data, isBinary } = await conn.next(`the echo on connection ${i}`);
      if (isBinary || data.toString("utf8") !== text) {
        throw new Error(`connection ${i}: echo differs`);
      }
      conn.ws.close(1000, "done");
      const { code } = await withTimeout(conn.closed, `the close of connection ${i}`);
      if (code !== 1000) throw new Error(`connection ${i}: close code ${code}, expected 1000`);
      return conn.localPort;
    } catch (err) {
      conn.ws.terminate();
      throw err;
    }
  };
  await step(`concurrent-${count}`, async () => {
    const results = await Promise.allSettled(Array.from({ length: count }, (_, i) => one(i)));
    const failed = results.filter((r) => r.status === "rejected");
    const errors = [...new Set(failed.map((r) => String(r.reason?.message ?? r.reason)))];
    return {
      ok: failed.length === 0,
      connections: count,
      succeeded: count - failed.length,
      failed: failed.length,
      ...(failed.length
        ? { error: `${failed.length} of ${count} failed`, errors: errors.slice(0, 10) }
        : {}),
    };
  });
  return {};
}

function usage(msg) {
  emit({ ok: false, error: `${msg}; usage: ws_client.mjs URL [--count N]` });
  process.exit(2);
}

const [url, ...rest] = process.argv.slice(2);
if (!url || !/^wss?:\/\//.test(url)) usage("need a ws:// URL");
let count = null;
if (rest.length) {
  if (rest[0] !== "--count" || rest.length !== 2 || !/^[1-9]\d*$/.test(rest[1])) {
    usage(`bad arguments ${JSON.stringify(rest)}`);
  }
  count = Number(rest[1]);
}

const overall = setTimeout(() => {
  summary(false, { error: `overall timeout of ${OVERALL_TIMEOUT_MS} ms` });
  process.exit(2);
}, OVERALL_TIMEOUT_MS);

try {
  const extra = count === null ? await conversation(url) : await concurrent(url, count);
  clearTimeout(overall);
  summary(true, { mode: count === null ? "conversation" : "concurrent", ...extra });
  process.exit(0);
} catch (err) {
  clearTimeout(overall);
  summary(false, { error: String(err?.message ?? err) });
  process.exit(1);
}
