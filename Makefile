# Benchmarks (see BENCHMARKS.md): our stack against Django Channels + Daphne.
PYTHON ?= .venv/bin/python

.PHONY: bench bench-quick

# Full: N = 1,000 / 5,000 / 10,000, both systems; regenerates BENCHMARKS.md and bench/plots/.
bench:
	$(PYTHON) bench/run.py $(BENCH_ARGS)

# Quick: N = 200, one broadcast round, both systems (under 2 minutes).
bench-quick:
	$(PYTHON) bench/run.py --quick $(BENCH_ARGS)
