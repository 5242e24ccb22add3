"""Benchmarks behind ``dvla bench``: one module per benchmark, each comparing with baselines in
the same run and writing JSON (``--json PATH``)."""
