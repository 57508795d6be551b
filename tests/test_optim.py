"""hf_gam.optim.GAM / SAM: one step of every mode equals the float64 reference (tests/reference.py), the same batches
give the same weights as GAMTrainer, failures leave the weights bit-identical, state_dict round trip, every, the ρ
schedule, fp16 GradScaler overflow skip, clipping, param groups, schedulers, BatchNorm statistics from the clean pass,
and two torchrun processes. (The gradient's memory format: test_grad_memory_format.py.)"""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from testing_utils import tiny_data, tiny_model
from reference import direction, flat_params, loss_of

from hf_gam import GAMConfig, GAMTrainer
from hf_gam.core.directions import MODES
from hf_gam.optim import GAM, SAM

HERE = os.path.dirname(__file__)
HP = dict(rho=0.3, alpha=0.4, rho_prime=0.1, beta=0.3, gamma=0.5)


def batch_of(data, idx=slice(None)):
    return {"pixel_values": data.x[idx], "labels": data.y[idx]}


def graph_closure(model, batch):
    """Graph style: the loss with its graph, no backward."""
    return lambda: F.cross_entropy(model(batch["pixel_values"]).logits, batch["labels"])


def backward_closure(model, opt, batch, create_graph=False):
    """davda54/sam / Lightning style: zero_grad, backward inside, return the loss."""
    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(batch["pixel_values"]).logits, batch["labels"])
        loss.backward(create_graph=create_graph)
        return loss
    return closure


def ref_kw(opt):
    h = opt.current_hyper()
    return dict(rho=h.rho, alpha=h.alpha, sam_rho=h.sam_rho, rho_prime=h.rho_prime, beta=h.beta, gamma=h.gamma,
                xi=h.eps, variant=h.variant, adaptive=h.adaptive)


def assert_rel(actual, expected, tol=1e-6):
    err = (actual - expected).norm() / expected.norm()
    assert err < tol, f"relative error {err:.3e}"


CASES = [
    dict(mode="none"), dict(mode="sam"), dict(mode="sam", sam_rho=0.7), dict(mode="sam", adaptive=True),
    dict(mode="gnp"), dict(mode="gam"), dict(mode="gam", adaptive=True), dict(mode="gam_sam", sam_rho=0.2),
    dict(mode="gam_fast"), dict(mode="gam_fast", variant="official"), dict(mode="gam_fast", adaptive=True),
    dict(mode="gam", eps=0.5), dict(mode="gam_fast", eps=0.5),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(str(v) for v in c.values()))
def test_step_equals_reference(case):
    model, batch = tiny_model(), batch_of(tiny_data())
    theta0 = flat_params(model)
    opt = GAM(model.parameters(), torch.optim.SGD, lr=1.0, **{**HP, **case})
    d_ref = direction(case["mode"], loss_of(model, batch), theta0, **ref_kw(opt))
    loss = opt.step(graph_closure(model, batch))
    assert_rel(theta0 - flat_params(model), d_ref)
    assert loss.item() == pytest.approx(loss_of(model, batch)(theta0).item())


@pytest.mark.parametrize("mode,create_graph", [("none", False), ("sam", False), ("gam_fast", False), ("gam", True),
                                               ("gam_sam", True)])
def test_backward_style_closure_equals_reference(mode, create_graph):
    """The closure calls zero_grad and backward itself; exact-HVP modes with backward(create_graph=True)."""
    model, batch = tiny_model(), batch_of(tiny_data())
    theta0 = flat_params(model)
    opt = GAM(model.parameters(), torch.optim.SGD, lr=1.0, mode=mode, **HP)
    d_ref = direction(mode, loss_of(model, batch), theta0, **ref_kw(opt))
    opt.step(backward_closure(model, opt, batch, create_graph))
    assert_rel(theta0 - flat_params(model), d_ref)


def test_plain_loop_trains():
    """A plain PyTorch loop with AdamW + cosine schedule + exact GAM lowers the training loss."""
    model, data = tiny_model(), tiny_data(n=64)
    data.y = data.x[:, :3].argmax(-1)  # a learnable rule (tiny_data's labels are random)
    opt = GAM(model.parameters(), torch.optim.AdamW, mode="gam", lr=0.05, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=40)
    batches = [batch_of(data, slice(16 * i, 16 * i + 16)) for i in range(4)]
    losses = []
    for _ in range(10):
        for b in batches:
            losses.append(opt.step(graph_closure(model, b)).item())
            opt.zero_grad()
            sched.step()
    assert sum(losses[-4:]) < 0.5 * sum(losses[:4])


