"""A round on several ranks (selflearn/trainer/distributed.py, launch.py): `selflearn train --procs 2`
under PyTorch's elastic launcher, gloo on this CPU, against the one-process round."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from selflearn.checkpoints import CheckpointStore
from selflearn.spec import parse_spec
from selflearn.trainer import distributed
from selflearn.trainer.distributed import World
from tests.support.waiting import wait_until

# fp32 and eager: the tolerance below is float summation order, nothing else. Four micro-batches a
# step, so each of the two ranks takes two, and a tail window of three leaves one rank short.
TRAINING = {"maxLength": 64, "batchSize": 2, "gradientAccumulation": 4, "learningRate": 1.0e-3, "chatEval": False,
            "evalArticles": 1, "generalArticles": 2, "epochs": 2, "precision": "fp32", "compile": "off",
            "format": "text"}


def write_run(path: Path, model: str, store: Path, trainer: dict | None = None, articles: int = 3,
              **training) -> Path:
    path.write_text(yaml.safe_dump({"name": "d", "spec": {
        "baseModel": model, "sources": [{"snapshot": {"language": "en", "articlesPerRound": articles}}],
        "training": {**TRAINING, **training}, "storage": {"uri": f"file://{store}"},
        "trainer": trainer or {}, "serving": {"engine": "torch"}}}))
    return path


def train(run: Path, *extra: str, **kw) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SELFLEARN_COMPILE": "0"}
    return subprocess.Popen([sys.executable, "-m", "selflearn.trainer", "--run-config", str(run), "--round", "1",
                             "--no-progress", *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, **kw)


def finished(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, dict, str]:
    out, err = proc.communicate(timeout=timeout)
    lines = [ln for ln in out.splitlines() if ln.startswith("{")]
    assert len(lines) == 1, (out, err[-3000:])  # one result line, whatever the number of ranks
    return proc.returncode, json.loads(lines[0]), err


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, tiny_llama_dir):
    d = tmp_path_factory.mktemp("one-process")
    code, result, err = finished(train(write_run(d / "run.yaml", tiny_llama_dir, d / "store")))
    assert code == 0 and result["status"] == "published", err[-3000:]
    return load_file(d / "store" / "d" / "r000001" / "model.safetensors"), result


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_ranks_train_the_weights_one_process_does(strategy, one_process, tiny_llama_dir, tmp_path):
    weights, alone = one_process
    run = write_run(tmp_path / "run.yaml", tiny_llama_dir, tmp_path / "store", {"strategy": strategy})
    code, result, err = finished(train(run, "--procs", "2"))
    assert code == 0 and result["status"] == "published", err[-3000:]
    store = CheckpointStore.from_uri(f"file://{tmp_path / 'store'}")
    assert [r.id for r in store.list("d")] == ["d/r000001"]  # one checkpoint, by rank 0
    manifest = store.manifest(store.ref("d", 1))
    assert manifest["world"] == {"size": 2, "strategy": strategy}
    two = load_file(tmp_path / "store" / "d" / "r000001" / "model.safetensors")
    assert set(two) == set(weights)
    diff = max((two[k] - weights[k]).abs().max().item() for k in weights)
    assert diff <= 1e-5, f"{strategy}: max abs difference {diff:.2e} from the one-process round"
    # The same steps and losses, and the evaluation (sharded over the ranks) agrees.
    assert result["metrics"]["steps"] == alone["metrics"]["steps"]
    for name, pair in alone["metrics"]["ppl"].items():
        assert result["metrics"]["ppl"][name]["after"] == pytest.approx(pair["after"], rel=1e-4)
        assert result["metrics"]["ppl"][name]["before"] == pytest.approx(pair["before"], rel=1e-6)


def test_two_machines_meet_at_the_first_ones_endpoint_as_pods_do(one_process, tiny_llama_dir, tmp_path):
    """What each pod of an Indexed Job runs (`--nnodes 2 --rdzv-endpoint <job>-0.<service>:29400`),
    as two launchers here: they meet through c10d, rank 0's says the result, one checkpoint."""
    from conftest import free_port

    weights, _ = one_process
    run = write_run(tmp_path / "run.yaml", tiny_llama_dir, tmp_path / "store", {"strategy": "ddp"})
    endpoint = f"127.0.0.1:{free_port()}"
    flags = ("--nnodes", "2", "--rdzv-endpoint", endpoint, "--rdzv-id", "d-r1")
    pods = [train(run, *flags), train(run, *flags)]
    outs = [p.communicate(timeout=300) for p in pods]
    assert [p.returncode for p in pods] == [0, 0], [err[-2000:] for _, err in outs]
    lines = [ln for out, _ in outs for ln in out.splitlines() if ln.startswith("{")]
    assert len(lines) == 1 and json.loads(lines[0])["status"] == "published"  # rank 0's launcher alone prints
    store = CheckpointStore.from_uri(f"file://{tmp_path / 'store'}")
    assert [r.id for r in store.list("d")] == ["d/r000001"]
    two = load_file(tmp_path / "store" / "d" / "r000001" / "model.safetensors")
    assert max((two[k] - weights[k]).abs().max().item() for k in weights) <= 1e-5


