"""The learning loop end to end in real containers (`make e2e-docker`, via hack/e2e-docker.sh).

Real parts: moto's S3 API server on 127.0.0.1; the operator (`selflearn operator`) running in the
trainer image against kmock's Kubernetes emulator (no real API server can run here); each trainer
Job's pod run as a container of the trainer image by tests/e2e_docker/job_runner.py; the serve image's
Ray head, fed every serveConfigV2 change through Ray's REST API by rayservice_applier.py.

The scenario: apply examples/learnerrun-tiny.yaml (its S3 endpoint pointed at the local server,
rounds back to back, two rounds); round 1 trains in a container and publishes to S3; the operator
promotes it; the serve container swaps in place (same replica ids and pids) while a client keeps
chatting (no request may fail); round 2 the same; pin r000001 (a rollback) and see it served; flip
one byte of a checkpoint in S3, pin it, and see it never served. Then one round of the same config
on the host, for the in-container round's speed (--host-round; the test tier copies round 2 instead).

Prints one JSON object as its last line (the figures); exits non-zero when a check fails.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import logging
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import boto3
import requests
import yaml

from selflearn.operator.kube import Connection, Kube
from selflearn.operator.resources import INGRESS_DEPLOYMENT, MODEL_DEPLOYMENT, served_checkpoint
from tests.support.operator import EmulatorThread

from .bad_inputs import bad_inputs, run_status
from .checks import NS, Failed, check, wait_for
from .job_runner import JobRunner
from .rayservice_applier import RayServiceApplier

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "learnerrun-tiny.yaml"
CACHE_PVC = REPO / "examples" / "trainer-cache-pvc.yaml"
log = logging.getLogger("e2e")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Chatter(threading.Thread):
    """A client that keeps chatting; every answer's checkpoint and every failure are kept."""

    def __init__(self, url: str, pause: float = 1.0):
        super().__init__(daemon=True, name="chatter")
        # One request a second: a steady user, not a load test (the trainer shares these 2 cores).
        self.url, self.pause, self.stop_flag = url, pause, threading.Event()
        self.total = self.failed = 0
        self.errors: list[str] = []
        self.seen: list[tuple[float, str | None]] = []

    def run(self) -> None:
        s = requests.Session()
        while not self.stop_flag.is_set():
            try:
                r = s.post(f"{self.url}/chat", json={"message": "What is the capital of France?",
                                                      "max_length": 8, "temperature": 0}, timeout=120)
                self.total += 1
                if r.status_code != 200:
                    self.failed += 1
                    self.errors.append(f"{time.strftime('%H:%M:%S')} HTTP {r.status_code}: {r.text[:200]}")
                    log.warning("chat failed: %s", self.errors[-1])
                else:
                    self.seen.append((time.time(), r.json().get("checkpoint")))
            except requests.RequestException as err:
                self.total += 1
                self.failed += 1
                self.errors.append(f"{time.strftime('%H:%M:%S')} {err!r}"[:200])
                log.warning("chat failed: %s", self.errors[-1])
            time.sleep(self.pause)

    def latest(self) -> str | None:
        return self.seen[-1][1] if self.seen else None

    def first_seen(self, checkpoint_id: str) -> float | None:
        return next((t for t, c in self.seen if _is(c, checkpoint_id)), None)


def serve_ready(url: str) -> bool:
    try:
        return requests.get(f"{url}/readyz", timeout=5).status_code == 200
    except requests.RequestException:
        return False


def swap_refused(url: str, checkpoint_id: str, *, since: float) -> str | None:
    """Serving's own word that loading `checkpoint_id` failed after `since`: /status's last_swap_error."""
    try:
        model = requests.get(f"{url}/status", timeout=5).json()["model"]
    except (requests.RequestException, ValueError, KeyError):
        return None
    err, at = model.get("last_swap_error") or "", model.get("last_swap_error_at") or 0
    return err if checkpoint_id in err and at >= since else None


