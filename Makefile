# Two entry points: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# Reinstall when what decides the install changes.
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml Makefile | cksum | cut -d' ' -f1)
DEMO_RUN := $(or $(XDG_RUNTIME_DIR),/tmp)/fluxgymd-demo-$(shell id -u)

.PHONY: demo test check venv clean install uninstall

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[trainer,dev]'
	rm -f $(VENV)/.installed-*
	touch $@

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

# The inner loop: the tests that start no daemon, trainer, cluster or browser (see the e2e
# marker in tests/conftest.py). `make test` is still the whole suite, and what CI runs.
check: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m "not e2e"

# fluxgymd in the foreground (its log on this terminal, its dashboard on a free local port), a
# tiny random Flux and dataset
# made once under .demo/, a LoRA job on them submitted and followed to the finished LoRA,
# then the daemon stopped. Job names are unique, so each run gets a fresh one.
demo: $(STAMP)
	@mkdir -p .demo outputs
	@test -f .demo/tiny-flux/model_index.json || HF_HUB_OFFLINE=1 $(PY) -m trainer.tiny .demo/tiny-flux
	@test -d .demo/dataset || $(PY) -m trainer.tiny --dataset .demo/dataset
	@set -e; \
	HF_HUB_OFFLINE=1 $(VENV)/bin/fluxgymd --state-dir .demo/state --runtime-dir $(DEMO_RUN) \
		--outputs-dir outputs --web 127.0.0.1:0 & \
	pid=$$!; trap 'kill -TERM $$pid 2>/dev/null; wait $$pid 2>/dev/null || true' EXIT INT TERM; \
	ctl="$(VENV)/bin/fluxgymctl --runtime-dir $(DEMO_RUN)"; \
	for i in $$(seq 100); do $$ctl ping >/dev/null 2>&1 && break; sleep 0.2; done; \
	echo "the dashboard, to watch it in a browser: $$($$ctl web-url)"; \
	name=tiny-lora-$$(date +%Y%m%d-%H%M%S); \
	$$ctl submit etc/jobs/tiny-lora.toml --name $$name; \
	$$ctl logs -f $$name; \
	$$ctl status; \
	$$ctl wait $$name; \
	echo; echo "demo finished: the LoRA is outputs/$$name/$$name.safetensors"; \
	ls -l outputs/$$name; \
	echo "next: kohya sd-scripts jobs run once a checkout is allowed: checkouts = [\"/path/to/sd-scripts\"]" \
		"under [kohya] in fluxgymd.toml (README: Running kohya sd-scripts under fluxgymd)"

clean:
	rm -rf $(VENV) .demo .pytest_cache

# --- install: a self-contained venv under $(PREFIX)/lib/fluxgymd, the executables linked into
# $(PREFIX)/bin, the units where systemd looks ($(PREFIX)/lib/systemd/system and the sysusers.d
# and tmpfiles.d beside it), the config in $(SYSCONFDIR)/fluxgymd (an existing one is kept).
# DESTDIR stages everything under another root (for packages and the end-to-end tests); the
# venv is built in the stage and its scripts, config and bytecode rewritten to the final paths.
# The service user must be able to reach PYTHON's installation: a Python under /root (pyenv)
# is refused with advice, use e.g. PYTHON=/usr/bin/python3.
PREFIX     ?= /usr/local
SYSCONFDIR ?= /etc
EXTRAS     ?= trainer
BINDIR     := $(PREFIX)/bin
LIBDIR     := $(PREFIX)/lib/fluxgymd
UNITDIR    ?= $(PREFIX)/lib/systemd/system
SYSUSERSDIR ?= $(PREFIX)/lib/sysusers.d
TMPFILESDIR ?= $(PREFIX)/lib/tmpfiles.d
DOCDIR     := $(PREFIX)/share/doc/fluxgymd
STAGE      := $(DESTDIR)$(LIBDIR)

# Every directory on the way to the interpreter and its stdlib must be searchable by others.
define CHECK_PYTHON
import os, sys
for path in {os.path.realpath(sys.executable), os.path.realpath(os.__file__)}:
    d = path
    while d != "/":
        d = os.path.dirname(d)
        if not os.stat(d).st_mode & 0o001:
            sys.exit(f"make install: {path} is not reachable by the fluxgymd service user "
                     f"({d} is mode {os.stat(d).st_mode & 0o777:o}); give a Python that others "
                     "can run, e.g. make install PYTHON=/usr/bin/python3")
