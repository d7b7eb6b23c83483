VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test lint demo compile images check-images constraints clean

# The stamp makes a second `make install` a no-op unless pyproject.toml changed.
$(STAMP): pyproject.toml
	test -x $(PY) || python3.11 -m venv $(VENV) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and exact: this resolves to the CPU wheel on disk, never a CUDA download.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	# kserve's InferenceService schema models only (tests/pipeline/test_manifest_schemas.py). --no-deps: its runtime
	# pins (pandas<3, psutil<6) would downgrade this environment; the models need only six and kubernetes.
	$(PY) -m pip install -q --no-deps kserve==0.21.0
	touch $(STAMP)

install: $(STAMP)

test: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check .

# The main job: the whole pipeline on this machine through kfp.local (see README, "Kubeflow pipeline").
demo: install
	$(VENV)/bin/vembed pipeline run --local

# The KFP IR YAML that clusters run; a test fails when the committed copy is stale.
compile: install
	$(VENV)/bin/vembed pipeline compile --defaults

# Build and push the component images (needs docker and a registry login; not run in CI).
IMAGE_REPO ?= ghcr.io/vembed-factory/vembed
IMAGE_TAG ?= $(shell $(PY) -c "import vembed; print(vembed.__version__)")
images:
	docker build -f images/Dockerfile.cpu -t $(IMAGE_REPO):$(IMAGE_TAG)-cpu .
	docker build -f images/Dockerfile.cuda -t $(IMAGE_REPO):$(IMAGE_TAG)-cuda .
	docker push $(IMAGE_REPO):$(IMAGE_TAG)-cpu
	docker push $(IMAGE_REPO):$(IMAGE_TAG)-cuda

# Check that the images the compiled pipeline names by default exist in the registry (needs docker and
# network; not run in CI), and print their digests for `vembed pipeline compile --image repo@sha256:...`.
check-images:
	@for tag in $(IMAGE_TAG)-cpu $(IMAGE_TAG)-cuda; do \
	  docker buildx imagetools inspect $(IMAGE_REPO):$$tag --format '{{json .Manifest.Digest}}' \
	    | sed "s|^|$(IMAGE_REPO):$$tag -> |" || { echo "missing: $(IMAGE_REPO):$$tag"; exit 1; }; \
	done

# Pin the images to the versions installed here (the set the tests passed with).
constraints: install
	{ echo "# Exact versions the images install (pip --constraint): the set the test suite passed with."; \
	  echo "# Regenerate with \`make constraints\` after changing dependencies."; \
	  $(PY) -m pip freeze --exclude-editable | sed -E 's/^(torch[a-z]*==[0-9.]+)\+[a-z0-9]+$$/\1/' \
	  | grep -v -E '^(-e|.* @ )'; } > images/constraints.txt

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
