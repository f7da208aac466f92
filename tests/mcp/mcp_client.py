"""The official MCP Python SDK (and raw HTTP) against OpenClaw's /mcp.

Run by tests/mcp.rs: python3 mcp_client.py PHASE URL OPERATOR_TOKEN VIEWER_TOKEN
Prints one `ok NAME` line per check that passed (and `task NAME ID` for
tasks the Rust side checks afterwards); an assertion that fails exits
non-zero with its message.

Phases: `main` (everything while dev-a and dev-b are online), `offline`
(dev-b has been stopped since the list).
"""
import asyncio
import json
import sys
import threading
import time
import urllib.error
import urllib.request

import httpx2
from mcp import Client, MCPError
from mcp.client.streamable_http import streamable_http_client

phase, url, op_token, viewer_token = sys.argv[1:5]
base = url.rsplit("/mcp", 1)[0]


def ok(name):
    print("ok", name, flush=True)


def transport(token):
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    h = httpx2.AsyncClient(headers=headers, timeout=httpx2.Timeout(120, read=120))
    return streamable_http_client(url, http_client=h)


def raw(body, token=op_token, accept="application/json, text/event-stream", headers=None,
        method="POST", timeout=120):
    """One HTTP request; (status, headers, body text)."""
    data = body if isinstance(body, bytes) else (None if body is None else json.dumps(body).encode())
    req = urllib.request.Request(url, data=data, method=method)
    req.add_header("Content-Type", "application/json")
    req.add_header("Accept", accept)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    for k, v in (headers or {}).items():
        req.add_header(k, v)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.headers, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read().decode()


def rpc(method, params=None, id=1, **kw):
    msg = {"jsonrpc": "2.0", "id": id, "method": method}
    if params is not None:
        msg["params"] = params
    status, headers, text = raw(msg, accept="application/json", **kw)
    return status, json.loads(text) if text else None


def text_of(result):
    return "".join(c.text for c in result.content if getattr(c, "type", "") == "text")


def task_of(result):
    return (result.meta or {}).get("openclaw/task")


async def main_phase():
    # The handshake-era client (what every released client speaks).
    async with Client(transport(op_token), mode="legacy") as c:
        tools = (await c.list_tools()).tools
        names = sorted(t.name for t in tools)
        for want in ["exec__dev-a", "sysinfo__dev-a", "sysinfo__dev-b", "echo__dev-a"]:
            assert want in names, f"{want} not in {names}"
        by = {t.name: t for t in tools}
        ex = by["exec__dev-a"]
        assert ex.input_schema["type"] == "object", ex.input_schema
        assert "hostname" in ex.input_schema["properties"]["command"]["enum"], ex.input_schema
        assert ex.annotations.destructive_hint is True and ex.annotations.read_only_hint is False
        assert "device `dev-a`" in ex.description, ex.description
        si = by["sysinfo__dev-b"]
        assert si.annotations.read_only_hint is True, si.annotations
        assert si.meta["openclaw/device"] == "dev-b" and si.meta["openclaw/plugin"] == "sysinfo"
        ok("tools_list")

        r = await c.call_tool("sysinfo__dev-b", {})
        assert not r.is_error, text_of(r)
        assert isinstance(r.structured_content, dict) and r.structured_content, r
        assert json.loads(text_of(r)) == r.structured_content
        assert r.meta["openclaw/device"] == "dev-b" and task_of(r), r.meta
        print("task sysinfo", task_of(r), flush=True)
        ok("call_sysinfo")

        r = await c.call_tool("exec__dev-a", {"command": "hostname"})
        assert not r.is_error, text_of(r)
        assert "host-of-dev-a" in r.structured_content["stdout"], r.structured_content
        ok("call_exec")

        r = await c.call_tool("exec__dev-a", {"command": "rm-rf"})
        assert r.is_error, r
        assert "command" in text_of(r) and "arguments" in text_of(r), text_of(r)
        r = await c.call_tool("exec__dev-a", {"command": 7})
        assert r.is_error and "command" in text_of(r), text_of(r)
        ok("bad_arguments_tool_error")

        try:
            await c.call_tool("no_such__tool", {})
            raise AssertionError("an unknown tool was called")
        except MCPError as e:
            assert e.error.code == -32602 and "no_such__tool" in e.error.message, e.error
        ok("unknown_tool_error")

        await c.send_ping()
        ok("ping_after_errors")

        # A result larger than a reply carries names the task to fetch.
        r = await c.call_tool("exec__dev-a", {"command": "many"})
        assert not r.is_error, text_of(r)
        assert r.structured_content is None, "a capped result came structured"
        t = text_of(r)
        assert "GET /v1/tasks/" in t and task_of(r) in t, t
        print("task big", task_of(r), flush=True)
        ok("large_result_named")

        # A client that gives up (its read timeout) abandons the call: the
        # SDK cancels it, and the task with it.
        started = time.monotonic()
        try:
            await c.call_tool("exec__dev-a", {"command": "nap"}, read_timeout_seconds=2)
            raise AssertionError("a 30 s nap answered within 2 s")
        except (MCPError, TimeoutError) as e:
            pass
        assert time.monotonic() - started < 20
        ok("abandoned_call")

    # What the SDK tries first (auto mode: `server/discover`, then the
    # handshake when it is not there), at the newest version we speak.
    async with Client(transport(op_token)) as c:
        r = await c.call_tool("sysinfo__dev-a", {})
        assert not r.is_error and r.structured_content, r
        ok("auto_mode_client")

    # A viewer lists but may not call; no token is refused at the door.
    async with Client(transport(viewer_token), mode="legacy") as c:
        assert (await c.list_tools()).tools
        try:
            await c.call_tool("sysinfo__dev-a", {})
            raise AssertionError("a viewer called a tool")
        except Exception as e:  # the SDK raises on the 403 reply
            pass
    status, body = rpc("tools/call", {"name": "sysinfo__dev-a"}, token=viewer_token)
    assert status == 403 and body["error"]["code"] == -32001, (status, body)
    assert "operator" in body["error"]["message"], body
    status, _ = rpc("tools/list", token=None)
    assert status == 401, status
    ok("viewer_lists_but_cannot_call")
    ok("no_token_401")