def test_two_ranks_share_the_probes_and_answer_as_one_process(tiny_llama_dir, tmp_path):
    """With chatEval on, each rank generates whole batches of the probes' questions and the report
    is gathered: the knowledge and chat figures equal the one-process round's (fp32, same batches)."""
    results = {}
    for procs in (1, 2):
        d = tmp_path / f"p{procs}"
        d.mkdir()
        # Enough articles for several batches of 32 questions: ranks take whole batches each.
        run = write_run(d / "run.yaml", tiny_llama_dir, d / "store", {"strategy": "ddp"}, articles=32,
                        chatEval=True, epochs=1, format="mixed")
        code, result, err = finished(train(run, *(("--procs", "2") if procs == 2 else ())))
        assert code == 0 and result["status"] == "published", err[-3000:]
        results[procs] = result["metrics"]
    one, two = results[1], results[2]
    assert one["knowledge"] is not None and one["chat"] is not None
    asked = one["knowledge"]["asked"]
    assert asked["learned"] + asked["held_out"] + asked["general"] > 32, asked  # 2+ batches of 32
    assert two["knowledge"] == one["knowledge"]  # every answer the same: its batch was the same
    assert two["chat"]["format_ok"] == one["chat"]["format_ok"]
    assert two["chat"]["retention"] == pytest.approx(one["chat"]["retention"], rel=1e-4)  # summed apart


def test_ranks_generating_whole_batches_give_every_answer_in_its_place(embedded_model_dir, tmp_path):
    """probe.generate on 2 ranks (5 batches of 4 dealt between them, gathered) returns the very
    answers, in the very order, that one process generates: the real model, whose answers differ."""
    from selflearn import basemodel
    from selflearn.trainer import probe

    prompts = [f"What is {x}?" for x in ("Paris", "the Moon", "water", "a violin", "Jupiter", "rice", "a bridge",
                                          "Mozart", "iron", "the Nile", "a tiger", "chess", "snow", "glass",
                                          "Rome", "a comet", "salt", "jazz")]
    (tmp_path / "prompts.json").write_text(json.dumps(prompts))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                    "-m", "tests.support.shared_generation", str(tmp_path / "prompts.json"), str(tmp_path / "out.json")],
                   check=True, env=env, capture_output=True, timeout=300)
    shared = json.loads((tmp_path / "out.json").read_text())
    model, tok = basemodel.load_model(embedded_model_dir), basemodel.load_tokenizer(embedded_model_dir)
    alone = [g.text for g in probe.generate(model, tok, prompts, max_new_tokens=8, batch_size=4)]
    assert len(set(alone)) > len(prompts) // 2  # answers that tell places apart
    assert shared == alone


def _rank_pids(launcher: int, rank: int) -> list[int]:
    """Processes below `launcher` whose environment says they are rank `rank`."""
    out = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            env = (p / "environ").read_bytes().split(b"\0")
            stat = (p / "stat").read_text().split()
        except OSError:
            continue
        if f"RANK={rank}".encode() in env and stat[3] == str(launcher):
            out.append(int(p.name))
    return out


