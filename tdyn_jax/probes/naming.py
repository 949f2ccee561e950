"""The layer part of site names, in one place: unrolled blocks are modules `layer_03`, a scanned
stack is the module `layers` whose leading axis is the layer, and a site names its layer as
`layer_03/...` either way."""

from __future__ import annotations

import re

SCANNED = "layers"  # the module name of the nn.scan stack of blocks
_COMPONENT = re.compile(r"^(layers|layer_\d+)$")
_INDEX = re.compile(r"(?:^|/)layer_(\d+)(?:/|$)")


def layer_name(i: int) -> str:
    """The module (and site component) name of block i: 3 -> 'layer_03'."""
    return f"layer_{i:02d}"


def unstacked(path: tuple[str, ...], depth: int) -> tuple[str, ...]:
    """The site names of a path through the scanned stack, one per layer: ('layers', 'attn') ->
    ('layer_00/attn', 'layer_01/attn', ...); any other path is one name."""
    if SCANNED not in path:
        return ("/".join(path),)
    i = path.index(SCANNED)
    return tuple("/".join((*path[:i], layer_name(j), *path[i + 1 :])) for j in range(depth))


def layer_free(path: tuple[str, ...] | str) -> str:
    """A site name without its layer component: ('layer_03', 'attn', 'q') -> 'attn/q'."""
    parts = path.split("/") if isinstance(path, str) else path
    return "/".join(p for p in parts if not _COMPONENT.match(p))


def layer_of(site: str) -> int:
    """The layer index in a site name (layer_03/... -> 3), or -1 outside the layers."""
    match = _INDEX.search(site)
    return int(match.group(1)) if match else -1
