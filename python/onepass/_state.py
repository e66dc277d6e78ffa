"""``optimizer.state`` that notices when it is changed from outside.

The engine keeps optimizer state in flat buffers and puts views of them in ``optimizer.state``.
torch.optim code (and users) sometimes reset state by replacing it: ``state.clear()``,
``del state[p]``, ``state[p]["exp_avg"] = ...``, or ``optimizer.state = defaultdict(dict)``.
Every such write marks the state dirty, and the next step rebuilds its buckets from what
``optimizer.state`` then holds, exactly as torch.optim would start from it. Reads never mark it
(``state[p]`` of a param without state returns a new empty entry, as a defaultdict does).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Any


class StateEntry(dict):
    """One param's state: a dict that marks its owner dirty on every write."""

    def __init__(self, owner: TrackedState, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._owner = owner

    def _touch(self) -> None:
        self._owner.dirty = True

    def __setitem__(self, key: Any, value: Any) -> None:
        super().__setitem__(key, value)
        self._touch()

    def __delitem__(self, key: Any) -> None:
        super().__delitem__(key)
        self._touch()

    def pop(self, *args: Any) -> Any:
        self._touch()
        return super().pop(*args)

    def popitem(self) -> tuple[Any, Any]:
        self._touch()
        return super().popitem()

    def clear(self) -> None:
        super().clear()
        self._touch()

    def update(self, *args: Any, **kwargs: Any) -> None:
        super().update(*args, **kwargs)
        self._touch()

    def setdefault(self, key: Any, default: Any = None) -> Any:
        if key not in self:
            self._touch()
        return super().setdefault(key, default)

    def __reduce__(self) -> Any:
        return (dict, (dict(self),))  # pickles and deep-copies as a plain dict


class TrackedState(defaultdict):
    """``optimizer.state``: param -> StateEntry, with a ``dirty`` flag set by outside writes."""

    def __init__(self, items: Mapping[Any, Any] | Iterable[tuple[Any, Any]] = ()) -> None:
        super().__init__(dict)
        self.dirty = False
        for key, value in dict(items).items():
            self.put(key, value)
        self.dirty = bool(self)

    def put(self, key: Any, entry: Mapping[str, Any]) -> None:
        """The engine's own write: stores an entry without marking the state dirty."""
        dict.__setitem__(self, key, StateEntry(self, entry))

    def __missing__(self, key: Any) -> StateEntry:
        entry = StateEntry(self)
        dict.__setitem__(self, key, entry)
        return entry

    def __setitem__(self, key: Any, value: Any) -> None:
        dict.__setitem__(self, key, StateEntry(self, value))
        self.dirty = True

    def __delitem__(self, key: Any) -> None:
        super().__delitem__(key)
        self.dirty = True

    def pop(self, *args: Any) -> Any:
        self.dirty = True
        return super().pop(*args)

    def popitem(self) -> tuple[Any, Any]:
        self.dirty = True
        return super().popitem()

    def clear(self) -> None:
        super().clear()
        self.dirty = True

    def update(self, *args: Any, **kwargs: Any) -> None:
        for key, value in dict(*args, **kwargs).items():
            self[key] = value

    def setdefault(self, key: Any, default: Any = None) -> Any:
        if key not in self:
            self[key] = {} if default is None else default
        return self[key]

    def __reduce__(self) -> Any:
        # pickles and deep-copies as torch.optim's own defaultdict(dict) of plain dicts
        return (_plain_state, (list((k, dict(v)) for k, v in self.items()),))


def _plain_state(items: list[tuple[Any, dict[str, Any]]]) -> defaultdict:
    state: defaultdict = defaultdict(dict)
    state.update(items)
    return state
