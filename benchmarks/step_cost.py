"""Cost of one optimizer step of every ``gam_mode`` over the plain ``transformers.Trainer`` step, on CPU.

Time: the same model (a copy per mode, same initial weights), the same batch, every mode stepped round-robin in
one process (the order rotates every round, so machine noise hits every mode alike), each mode's step right after a
plain Trainer step (the pair's ratio cancels the slow drift of a shared machine); a step is what the Trainer's
loop does: ``training_step`` + ``optimizer.step()`` (SGD, momentum 0.9) + ``zero_grad``. ``gam_fast every 10`` is
timed as blocks of 10 consecutive steps (one GAM step, nine plain), reported per step. Reported: the median time
over rounds and the median over rounds of the paired ratio; ``--clock cpu`` (default) measures the process's CPU
time, which other processes on a shared machine do not inflate; ``--clock wall`` measures elapsed time.

FLOPs: ``torch.utils.flop_counter`` over one step (ten for ``every 10``), the passes' matmul/conv/attention
arithmetic. The time ratio tracks the FLOP ratio; it can sit a little below it, as the optimizer step and the
Trainer's own per-step work are paid once in every mode.

Memory: the peak of the bytes a step allocates above what was live before it (parameters, optimizer state and
inputs excluded), from the allocator records of ``torch.profiler(profile_memory=True)``, in units of the model's
parameter size P. The ``mlp`` model (2.1M parameters, batch 8) has negligible activations, so its "beyond the
plain step" column counts parameter-sized buffers held beyond the gradient.

Leaks: ``--leak-steps`` steps of every mode on a tiny model; live tensor bytes (gc) and RSS after 10% of them and
at the end.

    python benchmarks/step_cost.py                      # the README table (a few minutes on 2 cores)
    python benchmarks/step_cost.py --tiny               # smoke run (seconds)
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (CASES, CPU_BENCHES, TARGETS, cpu_peak_step_bytes, git_commit, interleaved_times,  # noqa: E402
                     live_tensor_bytes, machine_line, make_trainer, make_trainers, num_params, optimizer_step,
                     param_bytes, rss_bytes, step_flops, summarize, tmp_output_dir, write_report)

from hf_gam.core.directions import MODES  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUT = os.path.join(HERE, "results", "step_cost_cpu.md")


def passes_of(label: str) -> str:
    if label.startswith("Trainer"):
        return "1"
    mode = label.split()[0]
    return str(MODES[mode].passes) + (" (1 step in 10)" if "every" in label else "")


def time_models(models, rounds, clock):
    clock_fn = time.process_time if clock == "cpu" else time.perf_counter
    out = {}
    for name in models:
        bench = CPU_BENCHES[name]
        model, batch = bench.build(), bench.data()
        trainers = make_trainers(model, CASES, tmp_output_dir(), use_cpu=True)
        times = interleaved_times(trainers, batch, rounds, block=lambda label: 10 if "every 10" in label else 1,
                                  clock=clock_fn)
        flops = {}
        for label, trainer in trainers.items():
            trainer.state.global_step = 0  # "every 10": a block of 10 steps holds exactly one GAM step
            flops[label] = step_flops(trainer, batch, torch.tensor(bench.batch), steps=10 if "every" in label else 1)
        summary = summarize(times)
        for label, f in flops.items():
            summary[label]["flop_ratio"] = f / flops["Trainer (plain)"]
        out[name] = {"params": num_params(model), "batch": bench.batch, "summary": summary,
                     "plain_gflop": flops["Trainer (plain)"] / 1e9}
    return out


def memory_models(models):
    out = {}
    for name in models:
        bench = CPU_BENCHES[name]
        model, batch = bench.build(), bench.data()
        P = param_bytes(model)
        n = torch.tensor(bench.batch)
        peaks = {}
        for label, overrides in CASES:
            trainer = make_trainer(copy.deepcopy(model), overrides, tmp_output_dir(), use_cpu=True)
            for _ in range(2):  # warm up: optimizer state exists, allocator caches settled
                trainer.state.global_step = 0
                optimizer_step(trainer, batch, n)
            trainer.state.global_step = 0  # an active step for "every 10"
            peaks[label] = cpu_peak_step_bytes(lambda: optimizer_step(trainer, batch, n)) / P
        base = peaks["Trainer (plain)"]
        out[name] = {"param_bytes": P, "peak": peaks, "beyond_plain": {k: v - base for k, v in peaks.items()}}
    return out


def leak_check(steps, bench_name="tiny"):
    bench = CPU_BENCHES[bench_name]
    model, batch = bench.build(), bench.data()
    n = torch.tensor(bench.batch)
    out = {}
    for label, overrides in CASES:
        trainer = make_trainer(copy.deepcopy(model), overrides, tmp_output_dir(), use_cpu=True)
        early = max(50, steps // 10) if steps >= 100 else max(1, steps // 10)
        for i in range(steps):
            optimizer_step(trainer, batch, n, log_every=50)
            if i + 1 == early:
                t_early, r_early = live_tensor_bytes(), rss_bytes()
        out[label] = {"tensor_bytes_growth": live_tensor_bytes() - t_early, "rss_growth": rss_bytes() - r_early,
                      "early_step": early, "steps": steps}
    return out


def _malloc_env() -> str:
    env = {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}
    return (" glibc malloc settings: " + ", ".join(f"`{k}={v}`" for k, v in sorted(env.items())) + ".") if env else ""


def _met(target: float, summaries: dict) -> str:
    """``yes``, or ``no (models)``, saying where the mode's FLOPs alone exceed the target (out of reach)."""
    missed = [k for k, s in summaries.items() if s["ratio"] > target]
    if not missed:
        return "yes"
    floor = [f"{k} {summaries[k]['flop_ratio']:.2f}x" for k in missed if summaries[k].get("flop_ratio", 0) > target]
    return f"no ({', '.join(missed)})" + (f"; FLOPs alone: {', '.join(floor)}" if floor else "")


