"""The one progress-bar helper: a tqdm bar, or a stand-in that does nothing when bars are off."""

from __future__ import annotations

__all__ = ["NullBar", "bar"]


class NullBar:
    """tqdm's ``update`` / ``set_postfix`` / ``close`` and context-manager protocol, doing nothing."""

    def __enter__(self) -> NullBar:
        return self

    def __exit__(self, *exc) -> None:
        return None

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, **kw) -> None:
        pass

    def close(self) -> None:
        pass


def bar(iterable=None, enabled: bool = True, **kwargs):
    """``tqdm(iterable, **kwargs)`` when ``enabled``; else ``iterable`` itself, or a `NullBar` for a
    manually updated bar (``iterable=None``)."""
    if enabled:
        from tqdm import tqdm  # lazy: imported only when a bar is shown

        return tqdm(iterable, leave=False, dynamic_ncols=True, **kwargs)
    return NullBar() if iterable is None else iterable
