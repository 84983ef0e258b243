"""assistants-server: a self-hosted server wire-compatible with the OpenAI Assistants API."""

# The one place the version is written; pyproject.toml reads it from here.
__version__ = "0.1.0"
