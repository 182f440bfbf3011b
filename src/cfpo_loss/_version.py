"""The package's version: this file is its one source (pyproject.toml reads it, `cfpo_loss.__version__` imports it)."""

__version__ = "0.2.0.dev0"
