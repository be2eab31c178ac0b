"""Book-keeping clipping: per-example clipping in one backward pass, for Linear and Conv layers.

Bu, Wang, Zha, Karypis, "Differentially Private Optimization on Large Model at Small Cost",
ICML 2023 (arXiv 2210.00038). The forward pass keeps each layer's input ``a`` ("book-keeping");
one backward pass returns only the gradients ``g`` of the loss w.r.t. each layer's *output*
(autograd is asked for nothing else, so it skips the weight gradients a plain step computes).
From ``(a, g)`` each layer gives every example's squared gradient norm, by the cheapest of:

- **outer** (Linear on ``(B, d)`` inputs): ``|a_i|^2 |g_i|^2``, the ghost norm of Goodfellow
  (arXiv 1510.01799);
- **gram** (sequences and convolutions): ``sum_{t,s} (a_t . a_s)(g_t . g_s)`` over positions, the
  ghost norm of Li et al. (ICLR 2022, arXiv 2110.05679), without per-example gradients;
- **einsum** / **grouped** / **broadcast** (convolutions): the per-example gradients themselves,
  from a strided view of the padded input, from one convolution grouped by example (Rochette et
  al. 2019, arXiv 1912.06015), or by broadcasting when that stays small (small layers on CPU).

The clipping factors ``c_i = min(1, C / (|grad_i| + 1e-6))`` (Opacus' rule) then weight one
product per layer that writes ``p.grad = sum_i c_i grad_i``; Opacus'
``DPOptimizerFastGradientClipping`` adds the noise and takes the step, as for ghost clipping.
Which kernel a layer uses is timed once per layer and example shape, and kept: they compute the
same numbers. Every trainable parameter must sit in a supported layer (``nn.Linear``,
``nn.Conv1d``, ``nn.Conv2d`` with ``groups=1``, zero padding), each run once per forward pass.
"""

from __future__ import annotations

import copy
import logging
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fedvault.errors import FedvaultError

log = logging.getLogger("fedvault")

SUPPORTED_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d)
#: Elements an intermediate of a broadcast kernel may hold (16 MiB of float32).
BROADCAST_LIMIT = 1 << 22
#: The clipped gradient sums ``(weight, bias)`` of one layer, given the clipping factors.
Finish = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
#: A layer's squared per-example norms, and how it finishes its clipped gradient sums.
Kernel = Callable[[nn.Module, torch.Tensor, torch.Tensor], tuple[torch.Tensor, Finish]]


class UnsupportedLayerError(FedvaultError, ValueError):
    """The model has a trainable parameter book-keeping clipping cannot clip."""


@dataclass
class _Record:
    layer: nn.Module
    activation: torch.Tensor
    output: torch.Tensor


def _set_grads(layer: nn.Module, weight: torch.Tensor, bias: torch.Tensor) -> None:
    for param, grad in ((layer.weight, weight), (layer.bias, bias)):
        if param is None or not param.requires_grad:
            continue
        if param.grad is not None:
            raise UnsupportedLayerError(
                "book-keeping clipping: a gradient is already present; zero the gradients before every "
                "backward pass (accumulation across passes is Opacus' optimizer's job)"
            )
        param.grad = grad.to(param.dtype).view_as(param)


def _bias_norms(layer: nn.Module, g_sum: torch.Tensor) -> torch.Tensor:
    """Squared norms of the per-example bias gradients ``g_sum`` (B, out), zero without a trainable bias."""
    if layer.bias is None or not layer.bias.requires_grad:
        return g_sum.new_zeros(len(g_sum))
    return g_sum.pow(2).sum(1)


# ---- Linear ------------------------------------------------------------------------------


