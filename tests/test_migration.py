"""The migration snippets of docs/migration.md ("after" halves, verbatim between the markers) run here, and one step
of each equals the float64 reference of the rule the "before" code computes, with the argument mapping of that
page's tables: davda54/sam's SAM -> mode "sam"; the released GAM code's GAM (https://github.com/xxgege/GAM, gam/gam.py)
-> mode "gam_fast", variant "official", grad_rho -> rho_prime, grad_norm_rho -> rho, grad_beta_0 -> beta,
grad_beta_1 -> alpha, grad_gamma -> gamma, ProportionScheduler -> rho_schedule="lr_proportional"."""

from __future__ import annotations

import inspect
import re
import textwrap
from pathlib import Path

import torch
import torch.nn.functional as F
from testing_utils import tiny_data, tiny_model
from reference import direction, flat_params, loss_of


def sam_after(model, loader, loss_fn):
    # docs/migration.md: from davda54/sam (after)
    import torch
    from hf_gam.optim import SAM

    optimizer = SAM(model.parameters(), torch.optim.SGD, rho=0.05, adaptive=False, model=model,
                    lr=0.1, momentum=0.9)
    for x, y in loader:
        loss = optimizer.step(lambda: loss_fn(model(x), y))  # every pass: forward + loss, no backward
        optimizer.zero_grad()
    # docs/migration.md end
    return optimizer


def gam_after(model, loader, loss_fn, epochs=1):
    # docs/migration.md: from the released GAM code (after)
    import torch
    from hf_gam.optim import GAM

    optimizer = GAM(model.parameters(), torch.optim.SGD, mode="gam_fast", variant="official",
                    rho=0.2, rho_prime=0.04, beta=0.5, alpha=0.6, gamma=0.03,  # grad_norm_rho, grad_rho, ...
                    rho_schedule="lr_proportional", rho_min_ratio=0.5,  # ProportionScheduler 0.04 -> 0.02
                    model=model, lr=0.1, momentum=0.9, weight_decay=5e-4)
    lr_scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    for epoch in range(epochs):
        for x, y in loader:
            loss = optimizer.step(lambda: loss_fn(model(x), y))
            optimizer.zero_grad()
        lr_scheduler.step()
    # docs/migration.md end
    return optimizer


def setup():
    model, data = tiny_model(), tiny_data()
    return model, [(data.x, data.y)], {"pixel_values": data.x, "labels": data.y}


def test_davda54_sam_migration_is_sam():
    model, loader, batch = setup()
    theta0 = flat_params(model)
    opt = sam_after(_Logits(model), loader, F.cross_entropy)
    d = direction("sam", loss_of(model, batch), theta0, rho=0.05, alpha=0.0, xi=1e-12)
    step = theta0 - flat_params(model)
    assert (step - 0.1 * d).norm() / (0.1 * d).norm() < 1e-6
    assert opt.hyper.mode == "sam" and opt.hyper.sam_rho == 0.05


def test_released_gam_migration_is_official_gam_fast():
    model, loader, batch = setup()
    theta0 = flat_params(model)
    opt = gam_after(_Logits(model), loader, F.cross_entropy)
    d = direction("gam_fast", loss_of(model, batch), theta0, rho=0.2, rho_prime=0.04, beta=0.5, alpha=0.6,
                  gamma=0.03, variant="official", xi=1e-12)
    expected = 0.1 * (d + 5e-4 * theta0)  # first SGD step: momentum buffer = gradient (+ weight decay)
    step = theta0 - flat_params(model)
    assert (step - expected).norm() / expected.norm() < 1e-6
    # after the epoch the cosine schedule reached lr 0: every radius at rho_min_ratio (ProportionScheduler's min)
    h = opt.current_hyper()
    assert opt.param_groups[0]["lr"] == 0.0 and (h.rho, h.rho_prime) == (0.1, 0.02)


class _Logits(torch.nn.Module):
    """The tiny HF model with ``model(x)`` returning logits, as the snippets' plain-PyTorch models do."""

    def __init__(self, model):
        super().__init__()
        self.inner = model

    def forward(self, x):
        return self.inner(x).logits


def _snippets() -> dict[str, str]:
    src = inspect.getsource(inspect.getmodule(_snippets))
    return {m.group(1): textwrap.dedent(m.group(2)).strip()
            for m in re.finditer(r"    # docs/migration.md: (.*?)\n(.*?)    # docs/migration.md end", src, re.S)}


def test_migration_page_shows_the_tested_snippets():
    """docs/migration.md shows these functions' "after" code, verbatim."""
    page = (Path(__file__).resolve().parents[1] / "docs" / "migration.md").read_text()
    assert "# Coming from davda54/sam or the released GAM code" in page
    snippets = _snippets()
    assert set(snippets) == {"from davda54/sam (after)", "from the released GAM code (after)"}
    for name, code in snippets.items():
        assert code in page, f"docs/migration.md's {name!r} snippet differs from tests/test_migration.py"
