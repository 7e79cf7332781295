"""agentkv's version, defined here only (pyproject.toml reads it; __init__ re-exports it)."""

__version__ = "0.4.0"
