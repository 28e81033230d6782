"""imgclf's version, in a module of its own: the lower layers (`tracking.env`, which writes it into env.json) read
it without importing the package's API."""

__all__ = ["__version__"]

__version__ = "0.1.0"  # keep equal to pyproject.toml's and imgclf.__version__ (tests/test_records.py checks)
