"""The Helm chart, checked with the real helm binary and real Kubernetes schemas.

- `helm lint --strict`, and `helm template` with default values and with every ci/ values file;
- every rendered manifest (CRDs included) validates with kubernetes-validate --strict against the
  newest Kubernetes it ships (1.30 or later); custom resources validate against their own CRDs;
- the chart's CRD is byte-identical to crds/learnerrun.yaml;
- the chart's RBAC rules file is the one generated from selflearn/operator/rbac.py, and the
  ClusterRole rendered from it grants exactly selflearn.operator.rbac.RULES;
- the operator Deployment's command line is one `selflearn operator` accepts, peered for replicas > 1;
- bad values fail `helm template`/`helm install` with the schema's message.

Installing against an API server is in test_chart_cluster.py; the helm plumbing in helm_support.py.
"""

from __future__ import annotations

import re

import pytest
import yaml

from helm_support import (CHART, CI_VALUES, NAMESPACE, RELEASE, REPO, K8sYamlLoader, helm, kinds,
                          needs_helm, one, operator_container, render, validate_manifests)


# -- lint and render -------------------------------------------------------------------------------
@needs_helm
@pytest.mark.parametrize("values", [None, *CI_VALUES], ids=lambda v: v.name if v else "defaults")
def test_helm_lint_strict_passes(values):
    args = ["lint", "--strict", str(CHART)] + (["-f", str(values)] if values else [])
    out = helm(*args).stdout
    assert "0 chart(s) failed" in out


@needs_helm
@pytest.mark.parametrize("values", [None, *CI_VALUES], ids=lambda v: v.name if v else "defaults")
def test_every_rendered_manifest_validates_strictly(values):
    from kubernetes_validate.utils import latest_version

    assert tuple(map(int, latest_version().split(".")[:2])) >= (1, 30)
    docs = render(*([values] if values else []))
    assert {"CustomResourceDefinition", "ServiceAccount", "ClusterRole", "ClusterRoleBinding",
            "Deployment"} <= {d["kind"] for d in docs}
    assert validate_manifests(docs) == []


def test_the_validation_catches_misspelled_and_mistyped_fields():
    deployment = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "x"},
                  "spec": {"replicas": 1, "selector": {"matchLabels": {"a": "b"}},
                           "template": {"metadata": {"labels": {"a": "b"}},
                                        "spec": {"containers": [{"name": "c", "image": "i", "comand": ["x"]}]}}}}
    run = {"apiVersion": "selflearn.dev/v1alpha1", "kind": "LearnerRun", "metadata": {"name": "x"},
           "spec": {"training": {"learningRate": 0, "epoks": 1}, "storage": {"uri": "ftp://x"}}}
    errors = validate_manifests([deployment, run])
    assert any("comand" in e for e in errors), errors
    assert any("epoks" in e for e in errors), errors
    assert any("learningRate" in e for e in errors), errors
    assert any("storage.uri" in e for e in errors), errors


def test_chart_crd_is_identical_to_the_repository_crd():
    chart_crd = CHART / "crds" / "learnerrun.yaml"
    assert chart_crd.read_bytes() == (REPO / "crds" / "learnerrun.yaml").read_bytes(), (
        "charts/selflearn/crds/learnerrun.yaml differs from crds/learnerrun.yaml: "
        "cp crds/learnerrun.yaml charts/selflearn/crds/learnerrun.yaml")


def test_chart_ships_kopf_peering_crds():
    crds = {c["metadata"]["name"]: c for c in yaml.safe_load_all((CHART / "crds" / "kopf-peering.yaml").read_text())}
    assert crds["clusterkopfpeerings.kopf.dev"]["spec"]["scope"] == "Cluster"
    assert crds["kopfpeerings.kopf.dev"]["spec"]["scope"] == "Namespaced"
    for crd in crds.values():
        (version,) = crd["spec"]["versions"]
        assert (crd["spec"]["group"], version["name"]) == ("kopf.dev", "v1")  # what Kopf looks for
        # Kopf writes each peer's record straight into .status (no status subresource).
        assert "subresources" not in version
        assert version["schema"]["openAPIV3Schema"]["properties"]["status"]["x-kubernetes-preserve-unknown-fields"]


