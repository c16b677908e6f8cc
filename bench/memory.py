"""How the memory of learned articles grows and how fast it answers.

Builds memories of N passages (default 1k, 10k and 100k) from the offline snapshot's English
articles (past the ~12k passages the snapshot has, the same articles again under numbered titles, a
synthetic stand-in for 1,000+ rounds), and measures: build seconds, bytes on disk, load seconds, and
the search alone (p50/p95 ms over probe questions about memorised articles) with the share that
found their article. Prints one JSON object as its last line.

    .venv/bin/python bench/memory.py [--sizes 1000,10000,100000] [--queries 200]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402,F401  (offline env defaults)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--sizes", default="1000,10000,100000")
    p.add_argument("--queries", type=int, default=200)
    a = p.parse_args()

    from selflearn.memory import Memory, passages_of
    from selflearn.sources.snapshot import load_snapshot
    from selflearn.trainer.probe import questions_for

    arts = load_snapshot("en")
    pool = [ps for i, art in enumerate(arts) for ps in passages_of(art, f"bench/r{i // 32 + 1:06d}")]
    out: dict = {"snapshot_passages": len(pool), "sizes": {}}
    for n in [int(x) for x in a.sizes.split(",")]:
        passages = [pool[i % len(pool)] if i < len(pool) else
                    replace(pool[i % len(pool)], title=f"{pool[i % len(pool)].title} ({i // len(pool)})")
                    for i in range(n)]
        t0 = time.perf_counter()
        mem = Memory.build(passages, "en")
        build_s = time.perf_counter() - t0
        with tempfile.TemporaryDirectory() as tmp:
            mem.save(Path(tmp))
            size = sum(f.stat().st_size for f in Path(tmp).rglob("*") if f.is_file())
            t0 = time.perf_counter()
            loaded = Memory.load(Path(tmp))
            load_s = time.perf_counter() - t0
        assert loaded is not None
        # Questions about articles whose passages are in this memory (its first articles).
        titles = {ps.title for ps in passages[:min(n, len(pool))]}
        asked = [(art.title, q.question) for i, art in enumerate(arts) if art.title in titles
                 for q in questions_for(art, phrasings=1, offset=i)][:a.queries]
        times, found = [], 0
        loaded.search("warm up the stemmer")
        for title, q in asked:
            t0 = time.perf_counter()
            hits = loaded.search(q)
            times.append((time.perf_counter() - t0) * 1000)
            # Past the snapshot, a passage's copies carry its title plus " (k)": the same text, as right.
            found += any(h.passage.title == title or h.passage.title.startswith(title + " (") for h in hits)
        times.sort()
        out["sizes"][str(n)] = {
            "build_s": round(build_s, 2), "disk_mb": round(size / 1e6, 1), "load_s": round(load_s, 2),
            "search_ms_p50": round(statistics.median(times), 2), "search_ms_p95": round(times[int(len(times) * .95)], 2),
            "queries": len(asked), "found_own_article": round(found / len(asked), 3)}
        print(json.dumps({str(n): out["sizes"][str(n)]}), flush=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
