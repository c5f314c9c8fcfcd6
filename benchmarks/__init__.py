"""piece_optim benchmarks (not installed; run from the repo: ``python -m benchmarks.micro``,
``python -m benchmarks``)."""
