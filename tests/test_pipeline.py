"""Article cleaning and packing: what goes into training, and that no token is padding."""

from selflearn.sources.base import Article
from selflearn.sources.pipeline import BlocklistFilter, clean_articles
from selflearn.sources.snapshot import GENERAL_POOL, SnapshotSource, general_set
from selflearn.trainer import data

LONG = ("Cadmium is a chemical element; it has symbol Cd and atomic number 48. This soft, silvery-white "
        "metal is chemically similar to the two other stable metals in group 12, zinc and mercury. Like zinc, "
        "it demonstrates oxidation state +2 in most of its compounds, and like mercury, it has a lower melting "
        "point than the transition metals in groups 3 through 11.")


def art(title, text):
    return Article(title=title, text=text, source="test")


def test_pipeline_drops_short_duplicates_and_blocked():
    near = LONG.replace("silvery-white", "bluish-white", 1)
    res = clean_articles(
        [art("a", "  " + LONG + "\n\n\n\n"), art("short", "tiny"), art("dup", LONG), art("near", near),
         art("spam", "Buy viagra now. " + "Other words go here to make it long enough. " * 6),
         art("other", "Completely different text about astronomy and the planets orbiting stars. " * 4)],
        min_chars=100, filters=[BlocklistFilter()])
    assert [a.title for a in res.kept] == ["a", "other"]
    reasons = dict(res.dropped)
    assert "too short" in reasons["short"] and reasons["dup"] == "exact duplicate"
    assert reasons["near"] == "near duplicate" and "viagra" in reasons["spam"]
    assert all(len(a.sha256) == 64 for a in res.kept)
    assert res.kept[0].text == LONG.strip(), "whitespace is normalised"


def test_seen_hashes_from_earlier_rounds_are_skipped():
    first = clean_articles([art("a", LONG)], min_chars=10).kept[0]
    again = clean_articles([art("a", LONG)], min_chars=10, seen_sha256={first.sha256})
    assert again.kept == [] and again.dropped == [("a", "exact duplicate")]


def test_pack_has_no_padding_and_keeps_every_token():
    docs = [[5] * 100, [6] * 37, [7] * 250]
    blocks = data.pack(docs, 64, eos_id=0, min_tail=1)
    stream = sum((d + [0] for d in docs), [])
    assert sum(len(b) for b in blocks) == len(stream) == 390
    assert [len(b) for b in blocks] == [64] * 6 + [6]
    assert (blocks[1] == 0).sum() == 1, "EOS separates documents"
    batches = data.batches(data.pack(docs, 64, eos_id=0, min_tail=1), 4)
    assert [tuple(b.shape) for b in batches] == [(3, 64), (3, 64), (1, 6)], "balanced, the tail alone"
    filled = data.pack(docs, 64, eos_id=0, fill_tail=True)
    assert [len(b) for b in filled] == [64] * 7, "training blocks all have one shape"
    assert filled[-1].tolist() == stream[384:] + stream[:58], "the tail is completed from the start"
    assert [tuple(b.shape) for b in data.batches(filled, 4)] == [(4, 64), (3, 64)]
    assert [len(b) for b in data.pack([[5] * 10], 64, eos_id=0, fill_tail=True)] == [11], "shorter than a block"


def test_snapshot_rounds_never_repeat_and_general_set_is_fixed():
    src = SnapshotSource("en")
    a, cur = src.fetch(5, {})
    b, cur2 = src.fetch(5, cur)
    assert cur2["next"] == GENERAL_POOL + 10
    titles = [x.title for x in a + b]
    assert len(set(titles)) == 10
    general = {x.title for x in general_set("en", 16)}
    assert general == {x.title for x in general_set("en", 16)}
    assert not general & set(titles), "the general set is never trained on"
    assert a[0].url.startswith("https://en.wikipedia.org/wiki/")
