"""Calibration and evaluation data: the ``.npz`` format, and how it binds to a model's inputs.

One ``.npz`` archive (``numpy.savez``) holds everything; keys name what an array is for
(docs/compressor.md, "Data files"):

========================  ==============================================================
``calib_x/<input>``        calibration values of model input ``<input>``
``eval_x/<input>``         evaluation values of model input ``<input>``
``const/<input>``          one value fed unchanged to every call (a sample rate, a flag)
``state0/<input>``         the first call's value of a state input (default: zeros)
``eval_y/<output>``        labels for model output ``<output>``, any shape
``eval_y``                 labels for the first scored output
``calib_x``, ``eval_x``,   the single-input format: values of the model's only varying
``x``, ``y``               input (``x`` serves both roles), labels
========================  ==============================================================

Stateless models: the leading axis of each ``*_x`` array is the sample axis, and it is the
model input's batch axis (``[N, 1, 8, 8]`` for an input ``[batch, 1, 8, 8]``); a model with
a fixed batch is fed in chunks of that size. Stateful models (some outputs feed inputs of the
next call, :class:`StatePair`): each ``*_x`` array is ``[sequences, steps, *call shape]``;
calls run step by step, each sequence starting from the initial state.
"""

from __future__ import annotations

import zipfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from .errors import CompressorError
from .runner import Signature, TensorInfo

__all__ = ["MAX_ARRAYS", "MAX_DATA_BYTES", "Binding", "Dataset", "DatasetError", "StatePair",
           "bind", "infer_state_pairs", "load_calls", "load_dataset", "parse_state_pair",
           "read_npz", "save_calls"]

#: Bounds on one data file: arrays in it, and their total size once loaded.
MAX_ARRAYS = 4096
MAX_DATA_BYTES = 4 * 2**30


class DatasetError(CompressorError):
    """A calibration or evaluation data file is missing, unreadable or does not fit the model."""


@dataclass(frozen=True)
class StatePair:
    """An output whose value is the named input's value in the next call (recurrent state)."""

    output: str
    input: str


@dataclass(frozen=True)
class Dataset:
    """Model inputs (and labels) for one role, calibration or evaluation."""

    source: str  # the file, for messages
    inputs: Mapping[str, np.ndarray]  # varying inputs, by model input name ("" = the only one)
    constants: Mapping[str, np.ndarray] = field(default_factory=dict)
    initial_state: Mapping[str, np.ndarray] = field(default_factory=dict)
    labels: Mapping[str, np.ndarray] = field(default_factory=dict)  # "" = first scored output

    def __len__(self) -> int:
        """Samples (stateless) or sequences (stateful)."""
        return len(next(iter(self.inputs.values())))

    def head(self, count: int) -> Dataset:
        """The first ``count`` samples or sequences (labels included)."""
        return replace(self, inputs={k: v[:count] for k, v in self.inputs.items()},
                       labels={k: v[:count] for k, v in self.labels.items()})


