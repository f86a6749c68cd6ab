"""Training library behind training/train.py."""
