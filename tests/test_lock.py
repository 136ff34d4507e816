"""requirements.lock pins the whole dependency tree, and setup refuses an environment that differs
from it (issue 8: a fresh machine must get exactly the versions CI got)."""
import importlib.util
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
LOCK = ROOT / "requirements.lock"


def _check_lock():
    spec = importlib.util.spec_from_file_location("check_lock", ROOT / "scripts" / "check_lock.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _requirement_names(reqs: list[str]) -> set[str]:
    return {_check_lock().canonical(re.match(r"[A-Za-z0-9_.-]+", r)[0]) for r in reqs}


def test_lock_pins_every_declared_dependency_exactly():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = _requirement_names(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        declared |= _requirement_names(extra)
    build = _requirement_names(tomllib.loads((ROOT / "pyproject.toml").read_text())
                               ["build-system"]["requires"])
    pins = _check_lock().read_lock(LOCK)
    assert not (declared | build) - pins.keys(), "declared but not locked"
    assert pins["torch"] == "2.13.0", "torch must stay the local CPU wheel (constraints.txt)"


def test_this_environment_is_the_locked_one():
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "check_lock.py")],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_a_differing_environment_is_named(tmp_path):
    pins = _check_lock().read_lock(LOCK)
    lines = [f"{n}=={v}" for n, v in pins.items() if n != "msgspec"]
    lines += ["numpy==0.0.1", "not-a-real-dist==1.0"]
    bad = tmp_path / "bad.lock"
    bad.write_text("\n".join(l for l in lines if not l.startswith("numpy==2")) + "\n")
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "check_lock.py"), "--lock",
                          str(bad)], capture_output=True, text=True)
    assert out.returncode == 1
    err = out.stderr
    assert "numpy: lock 0.0.1, installed" in err
    assert "not-a-real-dist: in the lock, not installed" in err
    assert re.search(r"msgspec==\S+: installed, not in the lock", err)
    assert err.count("\n") == 1, "one line"
