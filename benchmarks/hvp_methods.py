"""Which exact Hessian-vector product is fastest for GAM's HVPs: double backward (reverse-over-reverse) or
forward-over-reverse (``torch.func.jvp`` of ``torch.func.grad``)?

GAM needs ``H(θ) v`` with ``v = g(θ)/‖g(θ)‖``, so ``v`` is only known after a gradient at the same point:

- **double backward** (what ``hf_gam`` does): one forward, a backward with ``create_graph=True`` that yields ``g``,
  then a second backward through that graph with ``v`` -> ``H v``. One graph serves both.
- **forward-over-reverse**: a plain forward+backward for ``g``, then ``jvp(grad(L), θ, v)`` -> ``(g, H v)`` (a
  forward+backward carrying tangents).

Prints median milliseconds (interleaved rounds) of each, over one plain forward+backward, the same ratio in
matmul/conv/attention FLOPs (``torch.utils.flop_counter``), and the relative difference of the two HVPs (they must
agree to round-off).

    python benchmarks/hvp_methods.py [--models cnn,vit] [--rounds 10] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, jvp
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import CPU_BENCHES, machine_line, num_params  # noqa: E402

from hf_gam.core import functional  # noqa: E402
from hf_gam.core.functional import second_order_context# noqa: E402


def make_methods(model, batch):
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = [p for p in model.parameters() if p.requires_grad]
    buffers = dict(model.named_buffers())
    x, y = batch["pixel_values"], batch["labels"]

    def loss_of(pdict):
        logits = functional_call(model, ({**pdict, **buffers},), (x,)).logits
        return F.cross_entropy(logits, y)

    def unit(v):
        return torch._foreach_div(v, functional.global_norm(v))

    def plain():
        loss = F.cross_entropy(model(x).logits, y)
        return list(torch.autograd.grad(loss, params))

    def double_backward():
        with second_order_context():
            loss = F.cross_entropy(model(x).logits, y)
            g = torch.autograd.grad(loss, params, create_graph=True)
            gd = [t.detach() for t in g]
            return gd, functional.hvp(g, params, unit(gd))

    def forward_over_reverse():
        g = plain()
        primals = {n: p.detach() for n, p in zip(names, params)}
        tangents = dict(zip(names, unit(g)))
        with second_order_context():
            g2, hv = jvp(grad(loss_of), (primals,), (tangents,))
        return [g2[n] for n in names], [hv[n] for n in names]

    return {"fwd+bwd (plain)": plain, "double backward": double_backward,
            "forward-over-reverse": forward_over_reverse}


def count_flops(fn) -> float:
    """Matmul/conv/attention FLOPs of one call (``torch.utils.flop_counter``, attention under the math kernel)."""
    counter = FlopCounterMode(display=False)
    with counter, second_order_context():
        fn()
    return counter.get_total_flops()


def run(models, rounds, threads, warmup=2):
    torch.set_num_threads(threads)
    rows = []
    for name in models:
        bench = CPU_BENCHES[name]
        model = bench.build()
        model.eval() if name == "vit" else model.train()
        for m in model.modules():  # BatchNorm: use batch statistics, keep running ones untouched
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.track_running_stats = False
                m.running_mean = m.running_var = None
        batch = bench.data()
        methods = make_methods(model, batch)
        flops = {k: count_flops(f) for k, f in methods.items()}
        _, hv_db = methods["double backward"]()
        _, hv_for = methods["forward-over-reverse"]()
        rel = float(functional.global_norm(torch._foreach_sub(hv_db, hv_for)) / functional.global_norm(hv_db))
        times = {k: [] for k in methods}
        labels = list(methods)
        for r in range(warmup + rounds):
            for k in labels[r % 3:] + labels[:r % 3]:
                t0 = time.perf_counter()
                methods[k]()
                if r >= warmup:
                    times[k].append(time.perf_counter() - t0)
        base = statistics.median(times["fwd+bwd (plain)"])
        for k in labels:
            med = statistics.median(times[k])
            rows.append((name, num_params(model), k, 1e3 * med, med / base, flops[k] / flops[labels[0]],
                         rel if k != labels[0] else None))
    return rows


def table(rows) -> str:
    out = ["| model | params | method | median ms | x fwd+bwd | FLOPs x fwd+bwd | rel. diff vs double backward |",
           "|---|---:|---|---:|---:|---:|---:|"]
    for name, n, k, ms, ratio, fr, rel in rows:
        out.append(f"| {name} | {n:,} | {k} | {ms:.1f} | {ratio:.2f} | {fr:.2f} | "
                   f"{'' if rel is None else f'{rel:.1e}'} |")
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="cnn,vit")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                  "hvp_methods_cpu.md"), help="markdown file ('' to skip)")
    a = ap.parse_args(argv)
    rows = run(a.models.split(","), a.rounds, a.threads)
    text = (f"# Exact HVP methods on CPU\n\n{machine_line()}; median wall time of {a.rounds} interleaved rounds; "
            "each HVP method also returns g (GAM needs both at the same point).\n\n" + table(rows) + "\n")
    print(text)
    if a.out:
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w") as f:
            f.write(text)
    return rows


if __name__ == "__main__":
    main()
