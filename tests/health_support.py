"""The ecosystem's readers of Troupe's status, run for real: Argo CD's health check (the Lua
that ships in charts/troupe/argocd, run by Lua 5.1 through ``lupa`` in a sandbox like Argo
CD's) and kstatus (``sigs.k8s.io/cli-utils``, built by tools/build-kstatus.sh), so the tests
check what Argo CD, Flux and kpt would conclude, not a reading of their rules."""

from __future__ import annotations

import functools
import json
import subprocess
from pathlib import Path
from typing import Any, NamedTuple

import lupa.lua51  # type: ignore[import-untyped]

REPOSITORY = Path(__file__).resolve().parents[1]
ARGOCD = REPOSITORY / "charts" / "troupe" / "argocd"
HEALTH_LUA = ARGOCD / "health.lua"
ARGOCD_HEALTH = {"Healthy", "Progressing", "Degraded", "Suspended", "Missing", "Unknown"}
"""What Argo CD accepts from a script; anything else it shows as Unknown."""
KSTATUS = {"InProgress", "Failed", "Current", "Terminating", "NotFound", "Unknown"}
BUILD_TIMEOUT = 600.0
KSTATUS_TIMEOUT = 10.0

# Argo CD opens the base and table libraries for a custom check (plus a safe os, which the
# script does not use); these are the base library's pure functions.
_SANDBOX = """
local source = ...
local chunk, problem = loadstring(source, "=health.lua")
if chunk == nil then error(problem) end
local env = {table = table, _VERSION = _VERSION}
for _, name in ipairs({"assert", "error", "ipairs", "next", "pairs", "pcall", "rawequal",
                       "rawget", "rawset", "select", "tonumber", "tostring", "type",
                       "unpack", "xpcall", "getmetatable", "setmetatable"}) do
  env[name] = _G[name]
end
env._G = env
return function(obj)
  env.obj = obj
  return setfenv(chunk, env)()
end
"""


class Health(NamedTuple):
    """One reader's verdict: its status word and the message it shows."""

    status: str
    message: str


def _to_lua(runtime: Any, value: Any) -> Any:
    """JSON as Argo CD hands it to Lua: objects and arrays become tables (arrays from 1),
    numbers doubles, null nothing at all."""
    if isinstance(value, dict):
        table = runtime.table()
        for key, item in value.items():
            if item is not None:
                table[str(key)] = _to_lua(runtime, item)
        return table
    if isinstance(value, list):
        table = runtime.table()
        for index, item in enumerate((i for i in value if i is not None), 1):
            table[index] = _to_lua(runtime, item)
        return table
    if isinstance(value, bool | str):
        return value
    if isinstance(value, int | float):
        return float(value)
    raise TypeError(f"not JSON: {value!r}")


def argocd_health(obj: dict[str, Any], script: Path = HEALTH_LUA) -> Health:
    """Run the health check on ``obj`` as Argo CD does; a script error raises LuaError."""
    runtime = lupa.lua51.LuaRuntime(register_eval=False, register_builtins=False)
    check = runtime.execute(_SANDBOX, script.read_text())
    result = check(_to_lua(runtime, obj))
    if lupa.lua51.lua_type(result) != "table":
        raise AssertionError(f"the health check returned {result!r}, not a table")
    status, message = result["status"], result["message"]
    if not isinstance(status, str) or not isinstance(message, str | None):
        raise AssertionError(f"the health check returned status {status!r}, message {message!r}")
    return Health(status, message or "")


@functools.cache
def kstatus_binary() -> Path:
    """Build (or find in the cache) the kstatus checker; a build that fails fails the test."""
    build = subprocess.run(
        [str(REPOSITORY / "tools" / "build-kstatus.sh")],
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT,
        check=False,
    )
    assert build.returncode == 0, f"tools/build-kstatus.sh failed:\n{build.stderr}"
    return Path(build.stdout.strip())


def kstatus(obj: dict[str, Any]) -> Health:
    """What ``status.Compute`` of cli-utils makes of ``obj``."""
    run = subprocess.run(
        [str(kstatus_binary())],
        input=json.dumps(obj),
        capture_output=True,
        text=True,
        timeout=KSTATUS_TIMEOUT,
        check=False,
    )
    assert run.returncode == 0, f"kstatus refused the object:\n{run.stderr}"
    verdict = json.loads(run.stdout)
    return Health(str(verdict["status"]), str(verdict["message"]))
