"""The loss GAMTrainer steps on. Classification and regression heads get hf_gam's own loss, normalized by
``num_items_in_batch`` for every model (EfficientNet's own ignores it); multi-label (BCE) and regression (MSE) skip
label elements set to -100, in the summed head loss and in the step (references written independently here: BCE
and squared error from their formulas, in float64, over the kept elements picked by boolean indexing). A user's
``compute_loss_func`` and language models keep their own loss, with micro-batches weighed as the Trainer weighs
them."""

from __future__ import annotations

import pytest
import torch
from reference import direction, flat_params
from testing_utils import (HP, TensorDataset, TinyMLP, TinyMLPConfig, assert_rel, image_data, params_of, ref_kwargs,
                           sgd_args, tiny_data, tiny_efficientnet, tiny_model, tiny_vit, train_args)
from transformers import Trainer, TrainingArguments

from hf_gam import GAMConfig, GAMTrainer
from hf_gam.trainer.losses import classifier_config, fits_head, summed_head_loss

pytestmark = pytest.mark.usefixtures("one_thread")

HEADS = {"multi_label_classification": {"problem_type": "multi_label_classification", "num_labels": 3},
         "regression": {"num_labels": 1}}


def labels_with_ignored(head: str, n: int, generator: torch.Generator) -> torch.Tensor:
    """Float labels of ``head`` for ``n`` rows, about a quarter of the elements set to -100 (at least one)."""
    if head == "regression":
        labels = torch.randn(n, generator=generator, dtype=torch.float64)
    else:
        labels = torch.randint(0, 2, (n, 3), generator=generator).double()
    ignored = torch.rand(labels.shape, generator=generator) < 0.25
    ignored.view(-1)[0] = True
    return torch.where(ignored, torch.full_like(labels, -100.0), labels)


