"""Markdown tables, the targets of issue 4, JSON and log-log plots from the workload sections."""

import json
import math
import os

FAST_PEERS = ("gpytorch", "gpytorch-nochol")  # GPyTorch's time = its faster float64 setting
PYMC = ("pymc-numba", "pymc-cvm")


def _t(s):
    """Seconds as a short human string."""
    if s is None or (isinstance(s, float) and math.isnan(s)):
        return "—"
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.2f} ms"
    return f"{s * 1e6:.0f} µs"


def _e(x):
    return "—" if x is None else ("inf/NaN" if math.isinf(x) else f"{x:.1e}")


def _table(header, rows):
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def _by(rows, *keys):
    out = {}
    for r in rows:
        out[tuple(r.get(k) for k in keys)] = r
    return out


def _best(rows, grid, names):
    """The fastest row among systems ``names`` at ``grid`` (None if none ran)."""
    c = [r for r in rows if r["grid"] == grid and r["system"] in names and r.get("median_s")]
    return min(c, key=lambda r: r["median_s"]) if c else None


# --- per-workload renderers --------------------------------------------------------------


WIDE = (
    ("kronjax", ("kronjax",)),
    ("kronjax-f32", ("kronjax-f32",)),
    ("GPyTorch (best f64)", FAST_PEERS),
    ("PyMC (best mode)", PYMC),
    ("dense NumPyro", ("dense-numpyro",)),
    ("naive eigh autodiff", ("naive-eigh-jax",)),
    ("NumPy eigen", ("numpy-eig",)),
    ("floor", ("floor",)),
)


def _logp(sec):
    rows = sec["rows"]
    grids = list(dict.fromkeys(r["grid"] for r in rows))
    head = ["grid", "N"] + [c + ("" if i == 0 else " (× kronjax)") for i, (c, _) in enumerate(WIDE)]
    body = []
    for g in grids:
        kr = _best(rows, g, ("kronjax",))
        k = kr["median_s"] if kr else None
        n = next(r["N"] for r in rows if r["grid"] == g)
        cells = []
        for col, names in WIDE:
            r = _best(rows, g, names)
            if r is None:
                miss = [x for x in rows if x["grid"] == g and x["system"] in names]
                cells.append(miss[0].get("note", "")[:40] if miss else "")
                continue
            t = _t(r["median_s"]) + ("≥" if r.get("reps") == 1 else "")
            if len(names) > 1:
                t += f" [{r['system']}]"
            cells.append(t if col == "kronjax" or not k else f"{t} ({r['median_s'] / k:.2f}×)")
        body.append([g, f"{n:,}", *cells])
    md = [_table(head, body), "", "Details (agreement first; compile = first call − median):", ""]
    det = [
        [
            r["grid"],
            r["system"],
            r.get("dtype", ""),
            _t(r.get("median_s")),
            _t(r.get("min_s")),
            _t(r.get("compile_s")),
            r.get("reps", ""),
            _e(r.get("err_lp")),
            _e(r.get("err_grad")),
            r.get("ref", ""),
            r.get("threads", ""),
            r.get("note", ""),
        ]
        for r in rows
    ]
    md.append(
        _table(
            [
                "grid",
                "system",
                "dtype",
                "median",
                "min",
                "compile",
                "reps",
                "err logp",
                "err grad",
                "vs",
                "threads",
                "note",
            ],
            det,
        )
    )
    return "\n".join(md)


def _sample(sec):
    rows = sec["rows"]
    systems = list(dict.fromkeys(r["system"] for r in rows))
    idx = _by(rows, "grid", "system")
    body = []
    for g in dict.fromkeys(r["grid"] for r in rows):
        k = idx.get((g, "kronjax"), {}).get("draws_per_s")
        cells = []
        for s in systems:
            r = idx.get((g, s))
            if r is None:
                cells.append("")
            elif r.get("draws_per_s") is None:
                cells.append(r.get("note", "")[:40])
            else:
                v = f"{r['draws_per_s']:.3g}"
                cells.append(v if s == "kronjax" or not k else f"{v} ({k / r['draws_per_s']:.3g}×)")
        body.append([g, f"{next(r['N'] for r in rows if r['grid'] == g):,}", *cells])
    head = ["grid", "N"] + [
        s + (" (kronjax speed-up)" if s != "kronjax" else "") + " draws/s" for s in systems
    ]
    det = [
        [
            r["grid"],
            r["system"],
            r.get("draws", ""),
            _t(r.get("median_s")),
            _t(r.get("compile_s")),
            r.get("reps", ""),
            "—" if r.get("chi2_z") is None else f"{r['chi2_z']:+.2f}",
            r.get("note", ""),
        ]
        for r in rows
    ]
    return "\n".join(
        [
            _table(head, body),
            "",
            "Details:",
            "",
            _table(
                [
                    "grid",
                    "system",
                    "draws/call",
                    "median/call",
                    "compile",
                    "reps",
                    "chi2 z",
                    "note",
                ],
                det,
            ),
        ]
    )