def wait_running(plugin):
    """Until a task of `plugin` runs (GET /v1/tasks?state=running)."""
    deadline = time.time() + 30
    while time.time() < deadline:
        req = urllib.request.Request(f"{base}/v1/tasks?state=running")
        req.add_header("Authorization", f"Bearer {viewer_token}")
        with urllib.request.urlopen(req, timeout=10) as r:
            tasks = json.loads(r.read().decode())
        if isinstance(tasks, dict):
            tasks = tasks.get("tasks", [])
        if any(t.get("plugin") == plugin for t in tasks):
            return
        time.sleep(0.05)
    raise AssertionError(f"no `{plugin}` task running within 30 s")


def notification_cancels():
    """A call in JSON mode (no event stream) cancelled by
    `notifications/cancelled`, the way 2025 clients cancel."""
    out = {}

    def call():
        out["r"] = rpc("tools/call", {"name": "exec__dev-a", "arguments": {"command": "nap"}},
                       id="nap-by-notification")

    th = threading.Thread(target=call)
    th.start()
    wait_running("exec")  # the call has its task (the Rust side checks the task's end)
    status, _, text = raw({"jsonrpc": "2.0", "method": "notifications/cancelled",
                           "params": {"requestId": "nap-by-notification", "reason": "test"}},
                          accept="application/json")
    assert status == 202 and text == "", (status, text)
    th.join(20)
    assert not th.is_alive(), "the cancelled call did not end"
    status, body = out["r"]
    assert "cancelled" in json.dumps(body), body
    ok("notification_cancels")


def keep_alive_and_stream():
    """An event stream that outlasts the keep-alive period gets comments,
    then the one event with the answer."""
    req = urllib.request.Request(url, data=json.dumps({
        "jsonrpc": "2.0", "id": 9, "method": "tools/call",
        "params": {"name": "exec__dev-a", "arguments": {"command": "doze"}}}).encode(), method="POST")
    req.add_header("Content-Type", "application/json")
    req.add_header("Accept", "application/json, text/event-stream")
    req.add_header("Authorization", f"Bearer {op_token}")
    req.add_header("MCP-Protocol-Version", "2025-03-26")
    with urllib.request.urlopen(req, timeout=60) as r:
        assert r.headers["Content-Type"] == "text/event-stream", r.headers
        assert r.headers["X-Accel-Buffering"] == "no", r.headers
        lines = [l.decode().rstrip("\n") for l in r]
    assert ": working" in lines, lines
    data = [l for l in lines if l.startswith("data: ")]
    assert len(data) == 1, lines
    msg = json.loads(data[0][6:])
    assert msg["id"] == 9 and msg["result"]["isError"] is False, msg
    # 2025-03-26 has no structured content: the text alone.
    assert "structuredContent" not in msg["result"], msg
    assert lines.index(": working") < lines.index(data[0])
    ok("keep_alive_then_answer")


