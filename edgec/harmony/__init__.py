"""Harmony: gpt-oss's chat format (renderer, streaming parser, o200k_harmony tokenizer)."""