def _predict(sec):
    if not sec["rows"]:
        return ""
    return _table(
        ["grid", "N", "N test", "system", "median", "compile", "err mean", "err var", "note"],
        [
            [
                r["grid"],
                r["N"],
                r.get("N_test", ""),
                r["system"],
                _t(r.get("median_s")),
                _t(r.get("compile_s")),
                _e(r.get("err_mean")),
                _e(r.get("err_var")),
                r.get("note", ""),
            ]
            for r in sec["rows"]
        ],
    )


def _vmap(sec):
    idx = _by(sec["rows"], "B", "system")
    body = []
    for b in dict.fromkeys(r["B"] for r in sec["rows"]):
        v = idx[(b, "kronjax-vmap")]["median_s"]
        cells = []
        for s in ("kronjax-vmap", "kronjax-loop", "gpytorch-batch", "eigh-bound"):
            r = idx.get((b, s))
            if r is None:
                cells.append("")
                continue
            c = f"{_t(r['median_s'])} ({r['per_setting_us']:.0f} µs/set)"
            cells.append(c if s == "kronjax-vmap" else f"{c} ({r['median_s'] / v:.1f}×)")
        errs = max(
            max(r["err_lp"], r["err_grad"]) for r in sec["rows"] if r["B"] == b and "err_lp" in r
        )
        body.append([b, *cells, _e(errs)])
    head = ["B", "kronjax vmap", "Python loop (× vmap)", "GPyTorch batch (× vmap)"]
    return _table([*head, "eigh bound (× vmap)", "max err"], body)


def _nuts(sec):
    rows = sec["rows"]
    idx = _by(rows, "grid", "system")
    body = []
    for r in rows:
        pm = idx.get((r["grid"], "pymc"), {})
        ratio = ""
        if r["system"] == "numpyro-kronjax" and r.get("ess_per_s"):
            if pm.get("ess_per_s"):
                ratio = (
                    f"{r['ess_per_s'] / pm['ess_per_s']:.1f}× "
                    f"({r['ess_per_s_compile'] / pm['ess_per_s_compile']:.1f}× w/ compile)"
                )
            elif pm.get("note"):
                ratio = "PyMC did not finish"
        if r.get("ess_min") is None:
            note = r.get("note", "") or r.get("error", "")[-200:].replace("\n", " ")
            prog = ""
            if "iterations" in r:
                prog = (
                    f"reached {r['iterations']} iterations; mean depth "
                    f"{r['mean_tree_depth']:.2f}, leapfrog {r['mean_leapfrog']:.0f}, "
                    f"step {[round(s, 5) for s in r['step_size']]}, "
                    f"{100 * r['max_tree_depth_frac']:.0f}% at max depth"
                )
            body.append(
                [
                    r["grid"],
                    r["system"],
                    "",
                    "",
                    "",
                    "",
                    "",
                    "",
                    r.get("divergences", ""),
                    "",
                    "",
                    "",
                    f"{note} {prog}",
                ]
            )
            continue
        body.append(
            [
                r["grid"],
                r["system"],
                f"{r['wall_s']:.2f}",
                f"{r['compile_s']:.1f}",
                f"{r['wall_compile_s']:.1f}",
                f"{r['ess_min']:.0f}",
                "—" if r["ess_per_s"] is None else f"{r['ess_per_s']:.1f}",
                f"{r['ess_per_s_compile']:.1f}",
                r["divergences"],
                f"{r['mean_tree_depth']:.2f}",
                f"{r['mean_leapfrog']:.1f}",
                ", ".join(f"{s:.3g}" for s in r["step_size"]),
                ratio,
            ]
        )
    md = [
        _table(
            [
                "grid",
                "system",
                "wall s (no compile)",
                "compile s",
                "wall s (total)",
                "min ESS",
                "ESS/s",
                "ESS/s w/ compile",
                "div",
                "tree depth",
                "leapfrog",
                "step size",
                "kronjax ESS/s ÷ PyMC",
            ],
            body,
        )
    ]
    if sec.get("grad_rows"):
        md += [
            "",
            "Why PyMC collapses — gradients at the data-generating point and two random "
            "points vs the dense SciPy reference (max relative error over the 3 points):",
            "",
            _table(
                ["grid", "system", "err logp", "err grad", "factor eigenvalues < 1e-12·max"],
                [
                    [r["grid"], r["system"], _e(r["err_lp"]), _e(r["err_grad"]), r["tiny_eigvals"]]
                    for r in sec["grad_rows"]
                ],
            ),
        ]
    return "\n".join(md)


