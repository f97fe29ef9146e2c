"""minildm."""
