"""Colour themes as TOML data files."""
