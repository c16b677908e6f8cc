"""The operator's permissions, listed once.

The chart's ClusterRoles are rendered from the same list: `charts/selflearn/files/rbac-rules.yaml`
is this module's output (`python -m selflearn.operator.rbac`; `python hack/generate-manifests.py`
writes it along with the CRDs), and tests/test_chart.py fails when the committed file and this list
drift apart, so what the operator does and what it is allowed to do cannot drift apart. Each
grant says which code needs it.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import yaml


@dataclass(frozen=True)
class Grant:
    """One RBAC rule, why the operator needs it, and how the chart grants it."""

    why: str
    rule: dict[str, Any]
    # A boolean under the chart's `rbac:` values that, when false, leaves the rule out.
    only_with: str | None = None
    # A cluster-scoped read Kopf needs in every mode: the chart binds it cluster-wide even when the
    # operator watches only listed namespaces (and the rest is bound only there).
    cluster_wide: bool = False


GRANTS: tuple[Grant, ...] = (
    Grant("Its own resource: Kopf watches it and patches annotations and finalizers.",
          {"apiGroups": ["selflearn.dev"], "resources": ["learnerruns"], "verbs": ["list", "watch", "patch"]}),
    Grant("Its own resource's status.",
          {"apiGroups": ["selflearn.dev"], "resources": ["learnerruns/status"], "verbs": ["patch"]}),
    Grant("One trainer Job per round: indexed (list, watch), created, read back on a name clash (get),\n"
          "and old finished ones pruned (delete).",
          {"apiGroups": ["batch"], "resources": ["jobs"], "verbs": ["get", "list", "watch", "create", "delete"]}),
    Grant("A finished Job's pods carry the trainer's termination message.",
          {"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]}),
    Grant("The run config ConfigMap, owned by the LearnerRun (garbage-collected with it).",
          {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["create", "patch"]}),
    Grant("Distributed rounds (trainer.workers > 1): the headless Service through which the Job's pods\n"
          "find each other; it is owned by the Job and goes with it.",
          {"apiGroups": [""], "resources": ["services"], "verbs": ["create"]}),
    Grant("Serving: the RayService (indexed for readiness and the served checkpoint); deleted when\n"
          "serving.replicas goes to 0.",
          {"apiGroups": ["ray.io"], "resources": ["rayservices"],
           "verbs": ["list", "watch", "create", "patch", "delete"]}),
    Grant("Serving: the Ingress; deleted when serving.replicas goes to 0.",
          {"apiGroups": ["networking.k8s.io"], "resources": ["ingresses"], "verbs": ["create", "patch", "delete"]}),
    Grant("The run's storage Secret: checked before each round (status names it when missing) and read\n"
          "only to delete checkpoints (storage.deleteOnRemoval) or read a manifest whose pod is gone.",
          {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]}, only_with="readSecrets"),
    Grant("Events on LearnerRuns (Kopf posts core/v1 Events).",
          {"apiGroups": [""], "resources": ["events"], "verbs": ["create"]}),
    Grant("Kopf: discovering CRDs.",
          {"apiGroups": ["apiextensions.k8s.io"], "resources": ["customresourcedefinitions"],
           "verbs": ["list", "watch"]}, cluster_wide=True),
    Grant("Kopf: discovering namespaces.",
          {"apiGroups": [""], "resources": ["namespaces"], "verbs": ["list", "watch"]}, cluster_wide=True),
    Grant("Kopf: peering between replicas.",
          {"apiGroups": ["kopf.dev"], "resources": ["clusterkopfpeerings", "kopfpeerings"],
           "verbs": ["list", "watch", "patch"]}),
)

RULES: list[dict[str, Any]] = [grant.rule for grant in GRANTS]

CHART_FILE = "charts/selflearn/files/rbac-rules.yaml"
HEADER = """\
# The operator's RBAC rules. Generated from selflearn/operator/rbac.py by `python -m selflearn.operator.rbac`
# (or `python hack/generate-manifests.py`); do not edit. templates/_helpers.tpl renders the ClusterRoles
# from it; tests/test_chart.py fails when this file and rbac.py drift apart.
# onlyWith: granted only when .Values.rbac.<onlyWith> is true. clusterWide: bound cluster-wide in every mode.
"""


def chart_entry(grant: Grant) -> dict[str, Any]:
    """The grant as the chart's template reads it."""
    entry: dict[str, Any] = {"rule": grant.rule}
    if grant.only_with:
        entry["onlyWith"] = grant.only_with
    if grant.cluster_wide:
        entry["clusterWide"] = True
    return entry


def render() -> str:
    """The chart's rules file: every grant in order, each under a comment saying why."""
    parts = [HEADER, "grants:\n"]
    for grant in GRANTS:
        parts.extend(f"# {line}\n" for line in grant.why.splitlines())
        parts.append(yaml.safe_dump([chart_entry(grant)], sort_keys=False, default_flow_style=None, width=120))
    return "".join(parts)


if __name__ == "__main__":
    sys.stdout.write(render())
