"""Thin absl entry points over jaxpost: `python -m experiments.<name> --flags`."""
