"""The suites' progress bar."""

from __future__ import annotations


def progress_bar(total: int, desc: str, unit: str, enabled: bool):
    """A tqdm bar on stderr, or tqdm's silent twin when disabled (same methods), so callers never
    test for None. Use as a context manager."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, leave=False, disable=not enabled)
