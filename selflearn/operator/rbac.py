"""The operator's permissions, listed once.

The chart's ClusterRole is rendered from the same list (tests compare them), so what the operator
does and what it is allowed to do cannot drift apart.
"""

from __future__ import annotations

from typing import Any

RULES: list[dict[str, Any]] = [
    # Its own resource and status.
    {"apiGroups": ["selflearn.dev"], "resources": ["learnerruns"],
     "verbs": ["get", "list", "watch", "patch", "update"]},
    {"apiGroups": ["selflearn.dev"], "resources": ["learnerruns/status"], "verbs": ["get", "patch", "update"]},
    # One trainer Job per round; the pod is read for its termination message.
    {"apiGroups": ["batch"], "resources": ["jobs"], "verbs": ["get", "list", "watch", "create", "delete"]},
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]},
    # The round's run config travels in a ConfigMap owned by the LearnerRun.
    {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "list", "create", "patch", "delete"]},
    # Serving: the RayService (KubeRay), its ingress Service and the Ingress.
    {"apiGroups": ["ray.io"], "resources": ["rayservices"], "verbs": ["get", "list", "watch", "create", "patch", "delete"]},
    {"apiGroups": [""], "resources": ["services"], "verbs": ["get", "list", "create", "patch", "delete"]},
    {"apiGroups": ["networking.k8s.io"], "resources": ["ingresses"], "verbs": ["get", "list", "create", "patch", "delete"]},
    # Only to check that the named storage Secret exists (status names it when it does not).
    {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]},
    # Events on LearnerRuns.
    {"apiGroups": ["", "events.k8s.io"], "resources": ["events"], "verbs": ["create", "patch"]},
    # Kopf: discovering resources, namespaces, and peering between replicas.
    {"apiGroups": ["apiextensions.k8s.io"], "resources": ["customresourcedefinitions"], "verbs": ["get", "list", "watch"]},
    {"apiGroups": [""], "resources": ["namespaces"], "verbs": ["get", "list", "watch"]},
    {"apiGroups": ["kopf.dev"], "resources": ["clusterkopfpeerings", "kopfpeerings"],
     "verbs": ["get", "list", "watch", "patch", "create"]},
]
