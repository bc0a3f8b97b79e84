"""Comparing parameter trees by path: what a checkpoint holds against what the model needs, and
the message that lists the difference."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn


def path_str(path) -> str:
    return jax.tree_util.keystr(path, simple=True, separator="/")


def flat(tree) -> dict[str, Any]:
    """'a/b/c' -> leaf (arrays, ShapeDtypeStructs or Orbax array metadata: anything with `.shape`)."""
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))[0]
    return {path_str(p): leaf for p, leaf in leaves}


def shape_dtype(x) -> str:
    """'(shape) dtype' of an array, ShapeDtypeStruct or Orbax array metadata."""
    return f"{tuple(x.shape)} {jnp.dtype(x.dtype).name}"


def compare_trees(checkpoint: dict[str, Any], model: dict[str, Any]):
    """(missing, unexpected, mismatched) from 'path' -> what must agree (a shape tuple, or
    `_shape_dtype`'s text); mismatched as printable lines."""
    missing = sorted(set(model) - set(checkpoint))
    unexpected = sorted(set(checkpoint) - set(model))
    mismatched = sorted(f"{p}: checkpoint {checkpoint[p]} vs model {model[p]}"
                        for p in set(model) & set(checkpoint) if checkpoint[p] != model[p])
    return missing, unexpected, mismatched


MISMATCH_LINES = 25  # paths listed per kind of mismatch (a dtype change mismatches hundreds)


def mismatch_message(what: str, missing, unexpected, mismatched) -> str:
    lines = [what]
    for title, items in (("missing from the checkpoint (in the model only)", missing),
                         ("unexpected (in the checkpoint only)", unexpected),
                         ("shape or dtype mismatch", mismatched)):
        if items:
            lines.append(f"  {title}: {len(items)}")
            lines += [f"    {p}" for p in items[:MISMATCH_LINES]]
            if len(items) > MISMATCH_LINES:
                lines.append(f"    ... and {len(items) - MISMATCH_LINES} more")
    return "\n".join(lines)


def unflatten_like(template, flat: dict[str, Any]):
    """A tree shaped like `template` whose leaves at 'path' are `flat[path]`; other leaves dropped
    (dict entries removed) — `template` must be nested dicts, as Flax params are."""
    def build(node, prefix):
        if isinstance(node, Mapping):
            out = {}
            for key, child in node.items():
                sub = build(child, f"{prefix}{key}/")
                if sub is not None:
                    out[key] = sub
            return out or None
        path = prefix[:-1]
        return flat.get(path)
    return build(nn.unbox(template), "") or {}
