"""spec/ and plan/ import no torch, nixl or zmq (DESIGN.md section 3)."""
from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import pdbridge

FORBIDDEN = ("torch", "nixl", "zmq")
_BLOCKER = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {forbidden!r}:
            raise ImportError('blocked: ' + name)
sys.meta_path.insert(0, Block())
import pdbridge.spec, pdbridge.plan, pdbridge.plan.reference
from pdbridge.plan import RequestBlocks, plan_transfer
from pdbridge.spec import EngineLayout, get_preset
layout = EngineLayout(get_preset('nemotron-h-8b'), 2)
plan = plan_transfer(layout, EngineLayout(get_preset('nemotron-h-8b'), 4), 0,
                     RequestBlocks(16, (0,), 1), RequestBlocks(16, (1,), 0), 'auto')
bad = [m for m in sys.modules if m.split('.')[0] in {forbidden!r}]
assert not bad, bad
print('ok', plan.num_descriptors)
"""


def test_imports_without_torch_nixl_zmq():
    code = _BLOCKER.format(forbidden=FORBIDDEN)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ok")


def test_no_module_imports_them():
    root = pathlib.Path(pdbridge.__file__).parent
    for pkg in ("spec", "plan"):
        for path in (root / pkg).glob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = []
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    names = [node.module]
                for n in names:
                    assert n.split(".")[0] not in FORBIDDEN, f"{path.name} imports {n}"
