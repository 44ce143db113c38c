"""Checks of a manifest's rows and files before any training starts."""
