# Set-up and entry points. `make demo` runs the all-in-one default, `make test` the test suite.
# Both create .venv, install the project and what its tests need (system packages via apt
# when missing, a Redis server when none is listening on 127.0.0.1:6379).
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch; this machine has it on local disk. Users elsewhere may override,
# e.g. TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cpu".
TORCH_SPEC ?= torch==2.13.0
# what `make demo` and `make test` need from apt (installed when missing): the demo only the
# dataset (it needs no Redis), the tests also promtool (alert rules) and a Redis server
DEMO_APT := dataset-fashion-mnist
TEST_APT := dataset-fashion-mnist prometheus redis-server
# the Redis the tests use (tests/conftest.py names it): fixed, not a knob
REDIS_PORT := 6379
# The deployment's secrets (role tokens, Redis and Grafana passwords): an env file that docker
# compose reads (`.env` in this directory is its default) and the Kubernetes Secret is made from.
# Gitignored; `make secrets` creates it when missing and never changes a value it holds.
SECRETS_FILE ?= .env
# the namespace the manifests name (kustomization.yaml, the worker URL pattern): not a knob
K8S_NAMESPACE := dapdee

.PHONY: setup system-deps demo-deps redis demo test lint bench clean secrets compose-up k8s-secret

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@$(call apt_deps,python3-venv)
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

# $(call apt_deps,PACKAGES): install those of PACKAGES whose file or command is missing
apt_deps = missing=""; \
	for p in $(1); do \
	  case $$p in \
	    dataset-fashion-mnist) [ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] ;; \
	    prometheus) command -v promtool >/dev/null ;; \
	    redis-server) command -v redis-server >/dev/null ;; \
	    python3-venv) python3 -c "import ensurepip" 2>/dev/null ;; \
	  esac || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing) >/dev/null \
	  || { echo "could not apt-get install:$$missing (run as root or install them by hand)"; exit 1; }; \
	fi

system-deps:
	@$(call apt_deps,$(TEST_APT))

demo-deps:
	@$(call apt_deps,$(DEMO_APT))

redis: system-deps
	@redis-cli -p $(REDIS_PORT) ping >/dev/null 2>&1 || { \
	  echo "starting redis-server on 127.0.0.1:$(REDIS_PORT)"; \
	  redis-server --port $(REDIS_PORT) --bind 127.0.0.1 --save '' --appendonly no --daemonize yes >/dev/null; \
	  for i in 1 2 3 4 5 6 7 8 9 10; do redis-cli -p $(REDIS_PORT) ping >/dev/null 2>&1 && break; sleep 0.3; done; }

demo: setup demo-deps
	$(VENV)/bin/dapdee up

test: setup system-deps redis
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bench: setup
	$(PY) bench/plan_speed.py

secrets:
	@python3 deploy/gen_secrets.py $(SECRETS_FILE)

# the compose stack (docs/DEPLOY.md): refuses to start without the secrets, so make them first
compose-up: secrets
	docker compose --env-file $(SECRETS_FILE) up --build --detach

# the Kubernetes Secret `dapdee-tokens` from the same file (run before `kubectl apply -k k8s/`;
# it creates the namespace when missing, which `kubectl apply -k k8s/` then labels)
k8s-secret: secrets
	kubectl create namespace $(K8S_NAMESPACE) --dry-run=client -o yaml | kubectl apply -f -
	kubectl -n $(K8S_NAMESPACE) create secret generic dapdee-tokens --from-env-file=$(SECRETS_FILE) \
	  --dry-run=client -o yaml | kubectl apply -f -

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
