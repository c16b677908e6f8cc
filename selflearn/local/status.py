"""`selflearn status`: a local run's rounds as a table (what the browser dashboard shows).

The browser dashboard (`selflearn/local/web/index.html`, served at /dashboard) reads the same state
file from GET /api/rounds and renders it with DOM text nodes only (no innerHTML), so an article
title can never inject markup; here every cell goes through `clean`, so none can drive the terminal.
"""

from __future__ import annotations

import argparse
import math
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pydantic models: imported when a table is drawn, not on `selflearn --help`
    from ..contracts import Pair
    from .records import RoundRecord
    from .state import LocalState, RunningRound


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
            print(state.model_dump_json(indent=1))
        else:
            if args.watch:
                print("\033[2J\033[H", end="")
            print(format_table(state, articles=args.articles), flush=True)
        if not args.watch:
            return 0
        time.sleep(args.watch)


# -- the table ----------------------------------------------------------------------------------
def _num(x: float | None, fmt: str = "{:.2f}") -> str:
    if x is not None and math.isfinite(x):
        return fmt.format(x)
    return "-" if x is None else str(x)


def _pair(p: Pair | None, fmt: str = "{:.2f}") -> str:
    return f"{_num(p.before, fmt)}->{_num(p.after, fmt)}" if p is not None else "-"


def _decision(rec: RoundRecord) -> str:
    if rec.status != "published":
        return rec.status
    return "promoted" if rec.promoted else "rejected"


def clean(text: object, width: int) -> str:
    """One terminal line: control characters out, clipped to `width`."""
    s = "".join(ch if ch.isprintable() else " " for ch in str(text if text is not None else "-"))
    return s if len(s) <= width else s[: width - 1] + "…"


COLUMNS = [("round", 5), ("result", 8), ("loss", 7), ("knows learned", 13), ("knows held-out", 14),
           ("chat kept", 9), ("format", 9), ("feedback", 14), ("fresh ppl", 15), ("trained ppl", 15), ("general ppl", 15),
           ("articles", 8), ("checkpoint", 16), ("reason", 60)]


def _format(rec: RoundRecord) -> str:
    f = rec.chat.format_ok if rec.chat is not None else None
    return _num(f.after, "{:.0%}") if f is not None else "-"


def feedback_cell(rec: RoundRecord) -> str:
    """What users said that the round learned: corrections and ratings."""
    fb = rec.feedback
    if fb is None:
        return "-"
    if fb.error:
        return "unavailable"
    return f"{fb.corrections} fix, {fb.ratings} rated"


def rows(state: LocalState) -> list[list[str]]:
    out = []
    for rec in state.rounds:
        k = rec.knowledge
        out.append([str(rec.round), _decision(rec), _num(rec.train_loss, "{:.3f}"),
                    _pair(k.learned if k else None), _pair(k.held_out if k else None),
                    _num(rec.chat.retention if rec.chat else None, "{:.3f}"), _format(rec), feedback_cell(rec),
                    _pair(rec.ppl.get("fresh")), _pair(rec.ppl.get("trained")), _pair(rec.ppl.get("general")),
                    str(len(rec.articles)), rec.id or "-", rec.reason or ""])
    return out


def _progress(cur: RunningRound, now: float) -> str:
    line = f"   training round {cur.round} for {now - cur.started_at:.0f}s"
    p = cur.progress
    if p is None:
        return line
    line += f": {p.phase}"
    if p.step and p.of:
        line += (f", step {p.step}/{p.of}, loss {_num(p.loss, '{:.3f}')}, "
                 f"{_num(p.tokens_per_s, '{:.0f}')} tok/s, ETA {_num(p.eta_s, '{:.0f}')}s")
    return line


def format_table(state: LocalState, *, articles: bool = False, now: float | None = None) -> str:
    now = now or time.time()
    cur = state.current_round
    lines = [
        f"run {clean(state.run, 40)}   phase {clean(state.phase, 20)}   rounds done {state.round}"
        + (_progress(cur, now) if cur else ""),
        f"serving  {clean(state.serving_id, 100)}",
        f"promoted {clean(state.promoted_id or '-', 100)}",
        "",
    ]
    table = [[c for c, _ in COLUMNS]] + rows(state)
    widths = [min(w, max(len(r[i]) for r in table)) for i, (_, w) in enumerate(COLUMNS)]
    for r in table:
        lines.append("  ".join(clean(v, widths[i]).ljust(widths[i]) for i, v in enumerate(r)).rstrip())
    if len(table) == 1:
        lines.append("(no rounds yet)")
    last = next((r for r in reversed(state.rounds) if r.examples), None)
    if last:
        lines += ["", f"round {last.round}, asked about what it learned (parent -> candidate):"]
        for e in last.examples[:3]:
            lines.append(f"  Q: {clean(e.question, 100)}")
            lines.append(f"     parent    ({_num(e.parent_score)}): {clean(e.parent, 110)}")
            lines.append(f"     candidate ({_num(e.candidate_score)}): {clean(e.candidate, 110)}")
    if articles:
        for rec in state.rounds:
            if rec.articles:
                lines.append("")
                lines.append(f"round {rec.round}:")
                lines += [f"  {clean(a.title, 60)}  {clean(a.url or '', 100)}" for a in rec.articles]
    return "\n".join(lines)
