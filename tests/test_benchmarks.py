"""Smoke tests of the benchmarks and the small-scale reproductions: they run end to end on tiny settings and write
their tables / figure. No timing is asserted (machines differ); only what is deterministic is."""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))


def _load(relpath: str, name: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, relpath))
    mod = importlib.util.module_from_spec(spec)
    sys.path.insert(0, os.path.dirname(os.path.join(ROOT, relpath)))
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(autouse=True)
def _threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_step_cost_tiny(tmp_path):
    step_cost = _load("benchmarks/step_cost.py", "bench_step_cost")
    out = tmp_path / "step_cost.md"
    result = step_cost.main(["--tiny", "--out", str(out)])
    text = out.read_text()
    for label, _ in step_cost.CASES:
        assert f"| {label} |" in text
    summary = result["time"]["tiny"]["summary"]
    assert summary["Trainer (plain)"]["ratio"] == pytest.approx(1.0)
    assert all(v["median_ms"] > 0 for v in summary.values())
    # the cost is exactly the passes: matmul FLOPs are whole multiples of the plain step's
    flops = {k: v["flop_ratio"] for k, v in summary.items()}
    assert flops["none"] == 1.0 and flops["sam"] == 2.0 and flops["gam_fast"] == 4.0
    assert flops["gam_fast every 10"] == pytest.approx(1.3)  # (4 + 9 plain) / 10
    assert flops["gam_sam"] == pytest.approx(flops["gam"] + 1.0)  # one more plain pass than gam
    assert flops["gam"] == pytest.approx(2 * flops["gnp"])  # two grad+HVP points
    peaks = result["memory"]["tiny"]["peak"]
    # mode none is the stock Trainer step: the same allocations
    assert peaks["none"] == pytest.approx(peaks["Trainer (plain)"])
    # a multi-pass mode holds at least the weight backup beyond the plain step; exact HVPs hold more than SAM
    assert peaks["sam"] >= peaks["Trainer (plain)"] + 0.99
    assert peaks["gam"] >= peaks["sam"]
    for v in result["leak"].values():
        assert v["tensor_bytes_growth"] <= 0


def test_hvp_methods_agree():
    hvp = _load("benchmarks/hvp_methods.py", "bench_hvp_methods")
    rows = hvp.run(["tiny"], rounds=1, threads=1, warmup=0)
    rel = [r[6] for r in rows if r[6] is not None]
    assert rel and max(rel) < 1e-4
    flop_ratio = {r[2]: r[5] for r in rows}
    assert flop_ratio["fwd+bwd (plain)"] == 1.0 and flop_ratio["forward-over-reverse"] == pytest.approx(4.0)
    assert 2.0 < flop_ratio["double backward"] < 4.0  # g and Hv from one graph: cheaper than forward-over-reverse
    assert "forward-over-reverse" in hvp.table(rows)


def test_gpu_step_cost_without_cuda(capsys):
    gpu = _load("benchmarks/gpu_step_cost.py", "bench_gpu_step_cost")
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the real run is not a smoke test")
    assert gpu.main(["--out", ""]) is None
    assert "no CUDA device" in capsys.readouterr().out


@pytest.mark.slow
def test_gpu_step_cost_code_path_on_cpu(tmp_path):
    gpu = _load("benchmarks/gpu_step_cost.py", "bench_gpu_step_cost")
    rows = gpu.main(["--tiny", "--device", "cpu", "--models", "resnet18", "--dtypes", "bf16",
                     "--out", str(tmp_path / "gpu.md")])
    assert {r["mode"] for r in rows} == {label for label, _ in gpu.CASES}


def test_reproduce_label_noise_quick(tmp_path):
    ln = _load("examples/reproduce_label_noise.py", "reproduce_label_noise")
    out = tmp_path / "ln.md"
    best, final = ln.main(["--quick", "--out", str(out)])
    assert set(best) == {(n, m) for n in (0.0, 0.4) for m in ln.METHODS}
    assert all(0.0 <= v <= 1.0 for vals in best.values() for v in vals)
    text = out.read_text()
    assert "| 40% |" in text and "SAM+GAM" in text


def test_flip_labels_is_symmetric_noise():
    ln = _load("examples/reproduce_label_noise.py", "reproduce_label_noise")
    y = torch.arange(10).repeat(50)
    z = ln.flip_labels(y, 0.4, 10, seed=0)
    assert int((z != y).sum()) == 200  # exactly round(rate n) flipped, each to another class
    assert torch.equal(ln.flip_labels(y, 0.0, 10, seed=0), y)


def test_reproduce_flatness_quick(tmp_path):
    fl = _load("examples/reproduce_flatness.py", "reproduce_flatness")
    png, md = tmp_path / "f.png", tmp_path / "f.md"
    out = fl.main(["--quick", "--methods", "SGD,GAM", "--out", str(md), "--png", str(png)])
    assert png.stat().st_size > 10_000 and png.read_bytes()[:4] == b"\x89PNG"
    for m in ("SGD", "GAM"):
        eig = out[m]["end"][0]["eig"]
        assert len(eig) == 3 and eig == sorted(eig, reverse=True) and eig[0] > 0
        assert out[m]["end"][0]["trace"] > 0
    assert "| GAM |" in md.read_text()


@pytest.mark.slow
@pytest.mark.distributed
def test_fsdp_memory_quick(tmp_path):
    """benchmarks/fsdp_memory.py end to end (torchrun, 2 CPU processes; about a minute): per process FSDP2 holds half
    of DDP's parameters, gradients and optimizer state, and the buffers held across passes are the rule's (sam: the
    saved weights; gam_fast: the saved weights, h- and h+), counted in the process's own parameter size."""
    bench = _load("benchmarks/fsdp_memory.py", "bench_fsdp_memory")
    result = bench.main(["--quick", "--out", str(tmp_path / "fsdp_memory.md")])
    rows = {(r["wrapper"], r["mode"]): r for r in result["rows"] if r["rank"] == 0}
    ddp, fsdp = rows[("ddp", "gam_fast")], rows[("fsdp2", "gam_fast")]
    for key in ("params", "grads", "optimizer_state"):
        assert abs(fsdp[key] / ddp[key] - 0.5) < 0.02, key
    for wrapper in ("ddp", "fsdp2"):
        for mode, buffers in (("none", 0), ("sam", 1), ("gam_fast", 3)):
            r = rows[(wrapper, mode)]
            assert r["held_across_passes"] / r["params"] == pytest.approx(buffers, abs=0.05), (wrapper, mode)
    assert "| FSDP2 |" in (tmp_path / "fsdp_memory.md").read_text()
