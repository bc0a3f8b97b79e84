"""SeqIO mixtures: tasks sampled at relative rates (seqio normalises them to probabilities).

Built-in, for every `local_media` manifest config C (tiny, tiny_silence, base, base_silence):
  pretrain_C   its captioning + classification examples, rates 1:1
  qa_C         its question answering; `qa_tiny` also mixes in `synthetic_avqa_tiny` (same geometry)

`config.data.mixture_rates` ("task:rate,task:rate") registers `config.data.task` as a mixture with
those rates instead (done by the pipeline), so rates change without code.

A seqio.Mixture keeps the Task objects it was built with, and `tasks.register_tasks` replaces the
built-in ones whenever the data dir, vocabulary or shuffle buffer change; the pipeline therefore
reads a mixture through `rebind`, which rebuilds it from its task names when it holds old tasks.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import seqio

from mirasol3b_data import tasks as tasks_lib


def parse_rates(rates: str | Mapping[str, float] | Sequence[tuple[str, float]] | None) -> dict[str, float]:
    """`"a:0.8,b:0.2"`, `{"a": 0.8, "b": 0.2}` or `[("a", 0.8), ...]` -> `{"a": 0.8, "b": 0.2}`."""
    if not rates:
        return {}
    if isinstance(rates, str):
        pairs = []
        for item in filter(None, (s.strip() for s in rates.split(","))):
            name, sep, rate = item.rpartition(":")
            if not sep or not name:
                raise ValueError(f"config.data.mixture_rates: expected 'task:rate,task:rate', got item {item!r}")
            pairs.append((name.strip(), rate))
    else:
        pairs = list(rates.items()) if isinstance(rates, Mapping) else list(rates)
    out = {}
    for name, rate in pairs:
        try:
            rate = float(rate)
        except (TypeError, ValueError):
            raise ValueError(f"config.data.mixture_rates: rate of {name!r} is not a number: {rate!r}") from None
        if not rate > 0 or rate == float("inf"):
            raise ValueError(f"config.data.mixture_rates: rate of {name!r} must be a positive number, got {rate}")
        if name in out:
            raise ValueError(f"config.data.mixture_rates: {name!r} appears twice")
        out[name] = rate
    return out


def register_mixture(name: str, rates: str | Mapping[str, float] | Sequence[tuple[str, float]], *,
                     replace: bool = False) -> seqio.Mixture:
    """Registers mixture `name` sampling each task (or sub-mixture) in proportion to its rate."""
    rates = parse_rates(rates)
    if not rates:
        raise ValueError(f"mixture {name!r}: no tasks given")
    known = set(seqio.TaskRegistry.names()) | set(seqio.MixtureRegistry.names())
    missing = sorted(set(rates) - known)
    if missing:
        raise ValueError(f"mixture {name!r}: no task or mixture named {missing}; register them first "
                         "(data/tasks.py: add_media_task)")
    if name in rates:
        raise ValueError(f"mixture {name!r} cannot contain itself")
    if name in seqio.TaskRegistry.names():
        raise ValueError(f"mixture {name!r}: a task has that name; give the mixture (config.data.task) another one")
    if replace:
        seqio.MixtureRegistry.remove(name)
    return seqio.MixtureRegistry.add(name, list(rates.items()))


def rebind(name: str) -> seqio.Mixture:
    """Mixture `name` (and its sub-mixtures) holding the tasks registered now; re-registered if it
    held replaced ones, otherwise returned as it is."""
    # At read time, as registering the built-in tasks before importing user modules cannot do: a
    # module is imported once per process, the tasks are replaced for every config that changes
    # the data dir, vocabulary or shuffle buffer, and a mixture may be registered anywhere.
    mixture = seqio.MixtureRegistry.get(name)
    for part in mixture.rate_per_task_name:
        if part in seqio.TaskRegistry.names():
            continue
        if part not in seqio.MixtureRegistry.names():
            raise ValueError(f"mixture {name!r}: its task {part!r} is no longer registered; register it again "
                             f"(data/tasks.py: add_media_task) or re-register {name!r} without it")
        rebind(part)
    if all(task is seqio.TaskRegistry.get(task.name) for task in mixture.tasks):
        return mixture
    kwargs = {"source_info": mixture.source_info}
    if hasattr(mixture, "_sample_fn"):  # a custom sampler given to seqio.MixtureRegistry.add; seqio has no getter
        kwargs["sample_fn"] = mixture._sample_fn
    # By name, so the constructor looks up the tasks and sub-mixtures registered now; built before
    # the old one is removed, so that a failure leaves the registry as it was.
    fresh = type(mixture)(name, list(mixture.rate_per_task_name.items()), **kwargs)
    seqio.MixtureRegistry.remove(name)
    seqio.MixtureRegistry.add_provider(name, fresh)
    return fresh


def builtin_mixtures() -> dict[str, dict[str, float]]:
    out = {}
    for c in tasks_lib.LOCAL_MEDIA_MANIFEST_CONFIGS:
        out[f"pretrain_{c}"] = {f"local_media_{c}_caption": 1.0, f"local_media_{c}_classification": 1.0}
        out[f"qa_{c}"] = {f"local_media_{c}_qa": 1.0}
        if c in tasks_lib.SYNTHETIC_AVQA_CONFIGS:
            out[f"qa_{c}"][f"synthetic_avqa_{c}"] = 1.0
    return out


def register_mixtures() -> list[str]:
    """(Re-)registers the built-in mixtures against the tasks registered now; returns their names."""
    mixtures = builtin_mixtures()
    for name, rates in mixtures.items():
        register_mixture(name, rates, replace=True)
    return list(mixtures)


register_mixtures()
