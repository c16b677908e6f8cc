"""Text out of the bytes of a .txt, .md, .html or .pdf document (the files source's parsers).

- Plain text is decoded (UTF-8, else a detected charset).
- Markdown is rendered with markdown-it-py and read back as text, so syntax (emphasis, links,
  code fences, tables, inline HTML) disappears and the words stay; YAML front matter is dropped.
- HTML keeps the readable text: script, style, nav, forms, asides and the like are dropped, and
  `<main>` or `<article>` is preferred over the whole body when a page has one.
- PDF text comes from pypdf, page by page, with hyphenated line breaks re-joined.
"""

from __future__ import annotations

import io
import logging
import re
from typing import Any

from .polite import decode_bytes

log = logging.getLogger(__name__)

_DROP_TAGS = ("script", "style", "noscript", "template", "nav", "aside", "form", "button", "select",
              "iframe", "svg", "canvas", "object", "embed", "footer", "head", "dialog")
_DROP_ROLES = {"navigation", "banner", "contentinfo", "search", "complementary", "menu", "menubar"}
_PARAGRAPH = {"p", "h1", "h2", "h3", "h4", "h5", "h6", "blockquote", "pre", "table", "ul", "ol", "dl",
              "figure", "section", "article", "main", "header", "address", "details", "hr"}
_LINE = {"div", "li", "dt", "dd", "tr", "figcaption", "caption", "summary", "body", "html"}
_SPACES = re.compile(r"[ \t\r\n\f\v]+")
_FRONT_MATTER = re.compile(r"\A(?:\ufeff)?---[ \t]*\n.*?\n(?:---|\.\.\.)[ \t]*(?:\n|\Z)", re.S)