# -- RBAC ------------------------------------------------------------------------------------------
def _canonical(rules: list[dict]) -> list[tuple]:
    return sorted((tuple(r.get("apiGroups", [])), tuple(sorted(r.get("resources", []))), tuple(sorted(r["verbs"])))
                  for r in rules)


def test_chart_rbac_rules_are_generated_from_the_operator_list():
    from selflearn.operator import rbac

    committed = (REPO / rbac.CHART_FILE).read_text()
    assert committed == rbac.render(), f"{rbac.CHART_FILE} is stale: run python hack/generate-manifests.py"


@needs_helm
def test_clusterrole_grants_exactly_the_operator_rules():
    from selflearn.operator.rbac import RULES

    docs = render()
    role = one(docs, "ClusterRole", f"{RELEASE}-selflearn")
    assert _canonical(role["rules"]) == _canonical(RULES)
    binding = one(docs, "ClusterRoleBinding")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                                  "name": role["metadata"]["name"]}
    account = one(docs, "ServiceAccount")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account["metadata"]["name"],
                                    "namespace": NAMESPACE}]
    assert one(docs, "Deployment")["spec"]["template"]["spec"]["serviceAccountName"] == account["metadata"]["name"]
    assert not kinds(docs, "Role") and not kinds(docs, "RoleBinding")


@needs_helm
def test_secret_access_is_a_toggle():
    from selflearn.operator.rbac import RULES

    without = [r for r in RULES if r["resources"] != ["secrets"]]
    assert len(without) == len(RULES) - 1
    docs = render(sets=("rbac.readSecrets=false",))
    assert _canonical(one(docs, "ClusterRole")["rules"]) == _canonical(without)
    docs = render(sets=("rbac.create=false",))
    assert not kinds(docs, "ClusterRole") and not kinds(docs, "ClusterRoleBinding")


@needs_helm
def test_watching_listed_namespaces_binds_the_rules_only_there():
    from selflearn.operator.rbac import RULES

    docs = render(CHART / "ci" / "namespaced-values.yaml")
    main = one(docs, "ClusterRole", "selflearn-operator")
    assert _canonical(main["rules"]) == _canonical([r for r in RULES if r["resources"] != ["secrets"]])
    bindings = kinds(docs, "RoleBinding")
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["team-a", "team-b"]
    assert all(b["roleRef"]["name"] == "selflearn-operator" for b in bindings)
    assert all(b["subjects"] == [{"kind": "ServiceAccount", "name": "selflearn", "namespace": NAMESPACE}]
               for b in bindings)
    # Cluster-wide, only the reads Kopf needs to find its CRDs and namespaces.
    cluster_binding = one(docs, "ClusterRoleBinding")
    cluster_role = one(docs, "ClusterRole", cluster_binding["roleRef"]["name"])
    assert cluster_role is not main
    assert {res for r in cluster_role["rules"] for res in r["resources"]} == {"customresourcedefinitions", "namespaces"}
    assert all(set(r["verbs"]) <= {"get", "list", "watch"} for r in cluster_role["rules"])
    args = operator_container(docs)["args"]
    assert [a for a in args if a.startswith("--namespace")] == ["--namespace=team-a", "--namespace=team-b"]
    assert sorted(p["metadata"]["namespace"] for p in kinds(docs, "KopfPeering")) == ["team-a", "team-b"]
    assert not kinds(docs, "ClusterKopfPeering")


# -- the operator Deployment -------------------------------------------------------------------------
def _parse_operator_command(container: dict):
    from selflearn.cli import build_parser

    assert container["command"] == ["selflearn"]
    return build_parser().parse_args(container["args"])


