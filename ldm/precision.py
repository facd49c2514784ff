"""Mixed-precision and speed policy for the UNet/VAE: channels-last, torch.compile, CUDA-graph sampling steps.

The numeric policy itself lives in the layers: weights and activations may be bf16/fp16, while GroupNorm
statistics (`ldm.layers.GroupNorm32`, fused kernel or reference), GEGLU (`ldm.kernels.geglu`) and the
attention softmax with QKᵀ (`ldm.attention`, every backend) are computed in fp32 and cast back, which is what
SD 2.1 needs to run in fp16 without overflowing. `check_precision_policy` asserts it on a built model.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import nn

from ldm.layers import GroupNorm32

__all__ = ["DTYPES", "CudaGraphStep", "check_precision_policy", "maybe_compile", "to_channels_last"]

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}  # DTYPE= / PRECISION= names

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def to_channels_last(model: nn.Module) -> nn.Module:
    """Store every 4-D parameter/buffer (conv weights) in channels-last (NHWC) order, in place; returns model.

    CUDA: cuDNN then runs NHWC convolutions, the tensor-core layout for fp16/bf16, and conv outputs stay
    channels-last. The Triton GroupNorm kernel reads NCHW, so it makes one contiguous copy per norm; measure
    before enabling it together with ONEWORD_KERNELS=triton/auto. CPU: oneDNN has NHWC convolutions too;
    results are the same up to summation order. State-dict keys, shapes and values do not change.
    """
    return model.to(memory_format=torch.channels_last)


def maybe_compile(module: nn.Module, enabled: bool = False, **compile_kwargs) -> nn.Module:
    """torch.compile `module` in place (`nn.Module.compile`, so the object and its state-dict keys stay) if enabled.

    Off by default: returns `module` untouched. CUDA: Inductor generates Triton code; Dynamo either traces our
    own Triton kernels (ldm.kernels) as user kernels or breaks the graph around them — the result is the same;
    with ONEWORD_KERNELS=math Inductor can fuse GroupNorm+SiLU itself. Under "auto", a compiled graph uses a
    Triton kernel only for configurations whose warm-up already passed in an eager call (`ldm.kernels.routing`:
    a compile failure inside a graph could not fall back); run one eager call first to get them. CPU: Inductor
    emits C++/OpenMP and needs a working C++ compiler. The first call per input shape compiles (tens of seconds
    on a full UNet). `compile_kwargs` go to torch.compile (e.g. mode="max-autotune", backend="eager" for a dry run).
    """
    if not enabled:
        return module
    log.info("torch.compile(%s, %s)", type(module).__name__, compile_kwargs or "defaults")
    module.compile(**compile_kwargs)
    return module


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and a.device == b.device


class CudaGraphStep:
    """One sampling step `model_fn(x, t)` captured once as a CUDA graph and replayed (fixed shape, inference).

    CUDA (`example_x` on a CUDA device, `enabled`): runs `warmup` eager calls on a side stream (Triton
    kernels compile there), captures one call on static input buffers, then each call copies x and t into
    them, replays the graph and returns a clone of the output (samplers such as PLMS keep earlier outputs).
    Everything `model_fn` closes over (weights, the prompt context) is read from the same memory at every
    replay, so it must not be replaced between steps. Inputs of another shape/dtype/device, or a call that
    needs gradients, run `model_fn` eagerly. CPU or other devices: every call is plain `model_fn(x, t)`.
    """

    def __init__(
        self,
        model_fn: ModelFn,
        example_x: torch.Tensor,
        example_t: torch.Tensor,
        *,
        warmup: int = 2,
        enabled: bool = True,
    ) -> None:
        self.model_fn = model_fn
        self.graph: torch.cuda.CUDAGraph | None = None
        self.replays = 0
        if not enabled or example_x.device.type != "cuda":
            log.debug(
                "CudaGraphStep: %s; calling model_fn eagerly",
                "disabled" if not enabled else f"device {example_x.device.type} has no CUDA graphs",
            )
            return
        if not isinstance(example_t, torch.Tensor) or example_t.device != example_x.device:
            raise ValueError(
                "CudaGraphStep needs example_t as a tensor on the same device as example_x "
                "(a Python number would be frozen into the graph)"
            )
        self.static_x = example_x.detach().clone()
        self.static_t = example_t.detach().clone()
        with torch.no_grad():
            side = torch.cuda.Stream(device=example_x.device)
            side.wait_stream(torch.cuda.current_stream(example_x.device))
            with torch.cuda.stream(side):
                for _ in range(warmup):
                    model_fn(self.static_x, self.static_t)
            torch.cuda.current_stream(example_x.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self.static_out = model_fn(self.static_x, self.static_t)
        self.graph = graph
        log.debug("CudaGraphStep: captured model_fn for x %s %s", tuple(example_x.shape), example_x.dtype)

    @property
    def captured(self) -> bool:
        """True where calls replay a CUDA graph (CUDA only)."""
        return self.graph is not None

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.graph is None:
            return self.model_fn(x, t)
        if not (isinstance(t, torch.Tensor) and _same(x, self.static_x) and _same(t, self.static_t)) or (
            torch.is_grad_enabled() and x.requires_grad
        ):
            log.debug(
                "CudaGraphStep: x %s / t %s differ from the captured inputs; running eagerly",
                tuple(x.shape),
                tuple(t.shape) if isinstance(t, torch.Tensor) else t,
            )
            return self.model_fn(x, t)
        self.static_x.copy_(x)
        self.static_t.copy_(t)
        self.graph.replay()
        self.replays += 1
        return self.static_out.clone()


def check_precision_policy(model: nn.Module) -> list[str]:
    """Names of GroupNorm modules in `model` that would not compute their statistics in fp32 (empty: policy holds).

    Device-independent: every norm must be `ldm.layers.GroupNorm32` (fused kernel or fp32 reference), whatever
    the weights' dtype.
    """
    return [name for name, m in model.named_modules() if isinstance(m, nn.GroupNorm) and not isinstance(m, GroupNorm32)]
