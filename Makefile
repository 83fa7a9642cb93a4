# Convenience targets; each script sets up what it needs on a fresh Debian machine.
.PHONY: test lint demo bench

test:
	scripts/test

lint:
	scripts/lint

demo:
	scripts/demo

bench:
	scripts/bench
