"""capturable=True: a param group's hyperparameters on the device.

A step captured in a CUDA graph replays its kernels with the arguments of the capture, so every
value a replay must see change lives in device memory: the step counts and the AMP scalars (on
the GPU backends always), and for a capturable group its lr, betas, eps and weight_decay, which
the CUDA kernels read from one float64 block per group (csrc/include/onepass/device_hyper.h
lays it out). The group's own entries become 0-d views into that block, so an in-place change,
an LR scheduler's or ``group["weight_decay"].fill_(0.05)``, reaches the next launch and every
replay. A value assigned anew (a float, another tensor) is checked and written into the block at
the next eager step, and the view put back.

Structural hyperparameters (SGD's momentum and nesterov, FAdam's p and clip, amsgrad, maximize,
the decay mode) stay on the host and are read when a step is captured.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from onepass.algorithms.base import DEVICE_BLOCK, decay_scale, scalar

if TYPE_CHECKING:
    from onepass.algorithms.base import AlgorithmSpec, Group


def _entries(keys: tuple[str, ...]) -> list[tuple[str, int | None]]:
    """(group key, index in the key's tuple or None) for each value of the block but decay_scale."""
    return [(key, i) for key in keys for i in ((0, 1) if key == "betas" else (None,))]


def _host(value: Any) -> float:
    return scalar(value) if isinstance(value, torch.Tensor) else float(value)


class DeviceHyper:
    """One capturable group's block of hyperparameters on ``device``, and the host copy of its
    values that structural decisions and checks read (never the kernels)."""

    def __init__(self, spec: AlgorithmSpec, group: Group, device: torch.device) -> None:
        self.keys = spec.device_hyper
        self.check_group = spec.check_group
        self.decay_in_block = spec.decay_in_block
        self.host: dict[str, Any] = {key: self._host_value(group[key]) for key in self.keys}
        values = [self._read(self.host, key, i) for key, i in _entries(self.keys)]
        if self.decay_in_block:
            values.append(decay_scale(group))
        # Built at the first step of the group (or after a rebuild), never under capture.
        self.block = torch.tensor(values, dtype=torch.float64, device=device)
        self.decay = values[-1] if self.decay_in_block else 0.0
        self.views: dict[str, Any] = {}
        self._install(group)

    @staticmethod
    def _host_value(value: Any) -> Any:
        if isinstance(value, tuple | list):
            return tuple(_host(v) for v in value)
        return _host(value)

    @staticmethod
    def _read(values: dict[str, Any], key: str, i: int | None) -> float:
        return float(values[key] if i is None else values[key][i])

    def _install(self, group: Group) -> None:
        """The group's entries become views of the block (betas: a tuple of two)."""
        at = 0
        for key in self.keys:
            if key == "betas":
                group[key] = (self.block[at], self.block[at + 1])
                at += 2
            else:
                group[key] = self.block[at]
                at += 1
            self.views[key] = group[key]

    def is_view(self, value: Any) -> bool:
        """Whether ``value`` is one of the block's views in the group (state_dict saves floats)."""
        return any(value is v for v in self.views.values())

    def launch_group(self, group: Group) -> Group:
        """The group as the launchers read it: ``lr`` is the block, the other device values are
        their host copies. Entries assigned anew since the last step are checked (a refused value
        leaves the block and the group's views as they were) and written into the block."""
        changed = {key: group[key] for key in self.keys if group[key] is not self.views[key]}
        if changed:
            host = {**self.host, **{k: self._host_value(v) for k, v in changed.items()}}
            self.check_group({**group, **host})
            for at, (key, i) in enumerate(_entries(self.keys)):
                if key not in changed:
                    continue
                value = changed[key] if i is None else changed[key][i]
                if isinstance(value, torch.Tensor):
                    self.block[at].copy_(value.reshape(()))
                else:
                    self.block[at].fill_(float(value))
            self.host = host
            self._install(group)
        if self.decay_in_block:  # the decay mode (or initial_lr) may change between steps
            decay = decay_scale(group)
            if decay != self.decay:
                self.block[-1].fill_(decay)
                self.decay = decay
        return {**group, **self.host, "lr": self.block, DEVICE_BLOCK: True}


def host_floats(value: Any) -> Any:
    """A block view (or a tuple of them) as Python floats, for a state_dict."""
    if isinstance(value, tuple):
        return tuple(float(v) for v in value)
    return float(value)