@needs_helm
def test_operator_runs_selflearn_operator_with_arguments_it_accepts():
    docs = render()
    container = operator_container(docs)
    args = _parse_operator_command(container)
    assert args.command == "operator"
    assert args.namespace == []  # every namespace
    peering = one(docs, "ClusterKopfPeering")
    assert args.peering == peering["metadata"]["name"]
    assert args.priority is None  # random per pod
    assert args.liveness == "http://0.0.0.0:8080/healthz"
    probe = container["livenessProbe"]["httpGet"]
    port = next(p for p in container["ports"] if p["name"] == probe["port"])
    assert (probe["path"], port["containerPort"]) == ("/healthz", 8080)
    assert container["image"] == "ghcr.io/selflearn/trainer:0.1.0"  # appVersion


@needs_helm
def test_several_replicas_are_peered_and_never_tie():
    docs = render(CHART / "ci" / "ha-values.yaml")
    deployment = one(docs, "Deployment")
    assert deployment["spec"]["replicas"] == 3
    args = _parse_operator_command(operator_container(docs))
    assert args.verbose is True
    assert args.peering == one(docs, "ClusterKopfPeering")["metadata"]["name"]
    # No fixed --priority: `selflearn operator` draws one per pod, so the three never tie.
    assert args.priority is None and not args.standalone


@needs_helm
def test_a_single_replica_can_run_standalone_or_with_a_fixed_priority():
    standalone = render(sets=("operator.peering.enabled=false",))
    args = _parse_operator_command(operator_container(standalone))
    assert args.standalone and args.peering is None
    assert not kinds(standalone, "ClusterKopfPeering")
    # An upgrade must not run the old and the new unpeered operator side by side.
    assert one(standalone, "Deployment")["spec"]["strategy"] == {"type": "Recreate"}
    assert "strategy" not in one(render(), "Deployment")["spec"]  # peered: a rolling update is safe
    args = _parse_operator_command(operator_container(render(CHART / "ci" / "namespaced-values.yaml")))
    assert (args.peering, args.priority) == ("selflearn", 100)


@needs_helm
def test_operator_pod_is_locked_down():
    spec = one(render(), "Deployment")["spec"]["template"]["spec"]
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] == 10001  # the image's user
    (container,) = spec["containers"]
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"]
    assert container["resources"]["limits"]["memory"]


@needs_helm
def test_names_fit_in_63_characters_for_long_release_names():
    release = "a-long-release-name-for-selflearn-that-goes-on-and-on"  # helm allows 53
    assert len(release) == 53
    docs = render(CHART / "ci" / "ha-values.yaml", release=release)
    docs += render(CHART / "ci" / "namespaced-values.yaml", release=release,
                   sets=("fullnameOverride=", "nameOverride=chat-that-keeps-learning", "serviceAccount.name="))
    assert any(len(d["metadata"]["name"]) == 63 for d in docs)  # truncated, not rejected
    dns = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    for doc in docs:
        name = doc["metadata"]["name"]
        assert len(name) <= 63 and dns.match(name.replace(".", "-")), name
        for value in (doc["metadata"].get("labels") or {}).values():
            assert len(value) <= 63, (name, value)


# -- the example LearnerRun ------------------------------------------------------------------------
@needs_helm
@pytest.mark.parametrize("values", ["example-tiny-values.yaml", "example-gpu-values.yaml"])
def test_example_learnerrun_is_a_valid_run(values):
    from selflearn.spec import parse_spec

    docs = render(CHART / "ci" / values)
    run = one(docs, "LearnerRun")
    assert run["metadata"]["namespace"] == NAMESPACE
    assert validate_manifests([run]) == []
    spec = parse_spec(run["spec"])  # what the operator itself accepts
    assert spec.storage.credentials_secret == "s3-creds"
    assert not kinds(render(), "LearnerRun")  # off by default


@needs_helm
def test_a_given_example_spec_replaces_the_built_in_one_whole():
    """Helm merges value maps key by key; the example's spec must not inherit the tiny run's keys."""
    given = yaml.load((CHART / "ci" / "example-gpu-values.yaml").read_text(), Loader=K8sYamlLoader)
    run = one(render(CHART / "ci" / "example-gpu-values.yaml"), "LearnerRun")
    assert run["spec"] == given["exampleRun"]["spec"]
    tiny = yaml.load((CHART / "files" / "tiny-run-spec.yaml").read_text(), Loader=K8sYamlLoader)
    assert one(render(CHART / "ci" / "example-tiny-values.yaml"), "LearnerRun")["spec"] == tiny


