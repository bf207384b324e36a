"""The package version (one place: pyproject.toml reads it, and every module that needs it imports this one)."""
__version__ = "0.1.0"
