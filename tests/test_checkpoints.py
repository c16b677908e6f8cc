"""CheckpointStore on a directory and on a real S3 API server: nobody can half-read a checkpoint."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from selflearn.checkpoints import CheckpointError, CheckpointStore
from selflearn.trainer.round import resolve_parent


def _files(tmp: Path, name: str, payload: bytes = b"w" * 1000) -> Path:
    d = tmp / name
    d.mkdir()
    (d / "model.safetensors").write_bytes(payload)
    (d / "config.json").write_text('{"a": 1}')
    return d


@pytest.fixture(params=["file", "s3"])
def store(request, tmp_path, s3_server) -> CheckpointStore:
    if request.param == "file":
        return CheckpointStore.from_uri(f"file://{tmp_path}/store")
    endpoint, make_bucket = s3_server
    bucket = make_bucket(f"ckpt-{tmp_path.name.lower().replace('_', '-')[:40]}")
    return CheckpointStore.from_uri(f"s3://{bucket}/prefix", endpoint=endpoint)


def test_publish_list_download_verify(store, tmp_path):
    ref = store.publish("run", 1, _files(tmp_path, "a"), {"metrics": {"loss": 1.0}})
    assert ref.uri == f"{store.uri}/run/r000001" and ref.id == "run/r000001"
    assert [r.round for r in store.list("run")] == [1]
    doc = store.download(ref, tmp_path / "dl")
    assert doc["files"]["model.safetensors"]["size"] == 1000
    assert (tmp_path / "dl" / "model.safetensors").read_bytes() == b"w" * 1000
    with pytest.raises(CheckpointError, match="already exists"):
        store.publish("run", 1, _files(tmp_path, "b"), {})


def test_flipped_byte_is_refused(store, tmp_path):
    ref = store.publish("run", 1, _files(tmp_path, "a"), {})
    # Corrupt the stored weights behind the store's back (same size, one byte flipped).
    key = "run/r000001/model.safetensors"
    data = bytearray(store.backend.get_bytes(key))
    data[10] ^= 0xFF
    store.backend.put_bytes(key, bytes(data))
    with pytest.raises(CheckpointError, match="sha256 mismatch"):
        store.download(ref, tmp_path / "dl")
    assert not (tmp_path / "dl").exists(), "a failed verification must leave nothing loadable behind"


def test_promoted_pointer_and_retention(store, tmp_path):
    refs = [store.publish("run", i, _files(tmp_path, f"c{i}"), {}) for i in range(1, 6)]
    store.set_promoted(refs[0])
    assert store.promoted("run") == refs[0]
    deleted = store.retain("run", keep=2)
    assert [r.round for r in deleted] == [2, 3]
    assert [r.round for r in store.list("run")] == [1, 4, 5], "the promoted checkpoint is never deleted"
    assert store.latest("run").round == 5


def test_crash_between_weights_and_manifest(tmp_path):
    """A real process killed (SIGKILL) after uploading weights and before the manifest."""
    src = _files(tmp_path, "w")
    uri = f"file://{tmp_path}/store"
    ok = CheckpointStore.from_uri(uri)
    first = ok.publish("run", 1, _files(tmp_path, "first"), {})
    script = textwrap.dedent(f"""
        import os, signal
        from pathlib import Path
        from selflearn.checkpoints import CheckpointStore, MANIFEST
        store = CheckpointStore.from_uri({uri!r})
        real = store.backend.put_bytes
        def put_bytes(key, data):
            if key.endswith(MANIFEST):
                os.kill(os.getpid(), signal.SIGKILL)
            real(key, data)
        store.backend.put_bytes = put_bytes
        store.publish("run", 2, Path({str(src)!r}), {{}})
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True)
    assert proc.returncode == -9
    assert (tmp_path / "store/run/r000002/model.safetensors").is_file(), "weights were uploaded"
    store = CheckpointStore.from_uri(uri)
    assert [r.round for r in store.list("run")] == [1], "a checkpoint without manifest does not exist"
    with pytest.raises(CheckpointError, match="no manifest"):
        store.download(store.ref("run", 2), tmp_path / "dl")
    assert resolve_parent(store, "run", None) == first, "the next round trains from the last complete one"


def test_corrupt_manifest_is_refused(tmp_path):
    store = CheckpointStore.from_uri(f"file://{tmp_path}/s")
    ref = store.publish("run", 1, _files(tmp_path, "a"), {})
    store.backend.put_bytes("run/r000001/manifest.json", b"{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        store.download(ref, tmp_path / "dl")
    store.backend.put_bytes("run/r000001/manifest.json", json.dumps({"files": "x"}).encode())
    with pytest.raises(CheckpointError, match="not a selflearn"):
        store.manifest(ref)


def test_unreachable_bucket_is_a_clear_error(s3_server):
    endpoint, _ = s3_server
    with pytest.raises(ValueError, match="s3://no-such-bucket.* is not reachable"):
        CheckpointStore.from_uri("s3://no-such-bucket/p", endpoint=endpoint).check()
    with pytest.raises(ValueError, match="unsupported store uri"):
        CheckpointStore.from_uri("gs://bucket/x")
