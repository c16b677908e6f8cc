"""`selflearn status`: a local run's rounds as a table (what the browser dashboard shows).

The browser dashboard (`selflearn/local/web/index.html`, served at /dashboard) reads the same state
file from GET /api/rounds and renders it with DOM text nodes only (no innerHTML), so an article
title can never inject markup; here every cell goes through `_clean`, so none can drive the terminal.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from typing import Any


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", default=".selflearn", help="the data dir of `selflearn local` (default ./.selflearn)")
    p.add_argument("--json", action="store_true", help="print the raw state document")
    p.add_argument("--articles", action="store_true", help="also list each round's articles with their source")
    p.add_argument("--watch", type=float, metavar="SECONDS", help="refresh every SECONDS until Ctrl-C")


def run(args: argparse.Namespace) -> int:
    from .state_file import read_state  # it loads the spec (pydantic): not on `selflearn --help`

    while True:
        state = read_state(args.data_dir)
        if state is None:
            raise ValueError(f"no local run in {args.data_dir} (start one with `selflearn local`)")
        if args.json:
            print(json.dumps(state, indent=1, sort_keys=True))
        else:
            if args.watch:
                print("\033[2J\033[H", end="")
            print(format_table(state, articles=args.articles), flush=True)
        if not args.watch:
            return 0
        time.sleep(args.watch)


# -- the table ----------------------------------------------------------------------------------
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


COLUMNS = [("round", 5), ("result", 8), ("loss", 7), ("knows learned", 13), ("knows held-out", 14),
           ("chat kept", 9), ("format", 9), ("feedback", 14), ("fresh ppl", 15), ("trained ppl", 15), ("general ppl", 15),
           ("articles", 8), ("checkpoint", 16), ("reason", 60)]


def _knowledge(rec: dict[str, Any], name: str) -> str:
    k = (rec.get("knowledge") or {}).get(name) or {}
    return f"{_num(k.get('before'))}->{_num(k.get('after'))}" if k else "-"


def _format(rec: dict[str, Any]) -> str:
    f = (rec.get("chat") or {}).get("format_ok") or {}
    return _num(f.get("after"), "{:.0%}") if f else "-"


def feedback_cell(rec: dict[str, Any]) -> str:
    """What users said that the round learned: corrections and ratings."""
    fb = rec.get("feedback")
    if not fb:
        return "-"
    if fb.get("error"):
        return "unavailable"
    return f"{fb.get('corrections', 0)} fix, {fb.get('ratings', 0)} rated"


def rows(state: dict[str, Any]) -> list[list[str]]:
    out = []
    for rec in state.get("rounds") or []:
        out.append([str(rec.get("round")), _decision(rec), _num(rec.get("train_loss"), "{:.3f}"),
                    _knowledge(rec, "learned"), _knowledge(rec, "held_out"),
                    _num((rec.get("chat") or {}).get("retention"), "{:.3f}"), _format(rec), feedback_cell(rec),
                    _ppl(rec, "fresh"), _ppl(rec, "trained"), _ppl(rec, "general"),
                    str(len(rec.get("articles") or [])), rec.get("id") or "-", rec.get("reason") or ""])
    return out


def _progress(cur: dict[str, Any], now: float) -> str:
    p = cur.get("progress") or {}
    line = f"   training round {cur.get('round')} for {now - cur.get('started_at', now):.0f}s"
    if p.get("phase"):
        line += f": {p['phase']}"
    if p.get("step") and p.get("of"):
        line += (f", step {p['step']}/{p['of']}, loss {_num(p.get('loss'), '{:.3f}')}, "
                 f"{_num(p.get('tokens_per_s'), '{:.0f}')} tok/s, ETA {_num(p.get('eta_s'), '{:.0f}')}s")
    return line


def format_table(state: dict[str, Any], *, articles: bool = False, now: float | None = None) -> str:
    now = now or time.time()
    cur = state.get("current_round") or {}
    lines = [
        f"run {_clean(state.get('run'), 40)}   phase {_clean(state.get('phase'), 20)}   "
        f"rounds done {state.get('round', 0)}"
        + (_progress(cur, now) if cur else ""),
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
    last = next((r for r in reversed(state.get("rounds") or []) if r.get("examples")), None)
    if last:
        lines += ["", f"round {last.get('round')}, asked about what it learned (parent -> candidate):"]
        for e in last["examples"][:3]:
            lines.append(f"  Q: {_clean(e.get('question'), 100)}")
            lines.append(f"     parent    ({_num(e.get('parent_score'))}): {_clean(e.get('parent'), 110)}")
            lines.append(f"     candidate ({_num(e.get('candidate_score'))}): {_clean(e.get('candidate'), 110)}")
    if articles:
        for rec in state.get("rounds") or []:
            arts = rec.get("articles") or []
            if arts:
                lines.append("")
                lines.append(f"round {rec.get('round')}:")
                lines += [f"  {_clean(a.get('title'), 60)}  {_clean(a.get('url') or '', 100)}" for a in arts]
    return "\n".join(lines)
