# Two entry points a newcomer needs: `make test` and (with the proxy) `make run`.
# Both are idempotent: they install only what is missing.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
APT_PACKAGES := libdb5.3-dev db5.3-util sendmail-bin dovecot-core dovecot-pop3d dovecot-imapd \
	curl openssl python3-venv gcc systemd man-db groff-base fail2ban logrotate \
	sendmail-cf m4 iproute2 util-linux mount prometheus haproxy libsystemd-dev pkg-config \
	redis-server redis-sentinel
STAMP := $(VENV)/.installed

.PHONY: test run check lint typecheck unit system-deps venv bench fuzz clean

test: venv lint typecheck unit

run: venv
	$(PY) -m demo.run

system-deps:
	@missing=""; for p in $(APT_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing; \
	fi

venv: system-deps $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# berkeleydb compiles against the system libdb found under /usr.
	BERKELEYDB_DIR=/usr $(PY) -m pip install -q -e '.[test,lint]'
	touch $(STAMP)

lint: venv
	$(VENV)/bin/ruff check relayproxy tests bench demo
	$(VENV)/bin/ruff format --check relayproxy tests bench demo

typecheck: venv
	$(VENV)/bin/mypy --strict relayproxy demo

unit: venv
	$(VENV)/bin/pytest -q

bench: venv
	$(PY) bench/store.py
	$(PY) bench/logins.py
	$(PY) bench/workers.py
	$(PY) bench/memory.py
	$(PY) bench/durability.py
	$(PY) bench/redis_store.py
	$(PY) bench/mapserver.py
	$(PY) bench/mirror_lag.py

# Issue 9: generated POP3/IMAP dialogues through relayproxy to a real Dovecot; prints counts
# per class and fails on any false or missed record. FUZZ_ARGS="--seed N --count M" to vary.
fuzz: venv
	$(PY) -m tests.differential --count 100000 $(FUZZ_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build *.egg-info
