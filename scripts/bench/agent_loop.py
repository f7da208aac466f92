#!/usr/bin/env python3
"""The agent loop's own cost per step, and 100 concurrent runs (issue 13).

Real processes: `openclaw-server` with its embedded broker, an edge agent
`dev-a` whose `echo` plugin is the stub-speed tool, and a heavy node
(`openclaw-agent --board pc`) whose `llm` plugin uses the `openai` backend.
The model is the one part stubbed: a small OpenAI-compatible server in this
process that answers at once with a scripted reply (call `echo__dev-a`
K times, then answer), so model time is near zero and what is left is the
loop (storing steps, the prompt, reading and checking the reply, the tasks).

The loop's own cost is read from the server's own clock: the gap between
a task's `finished_ms` (its result reached the scheduler) and the next
task's `created_ms` (the run submitted the next step), over every step of
every run. The baseline, in the same session: the same number of `echo`
tasks submitted one after another over HTTP without a run.

  python3 scripts/bench/agent_loop.py AGENT_BIN_DIR [--server-bin DIR] [--runs 20]
      [--calls 5] [--concurrent 100]
"""
import argparse
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MODEL = "stub-planner"
TOOL = "echo__dev-a"


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


class Stub(BaseHTTPRequestHandler):
    """An OpenAI-compatible upstream that never thinks."""

    protocol_version = "HTTP/1.1"
    calls = 5
    served = 0
    lock = threading.Lock()

    def log_message(self, *a):
        pass

    def setup(self):
        super().setup()
        # Headers and body leave in one write with Nagle off: two small
        # writes would wait out the client's delayed ACK (~40 ms a reply).
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def reply(self, code, body):
        data = json.dumps(body).encode()
        head = (
            f"HTTP/1.1 {code} OK\r\ncontent-type: application/json\r\n"
            f"content-length: {len(data)}\r\n\r\n"
        ).encode()
        self.wfile.write(head + data)
        self.wfile.flush()

    def do_GET(self):
        self.reply(200, {"object": "list", "data": [{"id": MODEL, "object": "model"}]})

    def do_POST(self):
        n = int(self.headers.get("content-length", "0"))
        req = json.loads(self.rfile.read(n))
        done = sum(
            1
            for m in req.get("messages", [])
            if m.get("role") == "user" and m.get("content", "").startswith("Result of `")
        )
        if done < Stub.calls:
            text = json.dumps({"function": TOOL, "input": {"step": done}})
        else:
            text = json.dumps({"answer": f"done after {done} calls"})
        with Stub.lock:
            Stub.served += 1
        self.reply(
            200,
            {
                "id": "stub",
                "object": "chat.completion",
                "model": MODEL,
                "choices": [
                    {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
                ],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1},
            },
        )


class Api:
    def __init__(self, port):
        self.port = port
        self.local = threading.local()

    def conn(self):
        c = getattr(self.local, "c", None)
        if c is None:
            c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=900)
            self.local.c = c
        return c

    def call(self, method, path, body=None):
        for attempt in range(3):
            c = self.conn()
            try:
                data = None if body is None else json.dumps(body).encode()
                headers = {"content-type": "application/json"} if data else {}
                c.request(method, path, body=data, headers=headers)
                r = c.getresponse()
                raw = r.read()
                if r.status >= 300:
                    raise RuntimeError(f"{method} {path}: {r.status} {raw[:300]!r}")
                return json.loads(raw) if raw else None
            except (ConnectionError, http.client.HTTPException):
                self.local.c = None
                if attempt == 2:
                    raise
                time.sleep(0.05)


def wait_until(what, f, secs=120):
    end = time.time() + secs
    while time.time() < end:
        try:
            if f():
                return
        except Exception:
            pass
        time.sleep(0.1)
    sys.exit(f"timed out waiting for {what}")


def rss_kib(pid):
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "VmHWM"):
                out[k] = int(v.split()[0])
    return out


