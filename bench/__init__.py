"""mmloss benchmarks: `python -m bench` prints the CPU table, `bash bench/gpu.sh` is the GPU run,
bench/test_*.py are pytest-benchmark suites."""
