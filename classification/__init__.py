"""ImageNet-1K classification with the OverLoCK backbone: train.py, validate.py (see README.md)."""
