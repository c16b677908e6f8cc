"""Dashboard data: the local run's state file, summarised for the terminal (`selflearn status`).

The browser dashboard (`selflearn/web/index.html`, served at /dashboard) reads the same state
file from GET /api/rounds and renders it with DOM text nodes only (no innerHTML), so an
article title can never inject markup.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any


def read_state(data_dir: str | Path) -> dict[str, Any] | None:
    from .local import STATE_FILE

    path = Path(data_dir) / STATE_FILE
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except json.JSONDecodeError as err:
        raise ValueError(f"state file {path} is not valid JSON: {err}") from None


def _num(x: Any, fmt: str = "{:.2f}") -> str:
    if isinstance(x, (int, float)) and math.isfinite(x):
        return fmt.format(x)
    return "-" if x is None else str(x)


def _ppl(rec: dict[str, Any], name: str) -> str:
    p = (rec.get("ppl") or {}).get(name) or {}
    if not p:
        return "-"
    return f"{_num(p.get('before'))}->{_num(p.get('after'))}"


def _decision(rec: dict[str, Any]) -> str:
    if rec.get("status") != "published":
        return rec.get("status") or "-"
    return "promoted" if rec.get("promoted") else "rejected"


def _clean(text: Any, width: int) -> str:
    """One terminal line: control characters out, clipped to `width`."""
    s = "".join(ch if ch.isprintable() else " " for ch in str(text if text is not None else "-"))
    return s if len(s) <= width else s[: width - 1] + "…"


COLUMNS = [("round", 5), ("result", 8), ("loss", 7), ("fresh ppl", 15), ("trained ppl", 15),
           ("general ppl", 15), ("articles", 8), ("checkpoint", 16), ("reason", 60)]


def rows(state: dict[str, Any]) -> list[list[str]]:
    out = []
    for rec in state.get("rounds") or []:
        out.append([str(rec.get("round")), _decision(rec), _num(rec.get("train_loss"), "{:.3f}"),
                    _ppl(rec, "fresh"), _ppl(rec, "trained"), _ppl(rec, "general"),
                    str(len(rec.get("articles") or [])), rec.get("id") or "-", rec.get("reason") or ""])
    return out


def format_table(state: dict[str, Any], *, articles: bool = False, now: float | None = None) -> str:
    now = now or time.time()
    cur = state.get("current_round") or {}
    lines = [
        f"run {_clean(state.get('run'), 40)}   phase {_clean(state.get('phase'), 20)}   "
        f"rounds done {state.get('round', 0)}"
        + (f"   training round {cur.get('round')} for {now - cur.get('started_at', now):.0f}s" if cur else ""),
        f"serving  {_clean(state.get('serving_id') or 'base model ' + str(state.get('base_model')), 100)}",
        f"promoted {_clean(state.get('promoted_id') or '-', 100)}",
        "",
    ]
    table = [[c for c, _ in COLUMNS]] + rows(state)
    widths = [min(w, max(len(r[i]) for r in table)) for i, (_, w) in enumerate(COLUMNS)]
    for r in table:
        lines.append("  ".join(_clean(v, widths[i]).ljust(widths[i]) for i, v in enumerate(r)).rstrip())
    if len(table) == 1:
        lines.append("(no rounds yet)")
    if articles:
        for rec in state.get("rounds") or []:
            arts = rec.get("articles") or []
            if arts:
                lines.append("")
                lines.append(f"round {rec.get('round')}:")
                lines += [f"  {_clean(a.get('title'), 60)}  {_clean(a.get('url') or '', 100)}" for a in arts]
    return "\n".join(lines)
