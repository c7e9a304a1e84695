"""mmloss benchmarks: `python -m bench` prints the CPU table; bench/test_*.py are pytest-benchmark suites."""
