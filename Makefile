# Convenience targets; each script sets up what it needs on a fresh Debian machine.
.PHONY: test lint demo bench instructions

test:
	scripts/test

lint:
	scripts/lint

demo:
	scripts/demo

bench:
	scripts/bench

# Instructions per accepted event, in process (needs valgrind, which it names if missing): bench/instructions.py
instructions:
	scripts/setup
	.venv/bin/python -m bench.instructions
