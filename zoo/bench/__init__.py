"""Benchmarks run by `zoo bench NAME`: one module per benchmark (`add_arguments`, `run`)."""