def port_in_use(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


async def scenario(args: argparse.Namespace) -> dict[str, Any]:
    figures: dict[str, Any] = {}
    # The Ray head shares the host's network: its ports must be free (a Ray left running elsewhere?).
    busy = [p for p in (6379, 8265, 8000) if port_in_use(p)]
    if busy:
        raise Failed(f"ports {busy} on 127.0.0.1 are in use; the Ray head of the serve image needs them")
    work = Path(tempfile.mkdtemp(prefix="selflearn-e2e-docker-"))
    # 1. S3: moto's server on loopback, the example's bucket.
    from moto.server import ThreadedMotoServer

    s3_port = free_port()
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=s3_port)
    moto.start()
    endpoint = f"http://127.0.0.1:{s3_port}"
    creds = {"AWS_ACCESS_KEY_ID": "e2e", "AWS_SECRET_ACCESS_KEY": "e2e-secret"}
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                      aws_access_key_id=creds["AWS_ACCESS_KEY_ID"], aws_secret_access_key=creds["AWS_SECRET_ACCESS_KEY"])
    s3.create_bucket(Bucket="selflearn")

    # 2. The API server (kmock's emulator) and what a user creates first: the credentials Secret.
    api = EmulatorThread().start()
    kube = Kube(Connection(server=api.url))
    await kube.create("v1", "secrets", NS, {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s3-creds"},
                                            "data": {k: base64.b64encode(v.encode()).decode() for k, v in creds.items()}})
    kubeconfig = work / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "e2e",
        "clusters": [{"name": "e2e", "cluster": {"server": api.url}}],
        "users": [{"name": "e2e", "user": {"token": "e2e"}}],
        "contexts": [{"name": "e2e", "context": {"cluster": "e2e", "user": "e2e", "namespace": NS}}]}))
    kubeconfig.chmod(0o644)

    # 3. The operator from the trainer image; the two test controllers.
    operator = "e2e-operator"
    subprocess.run(["docker", "rm", "-f", operator], capture_output=True)
    subprocess.run(["docker", "run", "-d", "--name", operator, "--network", "host",
                    "-v", f"{kubeconfig}:/etc/e2e/kubeconfig:ro", "--entrypoint", "selflearn", args.trainer_image,
                    "operator", "--kubeconfig", "/etc/e2e/kubeconfig", "-n", NS, "--standalone",
                    "--tick", "2", "--retry-base", "5", "--retry-max", "30"], check=True, capture_output=True)
    runner = JobRunner(kube, namespace=NS, volumes_dir=work / "persistent-volumes")
    applier = RayServiceApplier(kube, namespace=NS)
    controllers = [asyncio.create_task(runner.run_forever()), asyncio.create_task(applier.run_forever())]
    url = f"http://127.0.0.1:{applier.serve_port}"
    chatter = Chatter(url)
    try:
        # 4. The example, as a user applies it (its S3 endpoint here; rounds back to back).
        doc = yaml.safe_load(EXAMPLE.read_text())
        spec = doc["spec"]
        spec["storage"]["endpoint"] = endpoint
        spec["schedule"] = {"intervalSeconds": 0, "maxRounds": 2}
        # The scenario needs both rounds promoted (then a rollback and a corrupt checkpoint). Two
        # tiny rounds' knowledge scores move by a few hundredths with a CPU's float summation
        # order alone, so the knowledge check gets that much slack here; the gate's own checks
        # are tested on real rounds in tests/test_gate_rounds.py.
        spec.setdefault("promotion", {})["maxKnowledgeDrop"] = 0.05
        spec["trainer"]["image"], spec["serving"]["image"] = args.trainer_image, args.serve_image
        run = doc["metadata"]["name"]
        if spec["trainer"].get("cacheVolumeClaim"):  # the trainer's cache volume, as the example's header says
            pvc = yaml.safe_load(CACHE_PVC.read_text())
            check(pvc["metadata"]["name"] == spec["trainer"]["cacheVolumeClaim"],
                  f"{CACHE_PVC.name} makes the claim the example names")
            await kube.create("v1", "persistentvolumeclaims", NS, pvc | {"status": {"phase": "Bound"}})
        await kube.create("selflearn.dev/v1alpha1", "learnerruns", NS, doc | {"metadata": {"name": run, "namespace": NS}})

        # Round 2 on two pods that meet through the headless Service (an Indexed Job): the spec
        # changes once round 1's Job exists, and the operator builds the next round from it.
        async def first_job() -> dict[str, Any] | None:
            return await kube.get("batch/v1", "jobs", NS, f"{run}-r1")

        await wait_for(first_job, timeout=120, what="round 1's Job")
        await kube.patch("selflearn.dev/v1alpha1", "learnerruns", NS, run, {"spec": {"trainer": {
            "workers": 2, "procsPerWorker": 1, "strategy": "ddp",
            "resources": {"requests": {"cpu": "1", "memory": "3Gi"}, "limits": {"cpu": "1", "memory": "5Gi"}}}}})

        t_serve = time.monotonic()
        await wait_for(lambda: serve_ready(url), timeout=600, what="the serve container's /readyz", interval=2)
        figures["serve_start_s"] = round(time.monotonic() - t_serve, 1)
        chatter.start()
        await wait_for(lambda: chatter.seen, timeout=120, what="a first /chat answer")
        base_replicas = await asyncio.to_thread(applier.replicas)
        figures["serving_engine"] = requests.get(f"{url}/status", timeout=5).json()["model"]["engine"]
        log.info("serving the base model on %s; replicas %s", figures["serving_engine"], base_replicas)

        restarted = 0
        swaps: list[float] = []
        for round_ in (1, 2):
            ckpt = f"r{round_:06d}"

            async def history_row() -> dict[str, Any] | None:
                return next((h for h in (await run_status(kube, run)).get("history") or [] if h.get("round") == round_), None)

            row = await wait_for(history_row, timeout=args.round_timeout, what=f"round {round_}'s result",
                                 interval=3)
            log.info("round %s: %s", round_, row)
            check(row.get("promoted") is True, f"round {round_} promoted ({row.get('result')}: {row.get('reason')})")
            job_end = time.time()
            await wait_for(lambda: _is(chatter.latest(), f"{run}/{ckpt}"), timeout=300,
                           what=f"/chat answering with {ckpt}")
            swaps.append(round((chatter.first_seen(f"{run}/{ckpt}") or time.time()) - job_end, 1))
            # The promoted checkpoint's memory came with its weights: asked about one of the round's
            # articles, the answer names it as its source, learned in this round.
            cited = await asyncio.to_thread(cites_its_round, s3, spec["storage"]["uri"], run, ckpt, url)
            check(cited is not None, f"an answer about a {ckpt} article names it, learned in {run}/{ckpt} ({cited})")
            after = await asyncio.to_thread(applier.replicas)
            before = base_replicas
            for dep in (MODEL_DEPLOYMENT, INGRESS_DEPLOYMENT):
                gone = set(before.get(dep, [])) - set(after.get(dep, []))
                restarted += len(gone)
            log.info("after %s: replicas %s", ckpt, after)
            base_replicas = after
        # Round 2's two pods both ran and exited 0; the checkpoint they published says so.
        pair = [r for r in runner.runs if r["job"] == f"{run}-r2"]
        check(len(pair) == 2 and all(r["exit_code"] == 0 for r in pair), f"round 2 ran on two pods ({pair})")
        check(await kube.get("v1", "services", NS, f"{run}-r2") is not None, f"the headless Service {run}-r2")
        m2 = json.loads(s3.get_object(Bucket="selflearn", Key=_key(spec["storage"]["uri"], run, "r000002"))["Body"].read())
        check(m2.get("world") == {"size": 2, "strategy": "ddp"}, f"r000002 trained by 2 ranks ({m2.get('world')})")
        figures["distributed_round_pod_seconds"] = [r["seconds"] for r in pair]
        figures["publish_to_serve_s"] = swaps
        figures["replicas_restarted_on_promote"] = restarted
        check(restarted == 0, "no replica restarted by a promotion (same replica ids and pids)")

        # 5. Rollback: pin r000001.
        store = spec["storage"]["uri"].rstrip("/")
        r1, r2 = f"{store}/{run}/r000001", f"{store}/{run}/r000002"
        await kube.patch("selflearn.dev/v1alpha1", "learnerruns", NS, run,
                         {"spec": {"promotion": {"pinnedCheckpoint": r1}}})
        await wait_for(lambda: _is(chatter.latest(), f"{run}/r000001"), timeout=300,
                       what="/chat answering with the pinned r000001")
        # 6. A checkpoint serving has never loaded: round 2's files under another run's id, or (with
        #    --host-round, for the in-container round's speed) the same round trained on the host.
        host_uri = "s3://selflearn/host/host/r000001"
        if args.host_round:
            figures["round_seconds_on_host"] = await host_round(spec, run, work, endpoint, creds)
            inside = [r["seconds"] for r in runner.runs if r["exit_code"] == 0]
            # Like for like: round 1's pod found the cache volume empty, the host round a fresh
            # compile cache too. Round 2's pod (warm volume) is in round_seconds_in_container.
            figures["round_container_vs_host"] = round(inside[0] / figures["round_seconds_on_host"], 2)
        else:
            await asyncio.to_thread(copy_checkpoint, s3, r2, host_uri)
        # 7. One flipped byte in that checkpoint's weights in S3, then pin it: never served. Both
        #    copies of the weights: the HF ones (the torch engine's) and the OpenVINO IR's (what a
        #    replica on OpenVINO downloads instead), so whichever engine serves must refuse it.
        bucket, _, prefix = host_uri[len("s3://"):].partition("/")
        keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix=prefix + "/").get("Contents", [])]
        weights = [max((k for k in keys if k.endswith(".safetensors")),
                       key=lambda k: s3.head_object(Bucket=bucket, Key=k)["ContentLength"])]
        weights += [k for k in keys if k.endswith("/openvino/openvino_model.bin")]
        for key in weights:
            body = bytearray(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
            body[len(body) // 2] ^= 0x01
            s3.put_object(Bucket=bucket, Key=key, Body=bytes(body))
        mark = time.time()
        await kube.patch("selflearn.dev/v1alpha1", "learnerruns", NS, run,
                         {"spec": {"promotion": {"pinnedCheckpoint": host_uri}}})
        await wait_for(lambda: _rayservice_serving(api, host_uri), timeout=120,
                       what=f"the RayService asked to serve the pinned, corrupted {host_uri}")
        # Serving tries it and refuses it (a sha256 mismatch), then keeps answering for a few
        # seconds more: every answer since the pin must come from r000001.
        host_id = host_uri.rsplit("/", 2)[-2] + "/" + host_uri.rsplit("/", 1)[-1]
        refused = await wait_for(lambda: swap_refused(url, host_id, since=mark), timeout=args.corrupt_watch,
                                 what=f"serving to refuse the corrupted {host_id}", interval=1)
        log.info("serving refused %s: %s", host_id, refused)
        await asyncio.sleep(5)
        after_pin = [c for t, c in chatter.seen if t > mark]
        check(bool(after_pin) and all(_is(c, f"{run}/r000001") for c in after_pin),
              f"the corrupted {host_uri} never served ({len(after_pin)} answers since, all from {run}/r000001: "
              f"{sorted(set(map(str, after_pin)))})")
        chatter.stop_flag.set()
        chatter.join(150)
        figures["total_requests"], figures["failed_requests"] = chatter.total, chatter.failed
        check(chatter.failed == 0, f"no failed request ({chatter.failed}/{chatter.total}: {chatter.errors[:3]})")
        figures["round_seconds_in_container"] = [r["seconds"] for r in runner.runs if r["exit_code"] == 0]
        # 8. Bad input, each in a run of its own without serving: one clear line in its status.
        figures["bad_input_seconds_to_status"] = await bad_inputs(kube, spec)
    finally:
        chatter.stop_flag.set()
        for t in controllers:
            t.cancel()
        await asyncio.gather(*controllers, return_exceptions=True)
        await runner.close()
        logs = subprocess.run(["docker", "logs", "--tail", "40", operator], capture_output=True, text=True)
        (work / "operator.log").write_text(logs.stdout + logs.stderr)
        subprocess.run(["docker", "rm", "-f", operator], capture_output=True)
        await applier.close(logs_dir=work)
        log.info("logs of the operator and the Ray head: %s", work)
        if chatter.failed:  # CI keeps only the output: the serve side's errors go there
            for path in sorted(work.glob("*-serve-logs/**/*.log")) + sorted(work.glob("*-head.log")):
                lines = [ln for ln in path.read_text(errors="replace").splitlines()
                         if "ERROR" in ln or "Traceback" in ln or "Error:" in ln]
                if lines:
                    log.warning("%s:\n%s", path.name, "\n".join(lines[-20:]))
        await kube.close()
        api.stop()

    moto.stop()
    return figures


def _key(store_uri: str, run: str, ckpt: str) -> str:
    """The S3 key of a checkpoint's manifest under the store `s3://bucket/prefix`."""
    prefix = store_uri[len("s3://"):].partition("/")[2].strip("/")
    return "/".join(x for x in (prefix, run, ckpt, "manifest.json") if x)


def _is(served: str | None, checkpoint_id: str) -> bool:
    return served == checkpoint_id or (served or "").endswith("/" + checkpoint_id)


async def host_round(spec: dict[str, Any], run: str, work: Path, endpoint: str, creds: dict[str, str]) -> float:
    """Seconds for round 1 of the same run config with `selflearn train` on the host, from a cold
    compile cache like the first pod's."""
    host_cfg = work / "host-run.yaml"
    host_spec = json.loads(json.dumps(spec))
    host_spec["storage"]["uri"] = "s3://selflearn/host"
    host_cfg.write_text(yaml.safe_dump({"name": "host", "spec": host_spec}))  # its own checkpoint ids
    env = os.environ | creds | {"S3_ENDPOINT": endpoint, "AWS_REGION": "us-east-1",
                                "SELFLEARN_TERMINATION_LOG": str(work / "host-termination-log"),
                                "TORCHINDUCTOR_CACHE_DIR": str(work / "host-compile-cache")}
    t0 = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "selflearn.cli", "train", "--run-config", str(host_cfg), "--round", "1",
        "--parent", "base", "--no-progress", env=env, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE)
    _, err = await proc.communicate()
    if proc.returncode:
        raise Failed(f"the host round failed: {err.decode(errors='replace').strip()[-300:]}")
    return round(time.monotonic() - t0, 1)


def cites_its_round(s3: Any, store_uri: str, run: str, ckpt: str, url: str) -> str | None:
    """The title of one of round `ckpt`'s articles whose /chat answer cites it as learned in that
    round (the first of three asked), else None."""
    bucket, _, prefix = store_uri[len("s3://"):].rstrip("/").partition("/")
    key = "/".join(p for p in (prefix, run, ckpt, "manifest.json") if p)
    manifest = json.loads(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
    for title in [a["title"] for a in manifest["articles"]][:3]:
        r = requests.post(f"{url}/chat", json={"message": f"What should I know about {title}?", "max_length": 4,
                                              "temperature": 0}, timeout=120)
        sources = r.json().get("sources") or [] if r.status_code == 200 else []
        log.info("asked about %s: sources %s", title, sources)
        if any(src["title"] == title and src["checkpoint"] == f"{run}/{ckpt}" for src in sources):
            return title
    return None


def copy_checkpoint(s3: Any, src_uri: str, dst_uri: str) -> None:
    """Every object of the checkpoint at `src_uri` under `dst_uri`, its manifest saying so: a valid
    checkpoint with an id of its own, for the cost of a copy instead of a round."""
    from selflearn.checkpoints import MANIFEST
    from selflearn.contracts import checkpoint_id_of_uri, parse_round_dir

    (bucket, _, src), (dst_bucket, _, dst) = (u[len("s3://"):].partition("/") for u in (src_uri, dst_uri))
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix=src + "/").get("Contents", [])]
    check(any(k.endswith("/" + MANIFEST) for k in keys), f"{src_uri} has a manifest to copy")
    run, round_dir = dst.rsplit("/", 2)[-2:]
    for key in keys:
        body = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
        if key.endswith("/" + MANIFEST):
            doc = json.loads(body)
            doc.update(run=run, round=parse_round_dir(round_dir), uri=dst_uri, id=checkpoint_id_of_uri(dst_uri))
            body = json.dumps(doc, indent=2, sort_keys=True).encode()
        s3.put_object(Bucket=dst_bucket, Key=dst + key[len(src):], Body=body)


