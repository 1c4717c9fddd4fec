"""The demo project and its datasets."""