endef
export CHECK_PYTHON

install:
	$(PYTHON) -c "$$CHECK_PYTHON"
	rm -rf '$(STAGE)'
	$(PYTHON) -m venv '$(STAGE)'
	'$(STAGE)/bin/python' -m pip install -q --no-compile '.$(if $(EXTRAS),[$(EXTRAS)])'
	@# the venv as it will be seen at $(LIBDIR): scripts' #! lines, activate, pyvenv.cfg
	grep -rlF '$(STAGE)' '$(STAGE)/bin' '$(STAGE)/pyvenv.cfg' | xargs -r sed -i 's|$(STAGE)|$(LIBDIR)|g'
	@# like pip, skip files that are not valid for this Python (torch ships 3.12-only helpers)
	'$(STAGE)/bin/python' -m compileall -qq -j 0 $(if $(DESTDIR),-s '$(DESTDIR)' -p /) \
		'$(STAGE)/lib' || true
	install -d '$(DESTDIR)$(BINDIR)' '$(DESTDIR)$(UNITDIR)' '$(DESTDIR)$(SYSUSERSDIR)' \
		'$(DESTDIR)$(TMPFILESDIR)' '$(DESTDIR)$(SYSCONFDIR)/fluxgymd' '$(DESTDIR)$(DOCDIR)/jobs'
	ln -sfr '$(STAGE)/bin/fluxgymd' '$(DESTDIR)$(BINDIR)/fluxgymd'
	ln -sfr '$(STAGE)/bin/fluxgymctl' '$(DESTDIR)$(BINDIR)/fluxgymctl'
	sed -e 's|/usr/local/bin/|$(BINDIR)/|g' -e 's|/etc/fluxgymd/|$(SYSCONFDIR)/fluxgymd/|g' \
		-e 's|/usr/local/share/doc/fluxgymd/|$(DOCDIR)/|g' systemd/fluxgymd.service \
		> '$(DESTDIR)$(UNITDIR)/fluxgymd.service'
	install -m 0644 systemd/fluxgymd.sysusers '$(DESTDIR)$(SYSUSERSDIR)/fluxgymd.conf'
	sed -e 's|/etc/fluxgymd|$(SYSCONFDIR)/fluxgymd|g' systemd/fluxgymd.tmpfiles \
		> '$(DESTDIR)$(TMPFILESDIR)/fluxgymd.conf'
	test -e '$(DESTDIR)$(SYSCONFDIR)/fluxgymd/fluxgymd.toml' \
		|| install -m 0644 etc/fluxgymd.toml '$(DESTDIR)$(SYSCONFDIR)/fluxgymd/fluxgymd.toml'
	install -m 0644 README.md '$(DESTDIR)$(DOCDIR)/README.md'
	install -m 0644 etc/jobs/*.toml '$(DESTDIR)$(DOCDIR)/jobs/'
	@if [ -z '$(DESTDIR)' ] && [ -d /run/systemd/system ]; then \
		systemd-sysusers && systemd-tmpfiles --create fluxgymd.conf && systemctl daemon-reload \
		&& echo "installed: systemctl enable --now fluxgymd"; \
	elif [ -z '$(DESTDIR)' ]; then echo "installed; systemd is not running here, so" \
		"systemd-sysusers and systemctl daemon-reload are left for when it is"; fi

# Removes what install put down; keeps $(SYSCONFDIR)/fluxgymd and /var/lib/fluxgymd (jobs, LoRAs).
uninstall:
	rm -rf '$(STAGE)' '$(DESTDIR)$(DOCDIR)'
	rm -f '$(DESTDIR)$(BINDIR)/fluxgymd' '$(DESTDIR)$(BINDIR)/fluxgymctl' \
		'$(DESTDIR)$(UNITDIR)/fluxgymd.service' '$(DESTDIR)$(SYSUSERSDIR)/fluxgymd.conf' \
		'$(DESTDIR)$(TMPFILESDIR)/fluxgymd.conf'