def _rayservice_serving(api: EmulatorThread, checkpoint: str) -> str | None:
    for (resource, _ns, name), obj in api.call(lambda: list(api.emulator.objects.items())):
        if resource.plural == "rayservices" and not obj.deleted:
            found, ckpt = served_checkpoint((obj.raw.get("spec") or {}).get("serveConfigV2"))
            if found and ckpt == checkpoint:
                return name
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trainer-image", default=os.environ.get("TRAINER_IMAGE", "ghcr.io/selflearn/trainer:0.1.0"))
    p.add_argument("--serve-image", default=os.environ.get("SERVE_IMAGE", "ghcr.io/selflearn/serve:0.1.0"))
    p.add_argument("--round-timeout", type=float, default=900)
    p.add_argument("--corrupt-watch", type=float, default=180,
                   help="seconds to wait for serving to refuse the corrupted checkpoint")
    p.add_argument("--host-round", action="store_true", default=os.environ.get("E2E_HOST_ROUND") == "1",
                   help="also train round 1 on the host, for the container/host speed figure (E2E_HOST_ROUND=1)")
    p.add_argument("--figures", default=None, help="a JSON file whose fields are added to the result (image builds)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("aiohttp.access", "werkzeug"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    t0 = time.monotonic()
    result: dict[str, Any] = {}
    if args.figures and Path(args.figures).is_file():
        with contextlib.suppress(json.JSONDecodeError):
            result.update(json.loads(Path(args.figures).read_text().strip().splitlines()[-1]))
    code = 0
    try:
        result.update(asyncio.run(scenario(args)))
        result["passed"] = True
    except Failed as err:
        result.update(passed=False, failure=str(err))
        code = 1
    result["e2e_seconds"] = round(time.monotonic() - t0, 1)
    print(json.dumps(result, sort_keys=True))
    return code


if __name__ == "__main__":
    sys.exit(main())
