# make run: the daemon with a demo configuration; make test: lint and the whole
# suite; make check: the fast unit tests alone; make lint: ruff and mypy.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEMO_PASSWORD := demo-password

.PHONY: run test check lint format print-unit deb deb-test clean cluster-test

# Unit tests: no daemon on a socket, no external program; seconds in all.
UNIT := tests.test_addresses tests.test_checkers tests.test_config tests.test_dataread \
	tests.test_dsn tests.test_envelope tests.test_esmtp tests.test_extensions \
	tests.test_forward tests.test_fromheader tests.test_headers tests.test_interfaces \
	tests.test_maildir tests.test_passwords tests.test_realm tests.test_replies \
	tests.test_routing tests.test_spool tests.test_throttle tests.test_userdb tests.test_workerlink

$(BIN)/mailauth: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel
	$(BIN)/pip install -q --config-settings editable_mode=compat -e '.[test]'
	@touch $@

var/tls/cert.pem:
	mkdir -p var/tls
	openssl req -x509 -newkey rsa:2048 -nodes -days 365 -subj /CN=localhost \
	  -addext subjectAltName=DNS:localhost,IP:127.0.0.1 \
	  -keyout var/tls/key.pem -out var/tls/cert.pem 2>/dev/null
	chmod 600 var/tls/key.pem

var/users: | $(BIN)/mailauth
	mkdir -p var
	echo '$(DEMO_PASSWORD)' | $(BIN)/mailauth user add demo@example.test --users var/users

# etc/demo.conf with this checkout's absolute path before var/: the daemon
# warns of a relative state_dir or maildir (a systemd unit starts in /).
var/demo.conf: etc/demo.conf
	mkdir -p var
	sed 's|= var/|= $(CURDIR)/var/|' etc/demo.conf > $@

run: $(BIN)/mailauth var/tls/cert.pem var/users var/demo.conf
	$(BIN)/mailauth check-config --config var/demo.conf
	@echo
	@echo "mailauth: submission with STARTTLS on 127.0.0.1:2587, implicit TLS on 127.0.0.1:2465"
	@echo "user: demo@example.test, password $(DEMO_PASSWORD) (AUTH PLAIN or LOGIN)"
	@echo "try:   swaks --server 127.0.0.1:2587 --tls --auth PLAIN --auth-user demo@example.test \\"
	@echo "         --auth-password $(DEMO_PASSWORD) --from demo@example.test --to demo@example.test"
	@echo "mail lands in var/mail/example.test/demo/Maildir/new/"
	@echo
	$(BIN)/twistd --nodaemon --pidfile= --logfile=- mailauth --config var/demo.conf

test: lint
	$(BIN)/python -m twisted.trial --jobs=2 tests

check: $(BIN)/mailauth
	$(BIN)/python -m twisted.trial --jobs=2 $(UNIT)

# make cluster-test: three mailauth nodes of two workers behind HAProxy (PROXY
# v2), with Redis and PostgreSQL, all started unprivileged in a temporary
# folder; one node is killed under load (tests/cluster.py; about a minute).
# PYTHON_TEST=/usr/bin/python3 runs it on Debian's Twisted.
PYTHON_TEST ?= $(BIN)/python

cluster-test: $(BIN)/mailauth
	PYTHONPATH="$(CURDIR)" $(PYTHON_TEST) -m tests.cluster

# For debian/rules: the package build runs the unit tests on Debian's own
# Twisted; the rest (engines, real clients) runs in .ci/run on both.
print-unit:
	@echo $(UNIT)

lint: $(BIN)/mailauth
	$(BIN)/ruff check mailauth tests twisted bench
	$(BIN)/ruff format --check mailauth tests twisted bench
	$(BIN)/mypy

format: $(BIN)/mailauth
	$(BIN)/ruff format mailauth tests twisted bench

clean:
	rm -rf $(VENV) var _trial_temp* build dist *.egg-info

# make deb: the Debian package, built from a copy of the tree into dist/ (needs
# debian/control's Build-Depends: as root, apt-get build-dep ./).
# make deb-test: as root on Debian bookworm: install the build dependencies,
# build, lintian, install, send mail through the installed daemon, purge.
deb:
	.ci/deb-build dist

deb-test:
	.ci/deb-test
