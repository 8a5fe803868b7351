"""Declarative mapping tables: rows of (megatron name, Hugging Face name(s), transform).

A row's names are patterns with named wildcards, ``{i}`` for an LM layer and ``{j}`` for a
vision block (any ``{name}`` works, matched as a non-negative integer)::

    Row("decoder.layers.{i}.self_attention.linear_qkv.weight",
        ("model.layers.{i}.self_attn.q_proj.weight", "model.layers.{i}.self_attn.k_proj.weight",
         "model.layers.{i}.self_attn.v_proj.weight"),
        QKV(heads=16, groups=2, head_dim=128))

A plain tuple ``(megatron, hf, transform)`` is a row too (``transform`` None = identity), so a
component's table can be a plain list. ``optional`` rows may be absent from a checkpoint (new
CASA weights, initialised from self-attention instead); ``fallback`` names are read when the
primary ones are absent (a ``replace`` CASA layer imported from a plain LM reads ``self_attn``).

The table is bidirectional: :func:`bind` resolves every megatron parameter to its HF names and
transform, and the same binding imports (``to_megatron``) and exports (``to_hf``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict, Iterable, List, NamedTuple, Optional, Sequence, Tuple, Union

from casa_megatron.conversion.errors import ConversionError
from casa_megatron.conversion.transforms import IDENTITY, Transform

Names = Tuple[str, ...]


class Row(NamedTuple):
    megatron: str
    hf: Union[str, Sequence[str]]
    transform: Optional[Transform] = None
    optional: bool = False
    fallback: Optional[Union[str, Sequence[str]]] = None


def as_row(row) -> Row:
    return row if isinstance(row, Row) else Row(*row)


def _names(value) -> Names:
    if value is None:
        return ()
    return (value,) if isinstance(value, str) else tuple(value)


_WILDCARD = re.compile(r"\{(\w+)\}")


def _pattern(template: str) -> re.Pattern:
    parts, last = [], 0
    for m in _WILDCARD.finditer(template):
        parts.append(re.escape(template[last:m.start()]))
        parts.append(f"(?P<{m.group(1)}>\\d+)")
        last = m.end()
    parts.append(re.escape(template[last:]))
    return re.compile("".join(parts) + r"\Z")


@dataclass(frozen=True)
class Binding:
    """One megatron parameter resolved against a table row."""

    megatron: str
    hf: Names
    transform: Transform
    optional: bool
    fallback: Names
    component: str

    def expected_hf_shapes(self, megatron_shape) -> List[Tuple[int, ...]]:
        return self.transform.expected_hf_shapes(megatron_shape)


class MappingTable:
    """A component's rows, compiled. ``component`` names it in reports (``lm``, ``vision``)."""

    def __init__(self, component: str, rows: Iterable):
        self.component = component
        self.rows = [as_row(r) for r in rows]
        self._compiled = [(_pattern(r.megatron), r) for r in self.rows]
        for row in self.rows:
            transform = row.transform or IDENTITY
            if len(_names(row.hf)) != transform.arity:
                raise ConversionError(f"table {component!r}: row {row.megatron!r} names {len(_names(row.hf))} "
                                      f"HF tensors but {transform!r} takes {transform.arity}")

    def bind(self, megatron_name: str) -> Optional[Binding]:
        """The binding of one parameter, or None when no row matches it."""
        matches = [(m, r) for p, r in self._compiled if (m := p.match(megatron_name))]
        if not matches:
            return None
        if len(matches) > 1:
            raise ConversionError(f"table {self.component!r}: parameter {megatron_name!r} matches several rows: "
                                  f"{[r.megatron for _, r in matches]}")
        match, row = matches[0]
        values = match.groupdict()
        return Binding(
            megatron=megatron_name,
            hf=tuple(n.format(**values) for n in _names(row.hf)),
            transform=row.transform or IDENTITY,
            optional=row.optional,
            fallback=tuple(n.format(**values) for n in _names(row.fallback)),
            component=self.component,
        )


def bind_all(names: Iterable[str], tables: Dict[str, MappingTable], component_of) -> Dict[str, Binding]:
    """Bind every parameter name with the table of its component; a name no row covers is a
    table bug and is reported with all others at once."""
    bindings, unmapped = {}, []
    for name in names:
        table = tables.get(component_of(name))
        binding = table.bind(name) if table is not None else None
        if binding is None:
            if table is not None:
                unmapped.append(name)
            continue
        bindings[name] = binding
    if unmapped:
        raise ConversionError(f"no mapping row for parameters {unmapped} (conversion table incomplete)")
    return bindings
