"""`python -m langchain_parallel_reason ...`: the `parallel-reason` command line."""

from langchain_parallel_reason.cli import main

raise SystemExit(main())
