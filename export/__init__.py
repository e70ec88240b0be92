"""flannel.export stage."""