def render(result) -> str:
    t, m, leak = result["time"], result["memory"], result["leak"]
    models = list(t)
    lines = [f"# Step cost on CPU ({result['clock']} time)", "",
             f"Machine: {result['machine']}; hf_gam commit {result['commit']}; {result['rounds']} interleaved rounds "
             "after 2 warm-up rounds; median per optimizer step; ratio: median over rounds of the step over the plain "
             "`transformers.Trainer` step run right before it (same model, batch, SGD momentum 0.9)." + _malloc_env(), "",
             "Models: " + "; ".join(f"`{k}` {v['params']:,} parameters, batch {v['batch']}" for k, v in t.items()),
             ""]
    head = ("| mode | passes | " + " | ".join(f"{k} ms | {k} ratio | {k} FLOP ratio" for k in models)
            + " | target | met |")
    lines += [head, "|" + "---|" * (2 + 3 * len(models) + 2)]
    for label, _ in CASES:
        cells = []
        for k in models:
            s = t[k]["summary"][label]
            cells += [f"{s['median_ms']:.1f}", f"{s['ratio']:.3f}x", f"{s.get('flop_ratio', float('nan')):.3f}x"]
        target = TARGETS.get(label)
        met = "" if target is None else _met(target, {k: t[k]["summary"][label] for k in models})
        lines.append(f"| {label} | {passes_of(label)} | " + " | ".join(cells)
                     + f" | {'' if target is None else f'<= {target}x'} | {met} |")
    lines += ["", "`FLOP ratio`: matmul, convolution and attention FLOPs of the step over the plain step's "
              "(`torch.utils.flop_counter`; " + ", ".join(f"plain {k} step {t[k]['plain_gflop']:.2f} GFLOP"
                                                        for k in models)
              + "): the arithmetic the mode's passes cannot avoid. Exact `gam` needs two exact grad+HVP points, each "
              "at least 3 forward+backward passes of products (double backward, one graph for g and Hv: 3.0-3.2x; "
              "forward-over-reverse: 4x, as v = g/‖g‖ needs g first; `benchmarks/hvp_methods.py`), so its FLOPs "
              "alone are "
              + ", ".join(f"{t[k]['summary']['gam']['flop_ratio']:.2f}x ({k})" for k in models)
              + " the plain step's: no exact implementation steps faster than that on a compute-bound machine."]
    if m:
        mm = list(m)
        lines += ["", "## Peak memory of a step, in units of the parameter size P", "",
                  "Peak bytes allocated during one optimizer step above what was live before it (gradient, "
                  "activations, backups, temporaries), over P. `beyond plain`: minus the plain Trainer step's peak "
                  "(whose peak is the gradient plus activations).", "",
                  "| mode | " + " | ".join(f"{k} peak/P | {k} beyond plain" for k in mm) + " |",
                  "|---|" + "---:|" * (2 * len(mm))]
        for label, _ in CASES:
            lines.append(f"| {label} | " + " | ".join(f"{m[k]['peak'][label]:.2f} | {m[k]['beyond_plain'][label]:+.2f}"
                                                       for k in mm) + " |")
    if leak:
        any_label = next(iter(leak.values()))
        lines += ["", f"## Memory growth over {any_label['steps']} steps (tiny model)", "",
                  f"Growth between step {any_label['early_step']} and step {any_label['steps']}.", "",
                  "| mode | live tensor bytes | RSS (KiB) |", "|---|---:|---:|"]
        for label, v in leak.items():
            lines.append(f"| {label} | {v['tensor_bytes_growth']:+,} | {v['rss_growth'] / 1024:+,.0f} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="cnn,vit", help="models to time (cnn, vit, mlp, tiny)")
    ap.add_argument("--memory-models", default="cnn,vit,mlp", help="models whose step memory is measured")
    ap.add_argument("--rounds", type=int, default=25)
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads for the whole run")
    ap.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
    ap.add_argument("--leak-steps", type=int, default=1000)
    ap.add_argument("--tiny", action="store_true", help="smoke run: tiny model, 2 rounds, 100 leak steps")
    ap.add_argument("--out", default=DEFAULT_OUT, help="markdown file to write ('' to skip)")
    ap.add_argument("--json", default="", help="also write the raw numbers as JSON here")
    a = ap.parse_args(argv)
    if a.tiny:
        a.models, a.memory_models, a.rounds, a.leak_steps = "tiny", "tiny", 2, 100
    torch.set_num_threads(a.threads)
    result = {"machine": machine_line(), "commit": git_commit(), "clock": a.clock, "rounds": a.rounds}
    result["time"] = time_models([x for x in a.models.split(",") if x], a.rounds, a.clock)
    result["memory"] = memory_models([x for x in a.memory_models.split(",") if x])
    result["leak"] = leak_check(a.leak_steps) if a.leak_steps > 0 else {}
    text = render(result)
    write_report(text, a.out, a.json, result)
    return result


if __name__ == "__main__":
    main()
