"""kronjax benchmark suite (issue 4): kronjax against every peer, on this machine.

Run ``python -m bench --quick`` or ``python -m bench --full`` from the repository root;
results go to ``bench/RESULTS.md``, ``bench/results_<mode>.json`` and ``bench/*.png``.
"""
