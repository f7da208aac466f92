"""OpenClaw process-plugin SDK for Python (one file, standard library only).

Write a class derived from `BasePlugin`, implement `execute`, and call
`run(MyPlugin)` at the bottom of your script. The agent talks to the script
with JSON lines over stdin/stdout (see docs/plugins.md):

    agent -> plugin  {"type": "validate", "id": "validate", "config": {...}}
    agent -> plugin  {"type": "execute", "id": "...", "input": {...}}
    plugin -> agent  {"type": "result", "id": "...", "output": ...}
    plugin -> agent  {"type": "error", "id": "...", "message": "..."}
    plugin -> agent  {"type": "log", "level": "info", "message": "..."}

stdout belongs to the protocol: `print()` inside a plugin would corrupt it,
so `run` points `sys.stdout` at stderr (which the agent logs) and keeps the
real stdout for protocol messages. Use `self.log(...)` for agent-side logs.
"""

import json
import sys
import traceback

__all__ = ["BasePlugin", "PluginError", "run"]


class PluginError(Exception):
    """Raise from `execute` to fail the task with this message (no traceback)."""


class BasePlugin:
    """Base class of a plugin. `config` is the `[config]` table of plugin.toml
    (merged with the agent's `[plugins.process.config.NAME]`)."""

    def __init__(self, config):
        self.config = config or {}
        self._out = None

    def validate(self):
        """Checks `self.config`; return False or raise to refuse it."""
        return True

    def execute(self, task_data):
        """Runs one task: `task_data` is the task input (a dict); return any
        JSON value. Must be implemented."""
        raise NotImplementedError("execute() must be implemented by the plugin")

    def log(self, message, level="info"):
        """Sends a log line to the agent (levels: debug, info, warn, error)."""
        _send(self._out, {"type": "log", "level": level, "message": str(message)})


def _send(out, msg):
    out.write(json.dumps(msg, separators=(",", ":")) + "\n")
    out.flush()


def run(plugin_class, stdin=None, stdout=None):
    """Serves the protocol until stdin closes."""
    inp = stdin or sys.stdin
    out = stdout or sys.stdout
    if stdout is None:
        # Stray prints go to stderr instead of corrupting the protocol.
        sys.stdout = sys.stderr
    plugin = None
    for line in inp:
        line = line.strip()
        if not line:
            continue
        msg_id = None
        try:
            msg = json.loads(line)
            msg_id = msg.get("id")
            kind = msg.get("type")
            if kind == "validate":
                plugin = plugin_class(msg.get("config") or {})
                plugin._out = out
                ok = plugin.validate()
                _send(out, {"type": "result", "id": msg_id, "output": ok is not False})
            elif kind == "execute":
                if plugin is None:
                    plugin = plugin_class({})
                    plugin._out = out
                result = plugin.execute(msg.get("input"))
                _send(out, {"type": "result", "id": msg_id, "output": result})
            else:
                _send(out, {"type": "error", "id": msg_id,
                            "message": "unknown message type %r" % (kind,)})
        except PluginError as e:
            _send(out, {"type": "error", "id": msg_id, "message": str(e)})
        except Exception as e:  # noqa: BLE001 - a task's failure, not the plugin's
            traceback.print_exc(file=sys.stderr)
            _send(out, {"type": "error", "id": msg_id,
                        "message": "%s: %s" % (type(e).__name__, e)})
