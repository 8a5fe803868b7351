"""The conversion engine: bind every megatron parameter to a table row, check the whole plan
against the checkpoint's headers, then stream tensors in (import) or out (export).

Import is two passes. The *plan* reads no tensor data: it resolves each parameter's HF names
(primary, fallback or absent-and-optional), compares the shapes the transform expects with
the safetensors headers, and collects every problem (missing tensors, shape mismatches,
unexpected tensors) into one error before anything is written. The *load* then reads the HF
tensors of one row at a time, transforms them and copies them into the parameter, so memory
holds the model plus one row. Parameters are accounted for exactly once: imported, CASA
initialised from self-attention (or a zero gate) after loading, or fresh (a component the
checkpoint does not hold, e.g. the vision encoder of an LM-only checkpoint). Components:
``lm``, ``vision`` (the encoder) and ``projector`` (the merger), each with its table and source.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Dict, Iterable, Iterator, List, Optional, Tuple

import torch
from tqdm import tqdm

from casa_megatron.conversion.errors import ConversionError
from casa_megatron.conversion.mapping import Binding, MappingTable, bind_all
from casa_megatron.conversion.safetensors_io import TensorUnit

# HF tensors no parameter reads, on purpose (name pattern -> why).
INTENTIONALLY_UNUSED = (
    (re.compile(r".*\.rotary_emb\.inv_freq\Z"), "RoPE buffer; megatron recomputes it"),
)
SHOW = 12  # names listed per problem kind in an error message


COMPONENTS = ("lm", "vision", "projector")


def component_of(name: str) -> str:
    """``vision`` (the encoder), ``projector`` (Qwen2.5-VL's merger) or ``lm`` (the rest)."""
    if name.startswith("vision."):
        return "vision"
    return "projector" if name.startswith("projector.") else "lm"


@dataclass
class Source:
    """Where a component's tensors come from. ``reader`` None: the component is fresh
    (``reason`` says why). ``skipped``: ``(reader, prefix)`` whose tensors under the prefix are
    not imported and reported as such with ``reason`` (a merger made for another LM width, or
    skipped on request): never silently dropped, never "unexpected". ``only``: the rest of the reader's
    tensors are reported as not imported (the LM of a ``--vision-from`` folder)."""

    reader: object = None
    reason: str = ""
    skipped: Optional[Tuple[object, str]] = None
    only: Optional[str] = None  # this folder serves only tensors under this prefix (--vision-from)


@dataclass
class ImportReport:
    imported: Dict[str, List[str]] = field(default_factory=dict)  # megatron param -> HF names
    casa_from_self_attention: List[str] = field(default_factory=list)
    zero_initialised: List[str] = field(default_factory=list)
    fresh: Dict[str, str] = field(default_factory=dict)  # megatron param -> why
    not_imported: Dict[str, str] = field(default_factory=dict)  # HF tensor -> why
    unused: Dict[str, str] = field(default_factory=dict)  # HF tensor -> why

    def summary(self) -> dict:
        return {"imported": len(self.imported), "casa_from_self_attention": len(self.casa_from_self_attention),
                "zero_initialised": len(self.zero_initialised), "fresh": len(self.fresh),
                "hf_not_imported": len(self.not_imported), "hf_unused": len(self.unused)}

    def to_json(self) -> dict:
        reasons = defaultdict(list)
        for name, why in self.fresh.items():
            reasons[why].append(name)
        return {"summary": self.summary(), "imported": self.imported,
                "casa_from_self_attention": self.casa_from_self_attention,
                "zero_initialised": self.zero_initialised, "fresh": dict(reasons),
                "not_imported": self.not_imported, "unused": self.unused}


@dataclass
class _Step:
    binding: Binding
    names: Tuple[str, ...]  # the HF names read (primary or fallback)


def _listing(kind: str, items: List[str]) -> str:
    more = f" ... and {len(items) - SHOW} more" if len(items) > SHOW else ""
    return f"{kind} ({len(items)}): " + ", ".join(items[:SHOW]) + more


def plan_import(params: Dict[str, torch.Tensor], tables: Dict[str, MappingTable],
                sources: Dict[str, Source], tied_embeddings: bool = False) -> Tuple[List[_Step], ImportReport]:
    """Resolve and check everything from the headers; raise one ConversionError listing all problems."""
    report = ImportReport()
    sourced = {c: t for c, t in tables.items() if sources.get(c) is not None and sources[c].reader is not None}
    bindings = bind_all(params, sourced, component_of)
    for name in params:
        source = sources.get(component_of(name))
        if source is None or source.reader is None:
            report.fresh[name] = source.reason if source is not None else "no source for this component"
    steps, missing, mismatched, optional_missing = [], [], [], []
    read: set = set()
    for name, binding in bindings.items():
        reader = sources[binding.component].reader
        primary = all(n in reader for n in binding.hf)
        read.update(n for n in (binding.hf if primary else binding.hf + binding.fallback) if n in reader)
        if primary:  # (names are marked read even when their shapes turn out wrong: one problem, one line)
            names = binding.hf
        elif binding.fallback and all(n in reader for n in binding.fallback):
            names = binding.fallback
        elif binding.optional and not any(n in reader for n in binding.hf):
            optional_missing.append(name)
            continue
        else:
            missing += [f"{n} (for {name})" for n in binding.hf if n not in reader]
            continue
        expected = binding.expected_hf_shapes(params[name].shape)
        actual = [reader.shape(n) for n in names]
        if [tuple(e) for e in expected] != actual:
            mismatched += [f"{n}: checkpoint {a} vs model {tuple(e)} (for {name}, {binding.transform!r})"
                           for n, a, e in zip(names, actual, expected) if tuple(e) != a]
            continue
        steps.append(_Step(binding, names))
    _account_optional(optional_missing, report)
    unexpected = _unexpected(sources, read, report, tied_embeddings)
    problems = [_listing(kind, items) for kind, items in (("missing tensors", missing),
                                                          ("shape mismatches", mismatched),
                                                          ("unexpected tensors", unexpected)) if items]
    problems += _partial_casa(optional_missing, bindings)
    if problems:
        raise ConversionError("the checkpoint does not fit the model:\n  " + "\n  ".join(problems))
    return steps, report


def _account_optional(optional_missing: List[str], report: ImportReport) -> None:
    for name in optional_missing:
        if name.endswith("casa_gate"):
            report.zero_initialised.append(name)
        else:
            report.casa_from_self_attention.append(name)


def _partial_casa(optional_missing: List[str], bindings: Dict[str, Binding]) -> List[str]:
    """A layer's CASA weights come all from the checkpoint or all from self-attention."""
    def layer(name: str) -> str:
        return name.rsplit(".casa_", 1)[0]

    missing = [n for n in optional_missing if not n.endswith("casa_gate")]
    present_layers = {layer(b.megatron) for b in bindings.values() if b.optional
                      and not b.megatron.endswith("casa_gate") and b.megatron not in optional_missing}
    partial = [f"{', '.join(bindings[n].hf)} (for {n})" for n in missing if layer(n) in present_layers]
    return [_listing("missing CASA tensors of a layer whose other CASA tensors are present", partial)] \
        if partial else []


def _unexpected(sources: Dict[str, Source], read: set, report: ImportReport, tied: bool) -> List[str]:
    live = [s for s in sources.values() if s is not None]
    readers = {id(r): r for s in live for r in (s.reader, s.skipped[0] if s.skipped else None) if r is not None}
    skipped = [(s.skipped[0], s.skipped[1], s.reason) for s in live if s.skipped]
    unexpected = []
    for reader in readers.values():
        users = [s for s in live if reader is s.reader or (s.skipped and reader is s.skipped[0])]
        scopes = [s.only for s in users]
        for name in reader.names():
            if name in read:
                continue
            if scopes and all(scope is not None and not name.startswith(scope) for scope in scopes):
                report.not_imported[name] = f"outside {scopes[0]}*: only that part of this folder is used"
                continue
            why = next((w for p, w in INTENTIONALLY_UNUSED if p.match(name)), None)
            if why is None and tied and name == "lm_head.weight":
                why = "tied to model.embed_tokens.weight (tie_word_embeddings)"
            if why is not None:
                report.unused[name] = why
                continue
            skip = next((why for r, prefix, why in skipped if r is reader and name.startswith(prefix)), None)
            if skip is not None:
                report.not_imported[name] = skip
                continue
            unexpected.append(name)
    return unexpected


@torch.no_grad()
def load_weights(model: torch.nn.Module, tables: Dict[str, MappingTable], sources: Dict[str, Source],
                 progress: bool = True) -> ImportReport:
    """Fill ``model`` (one process, TP=1, PP=1) from the sources; see the module docstring."""
    params = dict(model.named_parameters())
    tied = bool(getattr(model, "share_embeddings_and_output_weights", False))
    steps, report = plan_import(params, tables, sources, tied_embeddings=tied)
    for step in tqdm(steps, desc="import", unit="tensor", disable=not progress):
        reader = sources[step.binding.component].reader
        value = step.binding.transform.to_megatron([reader.get(n) for n in step.names])
        params[step.binding.megatron].copy_(value)
        report.imported[step.binding.megatron] = list(step.names)
    _initialise_casa(model, report)
    return report


def _initialise_casa(model, report: ImportReport) -> None:
    from_sa = {n.rsplit(".casa_", 1)[0] for n in report.casa_from_self_attention}
    params = dict(model.named_parameters())
    for name in report.zero_initialised:
        params[name].zero_()
    if not from_sa:
        return
    layers_by_prefix = {n.rsplit(".casa_", 1)[0]: None for n in report.casa_from_self_attention}
    for module_name, module in model.named_modules():
        if module_name in layers_by_prefix and hasattr(module, "init_casa_from_self_attention"):
            module.init_casa_from_self_attention()
            layers_by_prefix[module_name] = module
    missed = [p for p, m in layers_by_prefix.items() if m is None]
    if missed:
        raise ConversionError(f"cannot initialise CASA weights of {missed} from self-attention")


def import_tensors(names: Iterable[str], tables: Dict[str, MappingTable],
                   reader) -> Iterator[Tuple[str, torch.Tensor]]:
    """The import direction without a model: ``(megatron name, full TP=1 tensor)`` for every
    name, from the reader's HF tensors (primary names, else the fallback; an absent optional
    row is skipped). For state dicts that are split over TP afterwards (tests, benchmarks) and
    for anything linear in the weights (gradients map alike). Missing tensors: one error."""
    steps, missing = [], []
    for name, binding in bind_all(names, tables, component_of).items():
        for candidate in (binding.hf, binding.fallback):
            if candidate and all(n in reader for n in candidate):
                steps.append((name, binding, candidate))
                break
        else:
            if not (binding.optional and not any(n in reader for n in binding.hf)):
                missing += [f"{n} (for {name})" for n in binding.hf if n not in reader]
    if missing:
        raise ConversionError("the checkpoint does not fit the model:\n  " + _listing("missing tensors", missing))
    for name, binding, hf_names in steps:
        yield name, binding.transform.to_megatron([reader.get(n) for n in hf_names])


def export_tensors(model: torch.nn.Module, tables: Dict[str, MappingTable],
                   components=COMPONENTS) -> Iterator[Tuple[str, torch.Tensor]]:
    """The inverse direction, parameter by parameter: (HF name, tensor) in hub names.

    ``model`` must hold full tensors (one process, TP=1, PP=1)."""
    for unit in export_units(model, tables, components):
        yield from zip(unit.names, unit.produce())


def export_units(model: torch.nn.Module, tables: Dict[str, MappingTable], components=COMPONENTS,
                 dtype: Optional[torch.dtype] = None) -> List[TensorUnit]:
    """One :class:`TensorUnit` per parameter: its HF names and shapes (from the transform run on
    ``meta``) now, its tensors (``to_hf``, cast to ``dtype``) when the writer asks, so an export
    holds the model plus one parameter's HF tensors. Every parameter must bind to a row."""
    wanted = {c: t for c, t in tables.items() if c in components}
    params = dict(model.named_parameters())
    unbound = [n for n in params if component_of(n) not in wanted]
    if unbound and set(components) >= set(COMPONENTS):
        raise ConversionError(f"no table for the components of {unbound[:SHOW]}")
    units = []
    for name, binding in bind_all(params, wanted, component_of).items():
        param = params[name]
        out_dtype = dtype or param.dtype

        def produce(name=name, binding=binding, param=param, out_dtype=out_dtype):
            try:
                return [t.to(out_dtype) for t in binding.transform.to_hf(param.detach())]
            except ValueError as e:  # a transform that cannot write this tensor exactly
                raise ConversionError(f"{name} -> {binding.hf}: {e}") from None

        shapes = [tuple(s) for s in binding.expected_hf_shapes(param.shape)]
        units.append(TensorUnit(binding.hf, shapes, out_dtype, produce))
    return units
