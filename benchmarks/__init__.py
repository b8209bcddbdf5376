"""vlbot benchmarks (not part of the test suite): ``python -m benchmarks.run [--quick]``."""
