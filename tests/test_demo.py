"""The El Niño data and ``python -m kronjax demo`` at tiny settings."""

import math
import re

import numpy as np
import pytest

from kronjax.data import load_elnino


def test_load_elnino():
    years, months, sst = load_elnino()
    assert sst.shape == (61, 12)
    np.testing.assert_array_equal(years, np.arange(1950, 2011))
    np.testing.assert_array_equal(months, np.arange(1, 13))
    assert np.all(np.isfinite(sst))
    assert 18.0 < sst.min() and sst.max() < 30.0  # Niño 1+2 SSTs, °C
    # spot values from the NOAA table: January 1950 and December 2010
    assert sst[0, 0] == pytest.approx(23.11)
    assert sst[-1, -1] == pytest.approx(22.07)
    # the seasonal cycle: warm in March, cool in September
    assert sst[:, 2].mean() > sst[:, 8].mean() + 4


def test_demo_runs(tmp_path, capsys):
    from kronjax import demo

    out = tmp_path / "forecast.png"
    demo.main(
        [
            "--out",
            str(out),
            "--steps",
            "20",
            "--num-warmup",
            "20",
            "--num-samples",
            "20",
            "--no-progress",
        ]
    )
    printed = capsys.readouterr().out
    assert out.exists() and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = re.findall(r"^(GP .*|climatology .*?)\s+(\S+)\s+(\d+)%\s+(\S+)$", printed, re.M)
    assert len(rows) == 2, printed
    for _, rmse, cover, width in rows:
        assert math.isfinite(float(rmse)) and 0 <= int(cover) <= 100 and float(width) > 0
    for stage in ("optax", "NUTS", "forecast", "plot"):
        assert re.search(rf"{stage} [\d.]+ s", printed)


def test_demo_help(capsys):
    from kronjax.__main__ import main

    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for option in ("--out", "--num-samples", "--num-warmup", "--seed"):
        assert option in text
