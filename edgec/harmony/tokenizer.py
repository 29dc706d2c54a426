"""o200k_harmony tokenizer (placeholder until the Harmony work lands)."""

from pathlib import Path


def write_tokenizer_files(out: Path) -> None:
    """Write tokenizer.json, tokenizer_config.json, special_tokens_map.json into `out`."""
