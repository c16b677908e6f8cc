"""The operator's permissions, listed once.

The chart's ClusterRole is rendered from the same list (tests compare them), so what the operator
does and what it is allowed to do cannot drift apart. Each rule says which code needs it.
"""

from __future__ import annotations

from typing import Any

RULES: list[dict[str, Any]] = [
    # Its own resource (Kopf watches it and patches annotations and finalizers) and its status.
    {"apiGroups": ["selflearn.dev"], "resources": ["learnerruns"], "verbs": ["list", "watch", "patch"]},
    {"apiGroups": ["selflearn.dev"], "resources": ["learnerruns/status"], "verbs": ["patch"]},
    # One trainer Job per round: indexed (list, watch), created, read back on a name clash (get),
    # and old finished ones pruned (delete).
    {"apiGroups": ["batch"], "resources": ["jobs"], "verbs": ["get", "list", "watch", "create", "delete"]},
    # A finished Job's pods carry the trainer's termination message.
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]},
    # The run config ConfigMap, owned by the LearnerRun (garbage-collected with it).
    {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["create", "patch"]},
    # Serving: the RayService (indexed for readiness and the served checkpoint) and the Ingress;
    # deleted when serving.replicas goes to 0.
    {"apiGroups": ["ray.io"], "resources": ["rayservices"], "verbs": ["list", "watch", "create", "patch", "delete"]},
    {"apiGroups": ["networking.k8s.io"], "resources": ["ingresses"], "verbs": ["create", "patch", "delete"]},
    # The run's storage Secret: checked before each round (status names it when missing) and read
    # only to delete checkpoints (storage.deleteOnRemoval) or read a manifest whose pod is gone.
    {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]},
    # Events on LearnerRuns (Kopf posts core/v1 Events).
    {"apiGroups": [""], "resources": ["events"], "verbs": ["create"]},
    # Kopf: discovering CRDs and namespaces, and peering between replicas.
    {"apiGroups": ["apiextensions.k8s.io"], "resources": ["customresourcedefinitions"], "verbs": ["list", "watch"]},
    {"apiGroups": [""], "resources": ["namespaces"], "verbs": ["list", "watch"]},
    {"apiGroups": ["kopf.dev"], "resources": ["clusterkopfpeerings", "kopfpeerings"], "verbs": ["list", "watch", "patch"]},
]