def independent_summed_loss(head: str, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Σ over the kept label elements of -[y log σ(z) + (1-y) log(1-σ(z))] (multi-label) or (z-y)² (regression)."""
    z, y = logits.reshape(-1), labels.reshape(-1)
    kept = y != -100
    z, y = z[kept], y[kept]
    if head == "regression":
        return ((z - y) ** 2).sum()
    return -(y * torch.log(torch.sigmoid(z)) + (1 - y) * torch.log(1 - torch.sigmoid(z))).sum()


@pytest.mark.parametrize("head", list(HEADS))
def test_summed_loss_excludes_ignored_elements(head):
    g = torch.Generator().manual_seed(3)
    labels = labels_with_ignored(head, 4 if head != "regression" else 12, g)
    logits = torch.randn(labels.shape if head != "regression" else (12, 1), generator=g, dtype=torch.float64)
    assert (labels == -100).sum() >= 1
    expected = independent_summed_loss(head, logits, labels)
    actual = summed_head_loss(head, logits, labels, smoothing=0.0)
    assert torch.allclose(actual, expected, rtol=1e-12, atol=0), (actual.item(), expected.item())


@pytest.mark.parametrize("mode", [dict(gam_mode="none"), dict(gam_mode="sam", sam_rho=0.0)])
@pytest.mark.parametrize("head", list(HEADS))
def test_step_is_gradient_of_mean_over_kept_elements(tmp_path, head, mode):
    """Accumulation 2 over uneven micro-batches (8 + 4), SGD lr 1: θ moves by minus the gradient of the mean loss
    over the kept label elements of all 12 rows."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(12, 6, generator=g, dtype=torch.float64)
    labels = labels_with_ignored(head, 12, g)
    model = tiny_model(0, **HEADS[head])
    theta0 = flat_params(model)

    reference = tiny_model(0, **HEADS[head])
    kept = (labels != -100).sum()
    mean = independent_summed_loss(head, reference(x).logits, labels) / kept
    expected_step = -torch.cat([p.reshape(-1) for p in torch.autograd.grad(mean, list(reference.parameters()))])

    args = sgd_args(tmp_path, per_device_train_batch_size=8, gradient_accumulation_steps=2, **mode)
    GAMTrainer(model=model, args=args, train_dataset=TensorDataset(x, labels)).train()
    assert_rel(flat_params(model) - theta0, expected_step, tol=1e-10)


def test_efficientnet_loss_normalized_like_every_model(tmp_path):
    """EfficientNet's own loss ignores num_items_in_batch (so the stock Trainer's gradients are 2x under
    accumulation 2); GAMTrainer's loss is sum / num_items_in_batch for it as for ViT."""
    model = tiny_efficientnet(image_size=32).eval()  # running statistics: the same logits in every call
    batch = {"pixel_values": image_data(4, size=32).x, "labels": image_data(4, size=32).y}
    with torch.no_grad():
        expected = torch.nn.functional.cross_entropy(model(pixel_values=batch["pixel_values"]).logits,
                                                     batch["labels"], reduction="sum") / 8
        stock = Trainer(model=model, args=train_args(tmp_path / "s", TrainingArguments))
        gam = GAMTrainer(model=model, args=train_args(tmp_path / "g", gam_mode="none"))
        stock_loss = stock.compute_loss(model, dict(batch), num_items_in_batch=torch.tensor(8))
        gam_loss = gam.compute_loss(model, dict(batch), num_items_in_batch=torch.tensor(8))
    torch.testing.assert_close(gam_loss, expected)
    torch.testing.assert_close(stock_loss, 2 * expected)  # the trap this override removes


def smoothed_ce(outputs, labels, num_items_in_batch=None):
    """A user's loss (``compute_loss_func``) that is not the model's own: cross-entropy with smoothing 0.2."""
    return torch.nn.functional.cross_entropy(outputs["logits"], labels, label_smoothing=0.2)


def smoothed_ce_of(model, data):
    """``L(θ)`` of :func:`smoothed_ce` on ``data`` as a function of the flat parameters (float64 reference)."""
    from torch.func import functional_call

    names, shapes = zip(*[(n, p.shape) for n, p in model.named_parameters()])

    def L(theta):
        chunks = torch.split(theta, [s.numel() for s in shapes])
        params = {n: c.view(s) for n, c, s in zip(names, chunks, shapes)}
        return smoothed_ce({"logits": functional_call(model, params, (data.x,)).logits}, data.y)

    return L


@pytest.mark.parametrize("mode", ["sam", "gam_fast", "gam"])
def test_compute_loss_func_multi_pass_modes_equal_reference(tmp_path, mode):
    """``compute_loss_func`` is the loss of every pass (each pass gets its own inputs dict: the Trainer pops
    ``labels``), and the step is the float64 reference direction of the user's loss."""
    model, data = tiny_model(), tiny_data()
    theta0 = flat_params(model)
    args = sgd_args(tmp_path, gam_mode=mode, **HP)
    GAMTrainer(model=model, args=args, train_dataset=data, compute_loss_func=smoothed_ce).train()
    d_ref = direction(mode, smoothed_ce_of(tiny_model(), data), theta0, **ref_kwargs(args))
    assert_rel(theta0 - flat_params(model), d_ref)


class NoKwargsMLP(TinyMLP):
    """A model whose forward takes no ``**kwargs``: the Trainer must not pass it ``num_items_in_batch``."""

    def forward(self, pixel_values, labels=None):
        return super().forward(pixel_values)


def test_compute_loss_func_model_without_kwargs_is_trainer_bit_for_bit(tmp_path):
    def run(trainer_cls, args_cls, **kw):
        torch.manual_seed(0)
        model = NoKwargsMLP(TinyMLPConfig())
        trainer_cls(model=model, args=train_args(tmp_path / trainer_cls.__name__, args_cls, **kw),
                    train_dataset=tiny_data(dtype=torch.float32), compute_loss_func=smoothed_ce).train()
        return params_of(model)

    stock, gam = run(Trainer, TrainingArguments), run(GAMTrainer, GAMConfig, gam_mode="none")
    assert all(torch.equal(a, b) for a, b in zip(stock, gam))


def summed_smoothed_ce(outputs, labels, num_items_in_batch=None):
    """A user's loss normalized as the Trainer expects of ``compute_loss_func``: Σ / ``num_items_in_batch`` (the
    micro-batch mean when it is not given)."""
    total = torch.nn.functional.cross_entropy(outputs["logits"], labels, label_smoothing=0.2, reduction="sum")
    return total / (len(labels) if num_items_in_batch is None else num_items_in_batch)


@pytest.mark.parametrize("mode", [dict(gam_mode="sam", sam_rho=0.0), dict(gam_mode="gam", gam_alpha=0.0)],
                         ids=["sam_rho0", "gam_alpha0"])
def test_compute_loss_func_model_without_kwargs_weighs_micro_batches_as_the_trainer(tmp_path, mode):
    """The Trainer counts ``num_items_in_batch`` for any ``compute_loss_func`` (whatever the model's forward takes)
    and takes the user's loss as normalized by it: over uneven micro-batches (8 + 4) each must weigh ``n_i / N``
    (not ``1 / accumulation steps``), so the multi-pass modes reduced to the gradient step as the stock Trainer."""
    sgd = dict(per_device_train_batch_size=8, max_steps=1, learning_rate=1.0, optim="sgd",
               lr_scheduler_type="constant", max_grad_norm=0.0, weight_decay=0.0)
    steps = []
    for trainer_cls, args_cls, kw in ((Trainer, TrainingArguments, {}), (GAMTrainer, GAMConfig, mode)):
        torch.manual_seed(0)
        model = NoKwargsMLP(TinyMLPConfig()).double()
        theta0 = flat_params(model)
        trainer_cls(model=model, args=train_args(tmp_path / trainer_cls.__name__, args_cls, **sgd, **kw),
                    train_dataset=tiny_data(n=12), compute_loss_func=summed_smoothed_ce).train()
        steps.append(theta0 - flat_params(model))
    assert_rel(steps[1], steps[0], tol=1e-9)


class TokenData(torch.utils.data.Dataset):
    """Language-model samples: ``labels`` are the ``input_ids`` (the model shifts them); ``padded``: the last 4
    targets of every third row are -100 (rows of unequal target counts)."""

    def __init__(self, n=16, length=12, vocab=50, seed=1, padded=False):
        self.ids = torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(seed))
        self.labels = self.ids.clone()
        if padded:
            self.labels[::3, -4:] = -100

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2, n_positions=32, bos_token_id=0,
                                      eos_token_id=0))


