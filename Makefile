# keyrelay — the two commands a new user needs:
#   make run    install what is missing, then run a keyrelay relay on loopback in the
#               foreground (private Postfix, policyd, milter, smtp-sink); Ctrl-C stops it
#   make test   install what is missing, then run ruff, mypy and every test
#   (make check: ruff, mypy and the in-process tests only, the edit loop;
#   make run-cluster: the same demo as two nodes sharing one slapd and one redis-server)
# Both are idempotent: a second run installs nothing.

SHELL := /bin/sh
# Debian's own interpreter: the venv must not depend on a pyenv or other
# interpreter that may be on PATH.
PYTHON := /usr/bin/python3
VENV := .venv
BIN := $(VENV)/bin
RUN_DIR := run

# make deb (debian/, docs/debian.md): the tools that build and check the package, and the
# Debian libraries it depends on (also its build dependencies: scripts/gen-manpages imports
# the programs). tests/test_deb.py installs the package into a scratch root layered over this
# host, where these libraries are then already present, so the install needs no network
# (logrotate: that test also runs the installed logrotate file). make deb alone installs only
# these, not the test suite's Postfix and slapd.
DEB_BUILD_PACKAGES := debhelper dh-python pybuild-plugin-pyproject python3-all \
	python3-setuptools python3-wheel lintian fakeroot man-db \
	python3-yaml python3-cryptography python3-dnspython python3-idna python3-dkim \
	python3-spf python3-ldap3 python3-milter python3-uvloop python3-redis \
	python3-prometheus-client python3-argon2 python3-bcrypt python3-passlib

# Everything the project needs from Debian, for building the Python
# dependencies (pymilter links against libmilter) and for the tests. slapd (with
# slapadd) is for the LDAP backend's tests, which start private slapd instances on
# loopback (testkit/slapd.py); the system slapd is installed unconfigured and
# disabled (scripts/ensure-debian-packages). ldap-utils: ldapsearch/ldapadd, the
# commands docs/ldap.md uses, for looking into a test server. python3-apt: Ansible's apt
# module (tests/test_ansible.py runs the role's package task). redis-server: the counter
# store's tests and make run-cluster. faketime: tests/test_cluster_e2e.py moves the policy
# daemons' clock to the end of a day with its libfaketime (testkit/cluster.py). prometheus:
# for its promtool, which tests/test_monitoring.py runs over monitoring/ (check rules, test
# rules, check config); its system server is installed disabled and not started
# (scripts/ensure-debian-packages), nothing listens on :9090. curl: the README's look at the
# demo's /metrics and /health (tests/test_make_run.py runs it). sasl2-bin (saslpasswd2),
# db-util (db_dump) and postfix-lmdb: tests/test_migrate_postfix.py makes a real Cyrus sasldb2
# and an lmdb sender map, and `keyrelay migrate postfix` reads a sasldb2 with db_dump (its
# saslauthd service is installed disabled by scripts/ensure-debian-packages). dovecot-core:
# tests/test_coexistence*.py start a private Dovecot auth service standing in for a site's own
# SASL (testkit/dovecot.py); its system service is installed disabled, nothing listens.
# systemd-journal-remote: tests/test_events_journal.py writes real journal files with it
# (testkit/journal.py) for keyrelay-events' journal source, read back with journalctl; its
# system service is installed disabled, nothing listens.
DEBIAN_PACKAGES := python3 python3-venv python3-dev gcc make libmilter-dev \
	postfix postfix-lmdb sasl2-bin db-util dovecot-core swaks libnet-ssleay-perl openssl curl \
	libmail-dkim-perl libcryptx-perl dnsmasq-base \
	slapd ldap-utils python3-apt redis-server faketime prometheus systemd-journal-remote \
	$(DEB_BUILD_PACKAGES) logrotate

# Only for the benchmarks (make bench-deps, make bench), not for make test: the other
# milters keyrelay-milter is compared with. The bench starts its own instances with its own
# configuration; ensure-debian-packages keeps the packages' system services from starting.
BENCH_DEBIAN_PACKAGES := opendkim dkimpy-milter

.PHONY: help run run-cluster test deps deb bench bench-deps fuzz check lint typecheck unit demo clean distclean

help:
	@echo "make run     install missing parts, run the demo relay on loopback (state in $(RUN_DIR)/)"
	@echo "make run-cluster  the same with two relay nodes sharing one slapd (directory) and"
	@echo "             one redis-server (counters); key and ports in $(RUN_DIR)/cluster.env"
	@echo "make test    install missing parts, run ruff, mypy and every test (cheap ones first)"
	@echo "make check   ruff, mypy and the in-process tests only (about a minute: the edit loop)"
	@echo "make clean   remove the demo state in $(RUN_DIR)/"
	@echo "make deb     build the Debian package keyrelay_*_all.deb into $(DEB_DIST)/ (DEB_DIST=DIR"
	@echo "             for another folder) and check it with lintian (docs/debian.md)"
	@echo "make bench   install what it compares with, run the end-to-end benchmark (about"
	@echo "             25 minutes) and write its report into docs/BENCHMARKS.md"
	@echo "make bench-deps  also install what bench/postfix_milter_bench.py compares with"
	@echo "make fuzz    coverage-guided fuzzing (atheris) of every parser, one target at a"
	@echo "             time, FUZZ_SECONDS=$(FUZZ_SECONDS) each (about 35 minutes); findings"
	@echo "             in fuzz/work/ (python -m fuzz.run --help)"
	@echo "make distclean  also remove the virtual environment"

