"""YAML files users hand us (run configs, `selflearn serve --config`), read with limits.

PyYAML's SafeLoader builds no objects, but it still accepts what a config file must not carry:
an alias bomb (a "billion laughs": nine anchors of ten aliases each are a few hundred bytes that
expand to 10**9 values as soon as anything walks or serialises the result), duplicate mapping keys
(the last one silently wins), arbitrarily deep nesting (a RecursionError, not an error message)
and numbers of a million digits (base-60 ones convert in quadratic time). `load_yaml_file` reads
a file with a size cap and `BoundedSafeLoader`, and turns every problem into one ValueError line
that names the file, the line and column, and the problem.

Anchors and aliases stay allowed (Kubernetes manifests use them to share a block of resources or
tolerations), within a budget: the document with every alias expanded may hold at most
MAX_EXPANDED nodes plus scalar characters, which no alias-free file under MAX_BYTES reaches. So
whatever reads the loaded document later sees no more than a plain file under the cap could hold.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import yaml
from yaml.constructor import ConstructorError
from yaml.events import AliasEvent
from yaml.nodes import MappingNode, Node, ScalarNode

MAX_BYTES = 1 << 20  # 1 MiB: a run config is a few kilobytes
# Nodes plus scalar characters once aliases are expanded. An alias-free document costs at most
# ~1.5 units per byte of its text (`{a,b,...}`: a key, its null value), so 2 units per byte of the
# size cap leave every plain file under the cap alone and bound what anchors can add.
MAX_EXPANDED = 2 * MAX_BYTES
MAX_DEPTH = 32  # levels of nesting, aliases expanded (a LearnerRun manifest has about 7)
# YAML 1.1 reads `1:2:3` as a base-60 number; PyYAML's conversion is quadratic in its length.
MAX_NUMBER_CHARS = 100
MERGE_TAG = "tag:yaml.org,2002:merge"
NUMBER_TAGS = ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")
NEWLINE = "\n"


class RefusedYAML(ConstructorError):
    """Valid YAML that a config file may not contain (an alias bomb, duplicate keys, deep nesting)."""

    def __init__(self, problem: str, mark: yaml.Mark | None):
        super().__init__(None, None, problem, mark)


class YAMLInputError(ValueError):
    """A bad document: `detail` is one line starting with the line and column."""

    def __init__(self, detail: str, *, syntax: bool):
        super().__init__(detail)
        self.detail = detail
        self.syntax = syntax  # not YAML at all, rather than YAML we refuse

    def about(self, source: str) -> str:
        """The message naming its source: `run config run.yaml is not valid YAML: line 3, ...`."""
        return f"{source} is not valid YAML: {self.detail}" if self.syntax else f"{source}: {self.detail}"


class BoundedSafeLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys, recursive aliases, nesting deeper than MAX_DEPTH and
    alias expansion beyond MAX_EXPANDED (counted while composing, before anything is built)."""

    def __init__(self, stream: str):
        super().__init__(stream)
        self._depth = 0
        self._aliases = 0
        # id(node) -> (expanded size, expanded depth); nodes stay alive while the document is composed.
        self._cost: dict[int, tuple[int, int]] = {}

    def compose_node(self, parent: Node | None, index: Any) -> Node:
        is_alias = self.check_event(AliasEvent)
        mark = self.peek_event().start_mark
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise RefusedYAML(f"nested more than {MAX_DEPTH} levels deep", mark)
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        if is_alias:
            self._aliases += 1
            if id(node) not in self._cost:  # its anchor is still being composed: it contains itself
                raise RefusedYAML("an alias inside its own anchor (a recursive document) is not allowed", mark)
            size, depth = self._cost[id(node)]
        else:
            size, depth = self._measure(node)
            self._cost[id(node)] = (size, depth)
        if self._depth + depth > MAX_DEPTH:
            raise RefusedYAML(f"nested more than {MAX_DEPTH} levels deep once aliases are expanded", mark)
        if size > MAX_EXPANDED:
            what = "aliases expand the document" if self._aliases else "the document holds"
            raise RefusedYAML(f"{what} beyond {MAX_EXPANDED:,} values and characters "
                              "(write it out plainly, with fewer aliases)", mark)
        return node

    def _measure(self, node: Node) -> tuple[int, int]:
        """(expanded size, expanded depth) of a node whose children are already measured."""
        if isinstance(node, ScalarNode):
            return 1 + len(node.value), 1
        children = [n for pair in node.value for n in pair] if isinstance(node, MappingNode) else node.value
        if isinstance(node, MappingNode):
            _refuse_duplicate_keys(self, node)
        costs = [self._cost[id(c)] for c in children]
        return 1 + sum(s for s, _ in costs), 1 + max((d for _, d in costs), default=0)

    def construct_object(self, node: Node, deep: bool = False) -> Any:
        # A scalar that matches a type's pattern but not its range (`2024-13-01`, an int of 5000
        # digits) raises a bare ValueError inside PyYAML; give it the node's place in the file.
        if node.tag in NUMBER_TAGS and len(node.value) > MAX_NUMBER_CHARS:
            raise RefusedYAML(f"a number of {len(node.value):,} characters (at most {MAX_NUMBER_CHARS})",
                              node.start_mark)
        try:
            return super().construct_object(node, deep=deep)
        except (ValueError, OverflowError) as err:
            value = node.value if len(node.value) <= 40 else f"{node.value[:20]}...({len(node.value):,} characters)"
            raise ConstructorError(None, None, f"cannot read {value!r} as {node.tag.rsplit(':', 1)[-1]}: {err}",
                                   node.start_mark) from None


