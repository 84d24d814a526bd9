"""One progress bar for long work: tqdm when it is shown, a silent stand-in with the same methods
otherwise (so callers never branch on it). tqdm is imported only when a bar is shown."""

from __future__ import annotations


class NullBar:
    """Counts like a tqdm bar and shows nothing."""

    n = 0

    def update(self, n: int = 1) -> None:
        self.n += n

    def set_postfix(self, *args, **kwargs) -> None:
        pass

    def close(self) -> None:
        pass


def bar(total: int, desc: str, show: bool, unit: str = "item", **kwargs):
    """A tqdm bar over `total` units when `show`, else a NullBar."""
    if not show:
        return NullBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, **kwargs)
