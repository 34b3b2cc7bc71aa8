# The two set-up commands of the README. Both install what they need (scripts/setup_venv.sh
# is idempotent: a few seconds when everything is already there).
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: venv demo test eval clean

venv:
	bash scripts/setup_venv.sh $(VENV)

# Main job: the node on a replayed TUM RGB-D bag (synthetic sequence without ../shared/data).
demo: venv
	$(PY) -m dense_match_ros.ros.tools.demo --out out/demo

test: venv
	$(PY) -m pytest -q test

# Evaluation of the classical baseline on every shared set and the synthetic held-out set.
eval: venv
	$(PY) -m dense_match_ros.evaluation.cli --method dis --sets all --json out/eval_dis.json --report out/eval_dis

clean:
	rm -rf build out
