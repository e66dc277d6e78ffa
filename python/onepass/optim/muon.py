"""onepass.Muon: Muon for the matrices, AdamW for the rest, in one optimizer."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from onepass.algorithms.muon import MUON
from onepass.optim.base import FusedOptimizer, Options

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from onepass.algorithms.base import AlgorithmSpec

DEFAULT_NS_COEFFICIENTS = (3.4445, -4.775, 2.0315)


class Muon(FusedOptimizer):
    r"""Muon, MomentUm Orthogonalized by Newton-Schulz (Jordan et al., 2024), with the decoupled
    decay and update scaling of Moonlight (Liu et al., 2025, "Muon is scalable for LLM training").

    The arguments and defaults of ``torch.optim.Muon`` for 2-D params, and its results with
    ``ns_method="standard", ns_dtype=torch.bfloat16`` (the defaults, ``"gram"`` and an
    ``ns_dtype`` chosen per device, run the same iteration with other roundings: see below);
    checkpoints load both ways (state ``momentum_buffer``). For each matrix with a gradient::

        buf = lerp(buf, g, 1 - momentum)
        u = lerp(g, buf, momentum) if nesterov else buf
        O = NS(u)        # ns_steps quintic Newton-Schulz iterations (ns_coefficients) in
                         # ns_dtype on u / max(||u||_F, eps), transposed when rows > cols
        p = p * (1 - lr * weight_decay)
        p = p - lr' * O  # lr' = lr * sqrt(max(1, rows/cols)) ("original", None), or
                         # lr * 0.2 * sqrt(max(rows, cols)) ("match_rms_adamw")

    Beyond torch.optim.Muon:

    - Params that are not matrices (biases, norms), and every param of a group with
      ``use_muon=False`` (embeddings and output heads, as Moonlight trains them), are stepped
      by fused AdamW in the same optimizer: the group's lr and weight_decay, ``adamw_betas``
      (default (0.9, 0.95), Moonlight's) and ``adamw_eps``; state ``step``, ``exp_avg``,
      ``exp_avg_sq``. Each group given is split into its Muon part (``use_muon=True``) and its
      AdamW part, so ``param_groups`` shows both.
    - Conv weights (4-D) are flattened to (out, in * kh * kw) for Newton-Schulz and lr'.
    - ``ns_dtype``: the Newton-Schulz dtype; None picks bfloat16 (torch's choice) on GPUs and on
      CPUs with native bf16 matmuls (AVX512-BF16, AMX), float32 on other CPUs, where bf16
      matmuls are emulated and slower; float64 for float64 params.
    - ``ns_method``: "gram" (default) runs Gram Newton-Schulz (Dao et al., 2026) on matrices
      whose aspect ratio makes it cheaper (above ~1.5 for 5 steps): the same polynomial
      iteration on the small X X^T, restarted after 3 iterations for bf16 stability
      (onepass.algorithms.muon.gram_segments). It equals torch's iteration up to rounding: in
      bf16 within 1.3x of torch's bf16 error on flat spectra and nearer the float64 result on
      decaying or low-rank ones, with a third fewer multiply-adds on 1:3 and 1:4 matrices.
      On CPUs, where matmuls are compute-bound, its symmetric products (X X^T and the m x m
      products of the Gram iteration, m >= ~640, outside torch.compile) multiply only their
      upper block triangle (onepass.algorithms.muon.symmetric_product): 1.57x
      torch.optim.Muon on GPT-2 small's matrices, against 0.97x for "standard".
      "standard" is torch's iteration, operation for operation (the reference backend then
      gives torch.optim.Muon's bits).
    - Same-shape matrices of a bucket are orthogonalised together in batched matmuls (on
      GPUs all of them; on CPUs batches of up to 16 MiB in ``ns_dtype``); the
      momentum pass before and the decay + scaled update after are one fused multi-tensor pass
      each (onepass.algorithms.muon).

    ``backend`` and ``flatten`` are as in :class:`onepass.Adam`; GradScaler steps unscale in the
    momentum pass and skip on inf/nan with no host sync.
    """

    spec: ClassVar[AlgorithmSpec] = MUON
    spec_keys: ClassVar[frozenset[str]] = frozenset({"betas", "eps"})  # its AdamW groups'
    #: Keys a torch.optim.Muon state_dict lacks, filled in when one is loaded.
    torch_keys: ClassVar[Mapping[str, Any]] = {
        "use_muon": True,
        "ns_dtype": None,
        "ns_method": "gram",
        "adamw_betas": (0.9, 0.95),
        "adamw_eps": 1e-8,
        "decay": "decoupled",
    }

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | torch.Tensor = 1e-3,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_coefficients: tuple[float, float, float] = DEFAULT_NS_COEFFICIENTS,
        eps: float = 1e-7,
        ns_steps: int = 5,
        adjust_lr_fn: str | None = None,
        *,
        adamw_betas: tuple[float, float] = (0.9, 0.95),
        adamw_eps: float = 1e-8,
        ns_dtype: torch.dtype | None = None,
        ns_method: str = "gram",
        capturable: bool = False,
        **options: Unpack[Options],
    ) -> None:
        defaults = {
            "lr": lr,
            "weight_decay": weight_decay,
            "momentum": momentum,
            "nesterov": nesterov,
            "ns_coefficients": ns_coefficients,
            "eps": eps,
            "ns_steps": ns_steps,
            "adjust_lr_fn": adjust_lr_fn,
            "use_muon": True,
            "adamw_betas": adamw_betas,
            "adamw_eps": adamw_eps,
            "ns_dtype": ns_dtype,
            "ns_method": ns_method,
            "decay": "decoupled",
            "capturable": capturable,
        }
        super().__init__(params, defaults, options)

    def __setstate__(self, state: dict[str, Any]) -> None:
        # A torch.optim.Muon checkpoint has none of onepass's keys: those keep this optimizer's
        # values (an ns_dtype chosen at construction survives loading torch's state_dict).
        defaults = state.get("defaults", getattr(self, "defaults", {}))
        for group in state.get("param_groups", []):
            for key in self.torch_keys:
                if key in defaults:
                    group.setdefault(key, defaults[key])
        super().__setstate__(state)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Adds the group's matrices as a Muon group and its other params (all of them with
        ``use_muon=False``) as an AdamW group."""
        params = param_group["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        use_muon = bool(param_group.get("use_muon", self.defaults["use_muon"]))
        # A named param, as model.named_parameters() gives it, is a (name, tensor) pair (torch
        # then keeps the names in the group's "param_names").
        tensors = [p[1] if isinstance(p, tuple) and len(p) == 2 else p for p in params]
        is_matrix = [use_muon and isinstance(t, torch.Tensor) and t.dim() >= 2 for t in tensors]
        added = len(self.param_groups)
        try:
            self._add_parts(param_group, params, is_matrix)
        except Exception:
            del self.param_groups[added:]  # a refused group adds neither part
            raise

    def _add_parts(
        self, param_group: dict[str, Any], params: list[Any], is_matrix: list[bool]
    ) -> None:
        for muon_part in (True, False):
            part = [p for p, m in zip(params, is_matrix, strict=True) if m == muon_part]
            if not part and (muon_part or any(is_matrix)):
                continue  # an empty group only where the caller gave one
            group = {**param_group, "params": part, "use_muon": muon_part}
            lr = group.get("lr", self.defaults["lr"])
            if not muon_part and any(is_matrix) and isinstance(lr, torch.Tensor):
                group["lr"] = lr.clone()  # its own: a scheduler updates each group's lr in place
            if not muon_part:  # AdamW's keys, as the ADAM spec reads them
                group["betas"] = group.get("adamw_betas", self.defaults["adamw_betas"])
                group["eps"] = group.get("adamw_eps", self.defaults["adamw_eps"])
                group.setdefault("amsgrad", False)
                group.setdefault("maximize", False)
                group["decay"] = "decoupled"
            super().add_param_group(group)
