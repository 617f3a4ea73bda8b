"""Fault injection: one test per promise of docs/reliability.md, each reproducing the fault on purpose."""
