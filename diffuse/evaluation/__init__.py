"""Evaluation library behind `python -m diffuse.evaluate` and `python -m diffuse.compare`:
likelihood bounds with their standard errors, sample quality under a judge, steps-vs-quality sweeps
and the speedup search."""