# -- values: documented, schema-checked ------------------------------------------------------------
def test_every_value_is_documented():
    """Each key carries a `# --` comment, or sits inside a documented key (a whole-object value)."""
    lines = (CHART / "values.yaml").read_text().splitlines()
    stack: list[tuple[int, bool]] = []  # (indent, documented) of the enclosing keys
    undocumented = []
    for i, line in enumerate(lines):
        m = re.match(r"^(\s*)([\w.-]+):", line)
        if not m or line.lstrip().startswith("#") or line.lstrip().startswith("- "):
            continue
        indent = len(m.group(1))
        while stack and stack[-1][0] >= indent:
            stack.pop()
        j = i - 1
        while j >= 0 and lines[j].strip().startswith("#") and not lines[j].strip().startswith("# --"):
            j -= 1
        documented = j >= 0 and lines[j].strip().startswith("# --")
        inherited = any(d for _, d in stack)
        is_leaf = not re.match(r"^\s*[\w.-]+:\s*$", line)
        if is_leaf and not documented and not inherited:
            undocumented.append(m.group(2))
        stack.append((indent, documented or inherited))
    assert undocumented == []


@needs_helm
@pytest.mark.parametrize(("sets", "message"), [
    (("operator.replicas=-1",), "at '/operator/replicas': minimum"),
    (("operator.replica=2",), "additional properties 'replica' not allowed"),
    (("operator.image.pullPolicy=Sometimes",), "at '/operator/image/pullPolicy'"),
    (("operator.replicas=2", "operator.peering.enabled=false"), "at '/operator/peering/enabled'"),
    (("operator.replicas=3", "operator.peering.priority=7"), "at '/operator/peering/priority'"),
    (("operator.watchNamespaces={Team_A}",), "at '/operator/watchNamespaces/0'"),
    (("operator.resources.limits.memory=lots",), "at '/operator/resources/limits/memory'"),
    (("exampleRun.name=a-name-that-is-much-longer-than-forty-characters",), "at '/exampleRun/name'"),
    (("rbac.readSecrets=maybe",), "at '/rbac/readSecrets'"),
])
def test_bad_values_fail_with_a_schema_message(sets, message):
    args = ["template", RELEASE, str(CHART)]
    for s in sets:
        args += ["--set", s]
    proc = helm(*args, check=False)
    assert proc.returncode != 0
    assert "values don't meet the specifications of the schema" in proc.stderr
    assert message in proc.stderr, proc.stderr


@needs_helm
def test_helm_install_refuses_bad_values_too(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("operator:\n  replicas: two\n")
    proc = helm("install", RELEASE, str(CHART), "--dry-run=client", "-f", str(bad), check=False)
    assert proc.returncode != 0
    assert "at '/operator/replicas': got string, want integer" in proc.stderr, proc.stderr


@needs_helm
def test_notes_print_the_next_commands():
    proc = helm("install", RELEASE, str(CHART), "--namespace", NAMESPACE, "--dry-run=client")
    notes = proc.stdout.split("NOTES:", 1)[1]
    assert f"kubectl -n {NAMESPACE} rollout status deployment/{RELEASE}-selflearn" in notes
    assert "create secret generic s3-creds" in notes and "AWS_SECRET_ACCESS_KEY" in notes
    assert "apply -f examples/learnerrun-tiny.yaml" in notes
    assert "get lr -w" in notes
    assert "/chat" in notes and "pinnedCheckpoint" in notes and '"suspend":true' in notes
    assert "rayservices.ray.io" in notes  # the KubeRay prerequisite


@needs_helm
def test_chart_renders_offline_without_kuberay():
    """KubeRay is a documented prerequisite, not a declared dependency: a declared but un-vendored
    dependency makes helm refuse to render at all, even with its condition off."""
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert not chart.get("dependencies")
    assert "ray.io/v1 RayService" in chart["annotations"]["selflearn.dev/prerequisites"]
    assert not kinds(render(), "RayService")
