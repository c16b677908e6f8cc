"""Config files users hand us are read with limits, and each bad one is one clear line.

- Through the real command line (`python -m selflearn.trainer --run-config FILE`): a billion-laughs
  document, a file over 1 MiB, duplicate keys, a syntax error and `storage.uri: "file://"` each
  exit 2 before training with one stderr line `selflearn train: error: ...` naming the file.
- `selflearn local --config` and `selflearn serve --config` read through the same loader.
- The loader itself, in-process: what it refuses and says, and that anchors, aliases and merge keys
  of a normal config still work.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from selflearn import yaml_input
from selflearn.cli import main
from selflearn.spec import MAX_RUN_CONFIG_JSON, load_run_config, parse_spec
from selflearn.yaml_input import MAX_BYTES, YAMLInputError, load_yaml_file, parse_yaml

REPO = Path(__file__).resolve().parents[1]


def laughs(levels: int = 9) -> str:
    """The issue's document: nine levels of nine aliases inside spec.trainer.resources (9**9 "lol"s)."""
    lines = ["name: bomb", "spec:", "  trainer:", "    resources:",
             "      l0: &l0 [" + ", ".join(['"lol"'] * 9) + "]"]
    lines += [f"      l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


HUGE = "name: big\nspec:\n  training:\n    blocklist:\n" + "    - some-word-to-block\n" * 60_000
DUPLICATE = """name: dup
spec:
  storage: {uri: "s3://bucket-a/runs"}
  training: {epochs: 1}
  storage: {uri: "file:///tmp/elsewhere"}
"""
SYNTAX = """name: typo
spec:
  training: {epochs: 1
  storage: {uri: "s3://bucket/runs"}
"""
FILE_STORE = REPO / "tests" / "data" / "bad-learnerruns" / "file-storage-without-path.yaml"


# -- the command line ------------------------------------------------------------------------------
@pytest.mark.parametrize("text, words", [
    (laughs(), "aliases expand the document beyond"),
    (HUGE, f"MiB ({len(HUGE):,} bytes); the limit is 1 MiB"),
    (DUPLICATE, "line 5, column 3: duplicate key 'storage' (first at line 3)"),
    (SYNTAX, "is not valid YAML: line 4, column 10: expected ',' or '}', but got ':'"),
    (FILE_STORE.read_text(), "spec.storage.uri: 'file://' has no path (file:// alone is the current directory): "
                             "write file:///absolute/dir or file://./relative/dir"),
], ids=["billion-laughs", "huge", "duplicate-keys", "syntax-error", "file-store-without-path"])
def test_the_trainer_refuses_a_bad_run_config_in_one_line(tmp_path, text, words):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    proc = subprocess.run([sys.executable, "-m", "selflearn.trainer", "--run-config", str(path), "--round", "1",
                           "--no-progress"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("selflearn train: error: ") and str(path) in lines[0] and words in lines[0], lines[0]
    assert proc.stdout == ""  # no round result: training never started


@pytest.mark.parametrize("command", [["local", "--no-serve", "--rounds", "1"], ["serve"]])
def test_local_and_serve_read_their_config_through_the_same_loader(tmp_path, capsys, command):
    path = tmp_path / "conf.yaml"
    path.write_text(laughs())
    assert main([*command, "--config", str(path), *(["--data-dir", str(tmp_path / "d")] if "local" in command
                                                    else [])]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"selflearn {command[0]}: error: "), err
    assert str(path) in err and "aliases expand the document beyond" in err
    assert not (tmp_path / "d").exists()  # refused before local mode made its data directory


# -- the loader ------------------------------------------------------------------------------------
def test_a_normal_config_with_anchors_and_a_merge_key_still_loads(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("""apiVersion: selflearn.dev/v1alpha1
kind: LearnerRun
metadata: {name: shared}
spec:
  storage: {uri: "s3://bucket/runs"}
  training: &training {epochs: 2, batchSize: 8}
  trainer:
    resources: &gpu {limits: {nvidia.com/gpu: 1, memory: 24Gi}}
    tolerations: [&tol {key: nvidia.com/gpu, operator: Exists, effect: NoSchedule}]
  serving:
    resources: *gpu
  sources:
    - snapshot: {language: en}
    - feedback:
        <<: {perClientCap: 3, maxItems: 50}
        maxItems: 80
""")
    config = load_run_config(path)
    assert config.name == "shared" and config.spec.training.batch_size == 8
    assert config.spec.serving.resources == config.spec.trainer.resources == {
        "limits": {"nvidia.com/gpu": 1, "memory": "24Gi"}}
    # A key after a merge overrides the merged one (YAML's merge rule), not a duplicate.
    assert (config.spec.feedback.per_client_cap, config.spec.feedback.max_items) == (3, 80)


@pytest.mark.parametrize("text, words", [
    ("a: &a [1, *a]\n", "line 1, column 11: an alias inside its own anchor (a recursive document) is not allowed"),
    ("a: " + "[" * 40 + "]" * 40 + "\n", "nested more than 32 levels deep"),
    ("a: &a " + "[" * 20 + "]" * 20 + "\nb: &b [[[[[[[[[[[[[[[*a]]]]]]]]]]]]]]]\n",
     "line 2, column 22: nested more than 32 levels deep once aliases are expanded"),
    ("n: 1" + ":1" * 20_000 + "\n", "line 1, column 4: a number of 40,001 characters (at most 100)"),
    ("a: 1\na: 2\n", "line 2, column 1: duplicate key 'a' (first at line 1)"),
    ("{1: x, true: y}\n", "duplicate key True"),  # the same key once loaded: 1 == True
], ids=["recursive-alias", "deep", "deep-through-an-alias", "base-60-number", "duplicate-key", "1-and-true"])
def test_the_loader_refuses_what_no_config_needs(text, words):
    with pytest.raises(YAMLInputError) as err:
        parse_yaml(text)
    assert not err.value.syntax and words in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("text, words", [
    ("a: 'open\n\nb: 1\n", "line 4, column 1: found unexpected end of stream (while scanning a quoted scalar "
                           "from line 1, column 4)"),
    ("a:\n\t- 1\n", "line 2, column 1: found character '\\t' that cannot start any token"),
    ("a: b\x01\n", "line 1, column 5: character #x0001 is not allowed"),
    ("a: 1\n---\nb: 2\n", "line 2, column 1: expected a single document in the stream, but found another document"),
    ("a: 2024-13-01\n", "line 1, column 4: cannot read '2024-13-01' as timestamp: month must be in 1..12"),
    ("a: !!python/object/apply:os.system [ls]\n", "could not determine a constructor"),
], ids=["unclosed-quote", "tab", "control-character", "two-documents", "bad-date", "python-tag"])
def test_a_yaml_error_is_one_line_with_line_and_column(tmp_path, text, words):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ValueError) as err:
        load_yaml_file(path, what="config file")
    assert str(err.value).startswith(f"config file {path} is not valid YAML: ") and words in str(err.value)
    assert "\n" not in str(err.value)


def test_unreadable_inputs_are_one_line(tmp_path):
    (tmp_path / "latin1.yaml").write_bytes(b"a: 1\nb: caf\xe9\n")
    cases = [(tmp_path / "missing.yaml", "does not exist"), (tmp_path, "is a directory"),
             (tmp_path / "latin1.yaml", "is not UTF-8 text: line 2, byte 0xe9"),
             (Path("/dev/zero"), "is larger than the limit of 1 MiB")]  # not a regular file: read up to the cap
    for path, words in cases:
        with pytest.raises(ValueError, match=re.escape(words)):
            load_yaml_file(path, what="run config")


DENSE = {  # the alias-free shapes with the most values per byte
    "flow-scalars": "[" + "k," * 20_000 + "k]",
    "empty-sequences": "[" + "[]," * 15_000 + "[]]",
    "empty-mappings": "[" + "{}," * 15_000 + "{}]",
    "block-nulls": "-\n" * 20_000,
    "keys-without-values": "{" + ",".join(map(str, range(8_000))) + "}",
    "block-keys": "".join(f"{i}:\n" for i in range(8_000)),
}


@pytest.mark.parametrize("text", DENSE.values(), ids=DENSE.keys())
def test_the_alias_budget_never_refuses_a_plain_file_under_the_size_cap(monkeypatch, text):
    """The budget is 2 units a byte of the size cap: the densest alias-free shapes stay under it."""
    monkeypatch.setattr(yaml_input, "MAX_EXPANDED", 2 * len(text))
    assert parse_yaml(text) is not None
    monkeypatch.setattr(yaml_input, "MAX_EXPANDED", 2_000)  # and the budget does bind
    with pytest.raises(YAMLInputError, match="the document holds beyond 2,000 values and characters"):
        parse_yaml(text)


def test_aliases_within_budget_are_still_bounded_once_written_out(tmp_path):
    """A few aliases of a 100 KB block pass the loader's budget, but the run config would be written
    out again (the local run.yaml, the operator's ConfigMap) at four times that: refused."""
    path = tmp_path / "run.yaml"
    block = "[" + ", ".join(["x" * 1000] * 100) + "]"
    path.write_text(f"name: wide\nspec:\n  trainer:\n    resources:\n      a: &a {block}\n      b: [*a, *a, *a]\n")
    assert path.stat().st_size < MAX_BYTES
    with pytest.raises(ValueError) as err:
        load_run_config(path)
    assert re.fullmatch(rf"run config {re.escape(str(path))} holds 39\d KiB as JSON \(aliases expanded, defaults "
                        rf"filled in\); the limit is {MAX_RUN_CONFIG_JSON // 1024} KiB", str(err.value)), str(err.value)


# -- storage.uri -----------------------------------------------------------------------------------
@pytest.mark.parametrize("uri, words", [
    ("file://", "has no path (file:// alone is the current directory)"),
    ("file://  ", "has no path"),
    ("s3://", "has no bucket: write s3://bucket or s3://bucket/prefix"),
    ("s3:///runs", "has no bucket"),
    ("ftp://x", "'ftp://x' must start with file:// or s3://"),
    ("s3://bucket", None), ("s3://bucket/runs/", None), ("file:///srv/ckpt", None), ("file://./ckpt", None),
    ("file://~/ckpt", None),
])
def test_storage_and_feedback_uris_name_a_place_and_the_crd_agrees(uri, words):
    crd = yaml.safe_load((REPO / "crds" / "learnerrun.yaml").read_text())
    spec_schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
    patterns = [spec_schema["storage"]["properties"]["uri"]["pattern"],
                spec_schema["sources"]["items"]["properties"]["feedback"]["properties"]["uri"]["pattern"]]
    for spec, pattern in [({"storage": {"uri": uri}}, patterns[0]),
                          ({"sources": [{"snapshot": {}}, {"feedback": {"uri": uri}}]}, patterns[1])]:
        assert bool(re.search(pattern, uri)) is (words is None), (pattern, uri)
        if words is None:
            parse_spec(spec)
            continue
        with pytest.raises(ValueError, match=re.escape(words)) as err:
            parse_spec(spec)
        assert "\n" not in str(err.value) and "pattern" not in str(err.value)  # words, not the regex
