"""fastgemma benchmark harness: ``python -m benchmarks.run --suite kernel|model|trl|context|all``."""
