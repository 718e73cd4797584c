"""Load generators and benchmarks (not part of the service package)."""
