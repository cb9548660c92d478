"""Benchmarks behind `parallel-reason bench ...`.

`decode`: wall time and KV memory of N branches decoded sequentially, in one sequence with the
belt mask (`decode_branches`), and as a batch of N prefix copies, on one model in one run.
Each module exposes a `run_*` function returning a JSON-able dict and a `render_*` function
that prints it as a table; the CLI only parses arguments and picks the output format.
"""
