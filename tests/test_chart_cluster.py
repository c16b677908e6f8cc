"""The chart against an API server (kmock's emulator): installing stops with a clear message when
KubeRay, a documented prerequisite, is missing, and goes ahead when it is there."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from pathlib import Path

import pytest
import yaml

from helm_support import CHART, RELEASE, helm, needs_helm


@contextlib.contextmanager
def fake_cluster(tmp_path: Path, *, kuberay: bool):
    """kmock's in-memory Kubernetes API serving what `helm template --dry-run=server` asks for:
    version, discovery (with or without ray.io/v1 RayService) and the `default/kubernetes` Service
    every real cluster has. Yields a kubeconfig path."""
    kmock = pytest.importorskip("kmock")
    started, stop, box = threading.Event(), threading.Event(), {}

    async def serve() -> None:
        emulator = kmock.KubernetesEmulator()
        async with emulator:
            kinds_ = [("v1/services", "Service", True), ("v1/serviceaccounts", "ServiceAccount", True),
                      ("apps/v1/deployments", "Deployment", True),
                      ("rbac.authorization.k8s.io/v1/clusterroles", "ClusterRole", False),
                      ("rbac.authorization.k8s.io/v1/clusterrolebindings", "ClusterRoleBinding", False),
                      ("kopf.dev/v1/clusterkopfpeerings", "ClusterKopfPeering", False)]
            if kuberay:
                kinds_.append(("ray.io/v1/rayservices", "RayService", True))
            for key, kind, namespaced in kinds_:
                emulator.resources[key] = kmock.ResourceInfo(kind=kind, namespaced=namespaced, verbs={"get", "list"})
            emulator["get /version"] << {"major": "1", "minor": "33", "gitVersion": "v1.33.1"}
            # The core group's discovery, spelled as an API server does.
            emulator["get /api/v1"] << {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": "v1",
                                        "resources": [{"name": p.split("/")[-1], "singularName": k.lower(),
                                                       "namespaced": n, "kind": k, "verbs": ["get", "list"]}
                                                      for p, k, n in kinds_ if p.startswith("v1/")]}
            emulator["get /api/v1/namespaces/default/services/kubernetes"] << {
                "apiVersion": "v1", "kind": "Service", "metadata": {"name": "kubernetes", "namespace": "default"}}
            async with kmock.Server(emulator) as server:
                box["url"] = str(server.url).rstrip("/")
                started.set()
                while not stop.is_set():
                    await asyncio.sleep(0.05)

    thread = threading.Thread(target=asyncio.run, args=(serve(),), daemon=True)
    thread.start()
    assert started.wait(10), "the fake API server did not start"
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "fake",
        "clusters": [{"name": "fake", "cluster": {"server": box["url"]}}],
        "users": [{"name": "fake", "user": {"token": "fake"}}],
        "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake"}}]}))
    try:
        yield str(kubeconfig)
    finally:
        stop.set()
        thread.join(10)


@needs_helm
def test_install_on_a_cluster_without_kuberay_stops_with_the_prerequisite(tmp_path):
    with fake_cluster(tmp_path, kuberay=False) as kubeconfig:
        args = ("template", RELEASE, str(CHART), "--dry-run=server", "--disable-openapi-validation",
                "--kubeconfig", kubeconfig)
        proc = helm(*args, check=False)
        assert proc.returncode != 0
        assert "KubeRay is a prerequisite: this cluster does not serve ray.io/v1 RayService" in proc.stderr
        # The documented escape hatch.
        helm(*args, "--set", "kuberay.requireCRD=false")


@needs_helm
def test_install_on_a_cluster_with_kuberay_goes_ahead(tmp_path):
    with fake_cluster(tmp_path, kuberay=True) as kubeconfig:
        out = helm("template", RELEASE, str(CHART), "--dry-run=server", "--disable-openapi-validation",
                   "--kubeconfig", kubeconfig).stdout
    assert "kind: Deployment" in out
