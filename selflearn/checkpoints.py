"""CheckpointStore: round checkpoints on file:// or s3:// that nobody can half-read.

Layout under the store's prefix:

    <run>/r000007/{model files...}      weights, tokenizer, config: uploaded first
    <run>/r000007/manifest.json         written last; its presence is what makes a checkpoint exist
    <run>/promoted.json                 the serving pointer {"uri": ..., "round": ...}

Readers list only directories holding a manifest, and `download` verifies every file's sha256
and size against it, so a crash mid-upload or a flipped byte can never reach a model.
"""

from __future__ import annotations

import builtins  # `list` below is also CheckpointStore.list: the builtin by its full name in annotations

import fnmatch
import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable
from urllib.parse import urlparse

from .contracts import checkpoint_id, parse_round_dir, round_dir
from .store_backends import Backend, CheckpointError, FileBackend, S3Backend

MANIFEST = "manifest.json"
PROMOTED = "promoted.json"
MANIFEST_FORMAT = "selflearn.checkpoint/v1"
_CHUNK = 8 * 1024 * 1024


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class CheckpointRef:
    run: str
    round: int
    uri: str

    @property
    def id(self) -> str:
        """Short identity shown to users and in headers: `<run>/r000007`."""
        return checkpoint_id(self.run, self.round)