def _linear_outer(layer: nn.Module, a: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, Finish]:
    norms = a.pow(2).sum(1) * g.pow(2).sum(1) + _bias_norms(layer, g)

    def finish(c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cg = g * c[:, None]
        return cg.t() @ a, cg.sum(0)

    return norms, finish


def _linear_gram(layer: nn.Module, a: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, Finish]:
    a3, g3 = a.flatten(1, -2), g.flatten(1, -2)  # (B, T, d_in), (B, T, d_out)
    norms = (torch.bmm(a3, a3.transpose(1, 2)) * torch.bmm(g3, g3.transpose(1, 2))).sum((1, 2))
    g_sum = g3.sum(1)
    norms = norms + _bias_norms(layer, g_sum)

    def finish(c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cg = g3 * c[:, None, None]
        return cg.flatten(0, 1).t() @ a3.flatten(0, 1), c @ g_sum

    return norms, finish


def _linear_einsum(layer: nn.Module, a: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, Finish]:
    a3, g3 = a.flatten(1, -2), g.flatten(1, -2)
    per_example = torch.bmm(g3.transpose(1, 2), a3)  # (B, d_out, d_in)
    g_sum = g3.sum(1)
    norms = per_example.flatten(1).pow(2).sum(1) + _bias_norms(layer, g_sum)

    def finish(c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return c @ per_example.flatten(1), c @ g_sum

    return norms, finish


# ---- Conv1d / Conv2d ---------------------------------------------------------------------


def _dims(layer: nn.Module) -> int:
    return 1 if isinstance(layer, nn.Conv1d) else 2


def _padded(layer: Any, a: torch.Tensor) -> torch.Tensor:
    pads = [p for p in reversed(layer.padding) for _ in range(2)]
    return F.pad(a, pads) if any(pads) else a


def _windows(layer: Any, a: torch.Tensor) -> torch.Tensor:
    """A strided view (no copy) of the padded input: ``(B, C, *out_positions, *kernel)``."""
    view = _padded(layer, a)
    dims = _dims(layer)
    for axis in range(dims):
        k, s, d = layer.kernel_size[axis], layer.stride[axis], layer.dilation[axis]
        view = view.unfold(2 + axis, d * (k - 1) + 1, s)
    if any(d > 1 for d in layer.dilation):
        every: tuple[Any, ...] = (..., *(slice(None, None, d) for d in layer.dilation))
        view = view[every]
    return view


def _conv_bias(layer: nn.Module, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    g_sum = g.flatten(2).sum(2)  # (B, out)
    return g_sum, _bias_norms(layer, g_sum)


def _conv_einsum(layer: nn.Module, a: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, Finish]:
    spec = "bol,bcli->boci" if _dims(layer) == 1 else "bohw,bchwij->bocij"
    per_example = torch.einsum(spec, g, _windows(layer, a)).flatten(1)  # (B, weight.numel())
    g_sum, bias_norms = _conv_bias(layer, g)

    def finish(c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return c @ per_example, c @ g_sum

    return per_example.pow(2).sum(1) + bias_norms, finish


def _conv_grouped(layer: Any, a: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, Finish]:
    batch, out_channels, dims = len(a), g.shape[1], _dims(layer)
    conv = F.conv1d if dims == 1 else F.conv2d
    # Batch as channels: example b's input (as C_in images) convolved with its own output gradients.
    weights = g.reshape(batch * out_channels, 1, *g.shape[2:])
    grads = conv(_padded(layer, a).transpose(0, 1), weights, groups=batch, dilation=layer.stride, stride=layer.dilation)
    kernel: tuple[Any, ...] = (..., *(slice(0, k) for k in layer.kernel_size))
    grads = grads[kernel]  # (C_in, B*out, *kernel)
    per_example = grads.reshape(grads.shape[0], batch, out_channels, -1)  # (C_in, B, out, k)
    g_sum, bias_norms = _conv_bias(layer, g)

    def finish(c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.einsum("b,cbok->ock", c, per_example), c @ g_sum

    return per_example.pow(2).sum((0, 2, 3)) + bias_norms, finish


def _conv_rows(layer: Any, a: torch.Tensor) -> torch.Tensor:
    """The input windows as rows ``(B, L, C*k)``, ordered as ``weight.view(out, -1)``'s columns."""
    dims, windows = _dims(layer), _windows(layer, a)  # (B, C, *positions, *kernel)
    order = (0, *range(2, 2 + dims), 1, *range(2 + dims, 2 + 2 * dims))
    positions = math.prod(windows.shape[2 : 2 + dims])
    return windows.permute(order).reshape(len(a), positions, -1)


def _gram(x: torch.Tensor, broadcast: bool) -> torch.Tensor:
    """``x x^T`` per example for ``x`` of shape (B, L, d)."""
    return (x[:, :, None, :] * x[:, None, :, :]).sum(-1) if broadcast else torch.bmm(x, x.transpose(1, 2))


def _conv_gram_with(broadcast: bool) -> Kernel:
    def kernel(layer: Any, a: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, Finish]:
        rows, g_rows = _conv_rows(layer, a), g.flatten(2).transpose(1, 2)  # (B, L, C*k), (B, L, out)
        norms = (_gram(rows, broadcast) * _gram(g_rows, broadcast)).sum((1, 2))
        g_sum, bias_norms = _conv_bias(layer, g)

        def finish(c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            weighted = (g_rows * c[:, None, None]).flatten(0, 1)  # (B*L, out)
            return weighted.t() @ rows.flatten(0, 1), c @ g_sum

        return norms + bias_norms, finish

    kernel.__name__ = "_conv_gram_broadcast" if broadcast else "_conv_gram"
    return kernel


_conv_gram = _conv_gram_with(broadcast=False)
_conv_gram_broadcast = _conv_gram_with(broadcast=True)


def _conv_broadcast(layer: Any, a: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, Finish]:
    rows, g_flat = _conv_rows(layer, a), g.flatten(2)  # (B, L, C*k), (B, out, L)
    per_example = (g_flat[:, :, None, :] * rows.transpose(1, 2)[:, None, :, :]).sum(-1).flatten(1)
    g_sum, bias_norms = _conv_bias(layer, g)

    def finish(c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return c @ per_example, c @ g_sum

    return per_example.pow(2).sum(1) + bias_norms, finish


def _candidates(layer: Any, activation: torch.Tensor, g: torch.Tensor) -> tuple[Kernel, ...]:
    """The kernels worth timing for this layer and shape; the broadcast ones only while their
    intermediate tensors stay small."""
    if isinstance(layer, nn.Linear):
        return (_linear_outer,) if activation.dim() == 2 else (_linear_gram, _linear_einsum)
    batch, out_channels, positions = len(g), g.shape[1], g[0, 0].numel()
    window = layer.weight[0].numel()
    kernels = [_conv_einsum, _conv_grouped, _conv_gram]
    if batch * positions * positions * max(window, out_channels) <= BROADCAST_LIMIT:
        kernels.append(_conv_gram_broadcast)
    if batch * out_channels * window * positions <= BROADCAST_LIMIT:
        kernels.append(_conv_broadcast)
    return tuple(kernels)


def _check_layer(name: str, layer: Any) -> None:
    if isinstance(layer, nn.Linear):
        return
    if layer.groups != 1 or layer.padding_mode != "zeros" or isinstance(layer.padding, str):
        raise UnsupportedLayerError(
            f"book-keeping clipping: layer {name!r} ({layer}) needs groups=1, padding_mode='zeros' and integer padding"
        )


class BookKeepingModule(nn.Module):
    """``module`` with forward hooks that keep each supported layer's input and output.

    :meth:`clipped_backward` turns per-example losses into ``p.grad = sum_i c_i grad_i``. The
    wrapped module's state-dict keys gain the ``_module.`` prefix, as Opacus' wrappers' do.
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self._module = module
        self._records: list[_Record] = []
        self._kernels: dict[tuple[int, torch.Size], Kernel] = {}
        layers: list[nn.Module] = []
        for name, layer in module.named_modules():
            own = [p for p in layer.parameters(recurse=False) if p.requires_grad]
            if not own:
                continue
            if not isinstance(layer, SUPPORTED_LAYERS):
                raise UnsupportedLayerError(
                    f"book-keeping clipping: layer {name!r} ({type(layer).__name__}) has trainable parameters "
                    f"and is not one of {', '.join(t.__name__ for t in SUPPORTED_LAYERS)}"
                )
            _check_layer(name, layer)
            layers.append(layer)
        self._layers = layers
        self._handles = [layer.register_forward_hook(self._keep) for layer in layers]
        self._handles.append(module.register_forward_pre_hook(self._forget))

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self._module(*args, **kwargs)

    def _forget(self, *_: Any) -> None:
        self._records = []

    def _keep(self, layer: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        if not (torch.is_grad_enabled() and layer.training):
            return
        if any(record.layer is layer for record in self._records):
            raise UnsupportedLayerError(
                f"book-keeping clipping: layer {layer} ran twice in one forward pass (shared weights are not supported)"
            )
        self._records.append(_Record(layer, inputs[0].detach(), output))

    def clipped_backward(self, losses: torch.Tensor, max_grad_norm: float, scale: Any = 1.0) -> None:
        """One backward pass of ``scale * losses.sum()`` (``losses``: one per example); writes each
        supported parameter's ``grad`` as ``scale * sum_i c_i grad_i`` with ``c_i`` clipping example
        ``i``'s whole gradient to ``max_grad_norm``."""
        records, self._records = self._records, []
        if not records:
            raise UnsupportedLayerError("book-keeping clipping: backward without a training-mode forward pass")
        batch = len(losses)
        outputs = [record.output for record in records]
        try:
            grads = torch.autograd.grad(losses.sum() * scale, outputs)
        except RuntimeError as exc:
            if "not have been used in the graph" not in str(exc):
                raise
            raise UnsupportedLayerError(
                "book-keeping clipping: the loss does not depend on every supported layer of the last "
                "training-mode forward pass (compute the loss from that forward's output, and no other in between)"
            ) from None
        norms = torch.zeros(batch, device=losses.device, dtype=torch.float32)
        finishers = []
        for record, g in zip(records, grads, strict=True):
            if len(record.activation) != batch:
                raise UnsupportedLayerError(
                    f"book-keeping clipping: layer {record.layer} saw {len(record.activation)} rows for "
                    f"{batch} examples (inputs must be batch-first)"
                )
            kernel = self._kernel(record, g)
            layer_norms, finish = kernel(record.layer, record.activation, g)
            norms += layer_norms.float()
            finishers.append(finish)
        true_norms = norms.sqrt() / float(scale)
        factors = (max_grad_norm / (true_norms + 1e-6)).clamp(max=1.0).to(grads[0].dtype)
        for record, finish in zip(records, finishers, strict=True):
            _set_grads(record.layer, *finish(factors))
        ran = {id(record.layer) for record in records}
        for layer in self._layers:  # a layer this forward skipped has a zero gradient for every example
            if id(layer) not in ran:
                weight: Any = layer.weight
                _set_grads(layer, torch.zeros_like(weight), weight.new_zeros(weight.shape[0]))

    def _kernel(self, record: _Record, g: torch.Tensor) -> Kernel:
        """The fastest of the layer's kernels for this example shape (timed the first time it is seen)."""
        key = (self._layers.index(record.layer), record.activation.shape[1:])  # Poisson batches vary in size
        if key not in self._kernels:
            candidates = _candidates(record.layer, record.activation, g)
            self._kernels[key] = _fastest(candidates, record, g) if len(candidates) > 1 else candidates[0]
            log.debug(
                "book-keeping clipping: %s on %s uses %s",
                record.layer,
                tuple(record.activation.shape),
                self._kernels[key].__name__,
            )
        return self._kernels[key]

    def cleanup(self) -> None:
        """Remove the hooks (as Opacus' ``GradSampleModule.cleanup``)."""
        for handle in self._handles:
            handle.remove()
        self._handles, self._records = [], []


def _fastest(candidates: tuple[Kernel, ...], record: _Record, g: torch.Tensor, reps: int = 5) -> Kernel:
    """The kernel with the lowest median time for norms and clipped sums, each run once to warm up and
    then ``reps`` times interleaved with the others (so machine load hits them alike); nothing is
    written to the parameters."""
    seconds: dict[Kernel, list[float]] = {kernel: [] for kernel in candidates}
    for rep in range(reps + 1):
        for kernel in candidates:
            start = time.perf_counter()
            norms, finish = kernel(record.layer, record.activation, g)
            weight, _ = finish(norms)
            weight.sum().item()  # synchronises on CUDA
            if rep:
                seconds[kernel].append(time.perf_counter() - start)
    return min(candidates, key=lambda kernel: statistics.median(seconds[kernel]))


class BookKeepingLoss:
    """The criterion the task's loop calls under book-keeping clipping: it returns a loss whose
    ``backward()`` clips per example in one pass (like Opacus' ghost-clipping loss)."""

    def __init__(self, module: BookKeepingModule, criterion: Any, max_grad_norm: float) -> None:
        self.module, self.max_grad_norm = module, max_grad_norm
        self.reduction = criterion.reduction
        self.per_example = copy.deepcopy(criterion)
        self.per_example.reduction = "none"

    def __call__(self, output: torch.Tensor, target: torch.Tensor) -> ClippedLoss:
        losses = self.per_example(output, target)
        if losses.dim() > 1:
            losses = losses.flatten(1).mean(1)
        return ClippedLoss(self, losses)


class ClippedLoss:
    """A batch's per-example losses; ``item()`` reduces them as the criterion does; ``loss * s``
    (a GradScaler's scaling) carries the factor into the backward pass."""

    def __init__(self, criterion: BookKeepingLoss, losses: torch.Tensor, scale: Any = 1.0) -> None:
        self.criterion, self.losses, self.scale = criterion, losses, scale

    def detach(self) -> torch.Tensor:
        reduced = self.losses.mean() if self.criterion.reduction == "mean" else self.losses.sum()
        return reduced.detach()

    def item(self) -> float:
        return float(self.detach().item())

    def __mul__(self, factor: Any) -> ClippedLoss:
        return ClippedLoss(self.criterion, self.losses, self.scale * factor)

    __rmul__ = __mul__

    def backward(self) -> None:
        self.criterion.module.clipped_backward(self.losses, self.criterion.max_grad_norm, self.scale)
