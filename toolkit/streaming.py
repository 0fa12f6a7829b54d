"""Passing once over data: the progress bar every streaming pass shows."""
from __future__ import annotations


def progress_bar(data, max_batches: int | None, enabled: bool, desc: str):
    """A tqdm bar over the batches of ``data`` (its length when known, capped by
    ``max_batches``); the caller adds images per second as a postfix."""
    from tqdm.auto import tqdm

    try:
        total = len(data)
    except TypeError:
        total = None
    if max_batches is not None:
        total = max_batches if total is None else min(total, max_batches)
    return tqdm(total=total, unit="batch", desc=desc, disable=not enabled)
