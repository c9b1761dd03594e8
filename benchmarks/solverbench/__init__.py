"""The code behind `benchmarks/bench_solvers.py` (see its docstring); scripts, not part of the odenet package."""
