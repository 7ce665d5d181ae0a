"""Reproducible benchmarks: our trainers against TRL and against the CPU, and orchestration cost.

`make bench` (or `python -m benchmarks.run`) writes `benchmarks/results/latest.json` and
`latest.md`; see benchmarks/README.md for what is measured and how.
"""