def _memory(sec):
    return _table(
        [
            "grid",
            "system",
            "baseline MiB",
            "peak above MiB",
            "× N·8 B",
            "target MiB",
            "compile peak MiB",
            "note",
        ],
        [
            [
                r["grid"],
                r["system"],
                f"{r.get('baseline_mb', float('nan')):.0f}",
                f"{r.get('peak_above_mb', float('nan')):.0f}",
                f"{r.get('n_times_8N', float('nan')):.1f}",
                f"{r.get('target_mb', float('nan')):.0f}",
                "—" if r.get("compile_peak_mb") is None else f"{r['compile_peak_mb']:.0f}",
                r.get("error", "")[-200:].replace("\n", " "),
            ]
            for r in sec["rows"]
        ],
    )


def _gpu(sec):
    rows = [r for r in sec["rows"] if r.get("median_s")]
    lp = _by([r for r in rows if r["workload"] == "logp"], "grid", "system")
    sm = _by([r for r in rows if r["workload"] == "sample"], "grid", "system")
    body = []
    for (g, s), r in lp.items():
        kname = "kronjax" if r["dtype"] == "float64" else "kronjax-f32"
        k, ks = lp.get((g, kname)), sm.get((g, kname))
        d = sm.get((g, s), {})
        ratio = "" if s.startswith("kronjax") or not k else f"{r['median_s'] / k['median_s']:.2f}×"
        sratio = (
            ""
            if s.startswith("kronjax") or not ks or not d
            else f"{ks['draws_per_s'] / d['draws_per_s']:.2f}×"
        )
        body.append(
            [
                g,
                s,
                r["dtype"],
                _t(r["median_s"]),
                ratio,
                _e(r["err_lp"]),
                _e(r["err_grad"]),
                f"{d.get('draws_per_s', float('nan')):.3g}",
                sratio,
                "—" if d.get("chi2_z") is None else f"{d['chi2_z']:+.2f}",
            ]
        )
    notes = [r.get("note", "") for r in sec["rows"] if r.get("note")]
    return "\n".join(
        [
            f"Device: {sec['meta']}. Same code (`python -m bench.gpu`), one run; errors vs "
            "kronjax float64 on the GPU.",
            "",
            _table(
                [
                    "grid",
                    "system",
                    "dtype",
                    "logp+grad",
                    "× kronjax (same dtype)",
                    "err logp",
                    "err grad",
                    "draws/s",
                    "kronjax speed-up",
                    "chi2 z",
                ],
                body,
            ),
        ]
        + notes
    )


RENDER = {
    "logp": _logp,
    "sample": _sample,
    "predict": _predict,
    "vmap": _vmap,
    "nuts": _nuts,
    "memory": _memory,
    "gpu": _gpu,
}


# --- targets -------------------------------------------------------------------------------


