# Convenience targets; each script sets up what it needs on a fresh Debian machine.
.PHONY: test demo bench

test:
	scripts/test

demo:
	scripts/demo

bench:
	scripts/bench
