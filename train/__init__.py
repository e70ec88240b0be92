"""flannel.train stage."""
