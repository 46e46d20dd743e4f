"""Benchmarks of the shield against CRIU's drop lock, run in a network lab.

``shieldproxy bench``, run from a checkout, runs the scenarios in
:mod:`bench.scenarios` and writes ``results.json``, ``results.md`` and PNG
plots. BENCHMARKS.md shows the latest run.
"""
