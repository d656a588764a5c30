"""A module that says it is pure is: importing it, in a fresh interpreter, loads no asyncio, socket,
subprocess or fcntl, neither itself nor through anything it imports.

Which modules say so is read from their docstrings ("pure", "sans-I/O"), so a new pure module is
checked without being listed here. The third-party libraries pure data models are built on are loaded
first, and a pydantic model made: what they load themselves is not ours (pydantic reads its plugins'
metadata through ``importlib.metadata`` when the first model class is made, and the ``email``
package that uses loads ``socket``). An import of a banned module by any hikkoshi module is still
caught, whether it was loaded before or not.
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

import hikkoshi

SRC = Path(hikkoshi.__file__).parent
BANNED = ("asyncio", "socket", "subprocess", "fcntl")
LIBRARIES = ("pydantic", "tomli_w")

_CLAIM = re.compile(r"\bpure\b|\bsans[- ]I/O\b", re.IGNORECASE)
_NOT_CLAIMS = {
    # Docstrings that speak of other modules' purity.
    "hikkoshi.migrate.coordinator": "the I/O around the pure modules it names",
    "hikkoshi.nbd.server": "the asyncio shell around the sans-I/O state machines",
    "hikkoshi.nbd.connection": "the asyncio shell of one client around the sans-I/O handshake",
}

# In the fresh interpreter: load the libraries, then the module, watching every import a hikkoshi
# module makes; print what went wrong as JSON.
_PROBE = """
import builtins, importlib, json, sys
target, banned, libraries = sys.argv[1], sys.argv[2].split(","), sys.argv[3].split(",")
for library in libraries:
    importlib.import_module(library)
import pydantic
type("Warm", (pydantic.BaseModel,), {"__annotations__": {"x": int}})
offences = []
real_import = builtins.__import__

def watching(name, globals=None, locals=None, fromlist=(), level=0):
    importer = (globals or {}).get("__name__") or ""
    if importer.split(".")[0] != "hikkoshi":
        return real_import(name, globals, locals, fromlist, level)
    if name.split(".")[0] in banned:
        offences.append(f"{importer} imports {name}")
    absent = [m for m in banned if m not in sys.modules and m != name.split(".")[0]]
    result = real_import(name, globals, locals, fromlist, level)
    offences.extend(f"{importer} imports {name}, which loads {m}" for m in absent if m in sys.modules)
    return result

builtins.__import__ = watching
importlib.import_module(target)
print(json.dumps(offences))
"""


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def claimed_pure() -> list[str]:
    """The modules whose docstrings say they are pure."""
    found = []
    for path in sorted(SRC.rglob("*.py")):
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        name = _module_name(path)
        if _CLAIM.search(doc) and name not in _NOT_CLAIMS:
            found.append(name)
    return found


def test_the_claims_are_found() -> None:
    """The docstring search finds the modules known to be pure (it would pass vacuously otherwise)."""
    known = {
        "hikkoshi.nbd.wire",
        "hikkoshi.nbd.server_handshake",
        "hikkoshi.nbd.client_transmission",
        "hikkoshi.block.move_policy",
        "hikkoshi.migrate.convergence",
        "hikkoshi.migrate.phases",
        "hikkoshi.migrate.precheck",
        "hikkoshi.migrate.storage_modes",
        "hikkoshi.vm.qemu",
    }
    assert known <= set(claimed_pure())


@pytest.mark.parametrize("module", claimed_pure())
def test_pure_module_loads_no_io(module: str) -> None:
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, module, ",".join(BANNED), ",".join(LIBRARIES)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    offences: list[str] = json.loads(done.stdout)
    assert offences == [], f"{module} says it is pure, but " + "; ".join(offences)
