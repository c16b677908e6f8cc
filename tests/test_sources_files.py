"""The files source on real .txt/.md/.html/.pdf files and on URLs served by a real local server."""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import replace

import pytest

from replay_server import Reply, ReplayServer
from selflearn.sources.factory import build_source
from selflearn.sources.files import FilesClient
from selflearn.sources.pipeline import clean_articles
from selflearn.sources.polite import FILES_HTTP, HttpPolicy, SourceHTTPError
from selflearn.spec import FilesSource, SourceSpec

QUICK = replace(FILES_HTTP, min_interval=0)  # test-sized politeness: no rate limit between requests


def make_pdf(pages: list[list[str]], title: str | None = None) -> bytes:
    """A real PDF (Helvetica text, one content stream per page, an xref table), built by hand."""

    def esc(s: str) -> str:
        return s.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")

    page_ids = [5 + 2 * i for i in range(len(pages))]
    objs = {
        1: b"<< /Type /Catalog /Pages 2 0 R >>",
        2: f"<< /Type /Pages /Kids [{' '.join(f'{p} 0 R' for p in page_ids)}] /Count {len(pages)} >>".encode(),
        3: b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica /Encoding /WinAnsiEncoding >>",
        4: f"<< /Title ({esc(title)}) /Producer (selflearn tests) >>".encode() if title else b"<< >>",
    }
    for pid, lines in zip(page_ids, pages):
        stream = "\n".join(["BT", "/F1 11 Tf", "14 TL", "72 720 Td", *(f"({esc(x)}) Tj T*" for x in lines),
                            "ET"]).encode("cp1252")
        objs[pid] = (f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] "
                     f"/Resources << /Font << /F1 3 0 R >> >> /Contents {pid + 1} 0 R >>").encode()
        objs[pid + 1] = b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream"
    out = bytearray(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n")
    offsets = {}
    for num in sorted(objs):
        offsets[num] = len(out)
        out += b"%d 0 obj\n" % num + objs[num] + b"\nendobj\n"
    xref, size = len(out), max(objs) + 1
    out += b"xref\n0 %d\n0000000000 65535 f \n" % size
    out += b"".join(b"%010d 00000 n \n" % offsets[i] for i in range(1, size))
    out += b"trailer\n<< /Size %d /Root 1 0 R /Info 4 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (size, xref)
    return bytes(out)


PDF = make_pdf([["Kestrels hover over open fields while they hunt for voles and other small mam-",
                 "mals. They are common across Europe, Asia and Africa.",
                 "Nesting"],
                ["Kestrels nest in tree holes, on cliff ledges and on buildings (often in cities)."]],
               title="A Field Guide to Kestrels")

MD = """---
title: "Notes on basalt"
tags: [geology]
---
# Basalt *rocks*

Basalt is a **fine-grained** [extrusive igneous rock](https://en.wikipedia.org/wiki/Basalt) formed
from the rapid cooling of low-viscosity lava rich in magnesium and iron.

- Lunar maria are plains of flood basalt.
- Most of the ocean floor is basalt.

| Rock | Grain |
|------|-------|
| basalt | fine |
| gabbro | coarse |

```
cooling_rate = "fast"
```
"""

HTML = """<!DOCTYPE html>
<html lang="en"><head><title>Lake Baikal - Travel notes</title>
<style>body { font-family: serif }</style><script>trackVisitor("lake-baikal");</script></head>
<body>
<header><a href="/">Home</a> | <a href="/blog">Blog</a></header>
<nav><ul><li><a href="/a">Archive</a></li><li><a href="/b">About</a></li></ul></nav>
<main>
  <article>
    <h1>Lake Baikal</h1>
    <p>Lake Baikal is a rift lake in southern Siberia and the <em>deepest</em> lake in the
       world, reaching 1,642 metres.<br>It holds more than a fifth of the world's fresh surface water.</p>
    <!-- a comment that is not text -->
    <p>The lake is home to the Baikal seal, one of the few freshwater seals.</p>
  </article>
  <aside>Sponsored: cheap flights to Irkutsk</aside>
</main>
<footer>Copyright 2024 Travel notes. All rights reserved.</footer>
</body></html>
"""

TXT = ("The printing press was invented in the Holy Roman Empire by Johannes Gutenberg around 1440.\r\n"
       "It spread to more than two hundred cities within a few decades.\r\n")


@pytest.fixture
def docs(tmp_path):
    root = tmp_path / "library"
    (root / "geology" / "deeper").mkdir(parents=True)
    (root / ".git").mkdir()
    (root / "notes.txt").write_text(TXT, encoding="utf-8")
    (root / "geology" / "basalt.md").write_text(MD, encoding="utf-8")
    (root / "geology" / "deeper" / "baikal.html").write_text(HTML, encoding="utf-8")
    (root / "kestrels.PDF").write_bytes(PDF)
    (root / "photo.png").write_bytes(b"\x89PNG\r\n\x1a\n")  # unsupported: ignored in a folder
    (root / ".git" / "HEAD.txt").write_text("ref: refs/heads/main")  # hidden: ignored
    (root / ".draft.md").write_text("# draft")
    return root


@pytest.fixture
def server():
    with ReplayServer() as s:
        yield s


def by_title(arts):
    return {a.title: a for a in arts}


def test_folder_is_walked_and_each_format_read(docs):
    src = FilesClient([docs])
    arts, cursor = src.fetch(10, {})
    got = by_title(arts)
    assert set(got) == {"notes.txt", "Notes on basalt", "Lake Baikal - Travel notes", "A Field Guide to Kestrels"}
    assert all(a.source == "file" and a.url.startswith("file:///") for a in arts)

    md = got["Notes on basalt"].text
    assert md.startswith("Basalt rocks\n\nBasalt is a fine-grained extrusive igneous rock formed from the rapid")
    assert "Lunar maria are plains of flood basalt." in md and 'cooling_rate = "fast"' in md
    for syntax in ("**", "](", "---", "|", "```", "tags:", "# "):
        assert syntax not in md, syntax

    html = got["Lake Baikal - Travel notes"].text
    assert html.startswith("Lake Baikal\n\nLake Baikal is a rift lake in southern Siberia and the deepest lake in the world")
    assert "Baikal seal" in html
    for boiler in ("trackVisitor", "font-family", "Archive", "Home", "Sponsored", "Copyright", "comment"):
        assert boiler not in html, boiler

    pdf = got["A Field Guide to Kestrels"]
    assert "hunt for voles and other small mammals. They are common across Europe" in pdf.text
    assert "cliff ledges and on buildings (often in cities)" in pdf.text and pdf.extra["pages"] == 2
    assert pdf.url == (docs / "kestrels.PDF").as_uri()

    txt = got["notes.txt"]
    assert txt.text == TXT.replace("\r\n", "\n").strip()
    assert txt.revision == hashlib.sha256(TXT.encode()).hexdigest()  # the version of the file learned
    assert set(cursor["learned"]) == {a.url for a in arts}

    # The pipeline takes them as they are.
    assert len(clean_articles(arts, min_chars=50).kept) == 4


def test_each_file_is_learned_once_and_again_when_changed(docs):
    src = FilesClient([docs])
    first, cursor = src.fetch(10, {})
    assert len(first) == 4
    again, cursor = src.fetch(10, cursor)
    assert again == [] and src.last_skipped["unchanged"] == 4

    (docs / "notes.txt").write_text(TXT + "Movable type made books cheaper.\n", encoding="utf-8")
    (docs / "geology" / "new.txt").write_text("A new file about obsidian, a volcanic glass.", encoding="utf-8")
    changed, cursor = src.fetch(10, cursor)
    assert sorted(a.title for a in changed) == ["new.txt", "notes.txt"]
    assert "Movable type" in by_title(changed)["notes.txt"].text
    assert src.fetch(10, cursor)[0] == []


def test_n_caps_a_round_and_the_rest_comes_next_round(docs):
    src = FilesClient([docs])
    a, cursor = src.fetch(3, {})
    b, cursor = src.fetch(3, cursor)
    assert len(a) == 3 and len(b) == 1
    assert {x.url for x in a}.isdisjoint(x.url for x in b)


def test_bad_paths_are_clear_errors(docs, tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        FilesClient([tmp_path / "nope.txt"])
    (tmp_path / "report.docx").write_bytes(b"PK\x03\x04")
    with pytest.raises(ValueError, match=r"unsupported type '\.docx'.*\.pdf"):
        FilesClient([tmp_path / "report.docx"])
    with pytest.raises(ValueError, match="at least one path or url"):
        FilesClient()
    with pytest.raises(ValueError, match="not an http"):
        FilesClient(urls=["ftp://example.org/file.txt"])
    single = tmp_path / "single.md"
    single.write_text("# One\n\nJust one file.")
    src = FilesClient([f"file://{single}"])
    assert src.fetch(1, {})[0][0].title == "One"
    single.unlink()
    with pytest.raises(ValueError, match="does not exist"):
        src.fetch(1, {})


def test_corrupt_pdf(docs, caplog):
    bad = docs / "geology" / "broken.pdf"
    bad.write_bytes(b"%PDF-1.4\nthis is not really a pdf\n")
    with pytest.raises(ValueError, match="broken.pdf: cannot read PDF"):
        FilesClient([bad]).fetch(1, {})
    with caplog.at_level(logging.WARNING):
        arts, _ = FilesClient([docs]).fetch(10, {})  # found in a folder: skipped, the rest is read
    assert len(arts) == 4 and "broken.pdf" in caplog.text


LATIN1 = "Les crêpes bretonnes se mangent à la Chandeleur, le 2 février.".encode("iso-8859-1")


def test_urls_content_type_decides_the_parser(server):
    server.script("/articles/baikal", Reply(200, HTML, content_type="text/html; charset=utf-8"))
    server.script("/download", Reply(200, PDF, content_type="application/pdf"))
    server.script("/raw/README.md", Reply(200, MD, content_type="text/plain; charset=utf-8"))
    server.script("/notes", Reply(200, MD.replace("Notes on basalt", "Served markdown"), content_type="text/markdown"))
    server.script("/crepes.txt", Reply(200, LATIN1, content_type="text/plain; charset=iso-8859-1"))
    server.script("/blob.html", Reply(200, HTML.replace("Baikal seal", "Baikal omul"),
                                           content_type="application/octet-stream"))
    urls = [server.url + p for p in ("/articles/baikal", "/download", "/raw/README.md", "/notes",
                                     "/crepes.txt", "/blob.html")]
    with FilesClient(urls=urls, policy=QUICK) as src:
        arts, cursor = src.fetch(10, {})
    got = by_title(arts)
    assert [a.url for a in arts] == urls and all(a.source == "url" for a in arts)
    assert got["A Field Guide to Kestrels"].extra == {"format": "pdf", "bytes": len(PDF), "pages": 2}
    assert got["Notes on basalt"].extra["format"] == "markdown"  # text/plain, but a .md URL
    assert "**" not in got["Served markdown"].text
    assert got["crepes.txt"].text.startswith("Les crêpes bretonnes")
    assert "trackVisitor" not in arts[0].text and arts[5].extra["format"] == "html"
    ua = server.hits("/download")[0].headers["User-Agent"]
    assert ua.startswith("selflearn/") and "(https://" in ua


def test_url_of_unsupported_type_is_a_clear_error(server):
    server.script("/logo", Reply(200, b"\x89PNG\r\n\x1a\n", content_type="image/png"))
    with FilesClient(urls=[server.url + "/logo"], policy=QUICK) as src, \
            pytest.raises(ValueError, match="unsupported content type 'image/png'"):
        src.fetch(1, {})


def test_url_retries_then_succeeds_or_gives_up(server):
    server.script("/flaky.txt", Reply(503, "busy", content_type="text/plain"),
                  Reply(200, TXT, content_type="text/plain", delay=0.6),  # slower than the timeout
                  Reply(200, TXT, content_type="text/plain"))
    server.fallback("/down.txt", lambda _s: Reply(500, "Internal Server Error", content_type="text/plain"))
    fast = replace(QUICK, timeout=0.2, max_attempts=3, backoff_base=0.02)
    with FilesClient(urls=[server.url + "/flaky.txt"], policy=fast) as src:
        arts, _ = src.fetch(1, {})
    assert arts[0].text.startswith("The printing press") and len(server.hits("/flaky.txt")) == 3
    with FilesClient(urls=[server.url + "/down.txt"], policy=fast) as src, \
            pytest.raises(SourceHTTPError, match=r"gave up after 3 attempts \(last: HTTP 500\)"):
        src.fetch(1, {})
    assert len(server.hits("/down.txt")) == 3


def test_unchanged_url_costs_a_304(server):
    version = {"etag": '"v1"', "body": TXT}

    def page(seen):
        if seen.headers.get("If-None-Match") == version["etag"]:
            return Reply(304, b"", headers={"ETag": version["etag"]})
        return Reply(200, version["body"], content_type="text/plain; charset=utf-8", headers={"ETag": version["etag"]})

    server.fallback("/page.txt", page)
    url = server.url + "/page.txt"
    with FilesClient(urls=[url], policy=QUICK) as src:
        first, cursor = src.fetch(5, {})
        assert len(first) == 1 and cursor["validators"][url] == {"etag": '"v1"'}
        again, cursor = src.fetch(5, cursor)
        assert again == [] and src.last_skipped["not_modified"] == 1
        version.update(etag='"v2"', body=TXT + "A second edition.\n")
        changed, cursor = src.fetch(5, cursor)
    assert "A second edition." in changed[0].text
    assert [h.headers.get("If-None-Match") for h in server.hits("/page.txt")] == [None, '"v1"', '"v1"']


def test_url_rate_limit_and_size_cap(server, tmp_path):
    for i in range(3):
        server.script(f"/p{i}.txt", Reply(200, f"Document number {i}.", content_type="text/plain"))
    with FilesClient(urls=[f"{server.url}/p{i}.txt" for i in range(3)], policy=replace(QUICK, min_interval=0.2)) as src:
        assert len(src.fetch(3, {})[0]) == 3
    times = [h.t for h in server.hits()]
    assert min(b - a for a, b in zip(times, times[1:])) >= 0.16

    server.script("/big.txt", Reply(200, "x" * 5000, content_type="text/plain"))
    capped = replace(QUICK, max_bytes=1000)
    with FilesClient(urls=[server.url + "/big.txt"], policy=capped) as src, \
            pytest.raises(SourceHTTPError, match="over the 1000-byte limit"):
        src.fetch(1, {})
    # The same cap holds for a local file, named or found in a folder.
    big = tmp_path / "big.txt"
    big.write_text("x" * 5000)
    with pytest.raises(ValueError, match="over the 1000-byte limit"):
        FilesClient([big], policy=capped).fetch(1, {})


def test_a_bad_http_policy_is_one_clear_line():
    for fields, words in [(dict(max_attempts=0), "max_attempts must be >= 1"),
                          (dict(min_interval=-1), "min_interval must be >= 0"),
                          (dict(backoff_base=-0.5), "backoff_base and backoff_max must be >= 0")]:
        with pytest.raises(ValueError, match=words):
            HttpPolicy(**fields)


def test_the_spec_builds_a_files_source(docs, server):
    """What a run's `files` source becomes (sources/factory.py), with the files source's HTTP policy."""
    server.script("/notes.txt", Reply(200, TXT, content_type="text/plain"))
    spec = SourceSpec(files=FilesSource(paths=[str(docs / "notes.txt")], urls=[server.url + "/notes.txt"]))
    t0 = time.monotonic()
    src = build_source(spec)
    assert isinstance(src, FilesClient) and src.http.policy == FILES_HTTP
    with src:
        arts, cursor = src.fetch(5, {})
    assert src.name == "files" and [a.source for a in arts] == ["file"]  # same bytes: learned once
    assert src.last_skipped["unchanged"] == 1 and len(cursor["learned"]) == 1
    assert server.hits("/notes.txt")[0].headers["User-Agent"].startswith("selflearn/")
    assert time.monotonic() - t0 < 2
