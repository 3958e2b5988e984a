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


def test_demo_plot_shows_gp_mean_and_full_legend(tmp_path, monkeypatch):
    """The GP mean is drawn above the bands, distinct from the climatology mean (which
    coincides with it almost everywhere), and the legend names everything drawn."""
    import matplotlib.pyplot as plt

    from kronjax import demo

    figures = []
    monkeypatch.setattr(plt, "close", figures.append)  # keep the figure to inspect it
    years, _, sst = load_elnino()
    n_train = len(years) - demo.HOLDOUT
    clim = np.tile(sst[:n_train].mean(0), demo.HOLDOUT)
    sd = np.tile(sst[:n_train].std(0, ddof=1), demo.HOLDOUT)
    out = tmp_path / "plot.png"
    demo.plot(out, years, sst, n_train, clim, clim - 1.8, clim + 1.8, clim, sd)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (fig,) = figures
    bottom = fig.axes[1]
    assert [t.get_text() for t in bottom.get_legend().get_texts()] == [
        "training data",
        "held-out truth",
        "GP predictive mean",
        "GP 90% predictive band",
        "climatology mean",
        "climatology 90% band (± 1.645 sd)",
    ]
    lines = {line.get_label(): line for line in bottom.get_lines()}
    gp_mean, clim_mean = lines["GP predictive mean"], lines["climatology mean"]
    assert gp_mean.get_linestyle() == "-" and clim_mean.get_linestyle() == "--"
    assert gp_mean.get_color() != clim_mean.get_color()
    assert gp_mean.get_linewidth() > 2 * clim_mean.get_linewidth()
    band = next(c for c in bottom.collections if c.get_label() == "GP 90% predictive band")
    assert band.get_zorder() < gp_mean.get_zorder() < lines["held-out truth"].get_zorder()
    plt.close(fig)


def test_synthetic_converges_to_the_maximum_likelihood_point(capsys):
    from kronjax import synthetic_demo

    result = synthetic_demo.run(shape=(12, 10, 8), steps=100, seed=0)
    printed = capsys.readouterr().out
    assert result["converged"] and result["grad_norm"] <= synthetic_demo.GTOL
    assert re.search(r"^converged after \d+ steps", printed, re.M), printed
    assert "fitted (ML)" in printed and "did not converge" not in printed
    # the fit is the likelihood maximum of this draw: more likely than the truth, which
    # lies within a few Laplace standard errors of it (not exactly on it)
    assert result["loss"] <= result["loss_true"]
    for key in ("lengthscale", "amplitude", "sigma"):
        z = np.log(result["true"][key] / result["fitted"][key]) / result["se"][f"log_{key}"]
        assert np.all(np.abs(z) < 4), (key, z)


def test_synthetic_says_when_it_did_not_converge(capsys):
    from kronjax import synthetic_demo

    result = synthetic_demo.run(shape=(12, 10, 8), steps=2, seed=0)
    printed = capsys.readouterr().out
    assert not result["converged"] and result["steps"] == 2 and result["se"] is None
    assert re.search(r"^did not converge after 2 steps \(gradient norm \S+", printed, re.M)
    assert "fitted" not in printed and "last iterate" in printed
