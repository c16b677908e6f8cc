"""The `selflearn` package imports without the test extras: test support lives in tests/support/.

Every module under selflearn/ is imported in a fresh interpreter where the packages of
pyproject.toml's `test` extra cannot be imported (as if never installed). The serve extra (Ray,
FastAPI) stays importable: the serving modules need it, and the serve image installs it.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())

# In the test extra, and also a dependency of something the package needs at run time: not blocked.
RUNTIME_TOO = {"jsonschema": "ray[serve], the serve extra, requires it"}

# In a fresh interpreter: make the given modules unimportable (a None in sys.modules is what
# `import` and `importlib.util.find_spec` treat as "not installed"), then import every selflearn
# module, `__main__` modules excepted (importing those runs them). Prints what was imported and
# what failed.
IMPORT_ALL = """
import importlib, json, pkgutil, sys
for name in json.loads(sys.argv[1]):
    sys.modules[name] = None
import selflearn
imported, failed = [], []
def record_failure(name):
    failed.append(f"{name}: {sys.exc_info()[0].__name__}: {sys.exc_info()[1]}")
for info in pkgutil.walk_packages(selflearn.__path__, "selflearn.", onerror=record_failure):
    if info.name.rsplit(".", 1)[-1] == "__main__":
        continue
    try:
        importlib.import_module(info.name)
        imported.append(info.name)
    except Exception as err:
        failed.append(f"{info.name}: {type(err).__name__}: {err}")
print(json.dumps({"imported": imported, "failed": failed}))
"""


def _distribution(requirement: str) -> str:
    name = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement).group(0)
    return re.sub(r"[-_.]+", "-", name).lower()


def _modules_of(distributions: set[str]) -> dict[str, str]:
    """Top-level module name -> the distribution (of those given) that installs it."""
    out = {}
    for module, dists in importlib.metadata.packages_distributions().items():
        for dist in dists:
            if _distribution(dist) in distributions and module.isidentifier():
                out[module] = _distribution(dist)
    return out


def _test_only_modules() -> dict[str, str]:
    """Top-level modules of the test extra's packages (those RUNTIME_TOO keeps aside excepted)."""
    test_extra = {_distribution(r) for r in PYPROJECT["project"]["optional-dependencies"]["test"]}
    return _modules_of(test_extra - set(RUNTIME_TOO))


def test_the_runtime_exceptions_are_real():
    """What RUNTIME_TOO keeps importable is in the test extra and required by an installed runtime package."""
    test_extra = {_distribution(r) for r in PYPROJECT["project"]["optional-dependencies"]["test"]}
    for dist in RUNTIME_TOO:
        assert dist in test_extra, f"{dist} is no longer in the test extra: drop it from RUNTIME_TOO"
        required_by = {_distribution(d.metadata["Name"]) for d in importlib.metadata.distributions()
                       if any(_distribution(r) == dist and "extra ==" not in r for r in d.requires or ())}
        assert required_by - test_extra, f"{dist}: no runtime package requires it any more"


def test_every_module_imports_without_the_test_extras(tmp_path):
    blocked = _test_only_modules()
    assert {"pytest", "kmock", "moto"} <= set(blocked), blocked
    # From an empty directory, so that only the installed package is importable (not the checkout's tests/).
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", IMPORT_ALL, json.dumps(sorted(blocked))], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not result["failed"], "\n".join(result["failed"])
    for module in ("selflearn.sources.polite", "selflearn.operator.handlers", "selflearn.serving.app"):
        assert module in result["imported"]
    assert not [m for m in result["imported"] if m.endswith(".testing")], "test support belongs in tests/support/"
