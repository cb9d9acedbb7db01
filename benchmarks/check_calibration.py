"""How often the expected-gradient check fails a RIGHT estimator, and how large a bias it sees.

``ppl-vi check`` averages an estimator's gradient over N seeds and holds the mean against a
reference (``ppl_vi/check/gradients.py``: element-wise z, the error along the reference direction,
a minimum cosine; family-wise α = 10⁻³). Whether the family-wise α holds is a claim about the
decision rule at the seed counts users run (10 in the test suite's CLI rows, 50 by default), with
heavy-tailed estimators and standard errors read off a few draws. This script measures it:

1. run the check of a registered model as ``ppl-vi check MODEL`` runs it (small networks:
   ``--hidden``, ``--z-dim``), and keep each expected-gradient row whose estimator is *sampled*
   (a pathwise or score-function gradient averaged over seeds; exact rows have no false alarms);
2. for each, draw a pool of ``--pool`` independent gradient draws of the estimator (seeds disjoint
   from the check's) and compute the check's reference once, as the check does;
3. resample ``--resamples`` sets of N draws from the pool (without replacement), form the mean,
   standard errors, kurtosis and projections exactly as the check does (``Moments``), and apply
   the decision rule (``expected_gradient_rows``). The fraction of FAILs is the false-alarm rate;
   with every draw scaled by (1 + b) (``--bias``: a gradient b too long, as a mis-weighted term
   makes it) it is the power at b.

Rates are given with a 95 % upper bound (Clopper–Pearson-style, from the binomial: for 0 failures
in R resamples, 3/R). The pool's own mean stands in for the truth only through resampling: with
N ≪ pool the resamples are nearly independent; at N = pool / 4 they overlap (said in the table).

    python benchmarks/check_calibration.py                      # m1m2, N = 10 and 50 (~10 min CPU)
    python benchmarks/check_calibration.py --model vae --bias 0,0.05,0.2
    python benchmarks/check_calibration.py --quick              # seconds (a test runs this)
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from ppl_vi.check import core, gradients  # noqa: E402
from ppl_vi.cli import main as cli_main  # noqa: E402
from ppl_vi.models import REGISTRY  # noqa: E402


def captured_rows(model: str, hidden: int, z_dim: int, k: int, seed: int) -> list:
    """The expected-gradient checks ``ppl-vi check MODEL`` runs: (name, call arguments, its rows)."""
    saved = {name: dict(spec.defaults) for name, spec in REGISTRY.items()}
    for spec in REGISTRY.values():
        spec.defaults.update(hidden=[hidden], z_dim=z_dim, components=3)
    calls, original = [], core.expected_gradient_check

    def recording(name, loss_fn, m, g, batch, params, names, **kw):
        rows = original(name, loss_fn, m, g, batch, params, names, **kw)
        calls.append((name, loss_fn, m, g, batch, params, names, kw, rows))
        return rows
    core.expected_gradient_check = recording
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            cli_main(["check", model, "--batch-size", "4", "--repeats", "2", "--gradient-seeds", "10",
                      "--k", str(k), "--seed", str(seed)])
    finally:
        core.expected_gradient_check = original
        for name, defaults in saved.items():  # the registry is the process's: leave it as found
            REGISTRY[name].defaults.clear()
            REGISTRY[name].defaults.update(defaults)
    return calls


def sampled(rows) -> bool:
    """Is the row's estimate an average over seeds (not exact, not enumerated)?"""
    note = rows[0].note
    return "exact" not in rows[0].name and "enumerated" not in note.replace("not enumerated", "")


def failures(rows) -> set:
    """Which of the three tests failed anywhere in a check's rows."""
    out = set()
    for r in rows[1:]:
        d = r.details
        if d.get("worst_z", 0) > d.get("z_limit", math.inf):
            out.add("element-wise")
        if d.get("cosine_min") is not None and d["cosine"] < d["cosine_min"] - 1e-12:
            out.add("cosine")
        if "along_t" in d and abs(d["along_t"]) > d["along_limit"]:
            out.add("along r")
    if "the whole gradient along r" in rows[0].details.get("failed", []):
        out.add("along r")
    return out


