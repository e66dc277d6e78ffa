"""capturable=True: a param group's hyperparameters on the device.

A step captured in a CUDA graph replays its kernels with the arguments of the capture, so every
value a replay must see change lives in device memory: the step counts and the AMP scalars (on
the GPU backends always), and for a capturable group its lr, betas, eps and weight_decay, which
the CUDA kernels read from one float64 block per group (csrc/include/onepass/device_hyper.h
lays it out).

- A value given as a float (or a CPU tensor) moves into the block, and the group's entry becomes
  a 0-d view of it: an in-place change, an LR scheduler's or ``group["weight_decay"].fill_(0.05)``,
  reaches the next launch and every replay.
- A value given as a tensor on the params' device stays the user's: every step copies it into
  the block on the device (a copy a captured graph replays), so in-place changes to it reach
  replays too.
- A value assigned anew (a float, another tensor) is checked and written into the block at the
  next eager step. Replays run no Python, so they see only in-place changes; a value assigned
  anew just before a capture is refused there (the graph would replay the write).

Structural hyperparameters (SGD's momentum and nesterov, FAdam's p and clip, amsgrad, maximize,
the decay mode) stay on the host and are read when a step is captured.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from onepass.algorithms.base import DEVICE_BLOCK, decay_scale

if TYPE_CHECKING:
    from onepass.algorithms.base import AlgorithmSpec, Group

#: The attribute that marks a 0-d view of a block in a param group (it survives deepcopy).
VIEW_MARK = "_onepass_block_view"


def stream_is_capturing() -> bool:
    """Whether the current CUDA stream is capturing a graph. False while torch.compile traces a
    step: dynamo cannot trace the query (it returns no tensor), and a trace is no capture."""
    if torch.compiler.is_compiling() or not torch.cuda.is_available():
        return False
    return torch.cuda.is_current_stream_capturing()


def is_block_view(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and getattr(value, VIEW_MARK, False)


def host_floats(value: Any) -> Any:
    """A group entry with its block views as Python floats (state_dicts, non-capturable plans)."""
    if isinstance(value, tuple | list) and any(is_block_view(v) for v in value):
        return tuple(float(v) if is_block_view(v) else v for v in value)
    return float(value) if is_block_view(value) else value


class DeviceHyper:
    """One capturable group's block of hyperparameters on ``device``, and the host copy of its
    values that structural decisions and checks read (never the kernels)."""

    def __init__(self, spec: AlgorithmSpec, group: dict[str, Any], device: torch.device) -> None:
        self.check_group = spec.check_group
        self.decay_in_block = spec.decay_in_block
        # (group key, index in the key's tuple or None), in block order; decay_scale last.
        self.entries = [
            (key, i) for key in spec.device_hyper for i in ((0, 1) if key == "betas" else (None,))
        ]
        self.block = torch.zeros(
            len(self.entries) + int(self.decay_in_block), dtype=torch.float64, device=device
        )
        self.views = [self.block[at] for at in range(len(self.entries))]  # made once: stable ids
        for view in self.views:
            setattr(view, VIEW_MARK, True)
        self.seen: list[Any] = [None] * len(self.entries)  # what the group held at each entry
        self.host: list[float] = [0.0] * len(self.entries)
        self.host_group: dict[str, Any] = {}  # the host values as group entries (betas a tuple)
        self.linked: dict[int, torch.Tensor] = {}  # the user's device tensors, copied each step
        self.captured = False  # a graph replays the copies of the links it captured
        self._update(group, self._changes(group))  # every entry is new
        self.decay = decay_scale(group) if self.decay_in_block else 0.0
        if self.decay_in_block:
            self.block[-1].fill_(self.decay)

    def _value(self, group: Group, at: int) -> Any:
        key, i = self.entries[at]
        return group[key] if i is None else group[key][i]

    def _changes(self, group: Group) -> list[int]:
        entries = range(len(self.entries))
        return [at for at in entries if self._value(group, at) is not self.seen[at]]

    def _links(self, value: Any) -> bool:
        """Whether a new value is a tensor to copy into the block at every step: one on the
        block's device that is not a view of this block (another group's view is linked too)."""
        if not isinstance(value, torch.Tensor) or value.device != self.block.device:
            return False
        ours = value.untyped_storage().data_ptr() == self.block.untyped_storage().data_ptr()
        return value.numel() == 1 and not ours

    def _update(self, group: dict[str, Any], changed: list[int]) -> None:
        """Checks the group's new values (a refused one raises before anything is written),
        writes them into the block and puts the views back."""
        values = {at: self._value(group, at) for at in changed}
        links = {at for at, value in values.items() if self._links(value)}
        if self.captured and (links | (set(self.linked) & set(values))):
            raise RuntimeError(
                "onepass: a captured CUDA graph copies the capturable group's linked tensors "
                "into its hyperparameters at every replay; change them in place, or capture "
                "again after replacing them"
            )
        host = list(self.host)
        for at, value in values.items():  # a device tensor is read once, here, to be checked
            host[at] = float(value.item() if isinstance(value, torch.Tensor) else value)
        self.check_group({**group, **self._host_group(host)})
        for at in values:
            self.linked.pop(at, None)
            if at in links:
                self.linked[at] = values[at]
            else:  # from the value read above: an alias of another entry reads as it was
                self.block[at].fill_(host[at])
        self.host = host
        self.host_group = self._host_group(host)
        for key in dict.fromkeys(self.entries[at][0] for at in changed):
            parts = [
                self.linked.get(at, self.views[at])
                for at, (k, _) in enumerate(self.entries)
                if k == key
            ]
            group[key] = tuple(parts) if key == "betas" else parts[0]
        self.seen = [self._value(group, at) for at in range(len(self.entries))]

    def _host_group(self, host: list[float]) -> dict[str, Any]:
        group: dict[str, Any] = {}
        for (key, i), value in zip(self.entries, host, strict=True):
            group[key] = value if i is None else (*group.get(key, ()), value)
        return group

    def launch_group(self, group: dict[str, Any]) -> Group:
        """The group as the launchers read it: ``lr`` is the block, the other device values are
        their host copies. Values assigned anew since the last step are checked and written."""
        changed = self._changes(group)
        decay = decay_scale(group) if self.decay_in_block else 0.0
        capturing = self.block.is_cuda and stream_is_capturing()
        if (changed or decay != self.decay) and capturing:
            raise RuntimeError(
                "onepass: a capturable group's hyperparameters were assigned anew since the last "
                "step; step once outside the capture, or change them in place"
            )
        if changed:
            self._update(group, changed)
        if decay != self.decay:  # the decay mode (or initial_lr) changed
            self.block[-1].fill_(decay)
            self.decay = decay
        for at, tensor in self.linked.items():
            self.block[at].copy_(tensor.reshape(()))
        self.captured = self.captured or capturing
        return {**group, **self.host_group, "lr": self.block, DEVICE_BLOCK: True}
