"""The LearnerRun CustomResourceDefinition, generated from the pydantic spec and status.

`crds/learnerrun.yaml` is this module's output (`python -m selflearn.operator.crd > crds/learnerrun.yaml`),
so the API server enforces the same fields, defaults, ranges and enums as `selflearn.spec.parse_spec`,
and the status the operator writes has the shape of `status.LearnerRunStatus`;
a test fails when the committed file and the spec drift apart. `python hack/generate-manifests.py`
writes it, the chart's copy and the chart's RBAC rules (from `rbac.py`) in one go.

What JSON Schema cannot say, the CRD says with CEL rules (the API server evaluates them):
a run name short enough to prefix Job and checkpoint names, the bundled embedded model's id, and a
files source with at least one path or URL. Unknown fields are pruned by the API server and
rejected by `kubectl apply` (strict field validation, the default since kubectl 1.27).
"""

from __future__ import annotations

import copy
import sys
from typing import Any

import yaml

from ..spec import EMBEDDED_MODEL, LearnerRunSpec
from .status import LearnerRunStatus

GROUP = "selflearn.dev"
VERSION = "v1alpha1"
PLURAL = "learnerruns"
KIND = "LearnerRun"
MAX_RUN_NAME = 40

DESCRIPTIONS: dict[str, str] = {
    "": "What a self-learning chatbot learns from, how it trains, when, where checkpoints go, and how it serves.",
    "baseModel": f"Hugging Face model id (e.g. facebook/opt-350m) or the bundled {EMBEDDED_MODEL}.",
    "sources": "What each round learns from; each item sets exactly one of wikipedia, snapshot, files, feedback.",
    "sources[].wikipedia": "Random live Wikipedia articles.",
    "sources[].wikipedia.endpoint": "Base URL of the Wikipedia REST API (default: the language's wikipedia.org).",
    "sources[].snapshot": "The offline snapshot of Wikipedia summaries bundled with the trainer image.",
    "sources[].files": "Local paths or URLs (text, HTML, PDF) read once, a round's share at a time.",
    "sources[].feedback": "Corrections and 👍/👎 ratings users gave through /feedback since the last round read "
                          "them (default: the run's own store), capped per client, learned once, and gated.",
    "training": "Hyperparameters of one round of fine-tuning.",
    "training.epochs": "Passes over the round's articles (may be fractional).",
    "training.gradientAccumulation": "Micro-batches per optimizer step.",
    "training.maxLength": "Tokens per packed training block; must fit the model's context.",
    "training.precision": "auto picks bf16 on capable GPUs and CPUs, fp16 on older GPUs, else fp32.",
    "training.method": "full fine-tunes every weight; lora trains low-rank adapters.",
    "training.replayFraction": "Share of training blocks replayed from earlier rounds' articles (limits forgetting).",
    "training.evalArticles": "Fresh articles held out of training to measure generalisation.",
    "training.generalArticles": "Size of the fixed general evaluation set, identical every round.",
    "schedule": "When rounds run.",
    "schedule.intervalSeconds": "Seconds between the end of one round and the start of the next.",
    "schedule.maxRounds": "Stop after this many rounds (null: never stop).",
    "suspend": "No new rounds while true; a running round finishes and serving stays up.",
    "storage": "Where checkpoints are published (S3-compatible object storage on Kubernetes).",
    "storage.uri": "s3://bucket/prefix (or file:// for a single machine); checkpoints go to <uri>/<run>/r000007.",
    "storage.endpoint": "S3 endpoint URL for non-AWS storage such as MinIO.",
    "storage.credentialsSecret": "Secret holding AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, in the run's namespace.",
    "storage.keepCheckpoints": "Newest checkpoints kept per run (the serving one is always kept).",
    "storage.deleteOnRemoval": "Delete the run's checkpoints from storage when the LearnerRun is deleted.",
    "promotion": "The evaluation gate between a new checkpoint and the chat users.",
    "promotion.maxPerplexityIncrease": "Largest allowed relative rise of general-set perplexity (0.02 = 2%).",
    "promotion.maxFreshPerplexityIncrease": "Largest allowed relative rise of perplexity on fresh held-out articles.",
    "promotion.pinnedCheckpoint": "Serve exactly this checkpoint URI and promote nothing (rollback); "
                                  "after unpinning, serving continues from it.",
    "trainer": "The trainer Job's pod.",
    "trainer.resources": "Container resources, e.g. limits: {nvidia.com/gpu: 1}.",
    "trainer.backoffLimit": "Pod retries within one round's Job.",
    "trainer.activeDeadlineSeconds": "A round's Job is stopped (and the round retried) after this long.",
    "serving": "The Ray Serve deployment (a KubeRay RayService) answering chat.",
    "serving.replicas": "Model replicas (Ray worker pods); 0 turns serving off.",
    "serving.resources": "Resources of each Ray worker pod.",
    "serving.ingress": "The Ingress routing / (chat page, /chat, /v1) to the serve Service.",
}

