"""The functional core against plain per-tensor loops and explicit Hessians, in float64."""

from __future__ import annotations

import pytest
import torch
from testing_utils import tiny_data, tiny_model
from reference import flat_params, hessian, loss_of

from hf_gam.core import directions
from hf_gam.core import functional
from hf_gam.core.oracles import MicroBatchOracle


def tensors(seed, shapes=((3, 4), (5,), (2, 2, 3), ())):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]


def flat(ts):
    return torch.cat([t.reshape(-1) for t in ts])


def test_global_norm_and_dot_match_loop():
    a, b = tensors(0), tensors(1)
    assert functional.global_norm(a).item() == pytest.approx(flat(a).norm().item(), rel=1e-15)
    assert functional.global_norm(a, b).item() == pytest.approx((flat(a) * flat(b).abs()).norm().item(), rel=1e-14)
    assert functional.dot(a, b).item() == pytest.approx((flat(a) @ flat(b)).item(), rel=1e-14)


@pytest.mark.parametrize("adaptive", [False, True])
def test_ascent_step_matches_loop(adaptive):
    v, w = tensors(2), tensors(3)
    e = functional.ascent_step(v, 0.3, 1e-12, w if adaptive else None)
    fv, fw = flat(v), flat(w)
    expected = 0.3 * fw**2 * fv / ((fw.abs() * fv).norm() + 1e-12) if adaptive else 0.3 * fv / (fv.norm() + 1e-12)
    torch.testing.assert_close(flat(e), expected, rtol=1e-14, atol=0)
    assert torch.equal(flat(v), flat(tensors(2)))  # input untouched


@pytest.mark.parametrize("variant", ["paper", "official"])
def test_gam_fast_combination_matches_loop(variant):
    """Algorithm 2's last lines as gam_fast_direction runs them (h+ in g1's storage, h- in g0's, then d in h+'s)
    against the textbook formulas: h-⊥ is h- minus its projection on h+, and d = h+ - γ h-⊥."""
    g0, g1, g2, g3 = (tensors(s) for s in range(10, 14))
    f0, f1, f2, f3 = (flat(x).clone() for x in (g0, g1, g2, g3))
    h_plus = functional.h_plus_(g1, g3, 0.6)
    h_minus = functional.h_minus_(g0, g2, 0.3, variant)
    hp = 0.6 * f1 + 0.4 * f3
    hm = 0.3 * f0 + 0.7 * f2 if variant == "paper" else f0 + 0.7 * f2
    torch.testing.assert_close(flat(h_plus), hp, rtol=1e-14, atol=0)
    torch.testing.assert_close(flat(h_minus), hm, rtol=1e-14, atol=0)
    d = functional.gam_fast_final_(h_plus, h_minus, 0.4, 1e-12)
    perp = hm - (hm @ hp) / (hp @ hp + 1e-12) * hp
    assert abs((perp @ hp).item()) < 1e-12 * hp.norm().item() * hm.norm().item()
    torch.testing.assert_close(flat(d), hp - 0.4 * perp, rtol=1e-13, atol=1e-15)
    assert torch.equal(flat(g2), f2) and torch.equal(flat(g3), f3)  # only the documented buffers are written


def test_hvp_matches_explicit_hessian():
    model = tiny_model()
    data = tiny_data()
    batch = {"pixel_values": data.x, "labels": data.y}
    params = list(model.parameters())
    loss = torch.nn.functional.cross_entropy(model(pixel_values=data.x).logits, data.y)
    g = torch.autograd.grad(loss, params, create_graph=True)
    v = tensors(7, [p.shape for p in params])
    hv = functional.hvp(g, params, v)
    H = hessian(loss_of(model, batch), flat_params(model))
    torch.testing.assert_close(flat(hv), H @ flat(v), rtol=1e-10, atol=1e-12)


def test_weights_restored_bit_exact_on_exception():
    params = [torch.nn.Parameter(t) for t in tensors(8)]
    before = [p.detach().clone() for p in params]
    with pytest.raises(KeyError), functional.weights_restored(params):
        functional.add_(params, functional.ascent_step(tensors(9), 0.1, 1e-12))
        functional.add_(params, functional.ascent_step(tensors(9), -0.1, 1e-12))
        raise KeyError("boom")
    assert all(torch.equal(a, b) for a, b in zip(before, params))


def test_gnp_direction_through_oracle_matches_explicit_hessian():
    model = tiny_model()
    data = tiny_data()
    batch = {"pixel_values": data.x, "labels": data.y}
    params = list(model.parameters())
    oracle = MicroBatchOracle(model, params, lambda: torch.nn.functional.cross_entropy(
        model(pixel_values=data.x).logits, data.y))
    d, stats = directions.gnp_direction(params, oracle.grad_hvp, rho=0.2, alpha=0.5, eps=1e-12)
    L, theta = loss_of(model, batch), flat_params(model)
    g = torch.autograd.functional.jacobian(L, theta)
    expected = g + 0.5 * 0.2 * hessian(L, theta) @ g / (g.norm() + 1e-12)
    torch.testing.assert_close(flat(d), expected, rtol=1e-10, atol=1e-13)
    assert oracle.passes == 1 and stats["grad_norm"].item() == pytest.approx(g.norm().item())


def test_functional_imports_nothing_of_the_package():
    """functional.py is the pure math under everything: of hf_gam it imports only core.collectives (where sharded
    FSDP2 tensors are recognised and shard sums taken), which imports nothing of hf_gam (no cycle through
    directions)."""
    import ast
    import inspect

    from hf_gam.core import collectives

    for module, allowed in ((functional, {"collectives"}), (collectives, set())):
        for node in ast.walk(ast.parse(inspect.getsource(module))):
            if isinstance(node, ast.ImportFrom):
                local = node.level == 1 and node.module in allowed
                assert local or (node.level == 0 and not (node.module or "").startswith("hf_gam")), ast.unparse(node)
            elif isinstance(node, ast.Import):
                assert not any(a.name.startswith("hf_gam") for a in node.names), ast.unparse(node)
    assert not hasattr(functional, "gam_fast_direction") and not hasattr(functional, "__getattr__")