def upper95(failed: int, total: int) -> float:
    """One-sided 95 % upper bound on a binomial rate (exact for 0 failures: 1 - 0.05^(1/n))."""
    if failed == 0:
        return 1 - 0.05 ** (1 / total)
    p = failed / total
    return min(1.0, p + 1.645 * math.sqrt(p * (1 - p) / total) + 1 / total)


def calibrate(call, pool: int, seed_counts, resamples: int, biases, seed: int) -> list:
    name, loss_fn, m, g, batch, params, names, kw, _ = call
    reference = core.reference_stats(m, g, batch, params, target=kw["target"], k=kw["k"],
                                     max_plate_nesting=kw.get("max_plate_nesting", 1), seed=kw.get("seed", 0),
                                     draws=10 * max(seed_counts), data_plate=kw.get("data_plate"))
    start = time.process_time()
    draws = [gradients._draw_gradient(lambda: loss_fn(batch), params, 10_000_019 + i) for i in range(pool)]
    draw_s = (time.process_time() - start) / pool
    rng = torch.Generator().manual_seed(seed)
    out = []
    for n in seed_counts:
        for b in biases:
            failed, which = 0, {}
            for _ in range(resamples):
                moments = gradients.Moments(reference.directions)
                for i in torch.randperm(pool, generator=rng)[:n].tolist():
                    moments.add([d * (1 + b) for d in draws[i]])
                rows = gradients.expected_gradient_rows(name, moments.stats("resampled", n), reference, names)
                if not rows[0].passed:
                    failed += 1
                    for t in failures(rows):
                        which[t] = which.get(t, 0) + 1
            out.append({"row": name, "seeds": n, "bias": b, "resamples": resamples, "failed": failed,
                        "rate": failed / resamples, "upper95": upper95(failed, resamples), "tests": which,
                        "pool": pool, "seconds_per_draw": draw_s})
            print(f"  N={n:4d} bias={b:+.2f}: {failed}/{resamples} FAIL ({failed / resamples:.2%}, 95% upper "
                  f"{upper95(failed, resamples):.2%}) {which}", flush=True)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="m1m2", choices=sorted(REGISTRY))
    p.add_argument("--hidden", type=int, default=8)
    p.add_argument("--z-dim", type=int, default=2)
    p.add_argument("--k", type=int, default=3)
    p.add_argument("--seeds", default="10,50", help="seed counts N, comma-separated")
    p.add_argument("--pool", type=int, default=400, help="gradient draws per row")
    p.add_argument("--resamples", type=int, default=2000)
    p.add_argument("--bias", default="0,0.1", help="relative scale biases b (0: false alarms)")
    p.add_argument("--rows", type=int, default=2, help="at most this many sampled rows")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--quick", action="store_true", help="tiny: a smoke run in seconds")
    a = p.parse_args(argv)
    if a.quick:
        a.model, a.seeds, a.pool, a.resamples, a.bias, a.rows = "linear-gaussian", "5", 20, 20, "0,0.5", 1
    seed_counts = [int(s) for s in a.seeds.split(",")]
    biases = [float(b) for b in a.bias.split(",")]
    if a.pool < 2 * max(seed_counts):
        p.error(f"--pool {a.pool} must be at least twice the largest seed count ({max(seed_counts)})")
    torch.set_num_threads(1)
    calls = [c for c in captured_rows(a.model, a.hidden, a.z_dim, a.k, a.seed) if sampled(c[-1])][:a.rows]
    if not calls:
        print(f"{a.model}: no sampled expected-gradient rows (every row exact or enumerated)")
        return 1
    results = []
    for call in calls:
        print(f"{a.model}: {call[0]}", flush=True)
        results += [dict(r, model=a.model) for r in calibrate(call, a.pool, seed_counts, a.resamples, biases, a.seed)]
    if a.json:
        Path(a.json).write_text(json.dumps({"args": vars(a), "alpha": gradients.FAMILY_ALPHA, "results": results},
                                           indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