def _refuse_duplicate_keys(loader: BoundedSafeLoader, node: MappingNode) -> None:
    """Raise on a scalar key given twice in one mapping (merge keys `<<` may override, as YAML says)."""
    seen: dict[Any, yaml.Mark] = {}
    for key_node, _ in node.value:
        if not isinstance(key_node, ScalarNode) or key_node.tag == MERGE_TAG:
            continue  # a sequence or mapping as a key: the constructor refuses it (unhashable)
        key = loader.construct_object(key_node)
        if key in seen:
            raise RefusedYAML(f"duplicate key {key!r} (first at line {seen[key].line + 1})", key_node.start_mark)
        seen[key] = key_node.start_mark


def _where(mark: yaml.Mark | None) -> str:
    return f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""


def describe(err: yaml.YAMLError) -> str:
    """A YAML error as one line: `line 7, column 3: problem (context from line 2, column 1)`."""
    if isinstance(err, yaml.MarkedYAMLError):
        text = _where(err.problem_mark) + (err.problem or "")
        if err.context and (err.problem or "").startswith("but "):  # "expected X, but found Y"
            text = f"{_where(err.problem_mark)}{err.context}, {err.problem}"
        elif err.context:
            text += f" ({err.context}"
            text += f" from {_where(err.context_mark)[:-2]})" if err.context_mark is not None else ")"
    else:
        text = str(err)
    return " ".join(text.split())  # PyYAML's messages may hold newlines; ours are one line


def _position(text: str, index: int) -> str:
    line = text.count("\n", 0, index) + 1
    return f"line {line}, column {index - text.rfind(NEWLINE, 0, index)}"


def parse_yaml(text: str) -> Any:
    """The one document in `text`; YAMLInputError (a ValueError) of one line when it is bad."""
    loader = None
    try:
        loader = BoundedSafeLoader(text)  # PyYAML's reader checks for control characters here
        return loader.get_single_data()
    except RefusedYAML as err:
        raise YAMLInputError(describe(err), syntax=False) from None
    except yaml.reader.ReaderError as err:
        raise YAMLInputError(f"{_position(text, err.position)}: character #x{err.character:04x} is not allowed",
                             syntax=True) from None
    except yaml.YAMLError as err:
        raise YAMLInputError(describe(err), syntax=True) from None
    finally:
        if loader is not None:
            loader.dispose()


def _read_capped(path: Path, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            info = os.fstat(f.fileno())
            if stat.S_ISREG(info.st_mode) and info.st_size > MAX_BYTES:
                raise ValueError(f"{what} {path} is {info.st_size / MAX_BYTES:.1f} MiB ({info.st_size:,} bytes); "
                                 f"the limit is {MAX_BYTES // (1 << 20)} MiB")
            raw = f.read(MAX_BYTES + 1)  # not a regular file (a pipe, /dev/zero): stop at the cap
    except FileNotFoundError:
        raise ValueError(f"{what} {path} does not exist") from None
    except IsADirectoryError:
        raise ValueError(f"{what} {path} is a directory, not a file") from None
    except OSError as err:
        raise ValueError(f"cannot read {what} {path}: {err.strerror or err}") from None
    if len(raw) > MAX_BYTES:
        raise ValueError(f"{what} {path} is larger than the limit of {MAX_BYTES // (1 << 20)} MiB")
    return raw


def load_yaml_file(path: str | Path, *, what: str = "config file") -> Any:
    """The one YAML document in a user's file, read within MAX_BYTES, MAX_EXPANDED and MAX_DEPTH.

    Every problem is a ValueError of one line that starts with `what` and the path: a missing or
    unreadable file, one over the size cap, text that is not UTF-8, a syntax error (with its line
    and column), duplicate keys, an alias bomb or nesting too deep."""
    p = Path(path)
    raw = _read_capped(p, what)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise ValueError(f"{what} {p} is not UTF-8 text: line {line}, byte 0x{raw[err.start]:02x}") from None
    try:
        return parse_yaml(text)
    except YAMLInputError as err:
        raise ValueError(err.about(f"{what} {p}")) from None