def test_causal_lm_keeps_its_own_loss_bit_for_bit(tmp_path):
    """A causal LM (``num_labels`` 2 by default, token labels) keeps its own shifted loss: mode none gives the stock
    Trainer's weights after 2 accumulated steps, bit for bit."""
    stock_model, gam_model = tiny_gpt2(), tiny_gpt2()
    Trainer(model=stock_model, args=train_args(tmp_path / "s", TrainingArguments, max_steps=2),
            train_dataset=TokenData()).train()
    GAMTrainer(model=gam_model, args=train_args(tmp_path / "g", gam_mode="none", max_steps=2),
               train_dataset=TokenData()).train()
    assert all(torch.equal(a, b) for a, b in zip(stock_model.parameters(), gam_model.parameters()))


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=2,
                                        max_position_embeddings=32)).double()


@pytest.mark.parametrize("perturbation", ["local", "global"])
def test_causal_lm_multi_pass_step_weighs_micro_batches_as_the_trainer(tmp_path, perturbation):
    """A causal LM (``loss_type`` ForCausalLM) in a multi-pass mode: the Trainer's ``num_items_in_batch`` counts
    ``labels[..., 1:]`` (the shifted targets), so must each micro-batch's weight; ``sam`` with ρs = 0 over 8 + 4
    sequences (padded with -100) then steps as the stock Trainer (counting every label would step T/(T-1) too far)."""
    data = TokenData(n=12, padded=True)
    sgd = dict(per_device_train_batch_size=8, max_steps=1, learning_rate=1.0, optim="sgd",
               lr_scheduler_type="constant", max_grad_norm=0.0, weight_decay=0.0)
    stock_model, gam_model = tiny_llama(), tiny_llama()
    theta0 = flat_params(stock_model)
    Trainer(model=stock_model, args=train_args(tmp_path / "s", TrainingArguments, **sgd), train_dataset=data).train()
    GAMTrainer(model=gam_model, args=train_args(tmp_path / "g", gam_mode="sam", sam_rho=0.0,
                                                gam_perturbation=perturbation, **sgd), train_dataset=data).train()
    # float32 accuracy: transformers' causal-LM loss computes the cross-entropy on logits.float()
    assert_rel(theta0 - flat_params(gam_model), theta0 - flat_params(stock_model), tol=1e-6)


def test_classifier_config_and_fits_head():
    lm, vit = tiny_gpt2(), tiny_vit()
    assert lm.config.num_labels == 2 and classifier_config(lm) is None  # loss_type ForCausalLM: its own loss
    config = classifier_config(vit)
    assert config is vit.config
    assert fits_head(config, torch.tensor([0, 2, 1]))
    assert not fits_head(config, torch.zeros(3, 5, dtype=torch.long))  # per-token ids: not a head's labels
    assert fits_head(config, torch.zeros(3, 3))  # multi-label: one float per class
    assert not fits_head(config, torch.zeros(3, 5))
    regression = tiny_vit(num_labels=1).config
    assert fits_head(regression, torch.zeros(3)) and not fits_head(regression, torch.zeros(3, 3))
