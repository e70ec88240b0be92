"""flannel.handlers stage."""
