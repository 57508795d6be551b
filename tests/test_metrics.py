"""Metrics through `evaluate`: the modules shipped in hf_gam/metrics load offline by path (also in a clean
subprocess), agree with an independent numpy computation, and `hf-gam train --metrics` reports them (plus a local
module script) in eval_results.json / all_results.json; an unloadable metric is a one-line error, exit 2, before
anything is written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from hf_gam.cli import main
from hf_gam.metrics import compute_metrics_fn, load_metrics, metric_path, parse_spec

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_EVALUATE_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.mark.slow  # ~30 s: a fresh interpreter imports evaluate/datasets
def test_shipped_modules_load_offline_in_a_clean_process(tmp_path):
    code = textwrap.dedent(f"""
        import evaluate
        top_k = evaluate.load({metric_path("top_k_accuracy")!r})
        acc = evaluate.load({metric_path("accuracy")!r})
        print(top_k.compute(predictions=[[0.1, 0.5, 0.4], [0.7, 0.1, 0.2]], references=[2, 1], k=2))
        print(acc.compute(predictions=[0, 1, 2, 1], references=[0, 1, 1, 1]))
    """)
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_EVALUATE_OFFLINE="1", HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), PYTHONPATH=str(REPO),
               OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split("\n")[:2] == ["{'top2_accuracy': 0.5}", "{'accuracy': 0.75}"]


def test_compute_metrics_matches_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(200, 12)).astype(np.float32)
    labels = rng.integers(0, 12, size=200)
    fn = compute_metrics_fn(load_metrics(["accuracy", "top_k_accuracy"]))
    out = fn(SimpleNamespace(predictions=logits, label_ids=labels))
    ranks = (logits > logits[np.arange(200), labels][:, None]).sum(-1)  # classes scored above the label
    assert out == pytest.approx({"accuracy": float((ranks == 0).mean()), "top5_accuracy": float((ranks < 5).mean())})
    assert 0 < out["accuracy"] < out["top5_accuracy"] < 1
    few = compute_metrics_fn(load_metrics(["top_k_accuracy"]))(SimpleNamespace(predictions=logits[:, :3],
                                                                              label_ids=labels % 3))
    assert few == {"top5_accuracy": 1.0}  # fewer classes than k: every label is in the top k
    top3 = compute_metrics_fn(load_metrics(["top_k_accuracy:k=3"]))(SimpleNamespace(predictions=logits,
                                                                                   label_ids=labels))
    assert top3 == pytest.approx({"top3_accuracy": float((ranks < 3).mean())})


def test_parse_spec():
    assert parse_spec("f1:average=macro") == ("f1", {"average": "macro"})
    assert parse_spec("top_k_accuracy:k=3,normalize=false") == ("top_k_accuracy", {"k": 3, "normalize": False})
    assert parse_spec("C:\\metrics\\mine") == ("C:\\metrics\\mine", {})
    assert parse_spec("/tmp/a:b/mine") == ("/tmp/a:b/mine", {})


MACRO_RECALL = '''
import datasets
import evaluate
import numpy as np

class MacroRecall(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(description="", citation="", inputs_description="",
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}))

    def _compute(self, predictions, references):
        p, r = np.asarray(predictions), np.asarray(references)
        return {"macro_recall": float(np.mean([(p[r == c] == c).mean() for c in np.unique(r)]))}
'''


def test_train_metrics_flag_reports_every_metric(tmp_path, capsys):
    module = tmp_path / "macro_recall"
    module.mkdir()
    (module / "macro_recall.py").write_text(MACRO_RECALL)
    out = tmp_path / "run"
    assert main(["train", "--max_steps", "2", "--output_dir", str(out), "--disable_tqdm", "true",
                 "--metrics", "accuracy", "top_k_accuracy", "top_k_accuracy:k=2", str(module)]) == 0
    evals = json.loads((out / "eval_results.json").read_text())
    assert {"eval_accuracy", "eval_top5_accuracy", "eval_top2_accuracy", "eval_macro_recall"} <= set(evals)
    assert 0 <= evals["eval_macro_recall"] <= 1
    assert json.loads((out / "all_results.json").read_text())["eval_macro_recall"] == evals["eval_macro_recall"]
    assert "test accuracy:" in capsys.readouterr().out


def test_unloadable_metric_fails_before_training(tmp_path, capsys):
    out = tmp_path / "o"
    assert main(["train", "--metrics", "accuracy", "f1_nonexistent_xyz", "--output_dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "'f1_nonexistent_xyz'" in err and "--metrics" in err and "offline" in err
    assert len(err.strip().splitlines()) == 1
    assert not out.exists()


BINARY_ONLY = MACRO_RECALL.replace("MacroRecall", "BinaryOnly").replace(
    "        p, r = np.asarray(predictions), np.asarray(references)\n",
    "        p, r = np.asarray(predictions), np.asarray(references)\n"
    "        if len(np.unique(r)) > 2:\n"
    "            raise ValueError(\"Target is multiclass but average='binary'\")\n")


def test_metric_unfit_for_the_task_fails_before_training(tmp_path, capsys):
    """Like the Hub's f1 without average= on 10 classes: caught on made-up predictions, before training."""
    module = tmp_path / "binary_only"
    module.mkdir()
    (module / "binary_only.py").write_text(BINARY_ONLY)
    out = tmp_path / "o"
    assert main(["train", "--metrics", str(module), "--output_dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "binary_only" in err and "10-class" in err and "multiclass" in err
    assert not out.exists()


PER_CLASS = MACRO_RECALL.replace("MacroRecall", "PerClass").replace(
    'return {"macro_recall": float(np.mean([(p[r == c] == c).mean() for c in np.unique(r)]))}',
    'return {"accuracy": float((p == r).mean()), "recall": np.array([(p[r == c] == c).mean() for c in np.unique(r)])}')


def test_metric_with_per_class_values_fails_before_training(tmp_path, capsys, monkeypatch):
    """Like f1 with average=None: an array per class passes compute but cannot be logged or carded; it is rejected
    before the data is even prepared for training, naming the metric and the key."""
    import hf_gam.trainer

    assert PER_CLASS != MACRO_RECALL
    module = tmp_path / "per_class"
    module.mkdir()
    (module / "per_class.py").write_text(PER_CLASS)
    monkeypatch.setattr(hf_gam.trainer.GAMTrainer, "train", lambda *a, **k: pytest.fail("trained"))
    out = tmp_path / "o"
    assert main(["train", "--metrics", str(module), "--output_dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert "'recall'" in err and "per_class" in err and "non-scalar" in err and "shape (10,)" in err
    assert not out.exists()