def _tidy(text: str) -> str:
    lines = [" ".join(line.split()) if line.strip() else "" for line in text.split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def html_to_text(html: str) -> tuple[str | None, str]:
    """(title, readable text) of an HTML document."""
    from bs4 import BeautifulSoup
    from bs4.element import NavigableString, Tag

    soup = BeautifulSoup(html, "html.parser")
    title = None
    meta = soup.find("meta", attrs={"property": "og:title"})
    if soup.title and soup.title.get_text(strip=True):
        title = soup.title.get_text(" ", strip=True)
    elif isinstance(meta, Tag) and meta.get("content"):
        title = str(meta["content"]).strip()
    for tag in soup.find_all(_DROP_TAGS):
        tag.decompose()
    for tag in soup.find_all(True):
        if tag.decomposed or tag.attrs is None:
            continue
        if (tag.get("role") in _DROP_ROLES or tag.get("aria-hidden") == "true" or tag.has_attr("hidden")
                or (tag.name == "header" and tag.find_parent(("article", "main")) is None)):
            tag.decompose()
    articles = soup.find_all("article")
    root = soup.find("main") or (max(articles, key=lambda a: len(a.get_text())) if articles else None)
    root = root or soup.body or soup
    if title is None and (h1 := root.find("h1")):
        title = h1.get_text(" ", strip=True) or None

    # Walk without recursion (deeply nested pages exist): block elements become line breaks
    # (adjacent blocks share them: a paragraph break is at most one blank line), whitespace in
    # running text collapses, <pre> keeps its line breaks.
    out: list[str] = []
    newlines = 0  # newlines at the end of `out`

    def text(t: str) -> None:
        nonlocal newlines
        if not t:
            return
        out.append(t)
        core = t.rstrip(" \t")
        if core.strip("\n"):  # visible text: count only the newlines after it
            newlines = len(core) - len(core.rstrip("\n"))
        else:
            newlines += core.count("\n")

    def block(sep: str) -> None:
        if sep == " ":
            text(" ")
        elif len(sep) > newlines and out:
            text("\n" * (len(sep) - newlines))

    stack: list[Any] = [(root, False)]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            block(item)
            continue
        node, in_pre = item
        if isinstance(node, NavigableString):
            if type(node) is not NavigableString:  # a Comment, Doctype, CData, ...
                continue
            if in_pre:
                text(str(node))
            elif node.strip() or not newlines:
                # Whitespace between blocks is layout, not a word separator.
                text(_SPACES.sub(" ", str(node)))
            continue
        if not isinstance(node, Tag):
            continue
        name = node.name
        if name == "br":
            text("\n")
            continue
        sep = "\n\n" if name in _PARAGRAPH else "\n" if name in _LINE else " " if name in ("td", "th") else ""
        if name == "img" and node.get("alt"):
            text(f" {node['alt']} ")
        block(sep)
        stack.append(sep)
        for child in reversed(list(node.children)):
            stack.append((child, in_pre or name == "pre"))
    return title, _tidy("".join(out))


def markdown_to_text(md: str) -> tuple[str | None, str]:
    """(title, text) of a Markdown document: rendered to HTML by markdown-it-py, then read back.
    The title is the front matter's `title:` or the first `# heading`."""
    from markdown_it import MarkdownIt

    title = None
    if fm := _FRONT_MATTER.match(md):
        if m := re.search(r"^title:[ \t]*(.+?)[ \t]*$", fm.group(0), re.M):
            title = m.group(1).strip("'\"") or None
        md = md[fm.end():]
    parser = MarkdownIt("commonmark", {"html": True}).enable(["table", "strikethrough"])
    if title is None and (heading := re.search(r"^ {0,3}#[ \t]+(.+?)(?:[ \t]+#+)?[ \t]*$", md, re.M)):
        title = html_to_text(parser.renderInline(heading.group(1)))[1] or None
    _, text = html_to_text(f"<html><body>{parser.render(md)}</body></html>")
    return title, text


_HYPHEN_BREAK = re.compile(r"(\w)-\n(?=[a-z])")
_SOFT_BREAK = re.compile(r"(?<=[^\n])\n(?=[a-z(])")


def pdf_to_text(data: bytes) -> tuple[str | None, str, int]:
    """(title, text, page count) of a PDF, through pypdf."""
    from pypdf import PdfReader
    from pypdf.errors import PdfReadError

    try:
        reader = PdfReader(io.BytesIO(data))
        if reader.is_encrypted and not reader.decrypt(""):
            raise ValueError("the PDF is encrypted")
        pages = list(reader.pages)
    except (PdfReadError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"cannot read PDF: {err}") from None
    texts = []
    for i, page in enumerate(pages):
        try:
            t = page.extract_text() or ""
        except Exception as err:  # one broken page should not lose the rest of the document
            log.warning("PDF page %d: no text (%s)", i + 1, err)
            continue
        # Lines of a paragraph come back as separate lines; re-join words hyphenated across a
        # line break and lines that continue a sentence.
        t = _SOFT_BREAK.sub(" ", _HYPHEN_BREAK.sub(r"\1", t.replace("\r\n", "\n")))
        texts.append(t.strip())
    title = None
    try:
        meta = reader.metadata
        title = (meta.title or "").strip() or None if meta else None
    except Exception:  # broken metadata is not worth losing the text over
        pass
    return title, _tidy("\n\n".join(t for t in texts if t)), len(pages)


def extract(data: bytes, kind: str, *, charset: str | None = None) -> tuple[str | None, str, dict[str, Any]]:
    """(title or None, text, extra) for raw bytes of one of the supported kinds."""
    if kind == "pdf":
        title, text, pages = pdf_to_text(data)
        return title, text, {"pages": pages}
    decoded = decode_bytes(data, charset)
    if kind == "html":
        return (*html_to_text(decoded), {})
    if kind == "markdown":
        return (*markdown_to_text(decoded), {})
    if kind == "text":
        return None, _tidy(decoded.replace("\r\n", "\n").replace("\r", "\n")), {}
    raise ValueError(f"unsupported kind {kind!r}")
