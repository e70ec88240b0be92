"""flannel: chest X-ray classifiers from training to a served, benchmarked model."""
__version__ = "0.1.0"
