"""Paper Figure 3 (top Hessian eigenvalues and Hessian trace of SGD, SAM, GAM, SAM+GAM) at CPU scale.

The digits MLP of ``reproduce_label_noise.py`` (clean labels) trained with each method for ``--epochs`` epochs and
3 seeds; at half of training and at the end, on the whole training set (eval mode, mean cross-entropy):

- the top ``--k`` Hessian eigenvalues (Lanczos, :func:`hf_gam.flatness.hessian_eigenvalues`),
- the Hessian trace (Hutchinson, Rademacher probes, :func:`hf_gam.flatness.hessian_trace`),

plus the final test accuracy. Writes a markdown table (mean ± std over seeds) and a PNG: per checkpoint, the
distribution of the top eigenvalues of every method (all seeds pooled) and the trace.

    python examples/reproduce_flatness.py             # the README figure (a few minutes on 2 cores)
    python examples/reproduce_flatness.py --quick     # smoke run (seconds)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from reproduce_label_noise import METHODS, RESULTS, digits_tensors, fmt, train_digits  # noqa: E402

from hf_gam.flatness import hessian_eigenvalues, hessian_trace  # noqa: E402 (exact HVPs, the model left as it was)


def measure(model, batches, k, lanczos_iter, trace_samples):
    eig = hessian_eigenvalues(model, batches, k=k, method="lanczos", max_iter=lanczos_iter, seed=0)
    trace = hessian_trace(model, batches, num_samples=trace_samples, seed=0)
    return {"eig": list(eig), "trace": float(trace)}


def run(methods, seeds, epochs, k, lanczos_iter, trace_samples, log=print):
    data = digits_tensors()
    x_tr, y_tr = data[0], data[1]
    batches = [{"pixel_values": x_tr[i:i + 512], "labels": y_tr[i:i + 512]} for i in range(0, len(y_tr), 512)]
    mid = max(1, epochs // 2)
    out = {m: {"mid": [], "end": [], "acc": []} for m in methods}
    for m in methods:
        for seed in seeds:
            t0 = time.perf_counter()

            def on_epoch(model, epoch, m=m):
                if epoch == mid and epoch != epochs:
                    out[m]["mid"].append(measure(model, batches, k, lanczos_iter, trace_samples))

            model, hist = train_digits(m, seed, epochs=epochs, data=data, on_epoch=on_epoch)
            out[m]["end"].append(measure(model, batches, k, lanczos_iter, trace_samples))
            out[m]["acc"].append(hist[-1])
            if not out[m]["mid"] or len(out[m]["mid"]) < len(out[m]["end"]):
                out[m]["mid"].append(out[m]["end"][-1])  # epochs == 1: mid is the end
            e = out[m]["end"][-1]
            log(f"{m:8s} seed {seed}: λmax {e['eig'][0]:.3f} trace {e['trace']:.2f} test acc {hist[-1]:.4f} "
                f"({time.perf_counter() - t0:.1f} s)")
    return out, mid


def render(out, methods, seeds, epochs, mid, k, command) -> str:
    lines = ["# Hessian spectrum on sklearn digits (shape of paper Figure 3)", "",
             f"`{command}` - {time.strftime('%Y-%m-%d')}; digits MLP (64-256-256-10), clean labels, {epochs} "
             f"epochs, seeds {list(seeds)}; Hessian of the mean training cross-entropy (whole training set, eval "
             f"mode): top-{k} eigenvalues by Lanczos, trace by Hutchinson. Mean ± std over seeds.", "",
             f"| method | λ1 (epoch {mid}) | λ1 (epoch {epochs}) | mean of top-{k} (epoch {epochs}) | trace (epoch "
             f"{mid}) | trace (epoch {epochs}) | test acc % (epoch {epochs}) |",
             "|---|---:|---:|---:|---:|---:|---:|"]

    def ms(vals, scale=1.0):
        a = scale * np.asarray(vals, dtype=float)
        return f"{a.mean():.3f} ± {a.std(ddof=1) if len(a) > 1 else 0.0:.3f}"

    for m in methods:
        r = out[m]
        lines.append(f"| {m} | {ms([x['eig'][0] for x in r['mid']])} | {ms([x['eig'][0] for x in r['end']])} | "
                     f"{ms([np.mean(x['eig']) for x in r['end']])} | {ms([x['trace'] for x in r['mid']])} | "
                     f"{ms([x['trace'] for x in r['end']])} | {fmt(r['acc'])} |")
    return "\n".join(lines) + "\n"


def plot(out, methods, epochs, mid, k, path) -> str:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    colors = ["tab:blue", "tab:orange", "tab:red", "tab:green", "tab:purple"]
    fig = Figure(figsize=(11, 6.5))
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 2, gridspec_kw={"width_ratios": [2.2, 1]})
    rng = np.random.default_rng(0)
    for row, (when, epoch) in enumerate((("mid", mid), ("end", epochs))):
        ax = axes[row, 0]
        for i, m in enumerate(methods):  # every top-k eigenvalue of every seed, jittered; λ1 of each seed as a bar
            vals = np.asarray([v for x in out[m][when] for v in x["eig"]])
            ax.scatter(i + rng.uniform(-0.18, 0.18, len(vals)), vals, s=14, alpha=0.6, color=colors[i % len(colors)])
            for x in out[m][when]:
                ax.hlines(x["eig"][0], i - 0.3, i + 0.3, color="black", linewidth=1.5)
        ax.set_xticks(range(len(methods)), [f"{m}\nλ1 {np.mean([x['eig'][0] for x in out[m][when]]):.2f}"
                                            for m in methods])
        ax.set_title(f"top-{k} Hessian eigenvalues, epoch {epoch} (dots: all seeds; bars: λ1 per seed)")
        ax.set_ylabel("eigenvalue")
        ax.set_ylim(bottom=0)
        ax = axes[row, 1]
        means = [np.mean([x["trace"] for x in out[m][when]]) for m in methods]
        stds = [np.std([x["trace"] for x in out[m][when]], ddof=1) if len(out[m][when]) > 1 else 0.0
                for m in methods]
        ax.bar(range(len(methods)), means, yerr=stds, capsize=4,
               color=[colors[i % len(colors)] for i in range(len(methods))])
        ax.set_xticks(range(len(methods)), methods)
        ax.set_title(f"Hessian trace, epoch {epoch} (mean ± std)")
    fig.suptitle("digits MLP: Hessian spectrum of SGD, SAM, GAM and SAM+GAM (cf. paper Fig. 3)")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--k", type=int, default=10, help="top eigenvalues per model")
    ap.add_argument("--lanczos-iter", type=int, default=40)
    ap.add_argument("--trace-samples", type=int, default=30)
    ap.add_argument("--quick", action="store_true", help="smoke run: 1 seed, 2 epochs, k 3")
    ap.add_argument("--json", default=os.path.join(RESULTS, "flatness_digits.json"),
                    help="raw results written here ('' to skip)")
    ap.add_argument("--replot", default="", help="redraw table and figure from a --json file without training")
    ap.add_argument("--out", default=os.path.join(RESULTS, "flatness_digits.md"), help="markdown ('' to skip)")
    ap.add_argument("--png", default=os.path.join(RESULTS, "flatness_digits.png"), help="figure ('' to skip)")
    a = ap.parse_args(argv)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    seeds, epochs, k, iters, samples = list(range(a.seeds)), a.epochs, a.k, a.lanczos_iter, a.trace_samples
    if a.quick:
        seeds, epochs, k, iters, samples = [0], 2, 3, 10, 4
    methods = [m for m in a.methods.split(",") if m]
    command = "python examples/reproduce_flatness.py " + " ".join(sys.argv[1:] if argv is None else argv)
    if a.replot:
        with open(a.replot) as f:
            saved = json.load(f)
        out, mid, methods, seeds, epochs, k, command = (saved[key] for key in
                                                         ("out", "mid", "methods", "seeds", "epochs", "k", "command"))
    else:
        out, mid = run(methods, seeds, epochs, k, iters, samples)
        if a.json and not a.quick:
            with open(a.json, "w") as f:
                json.dump({"out": out, "mid": mid, "methods": methods, "seeds": seeds, "epochs": epochs, "k": k,
                           "command": command.strip()}, f)
    text = render(out, methods, seeds, epochs, mid, k, command.strip())
    print(text)
    if a.out:
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w") as f:
            f.write(text)
    if a.png:
        plot(out, methods, epochs, mid, k, a.png)
        print(f"figure: {a.png}")
    return out


if __name__ == "__main__":
    main()