def targets(sections):
    """Each target of issue 4 with the measured ratios: (target, verdict, evidence)."""
    out = []
    sec = sections.get("logp")
    if sec:
        rows = sec["rows"]
        ks = [r for r in rows if r["system"] == "kronjax" and r.get("median_s")]
        for label, names, bound, small in (
            ("logp+grad ≤ 0.8× GPyTorch, every size", FAST_PEERS, 0.8, False),
            ("logp+grad ≤ 0.25× GPyTorch at N ≤ 32³", FAST_PEERS, 0.25, True),
            ("logp+grad ≤ 0.2× PyMC, every size", PYMC, 0.2, False),
            ("logp+grad ≤ 1.5× floor at ≥ 64³ and 1024²", ("floor",), 1.5, None),
        ):
            ev, ok_min, misses = [], True, []
            for k in ks:
                if small and k["N"] > 32**3:
                    continue
                if small is None and not ((k["d"] == 3 and k["N"] >= 64**3) or k["N"] >= 1024**2):
                    continue
                p = _best(rows, k["grid"], names)
                if p is None:
                    continue
                ratio = k["median_s"] / p["median_s"]
                rmin = k.get("min_s", k["median_s"]) / p.get("min_s", p["median_s"])
                ok_min &= rmin <= bound
                ev.append(f"{k['grid']} {ratio:.2f} ({rmin:.2f})")
                floor = _best(rows, k["grid"], ("floor",))
                if ratio > bound:  # where missed: could the floor itself have met it?
                    f = floor["median_s"] / p["median_s"] if floor and p is not floor else None
                    misses.append(f)
                    if f is not None and names != ("floor",):
                        ev[-1] += f" [floor/peer {f:.2f}]"
            if not ev:
                verdict = "—"
            elif misses and all(f is not None and f > bound for f in misses):
                verdict = "MISSED only where the floor misses too (out of reach)"
            elif misses:
                verdict = "MISSED"
            else:
                verdict = "met" if ok_min else "met on medians; MISSED on min times"
            out.append((label, verdict, "kronjax/peer, medians (min times): " + ", ".join(ev)))
    sec = sections.get("sample")
    if sec:
        ev, ok = [], True
        for k in sec["rows"]:
            if k["system"] != "kronjax" or k["N"] < 4096 or not k.get("draws_per_s"):
                continue
            p = _best(sec["rows"], k["grid"], PYMC)
            if p:
                ratio = k["draws_per_s"] / p["draws_per_s"]
                ok &= ratio >= 100
                ev.append(f"{k['grid']} {ratio:.3g}×")
        out.append(
            (
                "sampling ≥ 100× PyMC draws/s at N ≥ 4096",
                "—" if not ev else ("met" if ok else "MISSED"),
                ", ".join(ev),
            )
        )
    sec = sections.get("vmap")
    if sec:
        idx = _by(sec["rows"], "B", "system")
        if (1024, "kronjax-vmap") in idx:
            ratio = (
                idx[(1024, "kronjax-loop")]["median_s"] / idx[(1024, "kronjax-vmap")]["median_s"]
            )
            ev = f"loop/vmap = {ratio:.1f}×"
            bound = idx.get((1024, "eigh-bound"))
            if bound:
                ev += (
                    f"; the factors' eigh alone bounds it: loop/eigh = "
                    f"{idx[(1024, 'kronjax-loop')]['median_s'] / bound['median_s']:.1f}×"
                )
            verdict = "met" if ratio >= 10 else "MISSED"
            out.append(("vmap of 1024 settings ≥ 10× the Python loop", verdict, ev))
    sec = sections.get("nuts")
    if sec:
        ev, ok, ok_c = [], True, True
        idx = _by(sec["rows"], "grid", "system")
        for (g, s), r in idx.items():
            if s != "numpyro-kronjax" or not r.get("ess_per_s"):
                continue
            pm = idx.get((g, "pymc"), {})
            if pm.get("ess_per_s"):
                a = r["ess_per_s"] / pm["ess_per_s"]
                b = r["ess_per_s_compile"] / pm["ess_per_s_compile"]
                ok &= a >= 5
                ok_c &= b >= 5
                ev.append(f"{g} {a:.1f}× ({b:.1f}× counting compile)")
            elif pm:
                ev.append(f"{g} PyMC did not finish")
        verdict = (
            "—"
            if not ev
            else (
                "MISSED"
                if not ok
                else "met"
                if ok_c
                else "met without compile; MISSED counting compile"
            )
        )
        for (g, s), r in idx.items():  # NumPyro's own NUTS cost bounds the ratio with compile
            pm = idx.get((g, "pymc"), {})
            if s == "numpyro-normal" and r.get("wall_compile_s") and pm.get("wall_compile_s"):
                ev.append(
                    f"{g}: NumPyro alone (i.i.d. Normal likelihood, no kronjax) takes "
                    f"{r['wall_compile_s']:.2f} s with compile, PyMC's total / 5 = "
                    f"{pm['wall_compile_s'] / 5:.2f} s"
                )
        out.append(("NUTS ESS/s ≥ 5× PyMC", verdict, ", ".join(ev)))
    sec = sections.get("memory")
    if sec:
        for r in sec["rows"]:
            if r["system"] == "kronjax" and "peak_above_mb" in r:
                out.append(
                    (
                        f"peak RSS at {r['grid']} ≤ 12 × N × 8 B",
                        "met" if r["n_times_8N"] <= 12 else "MISSED",
                        f"{r['peak_above_mb']:.0f} MiB = {r['n_times_8N']:.1f} × N × 8 B",
                    )
                )
    return out