deps: debian-packages $(VENV)/.installed

# The venv is rebuilt when the dependency list changes. The Debian packages
# are checked first (order-only) because pymilter compiles against them.
$(VENV)/.installed: setup.cfg pyproject.toml | debian-packages
	@[ -x $(BIN)/python ] || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip wheel setuptools
	$(BIN)/python -m pip install -q -e '.[test]'
	@touch $@

.PHONY: debian-packages
debian-packages:
	@scripts/ensure-debian-packages $(DEBIAN_PACKAGES)

bench-deps: deps
	@scripts/ensure-debian-packages $(BENCH_DEBIAN_PACKAGES)

# The end-to-end benchmark of issue 9 (bench/e2e_bench.py --help): baseline, keyrelay,
# keyrelay with Redis counters, OpenDKIM and dkimpy-milter side by side; rewrites its section
# of docs/BENCHMARKS.md and docs/e2e-bench.png.
bench: bench-deps
	$(BIN)/python -m bench.e2e_bench --docs

# The long run of the atheris fuzzer (issue 10): every parser target for FUZZ_SECONDS each,
# one at a time; its smoke run is part of make test (tests/test_fuzz_atheris.py).
FUZZ_SECONDS := 240

fuzz: deps
	$(BIN)/python -m fuzz.run --target all --seconds $(FUZZ_SECONDS)

unit: deps
	$(BIN)/python -m pytest

typecheck: deps
	$(BIN)/mypy

lint: deps
	$(BIN)/ruff check .

# The edit loop: lint, types and the tests that run in process (no Postfix, slapd, DNS
# server, Ansible or daemon process; tests/conftest.py IN_PROCESS). About a minute.
# PYTEST_FLAGS: more pytest options for both runs, e.g. PYTEST_FLAGS=--durations=0.
# PYTEST_WORKERS: test processes (pytest-xdist); each test module runs whole in one of them
# (its module and session fixtures are not shared: each worker starts its own relay and
# slapd). Most system tests wait on Postfix, slapd and the network rather than on a CPU, so
# two workers about halve the wall time on a 2-core machine. PYTEST_WORKERS=0: one process.
PYTEST_FLAGS :=
PYTEST_WORKERS := 2
PYTEST_RUN = $(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist loadfile $(PYTEST_FLAGS)
check: deps
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(PYTEST_RUN) -q -m "not system"

# Everything, cheap checks first so that a mistake fails fast: lint, types, the in-process
# tests, then the tests that start Postfix, slapd, DNS, Ansible and the daemons.
test: check
	$(PYTEST_RUN) -m system

# The Debian package (docs/debian.md). dpkg-buildpackage writes next to the source tree and
# leaves its work in debian/, so it runs on a copy of the tree (the files git tracks or would
# track, as they are now) in $(DEB_WORK); the .deb, .buildinfo and .changes go to $(DEB_DIST)/.
# lintian: errors fail the build; warnings are printed (docs/debian.md lists the accepted ones).
DEB_DIST := dist
DEB_WORK := build/deb
# Debian's tools and interpreter only: pybuild runs "python3.11", which must not be a pyenv one
DEB_PATH := /usr/sbin:/usr/bin:/sbin:/bin
deb:
	@scripts/ensure-debian-packages $(DEB_BUILD_PACKAGES)
	rm -rf $(DEB_WORK)
	mkdir -p $(DEB_WORK)/src $(DEB_DIST)
	git ls-files -z --cached --others --exclude-standard \
		| tar --null --files-from=- --ignore-failed-read -cf - | tar -xf - -C $(DEB_WORK)/src
	cd $(DEB_WORK)/src && env PATH=$(DEB_PATH) dpkg-buildpackage --build=binary --no-sign
	mv $(DEB_WORK)/keyrelay_*.deb $(DEB_WORK)/keyrelay_*.buildinfo $(DEB_WORK)/keyrelay_*.changes \
		$(DEB_DIST)/
	rm -rf $(DEB_WORK)
	lintian --fail-on error --info $(DEB_DIST)/keyrelay_*_all.deb
	@ls -l $(DEB_DIST)/keyrelay_*_all.deb

run: deps
	$(BIN)/python -m keyrelay.demo $(RUN_DIR)

# The two-node demo (README, "Two nodes as one"; docs/cluster.md): one slapd, one
# redis-server and two relay nodes sharing them, state in $(RUN_DIR)/cluster/, the key and
# both nodes' ports in $(RUN_DIR)/cluster.env. Its slapd and redis-server are the test
# harness's private servers (testkit/cluster.py).
run-cluster: deps
	$(BIN)/python -m testkit.cluster $(RUN_DIR)

clean:
	rm -rf $(RUN_DIR)

distclean: clean
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
