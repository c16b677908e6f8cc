"""Write every manifest generated from the code: the LearnerRun CRD (both copies) and the chart's RBAC rules.

    python hack/generate-manifests.py          # rewrite the files
    python hack/generate-manifests.py --check  # exit 1, naming them, when any is stale

- crds/learnerrun.yaml and charts/selflearn/crds/learnerrun.yaml: `selflearn.operator.crd.render()`
  (from the pydantic spec); tests/test_manifests.py and tests/test_chart.py check them.
- charts/selflearn/files/rbac-rules.yaml: `selflearn.operator.rbac.render()` (from the operator's
  own rule list); tests/test_chart.py checks it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the checkout's selflearn, also when another one is installed

from selflearn.operator import crd, rbac  # noqa: E402

GENERATED: dict[str, Callable[[], str]] = {
    "crds/learnerrun.yaml": crd.render,
    "charts/selflearn/crds/learnerrun.yaml": crd.render,
    rbac.CHART_FILE: rbac.render,
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="change nothing; fail when a file is stale")
    args = parser.parse_args()
    stale = []
    for relative, render in GENERATED.items():
        path, text = REPO / relative, render()
        if path.exists() and path.read_text() == text:
            continue
        stale.append(relative)
        if not args.check:
            path.write_text(text)
    verb = "stale" if args.check else "rewrote"
    for relative in stale:
        print(f"{verb}: {relative}")
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
