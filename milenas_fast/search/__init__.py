"""How α and w are optimised: the update rules (step) and the epoch loop (loop)."""