def test_sam_class_is_mode_sam_with_davda54_defaults():
    model, batch = tiny_model(), batch_of(tiny_data())
    theta0 = flat_params(model)
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.5, lr=1.0)
    assert (opt.hyper.mode, opt.hyper.sam_rho) == ("sam", 0.5)
    assert SAM(tiny_model().parameters(), lr=0.1).hyper.sam_rho == 0.05
    opt.step(graph_closure(model, batch))
    assert_rel(theta0 - flat_params(model), direction("sam", loss_of(model, batch), theta0, rho=0.5, alpha=0.1))



def test_sam_rho_positional_as_davda54():
    """davda54/sam's signature ``SAM(params, base_optimizer, rho=0.05, adaptive=False, **kwargs)``: ρ positional
    gives the same optimizer and the same step as ``rho=`` by keyword."""
    batch = batch_of(tiny_data())
    positional, keyword = tiny_model(), tiny_model()
    opt_p = SAM(positional.parameters(), torch.optim.SGD, 0.3, lr=0.1)
    opt_k = SAM(keyword.parameters(), torch.optim.SGD, rho=0.3, lr=0.1)
    assert opt_p.hyper == opt_k.hyper and opt_p.hyper.sam_rho == 0.3
    opt_p.step(graph_closure(positional, batch))
    opt_k.step(graph_closure(keyword, batch))
    assert torch.equal(flat_params(positional), flat_params(keyword))