def hostile():
    null = None
    cases = [
        (b"{", 400, -32700),
        (b"[1, 2]", 400, -32600),
        (b"7", 400, -32600),
        (json.dumps({"jsonrpc": "1.0", "id": 1, "method": "ping"}).encode(), 400, -32600),
        (json.dumps({"jsonrpc": "2.0", "id": {"x": 1}, "method": "ping"}).encode(), 400, -32600),
        (json.dumps({"jsonrpc": "2.0", "id": 1, "method": "ping", "params": [1]}).encode(), 200, -32602),
        (json.dumps({"jsonrpc": "2.0", "id": 1, "method": "x" * 100000}).encode(), 200, -32601),
        (json.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                     "params": {"name": 5}}).encode(), 200, -32602),
        (json.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                     "params": {"name": "sysinfo__dev-a", "arguments": [1]}}).encode(), 200, -32602),
        (json.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/list",
                     "params": {"cursor": 3}}).encode(), 200, -32602),
        (json.dumps({"jsonrpc": "2.0", "id": "i" * 300, "method": "ping"}).encode(), 400, -32600),
        (json.dumps({"jsonrpc": "2.0", "id": 1, "method": 7}).encode(), 400, -32600),
        (b"{\"jsonrpc\": \"2.0\", \"id\": 1, \"method\": \"ping\", \"params\": {\"p\": \""
         + b"x" * (2 << 20) + b"\"}}", 413, -32600),
    ]
    for body, want_status, want_code in cases:
        status, _, text = raw(body, accept="application/json")
        assert status == want_status, (body[:80], status, text[:300])
        got = json.loads(text)
        assert got["error"]["code"] == want_code, (body[:80], got)
        assert len(got["error"]["message"]) < 1000, got
    status, _, text = raw({"jsonrpc": "2.0", "id": 1, "method": "ping"},
                          headers={"MCP-Protocol-Version": "1999-01-01"})
    assert status == 400 and "1999-01-01" in text, (status, text)
    status, headers, _ = raw(None, method="GET")
    assert status == 405 and headers["Allow"] == "POST", (status, headers)
    status, _, _ = raw(None, method="DELETE")
    assert status == 405, status
    # A notification and a response are accepted with nothing to say.
    status, _, text = raw({"jsonrpc": "2.0", "method": "notifications/initialized"})
    assert status == 202 and text == "", (status, text)
    status, _, text = raw({"jsonrpc": "2.0", "id": 5, "result": {}})
    assert status == 202, status
    # Pages: a cursor past every name gives an empty page without a next one.
    status, body = rpc("tools/list", {"cursor": "~"})
    assert status == 200 and body["result"]["tools"] == [] and "nextCursor" not in body["result"], body
    status, body = rpc("initialize", {"protocolVersion": "2024-11-05", "capabilities": {},
                                      "clientInfo": {"name": "raw", "version": "0"}})
    assert body["result"]["protocolVersion"] == "2024-11-05", body
    ok("hostile_requests")


async def offline_phase():
    async with Client(transport(op_token), mode="legacy") as c:
        names = [t.name for t in (await c.list_tools()).tools]
        assert "sysinfo__dev-b" not in names, names
        # dev-a's names did not change when dev-b left.
        assert "sysinfo__dev-a" in names and "exec__dev-a" in names, names
        r = await c.call_tool("sysinfo__dev-b", {})
        assert r.is_error and "offline" in text_of(r), text_of(r)
    ok("offline_device_tool_error")


if phase == "main":
    asyncio.run(main_phase())
    notification_cancels()
    keep_alive_and_stream()
    hostile()
elif phase == "offline":
    asyncio.run(offline_phase())
else:
    sys.exit(f"unknown phase {phase}")
