"""edgec: edge-deployment compiler for OpenAI's gpt-oss models."""

__version__ = "0.1.0"