def run_once(api, calls):
    t0 = time.perf_counter()
    r = api.call(
        "POST",
        "/v1/agent/runs",
        {"goal": "Echo a few times, then say done.", "model": MODEL, "tools": ["echo"],
         "target": "dev-a", "max_steps": calls + 1, "timeout_ms": 600000},
    )
    while True:
        v = api.call("GET", f"/v1/agent/runs/{r['id']}?wait_ms=60000")
        if v["state"] not in ("running", "awaiting_approval"):
            break
    wall = time.perf_counter() - t0
    if v["state"] != "succeeded":
        raise RuntimeError(f"run {r['id']} ended {v['state']}: {v.get('error')}")
    return v, wall


def gaps(api, view):
    """Server-side loop cost: finished_ms of one step's task to created_ms
    of the next one's, for each pair of consecutive tasks of the run."""
    ids = []
    for s in view["steps"]:
        if s["kind"] in ("llm", "tool_call") and s.get("task_id"):
            ids.append(s["task_id"])
    tasks = [api.call("GET", f"/v1/tasks/{i}") for i in ids]
    out = []
    for a, b in zip(tasks, tasks[1:]):
        out.append(b["created_ms"] - a["finished_ms"])
    # The run's start and end: the run's own clock against its tasks.
    first = tasks[0]["created_ms"] - view["created_ms"]
    last = view["updated_ms"] - tasks[-1]["finished_ms"]
    return out, first, last, tasks


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("bin", help="directory of openclaw-agent (built with `llm`)")
    ap.add_argument("--server-bin", help="directory of openclaw-server (default: BIN)")
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--calls", type=int, default=5)
    ap.add_argument("--concurrent", type=int, default=100)
    a = ap.parse_args()
    Stub.calls = a.calls

    stub = ThreadingHTTPServer(("127.0.0.1", 0), Stub)
    stub.daemon_threads = True
    threading.Thread(target=stub.serve_forever, daemon=True).start()
    stub_url = f"http://127.0.0.1:{stub.server_address[1]}"

    work = tempfile.mkdtemp(prefix="openclaw-bench-agent.")
    mqtt, http_port = free_port(), free_port()
    with open(f"{work}/server.toml", "w") as f:
        f.write(
            f'[http]\nhost = "127.0.0.1"\nport = {http_port}\nauth = "off"\n'
            f'[mqtt]\nhost = "127.0.0.1"\nport = {mqtt}\n'
            f'[storage]\ndata_dir = "{work}/srv"\n'
        )
    with open(f"{work}/dev-a.toml", "w") as f:
        f.write("[agent]\nmax_concurrency = 64\nqueue_capacity = 256\n")
    with open(f"{work}/node.toml", "w") as f:
        f.write(
            "[agent]\nmax_concurrency = 64\nqueue_capacity = 256\n"
            f'[plugins.llm.models."{MODEL}"]\nbackend = "openai"\nhealth_interval_ms = 0\n'
            f'upstreams = [{{ url = "{stub_url}", max_concurrent = 128 }}]\n'
        )
    env = dict(os.environ, RUST_LOG=os.environ.get("RUST_LOG", "warn"))
    procs = []

    def spawn(args, log):
        p = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=open(f"{work}/{log}", "w"), env=env)
        procs.append(p)
        return p

    try:
        server = spawn([f"{a.server_bin or a.bin}/openclaw-server", "--config", f"{work}/server.toml"], "server.log")
        broker = f"mqtt://127.0.0.1:{mqtt}"
        spawn([f"{a.bin}/openclaw-agent", "--config", f"{work}/dev-a.toml", "--id", "dev-a",
               "--broker", broker, "--data-dir", f"{work}/dev-a", "--board", "sim"], "dev-a.log")
        spawn([f"{a.bin}/openclaw-agent", "--config", f"{work}/node.toml", "--id", "heavy",
               "--broker", broker, "--data-dir", f"{work}/heavy", "--board", "pc"], "heavy.log")
        api = Api(http_port)
        wait_until("the echo tool", lambda: any(t["name"] == TOOL for t in api.call("GET", "/v1/tools")["tools"]))
        wait_until("the model", lambda: any(m["id"] == MODEL for m in api.call("GET", "/v1/models")["data"]))

        # Warm up both paths.
        run_once(api, a.calls)
        t = api.call("POST", "/v1/tasks", {"plugin": "echo", "input": {"step": 0}, "target": "dev-a"})
        api.call("GET", f"/v1/tasks/{t['id']}?wait_ms=60000")

        # Baseline: the same tasks without a run, one after another.
        n_tasks = a.runs * (2 * a.calls + 1)
        t0 = time.perf_counter()
        for i in range(n_tasks):
            t = api.call("POST", "/v1/tasks", {"plugin": "echo", "input": {"step": i}, "target": "dev-a"})
            v = api.call("GET", f"/v1/tasks/{t['id']}?wait_ms=60000")
            assert v["state"] == "succeeded", v
        base = (time.perf_counter() - t0) / n_tasks

        # Runs one after another.
        all_gaps, firsts, lasts, walls, steps = [], [], [], [], 0
        for _ in range(a.runs):
            v, wall = run_once(api, a.calls)
            g, first, last, tasks = gaps(api, v)
            all_gaps += g
            firsts.append(first)
            lasts.append(last)
            walls.append(wall)
            steps += len(tasks)
        per_task = sum(walls) / steps
        print(f"== {a.runs} runs one after another, each {a.calls} echo calls and "
              f"{a.calls + 1} model replies ({steps} tasks)")
        print(f"loop's own cost between tasks (server clock, {len(all_gaps)} gaps): "
              f"mean {statistics.mean(all_gaps):.2f} ms, median {statistics.median(all_gaps)} ms, "
              f"p95 {pct(all_gaps, 95)} ms, max {max(all_gaps)} ms")
        print(f"run start to first task: mean {statistics.mean(firsts):.2f} ms; "
              f"last task to run end: mean {statistics.mean(lasts):.2f} ms")
        print(f"wall per task inside a run: {per_task * 1e3:.2f} ms; plain echo task round trip "
              f"over HTTP (baseline, {n_tasks} tasks): {base * 1e3:.2f} ms; ratio {per_task / base:.2f}x")
        print(f"wall per run: median {statistics.median(walls) * 1e3:.1f} ms")

        # Concurrent runs.
        before = rss_kib(server.pid)
        results, errors = [], []

        def one():
            try:
                results.append(run_once(api, a.calls))
            except Exception as e:  # noqa: BLE001 - reported below
                errors.append(str(e))

        threads = [threading.Thread(target=one) for _ in range(a.concurrent)]
        served0 = Stub.served
        t0 = time.perf_counter()
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        wall = time.perf_counter() - t0
        after = rss_kib(server.pid)
        print(f"== {a.concurrent} concurrent runs")
        if errors:
            print(f"{len(errors)} failed; the first: {errors[0]}")
        cg, ctasks = [], 0
        for v, _ in results:
            g, _, _, tasks = gaps(api, v)
            cg += g
            ctasks += len(tasks)
        print(f"{len(results)} succeeded in {wall:.2f} s: {len(results) / wall:.1f} runs/s, "
              f"{ctasks / wall:.0f} tasks/s ({Stub.served - served0} model replies)")
        print(f"run wall: median {statistics.median([w for _, w in results]):.2f} s, "
              f"max {max(w for _, w in results):.2f} s")
        print(f"gap between a run's tasks under load: median {statistics.median(cg)} ms, "
              f"p95 {pct(cg, 95)} ms")
        print(f"server RSS: {before['VmRSS'] / 1024:.1f} MiB before, {after['VmRSS'] / 1024:.1f} MiB after, "
              f"peak {after['VmHWM'] / 1024:.1f} MiB")
        if errors:
            sys.exit(1)
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        if os.environ.get("KEEP") is None:
            subprocess.run(["rm", "-rf", work])
        else:
            print(f"kept {work}")


if __name__ == "__main__":
    main()
