"""The Hutchinson estimator against a dense Hessian, on a small non-separable model."""

from __future__ import annotations

import math

import pytest
import torch
from torch.func import functional_call

from trainer.optim import AdaHessian, ProbeSource, hessian_diagonal, hutchinson_products, probe_seed
from trainer.optim.hutchinson import param_key
from trainer.optim.partition import averaging_unit, conv_kernel_names


def _model_and_loss() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)).double()
    x = torch.randn(16, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (16,))
    return model, x, y


def _dense_hessian(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The full Hessian of the loss over all parameters, flattened in parameter order."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def loss_of(theta: torch.Tensor) -> torch.Tensor:
        tensors, offset = {}, 0
        for name, shape in zip(names, shapes):
            n = math.prod(shape)
            tensors[name] = theta[offset : offset + n].view(shape)
            offset += n
        return torch.nn.functional.cross_entropy(functional_call(model, tensors, (x,)), y)

    return torch.autograd.functional.hessian(loss_of, flat)


def _products(model, x, y, hessian_index: int, n_samples: int = 1) -> torch.Tensor:
    params = list(model.parameters())
    loss = torch.nn.functional.cross_entropy(model(x), y)
    grads = torch.autograd.grad(loss, params, create_graph=True)
    out = hutchinson_products(grads, params, range(len(params)), ProbeSource(7), hessian_index, n_samples)
    return torch.cat([t.reshape(-1) for t in out])


def test_products_equal_dense_hessian_times_probe() -> None:
    """z⊙(Hz) from double backward equals z⊙(H_dense z) for the same probe."""
    model, x, y = _model_and_loss()
    hessian = _dense_hessian(model, x, y)
    assert (hessian - torch.diag(torch.diag(hessian))).abs().max() > 1e-2  # really non-separable
    probes = ProbeSource(7)
    for hessian_index in range(3):
        z = torch.cat(
            [probes.probe(p, hessian_index, i).reshape(-1) for i, p in enumerate(model.parameters())]
        )
        expected = z * (hessian @ z)
        torch.testing.assert_close(_products(model, x, y, hessian_index), expected, rtol=1e-5, atol=1e-10)


def test_optimizer_trace_is_probe_times_dense_hessian() -> None:
    """The optimizer's reported trace is Σ z⊙(H_dense z) with its own first probe."""
    model, x, y = _model_and_loss()
    hessian = _dense_hessian(model, x, y)
    probes = ProbeSource(seed=3)
    params = list(model.parameters())
    z = torch.cat([probes.probe(p, 0, param_key(str(i))).reshape(-1) for i, p in enumerate(params)])
    opt = AdaHessian(model.parameters(), seed=3)
    opt.backward(torch.nn.functional.cross_entropy(model(x), y))
    opt.step()
    assert opt.hessian_trace == pytest.approx((z * (hessian @ z)).sum().item(), rel=1e-5)


def test_mean_over_probes_converges_as_inverse_sqrt_n() -> None:
    """Mean of n probes → diag(H) with squared error Σ_{i≠j} H_ij² / n (Rademacher variance).

    The probes are keyed by fixed seeds, so this statistical check is deterministic.
    """
    model, x, y = _model_and_loss()
    hessian = _dense_hessian(model, x, y)
    diag = torch.diag(hessian)
    off_diagonal_energy = (hessian.pow(2).sum() - diag.pow(2).sum()).item()
    total = 1024
    samples = torch.stack([_products(model, x, y, k) for k in range(total)])
    errors = {}
    for n in (4, 16, 64):
        means = samples.view(total // n, n, -1).mean(dim=1)
        errors[n] = (means - diag).pow(2).sum(dim=1).mean().item()
        assert 0.6 < errors[n] * n / off_diagonal_energy < 1.6, (n, errors[n] * n / off_diagonal_energy)
    # Quadrupling the probes halves the RMS error.
    for small, large in ((4, 16), (16, 64)):
        assert 1.5 < math.sqrt(errors[small] / errors[large]) < 2.7
    assert torch.allclose(samples.mean(dim=0), diag, atol=4 * math.sqrt(off_diagonal_energy / total))


def test_probes_are_rademacher_and_keyed() -> None:
    """±1 with mean ≈ 0 (not the constant −1 of `randint_like(p, 0, 1)`), a pure function of the key."""
    like = torch.empty(10_000)
    probes = ProbeSource(seed=11)
    z = probes.probe(like, hessian_index=2, key=5)
    assert set(z.unique().tolist()) == {-1.0, 1.0}
    assert abs(z.mean().item()) < 0.05
    torch.testing.assert_close(ProbeSource(11).probe(like, 2, 5), z, rtol=0, atol=0)
    for other in (
        ProbeSource(12).probe(like, 2, 5),
        probes.probe(like, 3, 5),
        probes.probe(like, 2, 6),
        probes.probe(like, 2, 5, sample=1),
    ):
        assert (other != z).float().mean().item() > 0.4
    assert len({probe_seed(0, h, i) for h in range(50) for i in range(50)}) == 2500


def test_n_samples_average_signed_before_abs() -> None:
    """n_samples probes are averaged with their signs; |·| comes after (in hessian_diagonal)."""
    model, x, y = _model_and_loss()
    averaged = _products(model, x, y, hessian_index=0, n_samples=3)
    params = list(model.parameters())
    loss = torch.nn.functional.cross_entropy(model(x), y)
    grads = torch.autograd.grad(loss, params, create_graph=True)
    probes = ProbeSource(7)
    by_hand = torch.zeros_like(averaged)
    hessian = _dense_hessian(model, x, y)
    for sample in range(3):
        z = torch.cat([probes.probe(p, 0, i, sample).reshape(-1) for i, p in enumerate(params)])
        by_hand += z * (hessian @ z) / 3
    torch.testing.assert_close(averaged, by_hand, rtol=1e-5, atol=1e-10)
    assert grads  # the graph was built for the check above


@pytest.mark.parametrize(
    ("shape", "block", "conv", "expected"),
    [
        ((2, 3), None, False, [[1, 2, 3], [4, 5, 6]]),
        ((6,), 2, False, [1.5, 1.5, 3.5, 3.5, 5.5, 5.5]),
        ((2, 3), 4, False, [[2.5, 2.5, 2.5, 2.5], [5.5, 5.5]]),  # last short block: its own mean
        ((1, 1, 2, 3), None, True, [[[[3.5] * 3] * 2]]),
        ((1, 2, 3), None, True, [[[2, 2, 2], [5, 5, 5]]]),  # a conv1d kernel
        ((1, 2, 3), None, False, [[[1, 2, 3], [4, 5, 6]]]),  # a (1, T, D) embedding: not averaged
        ((1, 2, 3), 2, False, [[[1.5, 1.5, 3.5], [3.5, 5.5, 5.5]]]),  # ... unless by blocks
    ],
)
def test_hessian_diagonal_spatial_averaging(shape, block, conv, expected) -> None:
    signed = torch.tensor([1.0, -2, 3, -4, 5, -6]).view(shape)
    unit = averaging_unit(torch.Size(shape), conv_kernel=conv, average_conv_kernel=True, block_size=block)
    out = hessian_diagonal(signed, unit)
    flat_expected = torch.tensor([v for row in _flatten(expected) for v in [row]])
    assert out.shape == signed.shape
    torch.testing.assert_close(out.reshape(-1), flat_expected)


def test_only_convolution_kernels_are_spatially_averaged() -> None:
    """The rule is the module type, not the number of dimensions: a 3-D position embedding keeps
    its per-element curvature; Conv1d/2d/3d kernels are averaged over their spatial block."""

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.position = torch.nn.Parameter(torch.randn(1, 5, 4))
            self.conv1 = torch.nn.Conv1d(2, 3, 3)
            self.conv3 = torch.nn.Conv3d(1, 2, (2, 2, 2))
            self.tconv = torch.nn.ConvTranspose2d(2, 2, 3)
            self.linear = torch.nn.Linear(4, 4)

    net = Net()
    assert conv_kernel_names(net) == {"conv1.weight", "conv3.weight", "tconv.weight"}
    opt = AdaHessian(net.named_parameters(), conv_kernels=conv_kernel_names(net))
    units = {name: opt._units[p] for name, p in net.named_parameters()}
    assert units == {
        "position": 1,
        "conv1.weight": 3,
        "conv1.bias": 1,
        "conv3.weight": 8,
        "conv3.bias": 1,
        "tconv.weight": 9,
        "tconv.bias": 1,
        "linear.weight": 1,
        "linear.bias": 1,
    }
    bare = AdaHessian(net.parameters())  # no names: only 4-D tensors count as kernels
    assert [bare._units[p] for p in net.parameters()] == [1, 1, 1, 1, 1, 9, 1, 1, 1]


def _flatten(nested) -> list[float]:
    if isinstance(nested, (int, float)):
        return [float(nested)]
    return [v for item in nested for v in _flatten(item)]