def read_npz(path: Path) -> dict[str, np.ndarray]:
    """Every array in an ``.npz`` file, with one-line errors for missing, bad or huge files."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            if len(npz.files) > MAX_ARRAYS:
                raise DatasetError(f"{path}: {len(npz.files)} arrays, more than the "
                                   f"{MAX_ARRAYS} a data file may hold.")
            sizes = {name: npz.zip.getinfo(f"{name}.npy").file_size for name in npz.files}
            if sum(sizes.values()) > MAX_DATA_BYTES:
                raise DatasetError(f"{path}: {sum(sizes.values()) / 2**20:,.0f} MiB of "
                                   f"arrays, more than {MAX_DATA_BYTES / 2**20:,.0f} MiB; use "
                                   "fewer samples (a few hundred are enough to calibrate and "
                                   "judge).")
            return {name: npz[name] for name in npz.files}
    except FileNotFoundError as exc:
        raise DatasetError(f"{path}: no such file; pass an existing .npz data file.") from exc
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
        raise DatasetError(f"{path}: not a readable .npz archive ({exc}); "
                           "write it with numpy.savez.") from exc


def load_dataset(path: Path, role: str) -> Dataset | None:
    """The ``role`` ("calib" or "eval") part of a data file; None when it has none."""
    return dataset_from_arrays(read_npz(path), role, str(path))


def dataset_from_arrays(arrays: Mapping[str, np.ndarray], role: str,
                        source: str) -> Dataset | None:
    """:func:`load_dataset` on arrays already read (pure)."""
    prefix = f"{role}_x/"
    inputs = {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}
    if not inputs:
        single = arrays.get(f"{role}_x", arrays.get("x"))
        if single is None:
            return None
        inputs = {"": single}
    labels: dict[str, np.ndarray] = {}
    if role == "eval":
        labels = {k[len("eval_y/"):]: v for k, v in arrays.items() if k.startswith("eval_y/")}
        legacy = arrays.get("eval_y", arrays.get("y"))
        if legacy is not None:
            labels[""] = legacy
    data = Dataset(source, inputs, _section(arrays, "const/"), _section(arrays, "state0/"),
                   labels)
    lengths = {name or "x": len(v) if v.ndim else 0 for name, v in data.inputs.items()}
    lengths.update({f"labels {name or ''}".strip(): len(v) if v.ndim else 0
                    for name, v in data.labels.items()})
    if len(set(lengths.values())) != 1 or 0 in lengths.values():
        raise DatasetError(f"{source}: the {role} arrays disagree on the number of samples "
                           f"({', '.join(f'{k}: {n}' for k, n in lengths.items())}); every "
                           "input and label array needs the same, non-zero leading length.")
    return data


def _section(arrays: Mapping[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    return {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}


def parse_state_pair(text: str) -> StatePair:
    """``OUTPUT=INPUT`` (the ``--state`` option) as a :class:`StatePair`."""
    output, sep, name = text.partition("=")
    if not sep or not output or not name:
        raise DatasetError(f"--state {text!r}: expected OUTPUT=INPUT, the output whose value "
                           "feeds that input in the next call.")
    return StatePair(output, name)


_STATE_AFFIXES = ("_in", "_out", "in", "out", "_prev", "_next", "_new", "0", "n", "_0", "_n")


def infer_state_pairs(signature: Signature, provided: Iterable[str]) -> tuple[StatePair, ...]:
    """Outputs that look like the next value of an input the data does not provide.

    A pair needs the same dtype and shape, and names that say so: the output's name starts
    with the input's (``state`` -> ``stateN``, ``h`` -> ``hn``) or both are one stem with
    in/out affixes (``h_in``/``h_out``, ``c0``/``cn``).
    """
    given = set(provided)
    pairs = []
    used: set[str] = set()
    for inp in signature.inputs:
        if inp.name in given:
            continue
        for out in signature.outputs:
            if out.name in used or out.dtype != inp.dtype or not _same_shape(out, inp):
                continue
            if out.name.startswith(inp.name) or _stem(out.name) == _stem(inp.name):
                pairs.append(StatePair(out.name, inp.name))
                used.add(out.name)
                break
    return tuple(pairs)


def _stem(name: str) -> str:
    lowered = name.lower()
    for affix in _STATE_AFFIXES:
        if lowered.endswith(affix) and len(lowered) > len(affix):
            return lowered[: -len(affix)]
    return lowered


def _same_shape(a: TensorInfo, b: TensorInfo) -> bool:
    return len(a.shape) == len(b.shape) and all(
        x == y or not isinstance(x, int) or not isinstance(y, int)
        for x, y in zip(a.shape, b.shape, strict=True))


@dataclass(frozen=True)
class Binding:
    """A dataset checked against a model: which input each array feeds, and the state."""

    signature: Signature
    state: tuple[StatePair, ...]
    # The only varying input's real name, for data in the single-input format.
    single: str | None = None

    @property
    def sequences(self) -> bool:
        """Whether calls run as sequences carrying state."""
        return bool(self.state)

    def varying(self, data: Dataset) -> dict[str, np.ndarray]:
        """The data's varying inputs under the model's input names."""
        return {(self.single if name == "" and self.single else name): value
                for name, value in data.inputs.items()}

    def initial_state(self, data: Dataset) -> dict[str, np.ndarray]:
        """Each state input's first value: the data's ``state0/``, else zeros."""
        state = {}
        for pair in self.state:
            info = self.signature.input(pair.input)
            given = data.initial_state.get(pair.input)
            state[pair.input] = given if given is not None else np.zeros(
                [d if isinstance(d, int) and d > 0 else 1 for d in info.shape], info.dtype)
        return state


def bind(signature: Signature, data: Dataset, state: Iterable[StatePair] = (),
         infer_state: bool = True) -> Binding:
    """Check that ``data`` feeds every input of the model exactly once, with fitting shapes
    and dtypes; raises :class:`DatasetError` saying what to change otherwise."""
    names = {i.name for i in signature.inputs}
    outputs = {o.name for o in signature.outputs}
    single = None
    if "" in data.inputs:
        open_inputs = sorted(names - set(data.constants) - set(data.initial_state)
                             - {p.input for p in state})
        open_inputs = [n for n in open_inputs if not infer_state or n not in {
            p.input for p in infer_state_pairs(signature, set(data.constants) | {""})}]
        if len(open_inputs) != 1:
            raise DatasetError(
                f"{data.source}: the data is in the single-input format (x / calib_x / eval_x) "
                f"but the model has {len(signature.inputs)} inputs "
                f"({', '.join(i.name for i in signature.inputs)}); save one array per input "
                "as eval_x/<input name> and calib_x/<input name> (docs/compressor.md).")
        single = open_inputs[0]
    varying = {(single or "") if n == "" else n for n in data.inputs}
    pairs = tuple(state)
    if infer_state and not pairs:
        pairs = infer_state_pairs(signature, varying | set(data.constants))
    for pair in pairs:
        if pair.input not in names or pair.output not in outputs:
            raise DatasetError(f"state {pair.output}={pair.input}: the model has no "
                               f"{'input' if pair.input not in names else 'output'} of that "
                               "name.")
    fed = [*varying, *data.constants, *(p.input for p in pairs)]
    unknown = sorted(set(fed) - names)
    missing = sorted(names - set(fed))
    twice = sorted({n for n in fed if fed.count(n) > 1})
    if unknown or missing or twice:
        problems = ([f"no model input named {', '.join(unknown)}"] if unknown else []) + (
            [f"nothing feeds {', '.join(missing)} (add eval_x/<name> and calib_x/<name>, "
             "const/<name>, or --state OUTPUT=INPUT for recurrent state)"] if missing else []
        ) + ([f"{', '.join(twice)} fed twice"] if twice else [])
        described = ", ".join(f"{i.name} {i.dtype} {list(i.shape)}" for i in signature.inputs)
        raise DatasetError(f"{data.source}: {'; '.join(problems)}. The model's inputs: "
                           f"{described}.")
    binding = Binding(signature, pairs, single)
    for name, value in binding.varying(data).items():
        _check(value, signature.input(name), data.source, extra=2 if pairs else 1,
               what="sequences" if pairs else "samples")
    for name, value in data.constants.items():
        _check(value, signature.input(name), data.source, extra=0, what="const")
    for name, value in data.initial_state.items():
        _check(value, signature.input(name), data.source, extra=0, what="state0")
    return binding


def _check(value: np.ndarray, info: TensorInfo, source: str, extra: int, what: str) -> None:
    """``value`` fits ``info``, with ``extra`` leading axes (samples, or sequences x steps);
    the first declared axis is the sample axis itself when ``extra`` is 1."""
    declared = info.shape
    skip = 1 if extra == 1 else 0
    want = (("samples",) if extra == 1 else ("sequences", "steps")[:extra]) + tuple(
        d if isinstance(d, int) and d > 0 else "any" for d in declared[skip:])
    shape = value.shape[extra:] if extra != 1 else value.shape[1:]
    rank_ok = value.ndim == len(declared) + (extra - skip)
    fits = rank_ok and all(not isinstance(d, int) or d <= 0 or d == got
                           for d, got in zip(declared[skip:], shape, strict=True))
    if not fits:
        layout = {"samples": "[samples, ...] with the sample axis as the batch axis",
                  "sequences": "[sequences, steps, *one call's shape]",
                  "const": "the input's own shape", "state0": "the input's own shape"}[what]
        raise DatasetError(f"{source}: inputs have shape {list(value.shape)} but model input "
                           f"'{info.name}' expects {list(want)} ({layout}); reshape the data "
                           "to match.")
    if value.dtype != np.dtype(info.dtype):
        raise DatasetError(f"{source}: inputs are {value.dtype}, model input '{info.name}' "
                           f"expects {info.dtype}; convert with astype.")


def save_calls(calls: Sequence[Mapping[str, np.ndarray]], path: Path) -> Path:
    """Model calls as one ``.npz``: ``<call number>/<input name>`` arrays (calibration calls
    for the TFLite converter's child process, golden cases beside report.json)."""
    arrays: dict[str, Any] = {f"{i:06d}/{name}": value for i, call in enumerate(calls)
                              for name, value in call.items()}
    np.savez(str(path), **arrays)
    return path


def load_calls(path: Path) -> list[dict[str, np.ndarray]]:
    """The calls :func:`save_calls` wrote, in order."""
    calls: dict[str, dict[str, np.ndarray]] = {}
    with np.load(path, allow_pickle=False) as npz:
        for key in npz.files:
            number, _, name = key.partition("/")
            calls.setdefault(number, {})[name] = npz[key]
    return [calls[k] for k in sorted(calls)]
