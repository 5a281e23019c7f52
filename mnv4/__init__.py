"""The library under the two training scripts (see common.py for the map of its modules)."""
