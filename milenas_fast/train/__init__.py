"""Training a genotype from scratch (DARTS train.py): settings (config) and the epoch loop (loop)."""
