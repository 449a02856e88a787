# Two entry points: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
DEMO_RUN := $(or $(XDG_RUNTIME_DIR),/tmp)/fluxgymd-demo-$(shell id -u)

.PHONY: demo test venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	rm -f $(VENV)/.installed-*
	touch $@

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

# fluxgymd in the foreground (its log on this terminal), a bundled job submitted to it and
# followed to the end, then the daemon stopped. Job names are unique, so each run gets one.
demo: $(STAMP)
	@mkdir -p .demo outputs
	@set -e; \
	$(VENV)/bin/fluxgymd --state-dir .demo/state --runtime-dir $(DEMO_RUN) --outputs-dir outputs & \
	pid=$$!; trap 'kill -TERM $$pid 2>/dev/null; wait $$pid 2>/dev/null || true' EXIT INT TERM; \
	ctl="$(VENV)/bin/fluxgymctl --runtime-dir $(DEMO_RUN)"; \
	for i in $$(seq 50); do $$ctl ping >/dev/null 2>&1 && break; sleep 0.2; done; \
	name=demo-$$(date +%Y%m%d-%H%M%S); \
	$$ctl submit etc/jobs/demo.toml --name $$name; \
	$$ctl logs -f $$name; \
	$$ctl status; \
	$$ctl wait $$name; \
	echo "demo finished: outputs/$$name"; ls -l outputs/$$name

clean:
	rm -rf $(VENV) .demo .pytest_cache
