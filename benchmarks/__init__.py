"""flannel.benchmarks stage."""