class CheckpointStore:
    """Checkpoints of one or more runs under a `file://` or `s3://` prefix."""

    def __init__(self, uri: str, backend: Backend):
        self.uri = uri.rstrip("/")
        self.backend = backend

    @classmethod
    def from_uri(cls, uri: str, *, endpoint: str | None = None, region: str | None = None,
                 access_key: str | None = None, secret_key: str | None = None) -> "CheckpointStore":
        parsed = urlparse(uri)
        if parsed.scheme == "file":
            path = Path(uri[len("file://"):]).expanduser().resolve()
            return cls(f"file://{path}", FileBackend(path))
        if parsed.scheme == "s3":
            if not parsed.netloc:
                raise ValueError(f"s3 uri {uri!r} needs a bucket: s3://bucket/prefix")
            return cls(uri, S3Backend(parsed.netloc, parsed.path, endpoint=endpoint, region=region,
                                      access_key=access_key, secret_key=secret_key))
        raise ValueError(f"unsupported store uri {uri!r}: use file:///path or s3://bucket/prefix")

    @classmethod
    def for_checkpoint(cls, checkpoint_uri: str, **kw: Any) -> tuple["CheckpointStore", str, int]:
        """Split `<store>/<run>/r000007` into its store, run and round."""
        base, run, rdir = checkpoint_uri.rstrip("/").rsplit("/", 2)
        round_ = parse_round_dir(rdir)
        if round_ is None:
            raise ValueError(f"{checkpoint_uri!r} is not a checkpoint uri (expected .../<run>/r000007)")
        return cls.from_uri(base, **kw), run, round_

    # -- names ---------------------------------------------------------------------------------
    def ref(self, run: str, round_: int) -> CheckpointRef:
        return CheckpointRef(run, round_, f"{self.uri}/{run}/{round_dir(round_)}")

    def ref_for_uri(self, uri: str) -> CheckpointRef:
        base, run, rdir = uri.rstrip("/").rsplit("/", 2)
        round_ = parse_round_dir(rdir)
        if base != self.uri or round_ is None:
            raise ValueError(f"{uri!r} is not a checkpoint of store {self.uri}")
        return CheckpointRef(run, round_, uri.rstrip("/"))

    def check(self) -> None:
        """Raise ValueError with a one-line message if the store cannot be reached or written."""
        self.backend.check()

    # -- publish -------------------------------------------------------------------------------
    def publish(self, run: str, round_: int, local_dir: Path, manifest: dict[str, Any]) -> CheckpointRef:
        """Upload every file of `local_dir`, then the manifest (with sha256 and size per file)."""
        ref = self.ref(run, round_)
        base = f"{run}/{round_dir(round_)}"
        if self.backend.get_bytes(f"{base}/{MANIFEST}") is not None:
            raise CheckpointError(f"checkpoint {ref.uri} already exists; rounds are immutable")
        files: dict[str, dict[str, Any]] = {}
        for path in sorted(p for p in Path(local_dir).rglob("*") if p.is_file()):
            rel = path.relative_to(local_dir).as_posix()
            if rel == MANIFEST:
                continue
            files[rel] = {"sha256": sha256_file(path), "size": path.stat().st_size}
            self.backend.put_file(f"{base}/{rel}", path)
        if not files:
            raise CheckpointError(f"refusing to publish an empty checkpoint from {local_dir}")
        doc = {**manifest, "format": MANIFEST_FORMAT, "run": run, "round": round_, "uri": ref.uri,
               "id": ref.id, "published_at": time.time(), "files": files}
        # The manifest goes last: until it lands, readers do not see this checkpoint at all.
        self.backend.put_bytes(f"{base}/{MANIFEST}", json.dumps(doc, indent=2, sort_keys=True).encode())
        return ref

    # -- read ----------------------------------------------------------------------------------
    def list(self, run: str) -> list[CheckpointRef]:
        """Complete checkpoints of `run` (those with a manifest), oldest first."""
        out = []
        for d in self.backend.list_dirs(run):
            round_ = parse_round_dir(d)
            if round_ is not None and self.backend.get_bytes(f"{run}/{d}/{MANIFEST}") is not None:
                out.append(self.ref(run, round_))
        return sorted(out, key=lambda r: r.round)

    def latest(self, run: str) -> CheckpointRef | None:
        refs = self.list(run)
        return refs[-1] if refs else None

    def runs(self) -> builtins.list[str]:
        return [d for d in self.backend.list_dirs("") if not d.startswith(".")]

    def manifest(self, ref: CheckpointRef | str) -> dict[str, Any]:
        ref = self.ref_for_uri(ref) if isinstance(ref, str) else ref
        raw = self.backend.get_bytes(f"{ref.run}/{round_dir(ref.round)}/{MANIFEST}")
        if raw is None:
            raise CheckpointError(f"checkpoint {ref.uri} does not exist (no manifest)")
        try:
            doc = json.loads(raw)
        except json.JSONDecodeError as err:
            raise CheckpointError(f"manifest of {ref.uri} is not valid JSON: {err}") from None
        if not isinstance(doc, dict) or doc.get("format") != MANIFEST_FORMAT or not isinstance(doc.get("files"), dict):
            raise CheckpointError(f"manifest of {ref.uri} is not a {MANIFEST_FORMAT} manifest")
        return doc

    def checkpoint_file(self, ref: CheckpointRef, name: str) -> bytes | None:
        """File `name` of checkpoint `ref` (articles.jsonl), unverified; None if it has none."""
        return self.backend.get_bytes(f"{ref.run}/{round_dir(ref.round)}/{name}")

    def download(self, ref: CheckpointRef | str, dest: Path, *, skip: tuple[str, ...] = ()) -> dict[str, Any]:
        """Fetch a checkpoint into `dest`, verifying every file; returns its manifest.

        Files land in a temporary sibling directory that is renamed into place only after every
        sha256 matches, so `dest` is either absent or complete and verified. Files matching the
        patterns in `skip` (fnmatch, on the path within the checkpoint: `openvino/*`) are left
        out: a trainer needs no parent's OpenVINO IR, a replica serving that IR no HF weights. The
        local manifest records what was skipped, so such a copy never passes for a fuller one.
        """
        ref = self.ref_for_uri(ref) if isinstance(ref, str) else ref
        doc = self.manifest(ref)
        dest = Path(dest)
        if (dest / MANIFEST).is_file():
            try:
                local = json.loads((dest / MANIFEST).read_text())
                if local.get("files") == doc["files"] and set(local.get("skipped", [])) <= set(skip):
                    return doc  # already downloaded and verified, with at least what is asked for
            except json.JSONDecodeError:
                pass
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}."))
        try:
            for rel, meta in doc["files"].items():
                if ".." in Path(rel).parts or rel.startswith("/"):
                    raise CheckpointError(f"manifest of {ref.uri} names an unsafe path {rel!r}")
                if any(fnmatch.fnmatchcase(rel, pattern) for pattern in skip):
                    continue
                target = tmp / rel
                self.backend.get_file(f"{ref.run}/{round_dir(ref.round)}/{rel}", target)
                size = target.stat().st_size
                if size != meta.get("size"):
                    raise CheckpointError(f"{ref.uri}/{rel}: size {size} != manifest {meta.get('size')}")
                digest = sha256_file(target)
                if digest != meta.get("sha256"):
                    raise CheckpointError(f"{ref.uri}/{rel}: sha256 mismatch (file {digest[:12]}, "
                                          f"manifest {str(meta.get('sha256'))[:12]}); refusing to load")
            (tmp / MANIFEST).write_text(json.dumps({**doc, "skipped": list(skip)} if skip else doc,
                                                   indent=2, sort_keys=True))
            shutil.rmtree(dest, ignore_errors=True)
            os.replace(tmp, dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return doc

    # -- serving pointer ------------------------------------------------------------------------
    def promoted(self, run: str) -> CheckpointRef | None:
        raw = self.backend.get_bytes(f"{run}/{PROMOTED}")
        if raw is None:
            return None
        try:
            return self.ref_for_uri(json.loads(raw)["uri"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
            raise CheckpointError(f"promoted pointer of run {run} is corrupt: {err}") from None

    def set_promoted(self, ref: CheckpointRef) -> None:
        self.manifest(ref)  # only a complete checkpoint can be promoted
        doc = {"uri": ref.uri, "round": ref.round, "id": ref.id, "at": time.time()}
        self.backend.put_bytes(f"{ref.run}/{PROMOTED}", json.dumps(doc).encode())

    # -- retention ------------------------------------------------------------------------------
    def retain(self, run: str, keep: int, protect: Iterable[str] = ()) -> builtins.list[CheckpointRef]:
        """Delete all but the newest `keep` checkpoints; never the promoted or `protect`ed ones.

        Incomplete directories (no manifest) older than the newest complete one are debris from a
        crashed upload and go too.
        """
        if keep < 1:
            raise ValueError("keep must be >= 1")
        complete = self.list(run)
        keep_uris = {r.uri for r in complete[-keep:]} | set(protect)
        promoted = self.promoted(run)
        if promoted:
            keep_uris.add(promoted.uri)
        deleted = []
        for r in complete:
            if r.uri not in keep_uris:
                self.backend.delete_prefix(f"{run}/{round_dir(r.round)}")
                deleted.append(r)
        newest = complete[-1].round if complete else -1
        for d in self.backend.list_dirs(run):
            round_ = parse_round_dir(d)
            if round_ is not None and round_ < newest and self.backend.get_bytes(f"{run}/{d}/{MANIFEST}") is None:
                self.backend.delete_prefix(f"{run}/{d}")
        return deleted

    def remove_incomplete(self, run: str) -> builtins.list[str]:
        """Delete `run`'s round directories without a manifest (interrupted uploads); their names."""
        gone = [d for d in self.backend.list_dirs(run)
                if d.startswith("r") and d[1:].isdigit() and self.backend.get_bytes(f"{run}/{d}/{MANIFEST}") is None]
        for d in gone:
            self.backend.delete_prefix(f"{run}/{d}")
        return gone

    def delete_run(self, run: str) -> None:
        self.backend.delete_prefix(run)

    # -- small JSON documents beside checkpoints (run state, feedback) ---------------------------
    def put_json(self, key: str, doc: Any) -> None:
        self.backend.put_bytes(key, json.dumps(doc, indent=2, sort_keys=True).encode())

    def get_json(self, key: str) -> Any | None:
        raw = self.backend.get_bytes(key)
        return None if raw is None else json.loads(raw)
