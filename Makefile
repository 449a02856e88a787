# Two entry points: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# Reinstall when what decides the install changes.
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml Makefile | cksum | cut -d' ' -f1)
DEMO_RUN := $(or $(XDG_RUNTIME_DIR),/tmp)/fluxgymd-demo-$(shell id -u)

.PHONY: demo test venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[trainer,dev]'
	rm -f $(VENV)/.installed-*
	touch $@

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

# fluxgymd in the foreground (its log on this terminal), a tiny random Flux and dataset
# made once under .demo/, a LoRA job on them submitted and followed to the finished LoRA,
# then the daemon stopped. Job names are unique, so each run gets a fresh one.
demo: $(STAMP)
	@mkdir -p .demo outputs
	@test -f .demo/tiny-flux/model_index.json || HF_HUB_OFFLINE=1 $(PY) -m trainer.tiny .demo/tiny-flux
	@test -d .demo/dataset || $(PY) -m trainer.tiny --dataset .demo/dataset
	@set -e; \
	HF_HUB_OFFLINE=1 $(VENV)/bin/fluxgymd --state-dir .demo/state --runtime-dir $(DEMO_RUN) \
		--outputs-dir outputs & \
	pid=$$!; trap 'kill -TERM $$pid 2>/dev/null; wait $$pid 2>/dev/null || true' EXIT INT TERM; \
	ctl="$(VENV)/bin/fluxgymctl --runtime-dir $(DEMO_RUN)"; \
	for i in $$(seq 100); do $$ctl ping >/dev/null 2>&1 && break; sleep 0.2; done; \
	name=tiny-lora-$$(date +%Y%m%d-%H%M%S); \
	$$ctl submit etc/jobs/tiny-lora.toml --name $$name; \
	$$ctl logs -f $$name; \
	$$ctl status; \
	$$ctl wait $$name; \
	echo; echo "demo finished: the LoRA is outputs/$$name/$$name.safetensors"; \
	ls -l outputs/$$name

clean:
	rm -rf $(VENV) .demo .pytest_cache
