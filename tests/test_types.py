"""The type checker over the package, in the fast tier: the contracts that cross a boundary (round
metrics, the decision, progress, local state, engine request and status, operator status) are
types, so a renamed field or a changed promotion rule shows up here, at every place it matters,
before it is a gate check that silently stops running (docs/architecture.md)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def mypy(*args: str) -> subprocess.CompletedProcess[str]:
    # One cache for both calls (git-ignored): the second call reuses the first's work.
    return subprocess.run([sys.executable, "-m", "mypy", "--cache-dir", str(ROOT / ".mypy_cache"), *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_the_package_type_checks_clean():
    done = mypy()  # pyproject's [tool.mypy]: files = selflearn, check_untyped_defs, strict contracts
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
    assert "Success" in done.stdout


def test_a_misspelled_contract_field_is_a_type_error(tmp_path):
    """The checker sees through the contracts: reading a metric the type does not have, or passing
    a string where the decision's outcome goes, fails (what a newcomer renaming a field relies on)."""
    snippet = tmp_path / "uses_contracts.py"
    snippet.write_text(
        "from selflearn.contracts import RoundMetrics\n"
        "from selflearn.policy import Decision, switch_to\n"
        "def gate_reads(m: RoundMetrics) -> float:\n"
        "    return m.train_los\n"  # misspelled: RoundMetrics.train_loss
        "def serve_next(serving: str) -> str | None:\n"
        "    return switch_to(Decision('promote', 'file:///s/run/r000002', 'ok'), serving)\n")
    done = mypy("--config-file", str(ROOT / "pyproject.toml"), str(snippet))
    assert done.returncode == 1, done.stdout
    assert '"RoundMetrics" has no attribute "train_los"' in done.stdout
    assert 'Argument 1 to "Decision" has incompatible type "str"; expected "Outcome"' in done.stdout