class WithUnusedLayer(torch.nn.Module):
    """A Linear classifier next to a Linear the forward never calls (a head not in use, a mask token...)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.used, self.unused = torch.nn.Linear(6, 3).double(), torch.nn.Linear(6, 3).double()

    def forward(self, x):
        return self.used(x)


@pytest.mark.parametrize("mode", ["none", "sam", "gam_fast", "gam"])
def test_unreached_parameters_get_no_gradient_decay_or_momentum(mode):
    """As in a plain loop (autograd leaves their ``.grad`` None and SGD skips them): a parameter the loss does not
    reach is not decayed nor moved by momentum, its ``.grad`` stays None, while the used ones move (mode none: the
    plain loop's weights, bit for bit)."""
    model, data = WithUnusedLayer(), tiny_data()
    unused = [p.detach().clone() for p in model.unused.parameters()]
    used = [p.detach().clone() for p in model.used.parameters()]
    opt = GAM(model.parameters(), torch.optim.SGD, mode=mode, lr=0.1, momentum=0.9, weight_decay=0.1, model=model,
              **HP)
    for _ in range(2):
        opt.step(lambda: F.cross_entropy(model(data.x), data.y))
        assert all(p.grad is None for p in model.unused.parameters())
        assert all(p.grad is not None for p in model.used.parameters())
        opt.zero_grad()
    assert all(torch.equal(a, b) for a, b in zip(unused, model.unused.parameters()))
    assert all(not torch.equal(a, b) for a, b in zip(used, model.used.parameters()))
    if mode == "none":  # the plain loop, bit for bit
        plain = WithUnusedLayer()
        sgd = torch.optim.SGD(plain.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
        for _ in range(2):
            F.cross_entropy(plain(data.x), data.y).backward()
            sgd.step()
            sgd.zero_grad()
        assert all(torch.equal(a, b) for a, b in zip(plain.parameters(), model.parameters()))


class Recorder(GAMTrainer):
    def training_step(self, model, inputs, num_items_in_batch=None):
        self.seen = getattr(self, "seen", []) + [dict(inputs)]
        return super().training_step(model, inputs, num_items_in_batch)


def test_same_batches_same_weights_as_gam_trainer(tmp_path):
    """GAMTrainer (SGD lr 1, linear decay, ρ ∝ lr, gam_every=2, 4 steps of 8) and the wrapper with the same schedule
    on the batches the Trainer saw end on the same weights."""
    args = GAMConfig(output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=4, learning_rate=1.0,
                     optim="sgd", lr_scheduler_type="linear", max_grad_norm=0.0, weight_decay=0.0, report_to="none",
                     use_cpu=True, save_strategy="no", disable_tqdm=True, seed=0, gam_mode="gam_fast", gam_every=2,
                     gam_rho_schedule="lr_proportional", gam_rho_min_ratio=0.25, gam_rho=0.3, gam_alpha=0.4,
                     gam_rho_prime=0.1, gam_beta=0.3, gam_gamma=0.5)
    trainer = Recorder(model=tiny_model(), args=args, train_dataset=tiny_data(n=32))
    trainer.train()
    from transformers import get_linear_schedule_with_warmup

    model = tiny_model()
    opt = GAM(model.parameters(), torch.optim.SGD, lr=1.0, mode="gam_fast", every=2, rho_schedule="lr_proportional",
              rho_min_ratio=0.25, **HP)
    sched = get_linear_schedule_with_warmup(opt, 0, 4)
    assert len(trainer.seen) == 4
    for b in trainer.seen:
        opt.step(graph_closure(model, b))
        sched.step()
    torch.testing.assert_close(flat_params(model), flat_params(trainer.model), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("mode", [m for m in MODES if m != "none"])
def test_batchnorm_statistics_come_from_the_clean_pass_only(mode):
    """With ``model=``, a step leaves the BatchNorm running statistics of one train-mode forward at the clean
    weights: the perturbed passes' updates are undone."""
    model, batch = tiny_model(batchnorm=True), batch_of(tiny_data())
    clean = copy.deepcopy(model).train()
    with torch.no_grad():
        clean(batch["pixel_values"])
    opt = GAM(model.parameters(), torch.optim.SGD, lr=0.5, mode=mode, model=model, **HP)
    opt.step(graph_closure(model, batch))
    buffers = dict(model.named_buffers())
    for name, buffer in clean.named_buffers():
        assert torch.equal(buffer, buffers[name]), name


def test_failing_closure_leaves_weights_bit_identical():
    model, batch = tiny_model(batchnorm=True), batch_of(tiny_data())
    model.train()
    opt = GAM(model.parameters(), torch.optim.SGD, lr=0.5, momentum=0.9, mode="gam_fast", model=model, **HP)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calls = []

    def closure():
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("data loader died")
        return graph_closure(model, batch)()

    with pytest.raises(RuntimeError, match="data loader died"):
        opt.step(closure)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "weights or BatchNorm statistics changed"
    assert all(p.grad is None for p in model.parameters())
    assert not opt.base_optimizer.state and opt.step_count == 0


def test_hvp_mode_with_plain_backward_is_a_clear_error():
    model, batch = tiny_model(), batch_of(tiny_data())
    theta0 = flat_params(model)
    opt = GAM(model.parameters(), torch.optim.SGD, lr=1.0, mode="gam")
    with pytest.raises(ValueError, match="create_graph=True"):
        opt.step(backward_closure(model, opt, batch))
    assert torch.equal(flat_params(model), theta0)
    with pytest.raises(ValueError, match="without autograd graph"):
        opt.step(lambda: graph_closure(model, batch)().detach())
    with pytest.raises(TypeError, match="needs a closure"):
        opt.step()


@pytest.mark.parametrize("kw,field", [(dict(mode="adam"), "mode"), (dict(rho=-1.0), "rho"),
                                      (dict(beta=2.0), "beta"), (dict(mode="gam_fast", alpha=1.5), "alpha"), (dict(every=0), "every"),
                                      (dict(rho_schedule="cosine"), "rho_schedule"), (dict(variant="x"), "variant"),
                                      (dict(max_grad_norm=0.0), "max_grad_norm")])
def test_bad_arguments_name_the_field(kw, field):
    with pytest.raises(ValueError, match=f"^{field} must be"):
        GAM(tiny_model().parameters(), torch.optim.SGD, lr=0.1, **kw)


def run_steps(opt, model, batches):
    for b in batches:
        opt.step(graph_closure(model, b))


def test_state_dict_round_trip_and_every():
    """Resume after 1 step from state_dict (momentum buffers, every's phase) equals 3 uninterrupted steps; every=2
    makes step 1 plain."""
    data = tiny_data(n=24)
    batches = [batch_of(data, slice(8 * i, 8 * i + 8)) for i in range(3)]
    make = lambda m: GAM(m.parameters(), torch.optim.SGD, lr=0.5, momentum=0.9, mode="gam_fast", every=2, **HP)  # noqa: E731
    model_a = tiny_model()
    opt_a = make(model_a)
    run_steps(opt_a, model_a, batches)

    model_b = tiny_model()
    opt_b = make(model_b)
    run_steps(opt_b, model_b, batches[:1])
    sd, weights = opt_b.state_dict(), {k: v.clone() for k, v in model_b.state_dict().items()}
    assert sd["gam"]["step"] == 1 and sd["state"]
    model_c = tiny_model(seed=5)
    model_c.load_state_dict(weights)
    opt_c = make(model_c)
    opt_c.load_state_dict(sd)
    assert opt_c.current_hyper().mode == "none" and opt_c.param_groups is opt_c.base_optimizer.param_groups
    run_steps(opt_c, model_c, batches[1:])
    assert torch.equal(flat_params(model_a), flat_params(model_c))

    model_d = tiny_model()  # reference for `every`: steps 0 and 2 gam_fast, step 1 plain (no momentum: lr 1)
    theta = flat_params(model_d)
    opt_d = GAM(model_d.parameters(), torch.optim.SGD, lr=1.0, mode="gam_fast", every=2, **HP)
    kw = ref_kw(opt_d)
    run_steps(opt_d, model_d, batches)
    for t, b in enumerate(batches):
        theta = theta - direction("gam_fast" if t % 2 == 0 else "none", loss_of(model_d, b), theta, **kw)
    assert_rel(flat_params(model_d), theta, tol=1e-9)


def test_rho_schedule_follows_the_schedulers_lr():
    """LambdaLR on the wrapper halves the lr: with rho_min_ratio r every radius is ρ (r + (1-r)/2)."""
    model, batch = tiny_model(), batch_of(tiny_data())
    opt = GAM(model.parameters(), torch.optim.SGD, lr=2.0, mode="gam_fast", rho_schedule="lr_proportional",
              rho_min_ratio=0.2, **HP)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5)
    assert opt.base_optimizer.param_groups[0]["lr"] == 1.0  # the wrapper's scheduler drives the base
    h = opt.current_hyper()
    assert (h.rho, h.rho_prime) == pytest.approx((0.3 * 0.6, 0.1 * 0.6))
    theta0 = flat_params(model)
    d_ref = direction("gam_fast", loss_of(model, batch), theta0, **ref_kw(opt))
    opt.step(graph_closure(model, batch))
    sched.step()
    assert_rel(theta0 - flat_params(model), d_ref)  # lr 1 after the lambda


def test_param_groups_and_clipping():
    """Per-group lr reaches the base; max_grad_norm clips the final direction."""
    model, batch = tiny_model(), batch_of(tiny_data())
    theta0 = flat_params(model)
    groups = [{"params": [model.fc1.weight, model.fc1.bias], "lr": 1.0},
              {"params": [model.fc2.weight, model.fc2.bias], "lr": 0.25}]
    d = direction("sam", loss_of(model, batch), theta0, rho=0.3, alpha=0.0)
    n1 = model.fc1.weight.numel() + model.fc1.bias.numel()
    clip = 0.5 * d.norm().item()
    opt = SAM(groups, torch.optim.SGD, rho=0.3, lr=1.0, max_grad_norm=clip)
    opt.step(graph_closure(model, batch))
    step = theta0 - flat_params(model)
    d_clipped = d * clip / (d.norm() + 1e-6)  # clip_grad_norm_'s rule
    assert_rel(step[:n1], d_clipped[:n1])
    assert_rel(step[n1:], 0.25 * d_clipped[n1:])


def test_base_optimizer_instance_and_scheduler_on_base():
    model, batch = tiny_model(), batch_of(tiny_data())
    base = torch.optim.AdamW(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(base, step_size=1, gamma=0.5)
    opt = GAM(model.parameters(), base, mode="sam")
    opt.step(graph_closure(model, batch))
    sched.step()
    assert opt.param_groups[0]["lr"] == 0.05 and len(base.state) == 4
    with pytest.raises(TypeError, match="instance"):
        GAM(model.parameters(), base, lr=0.1)


def test_grad_scaler_overflow_skips_the_step_with_weights_clean():
    """fp16 path on CPU (float32 weights): an inf in the third pass skips the step (weights, momentum state
    untouched) and halves the scale; a finite step equals the unscaled one."""
    model, batch = tiny_model(dtype=torch.float32), batch_of(tiny_data(dtype=torch.float32))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    opt = GAM(model.parameters(), torch.optim.SGD, lr=1.0, momentum=0.9, mode="gam_fast", grad_scaler=scaler, **HP)
    theta0 = flat_params(model)
    calls = []

    def closure():
        calls.append(1)
        loss = graph_closure(model, batch)()
        return loss * float("inf") if len(calls) == 3 else loss

    opt.step(closure)
    assert torch.equal(flat_params(model), theta0) and not opt.base_optimizer.state
    assert scaler.get_scale() == 2.0 ** 9
    opt.step(graph_closure(model, batch))
    plain = tiny_model(dtype=torch.float32)
    GAM(plain.parameters(), torch.optim.SGD, lr=1.0, momentum=0.9, mode="gam_fast", every=2, **HP).step(
        graph_closure(plain, batch))  # every=2 at step 0 is gam_fast; same hyper, no scaler
    torch.testing.assert_close(flat_params(model), flat_params(plain), rtol=1e-5, atol=1e-6)


def test_grad_scaler_backward_style_equals_graph_style():
    """The AMP idiom inside the closure, scaler.scale(loss).backward(), gives the step of the graph-style closure
    (the wrapper scales that one itself)."""
    data = tiny_data(dtype=torch.float32)
    batch = batch_of(data)
    thetas = []
    for style in ("graph", "backward"):
        model = tiny_model(dtype=torch.float32)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
        opt = GAM(model.parameters(), torch.optim.SGD, lr=1.0, mode="sam", grad_scaler=scaler, rho=0.3)

        def closure():
            loss = graph_closure(model, batch)()
            if style == "backward":
                scaler.scale(loss).backward()
            return loss

        opt.step(closure)
        thetas.append(flat_params(model))
    assert torch.equal(thetas[0], thetas[1])


def test_add_param_group_reaches_the_base():
    model = tiny_model()
    opt = GAM([model.fc1.weight, model.fc1.bias], torch.optim.SGD, lr=0.1, mode="sam")
    opt.add_param_group({"params": [model.fc2.weight, model.fc2.bias], "lr": 0.01})
    assert opt.param_groups is opt.base_optimizer.param_groups and len(opt.param_groups) == 2
    assert opt.base_optimizer.param_groups[1]["momentum"] == 0  # the base's defaults filled in
    opt.step(graph_closure(model, batch_of(tiny_data())))
    assert model.fc2.weight.grad is not None


def test_bf16_autocast_around_the_closure():
    model, batch = tiny_model(dtype=torch.float32), batch_of(tiny_data(dtype=torch.float32))
    opt = GAM(model.parameters(), torch.optim.SGD, lr=0.1, mode="gam_fast")
    theta0 = flat_params(model)

    def closure():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return graph_closure(model, batch)()

    loss = opt.step(closure)
    theta1 = flat_params(model)
    assert torch.isfinite(loss) and torch.isfinite(theta1).all() and not torch.equal(theta0, theta1)
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in model.parameters())


def torchrun(script, *args, nproc=2, timeout=600):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([os.path.dirname(HERE), HERE])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           os.path.join(HERE, "workers", script), *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]


DDP_CASES = [(m, s) for m in ("sam", "gam_fast", "gam") for s in ("local", "global")] + [("gam_fast", "backward")]


@pytest.fixture(scope="module")
def ddp_optim_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp_optim")
    torchrun("optim_step.py", str(out), ",".join(f"{m}:{s}" for m, s in DDP_CASES))
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


@pytest.mark.distributed
@pytest.mark.parametrize("mode,case", DDP_CASES)
def test_two_processes_equal_reference(ddp_optim_results, mode, case):
    r0, r1 = (r[f"{mode}:{case}"] for r in ddp_optim_results)
    assert torch.equal(r0["theta1"], r1["theta1"]), "ranks diverged"
    batches = [r0["batch"], r1["batch"]]
    model = tiny_model()
    kw = dict(rho=0.3, alpha=0.4, sam_rho=0.3, rho_prime=0.1, beta=0.3, gamma=0.5)
    if case in ("local", "backward"):  # backward: the closure calls loss.backward() (under DDP's no_sync)
        d_ref = sum(direction(mode, loss_of(model, b), r0["theta0"], **kw) for b in batches) / 2
    else:
        union = {k: torch.cat([b[k] for b in batches]) for k in batches[0]}
        d_ref = direction(mode, loss_of(model, union), r0["theta0"], **kw)
    assert_rel(r0["theta0"] - r0["theta1"], d_ref)
