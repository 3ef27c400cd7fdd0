# make test: set up everything the suite needs on a fresh Debian 12 machine (as root) and run it.
# make check: lint + the fast tier (no systemd host, no servers, no Airflow): under a minute.
# make demo: run the agent's main jobs end to end on a local sandbox with embedded AWS.
# make dist: the agent's package the template installs, dist/airflow-ec2-agent-<version>.tar.gz.
# make bundle DAGS=dir [PLUGINS=dir]: a CodeDeploy revision, dist/airflow-bundle-<hash>.zip.
# make sandbox [WORKERS=n] [PARAMS=file]: the template launched on this machine, in the
#   foreground (docs/sandbox.md); `.venv/bin/python -m sandbox down` or Ctrl-C ends it.
SHELL := /bin/bash
.DEFAULT_GOAL := test

PYTHON ?= $(shell command -v python3.11 || command -v python3)
PY39 ?= $(shell ls -d $$HOME/.pyenv/versions/3.9*/bin/python3 /usr/bin/python3.9 2>/dev/null | head -1)
VENV := .venv
AIRFLOW_VENV := .cache/airflow-venv
PY39_VENV := .cache/py39-venv
# checkov pins old boto3/botocore, so it gets a venv of its own
CHECKOV_VENV := .cache/checkov-venv
PIP_FLAGS := -q --disable-pip-version-check
APT_PACKAGES := redis-server postgresql-15 iproute2 util-linux mount systemd python3-venv haproxy openssl
AIRFLOW_REQS := apache-airflow==3.3.2 apache-airflow-providers-celery celery[redis]==5.6.3 psycopg2-binary \
	asyncpg apache-airflow-providers-amazon apache-airflow-providers-postgres
# the fast tier: tests/conftest.py marks every test that needs none of the heavy sandbox parts
FAST := -m fast
# where `make dist` and `make bundle` write (tools/release.py: standard library only)
DIST ?= dist
DAGS ?=
PLUGINS ?=
WORKERS ?=
PARAMS ?=

.PHONY: test check demo lint format unit bench bench-drain deps apt-deps venv airflow-venv py39-venv checkov-venv clean \
	dist bundle sandbox

apt-deps:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing apt packages:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

$(VENV)/.stamp: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install $(PIP_FLAGS) --upgrade pip
	$(VENV)/bin/pip install $(PIP_FLAGS) -e '.[test]'
	touch $@

$(AIRFLOW_VENV)/.stamp:
	$(PYTHON) -m venv $(AIRFLOW_VENV)
	$(AIRFLOW_VENV)/bin/pip install $(PIP_FLAGS) --upgrade pip
	$(AIRFLOW_VENV)/bin/pip install $(PIP_FLAGS) $(AIRFLOW_REQS)
	touch $@

$(PY39_VENV)/.stamp: setup.cfg pyproject.toml
	@test -n "$(PY39)" || { echo "no Python 3.9 found (pyenv 3.9.x expected)"; exit 1; }
	$(PY39) -m venv $(PY39_VENV)
	$(PY39_VENV)/bin/pip install $(PIP_FLAGS) --upgrade pip
	$(PY39_VENV)/bin/pip install $(PIP_FLAGS) -e '.[test]'
	touch $@

$(CHECKOV_VENV)/.stamp:
	$(PYTHON) -m venv $(CHECKOV_VENV)
	$(CHECKOV_VENV)/bin/pip install $(PIP_FLAGS) checkov
	touch $@

venv: $(VENV)/.stamp
airflow-venv: $(AIRFLOW_VENV)/.stamp
py39-venv: $(PY39_VENV)/.stamp
checkov-venv: $(CHECKOV_VENV)/.stamp
deps: apt-deps venv airflow-venv py39-venv checkov-venv

lint: venv
	$(VENV)/bin/ruff check agent sandbox tests bench tools examples
	$(VENV)/bin/ruff format --check agent sandbox tests bench tools examples

format: venv
	$(VENV)/bin/ruff format agent sandbox tests bench tools examples
	$(VENV)/bin/ruff check --fix agent sandbox tests bench tools examples

check: lint
	$(VENV)/bin/python -m pytest -q -p no:cacheprovider $(FAST)

# the fast tier again on Python 3.9 (Amazon Linux 2023's python3)
unit: venv py39-venv
	$(PY39_VENV)/bin/python -m pytest -q -p no:cacheprovider $(FAST)

test: deps lint
	$(VENV)/bin/python -m pytest
	$(MAKE) --no-print-directory unit

demo: apt-deps venv airflow-venv
	$(VENV)/bin/python -m sandbox.demo

sandbox: apt-deps venv airflow-venv
	$(VENV)/bin/python -m sandbox up $(if $(WORKERS),--workers $(WORKERS)) $(if $(PARAMS),--params "$(PARAMS)")

# benchmarks print tables; they are run on purpose, not by `make test` (bench-drain: ~12 min)
bench: deps
	$(VENV)/bin/python bench/env_sync.py
	$(VENV)/bin/python -m bench.confapply
	$(VENV)/bin/python -m bench.variables

bench-drain: deps
	$(VENV)/bin/python -m bench.drain

clean:
	rm -rf $(VENV) $(PY39_VENV) .pytest_cache .hypothesis *.egg-info mutants dist

# the version is agent/__init__.py's __version__; upload the file as the template's AgentPackageKey
dist:
	$(PYTHON) -m tools.release dist --out $(DIST)

# codedeploy/appspec.yml + hooks/ + $(DAGS) as dags/ (+ $(PLUGINS) as plugins/), e.g. DAGS=examples/dags
bundle:
	@if [ -z "$(DAGS)" ]; then \
	  echo "make bundle: DAGS is not set; name the DAGs directory, e.g. make bundle DAGS=examples/dags" >&2; \
	  exit 2; \
	fi
	$(PYTHON) -m tools.release bundle --dags "$(DAGS)" $(if $(PLUGINS),--plugins "$(PLUGINS)") --out $(DIST)

# make mutate: mutation-test the pure cores (plan modules, envfile) with their fast tests alone;
# fails under 90% killed or on a survivor docs/mutation.md does not explain (about 2-4 min)
.PHONY: mutate
mutate: venv
	@$(VENV)/bin/python -c "import mutmut" 2>/dev/null || $(VENV)/bin/pip install $(PIP_FLAGS) 'mutmut>=3.8,<4'
	rm -rf mutants && mkdir mutants
	nice -n 10 $(VENV)/bin/mutmut run --max-children 2 >mutants/run.log 2>&1 || { tail -c 3000 mutants/run.log; exit 1; }
	$(VENV)/bin/python tests/mutation_report.py