# --- output ----------------------------------------------------------------------------------


def markdown(meta, sections):
    """The whole RESULTS.md text."""
    md = [
        "# kronjax benchmark results",
        "",
        f"- date: {meta['date']}",
        f"- command: `{meta['command']}` (mode `{meta['mode']}`)",
        f"- machine: {meta['machine']}",
        f"- load average at start / end: {meta['load_start']} / "
        f"{meta.get('load_end', '?')} (a shared machine: other jobs may add noise)",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()),
        f"- threads: {meta['threads']}",
        "- dtype float64 unless a system says f32; "
        "RBF factors exp(-(x-x')²/(2ℓ²)) on linspace(0, 1, n) axes, ℓ = (0.2, 0.3, 0.25), "
        "σ = 0.1, y drawn from the model; times are medians over ≥ 5 calls after a warm-up.",
        f"- GPU: {meta.get('gpu', 'none on this machine')}",
        "",
    ]
    tg = targets(sections)
    if tg:
        md += ["## Targets of issue 4", "", _table(["target", "verdict", "measured"], tg), ""]
    for key in ("logp", "sample", "predict", "vmap", "nuts", "memory", "gpu"):
        sec = sections.get(key)
        if not sec:
            continue
        md += [f"## {sec['title']}", "", RENDER[key](sec), ""]
        md += [f"- {n}" for n in sec.get("notes", [])] + [""]
        if key in ("logp", "sample"):
            md += [f"![{key} {d}-D]({key}_{d}d.png)" for d in (2, 3)] + [""]
    return "\n".join(md)


def plots(sections, outdir):
    """Log-log time vs N per system, the floor dashed; one PNG per workload and dimension."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    for key, ylab in (("logp", "logp + grad time per call [s]"), ("sample", "time per draw [s]")):
        sec = sections.get(key)
        if not sec:
            continue
        for d in (2, 3):
            rows = [r for r in sec["rows"] if r["d"] == d and r.get("median_s")]
            if not rows:
                continue
            fig, ax = plt.subplots(figsize=(7, 4.5))
            for s in dict.fromkeys(r["system"] for r in rows):
                rs = sorted((r for r in rows if r["system"] == s), key=lambda r: r["N"])
                y = [r["median_s"] / r.get("draws", 1) for r in rs]
                style = (
                    dict(ls="--", color="k", lw=2)
                    if s in ("floor", "numpy-eig")
                    and (key == "logp" and s == "floor" or key == "sample" and s == "numpy-eig")
                    else {}
                )
                lw = dict(lw=2.5) if s == "kronjax" else {}
                ax.loglog([r["N"] for r in rs], y, marker="o", label=s, **style, **lw)
            ax.set_xlabel("N (grid points)")
            ax.set_ylabel(ylab)
            ax.set_title(f"{sec['title']} — {d}-D grids")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7, ncol=2)
            fig.tight_layout()
            path = f"{outdir}/{key}_{d}d.png"
            fig.savefig(path, dpi=110)
            plt.close(fig)
            made.append(path)
    return made


def write(meta, sections, outdir):
    """Write RESULTS.md, results_<mode>.json and the plots; return the Markdown."""
    gpu = f"{outdir}/results_gpu.json"
    if os.path.exists(gpu) and "gpu" not in sections:
        with open(gpu) as f:
            g = json.load(f)
        sections = dict(
            sections,
            gpu=dict(
                key="gpu",
                title="7. GPU: logp+grad and sampling, float64 and float32",
                rows=g["rows"],
                meta=g["meta"],
            ),
        )
        meta = dict(meta, gpu=f"{g['meta']['torch_device']} (lent for one run): section 7")
    md = markdown(meta, sections)
    with open(f"{outdir}/RESULTS.md", "w") as f:
        f.write(md)
    with open(f"{outdir}/results_{meta['mode']}.json", "w") as f:
        json.dump({"meta": meta, "sections": sections}, f, indent=1, default=str)
    plots(sections, outdir)
    return md