# Kubernetes shapes the spec keeps as free-form dicts.
_QUANTITY = {"anyOf": [{"type": "integer"}, {"type": "string"}], "x-kubernetes-int-or-string": True}
RESOURCES_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "limits": {"type": "object", "additionalProperties": _QUANTITY},
        "requests": {"type": "object", "additionalProperties": _QUANTITY},
    },
}
TOLERATION_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "key": {"type": "string"},
        "operator": {"type": "string", "enum": ["Exists", "Equal"]},
        "value": {"type": "string"},
        "effect": {"type": "string", "enum": ["NoSchedule", "PreferNoSchedule", "NoExecute"]},
        "tolerationSeconds": {"type": "integer", "format": "int64"},
    },
}

# Fields the spec keeps as free-form dicts but the CRD types as Kubernetes does (stricter than the spec).
KUBERNETES_SHAPES = ("trainer.resources", "serving.resources", "trainer.tolerations")

OVERRIDES: dict[str, dict[str, Any]] = {
    "baseModel": {
        "minLength": 1, "maxLength": 256, "pattern": r"\S",
        "x-kubernetes-validations": [{
            "rule": f"!self.startsWith('embedded:') || self == '{EMBEDDED_MODEL}'",
            "message": f"unknown embedded model; the bundled one is {EMBEDDED_MODEL}",
        }],
    },
    "sources": {"default": [{"snapshot": {"language": "en", "articlesPerRound": 32}}]},
    "sources[]": {"minProperties": 1, "maxProperties": 1},
    "sources[].files": {"x-kubernetes-validations": [{
        "rule": "(has(self.paths) && size(self.paths) > 0) || (has(self.urls) && size(self.urls) > 0)",
        "message": "a files source needs at least one path or url",
    }]},
    "trainer.resources": RESOURCES_SCHEMA,
    "serving.resources": RESOURCES_SCHEMA,
    "trainer.tolerations": {"type": "array", "items": TOLERATION_SCHEMA},
    # Kopf and older operators may keep fields of their own in the status.
    "status": {"x-kubernetes-preserve-unknown-fields": True},
    # One condition per type (server-side apply merges the list by it).
    "status.conditions": {"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
}

_KEEP = ("type", "format", "minimum", "maximum", "pattern", "enum", "minLength", "maxLength",
         "minItems", "maxItems", "required")


def _convert(node: dict[str, Any], defs: dict[str, Any], path: str, *, defaults: bool = True) -> dict[str, Any]:
    """A pydantic JSON schema node as a structural OpenAPI v3 one. `defaults`: keep the models'
    defaults (the spec's, which the API server fills in), or leave them out (the status's)."""
    if "$ref" in node:
        node = {**defs[node["$ref"].rsplit("/", 1)[-1]], **{k: v for k, v in node.items() if k != "$ref"}}
    if "anyOf" in node:
        # Optional[X] -> X, nullable (absent and null both mean "not set").
        branches = [b for b in node["anyOf"] if b.get("type") != "null"]
        if len(branches) != 1:
            raise ValueError(f"{path}: cannot map anyOf {node['anyOf']} to a structural schema")
        optional = _convert(branches[0], defs, path, defaults=defaults)
        if "description" not in optional and node.get("description"):
            optional["description"] = node["description"]
        optional.pop("default", None)
        optional["nullable"] = True
        return optional
    out: dict[str, Any] = {}
    if path in DESCRIPTIONS:
        out["description"] = DESCRIPTIONS[path]
    elif node.get("description"):
        out["description"] = node["description"]
    for key in _KEEP:
        if key in node:
            out[key] = node[key]
    # JSON Schema 2020-12 (pydantic) writes exclusive bounds as numbers, OpenAPI v3.0 as flags.
    for bound, flag in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if bound in node:
            out[flag] = node[bound]
            out[bound] = True
    if defaults and "default" in node and node["default"] is not None:
        out["default"] = node["default"]
    if out.get("type") == "array" and "items" in node:
        out["items"] = _convert(node["items"], defs, path + "[]", defaults=defaults)
    if "properties" in node:
        out["type"] = "object"
        out["properties"] = {name: _convert(sub, defs, f"{path}.{name}".lstrip("."), defaults=defaults)
                             for name, sub in node["properties"].items()}
        # A nested block defaults to {} so that the API server fills in its fields' defaults.
        if defaults and path and not path.endswith("[]") and "default" not in out and not out.get("nullable"):
            out["default"] = {}
    elif out.get("type") == "object":
        extra = node.get("additionalProperties", True)
        if isinstance(extra, dict) and extra:
            out["additionalProperties"] = _convert(extra, defs, path + "{}", defaults=defaults)
        else:
            out["x-kubernetes-preserve-unknown-fields"] = True
    if path in OVERRIDES:
        override = copy.deepcopy(OVERRIDES[path])
        if "properties" in override or "items" in override:
            out = {k: v for k, v in out.items() if k in ("description", "default", "nullable")} | override
        else:
            out.update(override)
    return out


def spec_schema() -> dict[str, Any]:
    """The OpenAPI v3 (structural) schema of `spec`, derived from LearnerRunSpec."""
    js = LearnerRunSpec.model_json_schema(by_alias=True, mode="validation")
    out = _convert(js, js.get("$defs", {}), "")
    out.pop("title", None)
    out["default"] = {}
    return out


def status_schema() -> dict[str, Any]:
    """The OpenAPI v3 (structural) schema of `status`, derived from LearnerRunStatus. No defaults:
    the operator writes what it means, and a new run's status stays empty until it does."""
    js = LearnerRunStatus.model_json_schema(by_alias=True, mode="validation")
    out = _convert(js, js.get("$defs", {}), "status", defaults=False)
    out.pop("title", None)
    return out


PRINTER_COLUMNS = [
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
    {"name": "Round", "type": "integer", "jsonPath": ".status.round"},
    {"name": "Serving", "type": "string", "jsonPath": ".status.servingCheckpoint",
     "description": "The checkpoint chat users get (empty: the base model)."},
    {"name": "Perplexity", "type": "number", "jsonPath": ".status.lastPerplexity",
     "description": "General-set perplexity after the newest round."},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    {"name": "Suspended", "type": "boolean", "jsonPath": ".spec.suspend", "priority": 1},
    {"name": "Message", "type": "string", "jsonPath": ".status.message", "priority": 1},
]


def build_crd() -> dict[str, Any]:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{PLURAL}.{GROUP}",
            "labels": {"app.kubernetes.io/name": "selflearn", "app.kubernetes.io/component": "crd"},
        },
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {"kind": KIND, "listKind": f"{KIND}List", "plural": PLURAL, "singular": "learnerrun",
                      "shortNames": ["lr"], "categories": ["selflearn"]},
            "versions": [{
                "name": VERSION,
                "served": True,
                "storage": True,
                "subresources": {"status": {}},
                "additionalPrinterColumns": PRINTER_COLUMNS,
                "schema": {"openAPIV3Schema": {
                    "type": "object",
                    "description": "A chatbot that keeps learning: a trainer Job per round, an evaluation gate, "
                                   "and a RayService that hot-swaps to each promoted checkpoint.",
                    "properties": {
                        "apiVersion": {"type": "string"},
                        "kind": {"type": "string"},
                        "metadata": {"type": "object"},
                        "spec": spec_schema(),
                        "status": status_schema(),
                    },
                    "x-kubernetes-validations": [{
                        "rule": f"self.metadata.name.size() <= {MAX_RUN_NAME}",
                        "message": f"metadata.name must be at most {MAX_RUN_NAME} characters: "
                                   "it prefixes the run's Job and checkpoint names",
                    }],
                }},
            }],
        },
    }


HEADER = """\
# LearnerRun CRD. Generated from selflearn/spec.py and selflearn/operator/status.py by
# `python -m selflearn.operator.crd`; do not edit.
# tests/test_manifests.py fails when this file and the spec drift apart.
"""


class _NoAliases(yaml.SafeDumper):
    def ignore_aliases(self, data: Any) -> bool:
        return True


def render() -> str:
    return HEADER + yaml.dump(build_crd(), Dumper=_NoAliases, sort_keys=False, width=120)


if __name__ == "__main__":
    sys.stdout.write(render())
