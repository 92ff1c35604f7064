"""Performance benchmarks of bayesfilter_diff (run ``python -m benchmarks --help``)."""
