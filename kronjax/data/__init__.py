"""Small real datasets shipped with kronjax (read from package data, no network)."""

from importlib import resources

import numpy as np

__all__ = ["load_elnino"]


def load_elnino() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Monthly El Niño sea-surface temperatures, Niño 1+2 region, 1950–2010.

    NOAA ERSST.V3B (public domain); the same table ships with statsmodels as
    ``statsmodels.datasets.elnino``.

    Returns:
        ``(years, months, sst)``: ``years`` ``(61,)`` = 1950 … 2010, ``months`` ``(12,)`` =
        1 … 12, ``sst`` ``(61, 12)`` in °C, one row per year — a year × month grid.
    """
    text = resources.files(__name__).joinpath("elnino.csv").read_text()
    rows = [line for line in text.splitlines() if line and not line.startswith("#")]
    table = np.loadtxt(rows[1:], delimiter=",")  # rows[0] is the header YEAR,JAN,…,DEC
    return table[:, 0].astype(int), np.arange(1, 13), table[:, 1:]