def test_a_killed_rank_fails_the_round_naming_it_and_nothing_is_published(tiny_llama_dir, tmp_path):
    # Long enough to be killed in the middle of training: many epochs over a few blocks.
    run = write_run(tmp_path / "run.yaml", tiny_llama_dir, tmp_path / "store", epochs=100, maxLength=256)
    progress = tmp_path / "progress.json"
    proc = train(run, "--procs", "2", "--progress-file", str(progress))

    def training() -> bool:
        try:
            return json.loads(progress.read_text()).get("phase") == "training"
        except (OSError, ValueError):
            return False

    wait_until(training, timeout=180, what="rank 0 to start training")
    pids = _rank_pids(proc.pid, 1)
    assert len(pids) == 1, pids
    time.sleep(1.0)
    os.kill(pids[0], signal.SIGKILL)
    code, result, err = finished(proc)
    assert code == 1 and result["status"] == "failed", err[-3000:]
    assert result["reason"].startswith("rank 1 of 2 failed (killed by SIGKILL)"), result
    assert not (tmp_path / "store" / "d" / "r000001").exists()
    assert CheckpointStore.from_uri(f"file://{tmp_path / 'store'}").list("d") == []


def test_ranks_that_never_meet_time_out_with_the_endpoint_named(tiny_llama_dir, tmp_path):
    """Two machines announced, one comes: the rendezvous gives up after its timeout, saying where."""
    run = write_run(tmp_path / "run.yaml", tiny_llama_dir, tmp_path / "store", {"rendezvousTimeoutSeconds": 10})
    from conftest import free_port

    started = time.monotonic()
    code, result, err = finished(train(run, "--nnodes", "2", "--rdzv-endpoint", f"127.0.0.1:{free_port()}"),
                                 timeout=120)
    assert code == 1 and result["status"] == "failed", err[-3000:]
    assert "did not meet within 10 s" in result["reason"], result
    assert time.monotonic() - started < 90


def test_a_rendezvous_host_that_never_resolves_fails_the_round_saying_so(tiny_llama_dir, tmp_path):
    """A pod's name in the headless Service appears in DNS after the pod: the launcher waits for it,
    up to the rendezvous timeout, then says which name never resolved."""
    run = write_run(tmp_path / "run.yaml", tiny_llama_dir, tmp_path / "store", {"rendezvousTimeoutSeconds": 10})
    code, result, err = finished(train(run, "--nnodes", "2", "--rdzv-endpoint", "d-r1-0.no-such-service.invalid:29400"),
                                 timeout=120)
    assert code == 1 and result["status"] == "failed", err[-3000:]
    assert "cannot meet at d-r1-0.no-such-service.invalid:29400" in result["reason"], result
    assert "does not resolve" in result["reason"]


def test_each_rank_takes_its_share_and_runs_zero_weight_work_when_short():
    items = list(range(7))
    shares = [distributed.shard(World(rank=r, size=3), items) for r in range(3)]
    assert shares == [([0, 3, 6], 0), ([1, 4], 1), ([2, 5], 1)]
    assert distributed.shard(distributed.SOLO, items) == (items, 0)


def test_the_strategy_is_picked_by_what_fits_a_device():
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert distributed.pick_strategy("auto", 1, gpu, 10**9, 80 * 2**30) == "none"
    assert distributed.pick_strategy("auto", 2, cpu, 7 * 10**9, None) == "ddp"
    assert distributed.pick_strategy("auto", 8, gpu, 135 * 10**6, 80 * 2**30) == "ddp"
    assert distributed.pick_strategy("auto", 8, gpu, 7 * 10**9, 80 * 2**30) == "fsdp"  # 112 GB of state
    assert distributed.pick_strategy("ddp", 8, gpu, 7 * 10**9, 80 * 2**30) == "ddp"
    with pytest.raises(ValueError, match="choose auto, ddp or fsdp"):
        distributed.pick_strategy("zero3", 2, cpu, 1, None)


def test_the_spec_refuses_sharding_a_lora_run_and_bad_worker_counts():
    with pytest.raises(ValueError, match="use strategy ddp"):
        parse_spec({"training": {"method": "lora"}, "trainer": {"strategy": "fsdp"}})
    with pytest.raises(ValueError, match="workers"):
        parse_spec({"trainer": {"workers": 0}})
    spec = parse_spec({"trainer": {"workers": 2, "procsPerWorker": 4, "strategy": "ddp"}})
    assert (spec.trainer.workers, spec.trainer.procs_per_worker, spec.trainer.strategy) == (2, 4, "ddp")
