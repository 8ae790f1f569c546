"""Group-wise sequential OBS-Diff pruning of a whole transformer.

The prunable units, in execution order, are split into K contiguous groups of about equal size.
For each group in turn: run the calibration denoising loop on the current model (earlier groups
already pruned) with Hessian hooks on the group's layers only, then prune the group. K = 1 is
plain one-shot pruning (every Hessian from the unpruned model); larger K lets later layers see,
and compensate for, the errors of earlier ones, and bounds the Hessian memory to one group's.

Units: for unstructured / N:M pruning, the Linears of the attention and feed-forward branches
that share one input (q/k/v of an attention are one unit and are never split; so are
add_q/k/v_proj; a FLUX single block's q/k/v and proj_mlp read the same tensor too); the AdaLN
modulation Linears (`norm*.linear`, fed by the timestep embedding) are left dense. For structured
pruning, the heads of one attention or the neurons of one FFN (a FLUX single block's heads and
neurons share proj_out, so they are one unit).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Sequence

import torch
import torch.nn as nn

from hprune import recipe
from hprune.errors import HpruneError
from hprune.obs import structured as S
from hprune.obs.baselines import magnitude_prune, wanda_prune
from hprune.obs.hessian import DEFAULT_WEIGHTING, HessianCollector, run_calibration_loop, step_weights
from hprune.obs.patterns import Pattern, check_method, check_nm_fits, parse_pattern, resolve_sparsity
from hprune.obs.solver import obs_prune

# Linears that share their input with the first of the tuple (same Hessian).
_SHARED_INPUT = (("to_q", "to_k", "to_v"), ("add_q_proj", "add_k_proj", "add_v_proj"))


@dataclass
class LinearUnit:
    """Linears that read the same input: one Hessian serves them all. name = first Linear's path."""

    name: str
    block: int
    linears: list[tuple[str, nn.Linear]]

    @property
    def numel(self) -> int:
        return sum(l.weight.numel() for _, l in self.linears)

    @property
    def in_features(self) -> int:
        return self.linears[0][1].in_features


def _is_modulation(local_name: str) -> bool:
    # AdaLN Linears live under norm1 / norm1_context / norm (single blocks): keep them dense.
    return any(part.startswith("norm") for part in local_name.split("."))


def find_linear_units(model: nn.Module, blocks: Iterable[int] | None = None) -> list[LinearUnit]:
    """The prunable Linears of the blocks (all, or the given indices), grouped by shared input."""
    from hprune.models import get_adapter

    ad = get_adapter(model)
    wanted = set(range(ad.num_blocks(model))) if blocks is None else set(blocks)
    units: list[LinearUnit] = []
    for info in ad.blocks(model):
        if info.index not in wanted:
            continue
        blk = ad.get_block(model, info.index)
        lins = [(n, m) for n, m in blk.named_modules() if isinstance(m, nn.Linear) and n and not _is_modulation(n)]
        by_name = dict(lins)

        def leader(local: str) -> str:
            parent, _, leaf = local.rpartition(".")
            for tup in _SHARED_INPUT:
                if leaf in tup:  # the first of the tuple still present (add_q_proj may be gone)
                    present = [f"{parent}.{o}" if parent else o for o in tup]
                    return next(p for p in present if p in by_name)
            if info.kind == "flux_single" and local == "proj_mlp" and "attn.to_q" in by_name:
                return "attn.to_q"  # proj_mlp reads the same normed input as q/k/v
            return local

        members: dict[str, list[str]] = {}
        for local, _ in lins:  # dict order: a unit sits where its first member appears
            members.setdefault(leader(local), []).append(local)
        block_units = [LinearUnit(f"{info.name}.{lead}", info.index,
                                  [(f"{info.name}.{m}", by_name[m]) for m in [lead] + [x for x in ms if x != lead]])
                       for lead, ms in members.items()]
        units += block_units
    return units


def split_groups(sizes: Sequence[int], k: int) -> list[range]:
    """Splits len(sizes) ordered units into k contiguous, non-empty groups of about equal total size."""
    n = len(sizes)
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise HpruneError(f"groups must be a positive integer, got {k!r}")
    if k > n:
        raise HpruneError(f"groups={k} is more than the {n} prunable units (q/k/v of one attention count as one)")
    total = float(sum(sizes))
    bounds, acc, start = [], 0.0, 0
    for i, s in enumerate(sizes):
        acc += s
        left_groups = k - len(bounds) - 1
        # Close the group once it reaches its share, leaving at least one unit per remaining group.
        if left_groups > 0 and (acc >= total * (len(bounds) + 1) / k or n - (i + 1) == left_groups):
            bounds.append(range(start, i + 1))
            start = i + 1
    bounds.append(range(start, n))
    return bounds


def _prune_unit(unit: LinearUnit, hessian: torch.Tensor | None, method: str, sparsity: float, pattern: Pattern,
                blocksize: int, percdamp: float) -> list[dict[str, Any]]:
    rows = []
    for path, lin in unit.linears:
        w = lin.weight
        if method == "obs":
            new, _ = obs_prune(w, hessian, sparsity, pattern, blocksize=blocksize, percdamp=percdamp)
        elif method == "wanda":
            new = wanda_prune(w, hessian, sparsity, pattern.name)
        else:
            new = magnitude_prune(w, sparsity, pattern.name)
        with torch.no_grad():
            w.copy_(new.to(w.dtype))
        rows.append({"layer": path, "shape": list(w.shape), "sparsity": float((w == 0).float().mean())})
    return rows


def _collect(model: nn.Module, calib: Any, sites: dict[str, list[nn.Linear]], weights: list[float],
             progress: bool, desc: str) -> dict[str, torch.Tensor]:
    collector = HessianCollector(sites, weights)
    run_calibration_loop(model, calib, collector, progress=progress, desc=desc)
    hs = collector.hessians()
    missing = [s for s in sites if s not in hs]
    if missing:
        raise HpruneError(f"layer {missing[0]} never ran during the calibration loop (is it part of the model's forward?)")
    return hs


def _structured_group(model: nn.Module, names: list[str], blocks: Iterable[int] | None, calib: Any,
                      weights: list[float] | None, method: str, sparsity: float, percdamp: float,
                      progress: bool, desc: str) -> list[dict[str, Any]]:
    """Prunes the structured sites named `names` (rediscovered on the current model); returns
    their shrink entries in the order they were applied."""
    sites = [s for s in S.find_sites(model, blocks) if s.name in names]
    consumers = sorted({c for s in sites for c, _ in s.consumers})
    lin = {c: model.get_submodule(c) for c in consumers}
    hs = _collect(model, calib, {c: [lin[c]] for c in consumers}, weights, progress, desc) \
        if method != "magnitude" else {}
    return _prune_sites(model, sites, lin, hs, method, sparsity, percdamp)


def _prune_sites(model: nn.Module, sites: list[S.StructuredSite], lin: dict[str, nn.Linear],
                 hs: dict[str, torch.Tensor], method: str, sparsity: float, percdamp: float,
                 host: torch.device | None = None) -> list[dict[str, Any]]:
    """Chooses the heads / neurons to remove at every site (greedy OBS, wanda or magnitude), with
    OBS compensating the consumers, and applies the shrinks; returns their entries in the order
    they were applied. lin: {consumer path: Linear}; hs: {consumer path: (in, in) Hessian} (empty
    for magnitude); `hs` is emptied as the consumers are done.

    host: None (resident): the compensated weights are written into the consumers in place and
    the shrunk Linears made where the old ones are. A device (block by block: the block is on the
    compute device, its weights stay on `host`): the compensated consumers are replaced by new
    Linears on `host`, and the shrunk Linears are made there, so neither the device copies nor
    the host's (memory-mapped) originals are written."""
    # Sites that share a consumer (a FLUX single block's heads and neurons: proj_out) are pruned
    # together; the float64 OBS states live only while their cluster is processed.
    clusters: dict[str, list[S.StructuredSite]] = {}
    for site in sites:
        clusters.setdefault(site.owner or site.name, []).append(site)
    entries = []
    for cluster in clusters.values():
        used = sorted({c for site in cluster for c, _ in site.consumers})
        states = {c: S.ColumnOBS(lin[c].weight, hs[c], percdamp) for c in used} if method == "obs" else {}
        keeps = []
        for site in cluster:
            # Neuron counts stay multiples of 8 (tensor-core friendly, and N:M-prunable afterwards).
            n_remove = S.removal_count(site.count, sparsity, 8 if site.kind == S.NEURONS else 1)
            cols = [site.columns(off) for _, off in site.consumers]
            if n_remove == 0:
                continue
            if method == "obs":
                keep = S.greedy_obs_removal([states[c] for c, _ in site.consumers], cols, n_remove)
            else:
                ws = [lin[c].weight for c, _ in site.consumers]
                score = (S.magnitude_group_scores(ws, cols) if method == "magnitude"
                         else S.wanda_group_scores(ws, [hs[c] for c, _ in site.consumers], cols))
                keep = torch.topk(score.cpu(), site.count - n_remove).indices.sort().values
            keeps.append((site, keep))
        with torch.no_grad():  # compensated consumer weights go back in before the columns are sliced
            for c, st in states.items():
                if host is None:
                    lin[c].weight.copy_(st.W.to(lin[c].weight.dtype))
                else:
                    model.set_submodule(c, S.sliced_linear(lin[c], weight=st.W, device=host))
        del states
        for c in used:
            hs.pop(c, None)
        # Higher column offsets first, so a shared consumer's lower offsets stay valid.
        for site, keep in sorted(keeps, key=lambda sk: -max(off for _, off in sk[0].consumers)):
            entry = S.shrink_entry(site, keep)
            S.apply_shrink(model, entry, keep, device=host)
            entries.append(entry)
    return entries


def _structured_blockwise(model: nn.Module, sites: list[S.StructuredSite], calib: Any, device: Any,
                          weights: list[float] | None, method: str, sparsity: float, percdamp: float,
                          sequential: bool, progress: bool) -> list[dict[str, Any]]:
    """The structured path of obs_prune_model, block by block (see its `offload`): per block, the
    consumers' Hessians from one pass over the set's stored inputs, then the block's sites pruned
    and shrunk as `_structured_group` does (the new Linears on the host). Returns the shrink
    entries in the order they were applied."""
    from hprune.models import get_adapter
    from hprune.models.offload import placed
    from hprune.obs.blockwise import block_hessians
    from hprune.report import tqdm

    ad = get_adapter(model)
    by_block: dict[int, list[S.StructuredSite]] = {}
    for site in sites:
        by_block.setdefault(site.block, []).append(site)
    # Where each block's weights live (the host); the stream moves the block away while it is pruned.
    host = {b: next(ad.get_block(model, b).parameters()).device for b in by_block}
    lin = {b: {c: model.get_submodule(c) for site in ss for c, _ in site.consumers} for b, ss in by_block.items()}
    hsites = {b: {c: [m] for c, m in ls.items()} for b, ls in lin.items()}

    def blocks() -> Iterator[tuple[int, Any, dict[str, torch.Tensor]]]:
        """(block index, its StreamStep or None, its consumers' Hessians) with the block on the device."""
        if method == "magnitude":  # no data: only the blocks with sites, no stream
            for b in tqdm(list(by_block), desc="OBS-Diff structured", unit="block", disable=not progress):
                with torch.no_grad(), placed(ad.get_block(model, b), device):
                    yield b, None, {}
            return
        for step, hs in block_hessians(model, calib, device, hsites, weights, progress=progress,
                                       desc="OBS-Diff structured"):
            yield step.index, step, hs

    entries: list[dict[str, Any]] = []
    for b, step, hs in blocks():  # one iteration per block, done when its body ends
        entries += _prune_sites(model, by_block[b], lin.pop(b), hs, method, sparsity, percdamp, host[b])
        hsites.pop(b)  # the replaced Linears are not kept alive to the end
        if sequential and step is not None:
            step.run()  # the next block's inputs come from the shrunk block
    return entries


def _prune_blockwise(model: nn.Module, units: list[LinearUnit], calib: Any, device: Any, weights: list[float] | None,
                     method: str, sparsity: float, pattern: Pattern, blocksize: int, percdamp: float,
                     sequential: bool, progress: bool, spill: Any = None) -> list[dict[str, Any]]:
    """The unstructured / N:M path of obs_prune_model, block by block (see its `offload`).
    spill (hprune.models.offload.Spill): a block's Linears move to its file before the block is
    placed, so the pruned values are written there (file pages) instead of into private copies
    of the mapped checkpoint pages (anonymous memory for the rest of the run)."""
    from hprune.models.offload import placed
    from hprune.obs.blockwise import block_hessians

    by_block: dict[int, list[LinearUnit]] = {}
    for u in units:
        by_block.setdefault(u.block, []).append(u)

    def to_spill(us: list[LinearUnit]) -> None:
        if spill is not None:
            spill([l for u in us for _, l in u.linears])

    rows: list[dict[str, Any]] = []
    if method == "magnitude":  # no data: each unit on the device, pruned, written back
        from hprune.report import tqdm

        for us in tqdm(list(by_block.values()), desc="OBS-Diff magnitude", unit="block", disable=not progress):
            for u in us:
                to_spill([u])
                with placed([l for _, l in u.linears], device, writeback=True):
                    rows += _prune_unit(u, None, method, sparsity, pattern, blocksize, percdamp)
        return rows
    sites = {b: {u.name: [l for _, l in u.linears] for u in us} for b, us in by_block.items()}
    order = sorted(by_block)
    to_spill(by_block[order[0]] if order else [])
    for step, hs in block_hessians(model, calib, device, sites, weights, progress=progress, desc="OBS-Diff",
                                   writeback=True):
        later = [b for b in order if b > step.index]
        if later:  # the next pruned block, before the stream places it
            to_spill(by_block[later[0]])
        for u in by_block[step.index]:
            rows += _prune_unit(u, hs.pop(u.name), method, sparsity, pattern, blocksize, percdamp)
        if sequential:
            step.run()  # the next block's inputs come from the pruned block
    return rows


def obs_prune_model(model: nn.Module, calib: Any = None, sparsity: float | None = None,
                    pattern: str = "unstructured", groups: int = 1, weighting: str = DEFAULT_WEIGHTING,
                    method: str = "obs", *, blocks: Iterable[int] | None = None,
                    alpha: tuple[float, float] = (0.8, 1.2), blocksize: int = 128, percdamp: float = 0.01,
                    progress: bool = False, offload: Any = None, sequential: bool = False,
                    spill: Any = None) -> dict[str, Any]:
    """Prunes `model` in place with OBS-Diff (or a baseline) and records it in the model's recipe.

    Args:
        model: an SD3Transformer2DModel / FluxTransformer2DModel (possibly block-pruned).
        calib: a CalibrationSet for this model (its prompt embeddings, seeds, schedule and guidance
            drive the calibration denoising loop). Not needed for method="magnitude".
        sparsity: fraction of weights (unstructured; default 0.5) or of heads and neurons per
            attention / FFN (structured; kept neuron counts are rounded to multiples of 8, at
            least one head stays); N:M patterns imply 1 - N/M.
        pattern: "unstructured", "2:4", "4:8" (any "N:M") or "structured".
        groups: K of group-wise sequential pruning (1 = plain one-shot). The Hessians of one
            group are held at once (float32, in_features² each: ~0.9 GB per SD3.5-Large block,
            ~1-1.4 GB per FLUX block), so real-size models want K of 4 or more.
        weighting: step weights of the Hessian, see hprune.obs.hessian.WEIGHTINGS.
        method: "obs" (with compensation), "wanda" or "magnitude" (masks only).
        blocks: block indices to prune (default all), e.g. to spare the first and last.
        alpha: (α_min, α_max) of the step weights.
        blocksize, percdamp: OBS solver settings (see prune_linear).
        offload: a device: block by block there (weights on the host), the Hessians of one block
            at a time from ONE pass over the set's stored inputs (hprune.obs.blockwise; `groups`
            unused; `sequential`: later blocks see the pruned earlier ones). Every pattern:
            unstructured / N:M weights are written back to the host; structured sites are chosen
            and compensated on the device and their shrunk Linears made on the host, recorded in
            the recipe as the resident path records one group.
        spill: with offload, a hprune.models.offload.Spill: the pruned Linears' weights live in its
            file (file pages) instead of anonymous memory (see _prune_blockwise; unstructured / N:M).
    Returns a JSON-able report: settings, per-layer or per-site results, parameter counts, time.
    Everything is validated before the model changes.
    """
    from hprune.models import get_adapter
    from hprune.models.stats import param_count

    ad = get_adapter(model)
    pat = parse_pattern(pattern)
    s = resolve_sparsity(sparsity, pat)
    check_method(method)
    if blocks is not None:
        blocks = sorted(set(int(b) for b in blocks))
        n = ad.num_blocks(model)
        bad = [b for b in blocks if not 0 <= b < n]
        if bad:
            raise HpruneError(f"block index {bad[0]} out of range: the model has blocks 0..{n - 1}")
    if method != "magnitude":
        if calib is None:
            raise HpruneError(f"method {method!r} needs a calibration set (only magnitude pruning works without)")
        calib.check_fits(model)
    weights = step_weights(weighting, calib.num_steps if calib is not None else 1, *alpha) if calib is not None else None
    if not 0 < percdamp < 1:
        raise HpruneError(f"percdamp must be in (0, 1), got {percdamp}")
    if not isinstance(blocksize, int) or blocksize < 1:
        raise HpruneError(f"blocksize must be a positive integer, got {blocksize!r}")

    from hprune.report import tqdm

    t0 = time.perf_counter()
    params_before = param_count(model)
    report: dict[str, Any] = {"method": method, "pattern": pat.name, "sparsity": s, "groups": groups,
                              "weighting": weighting if method != "magnitude" else None,
                              "alpha": list(alpha), "blocks": blocks, "percdamp": percdamp, "blocksize": blocksize}
    if pat.kind == "structured":
        sites = S.find_sites(model, blocks)
        if not sites:
            raise HpruneError("no attention heads or FFN neurons to prune in the selected blocks")
        sizes = [sum(model.get_submodule(c).weight.shape[0] * site.group_size for c, _ in site.consumers)
                 * site.count for site in sites]
        # A FLUX single block's heads and neurons share proj_out: keep them in one unit.
        units: list[list[str]] = []
        unit_sizes: list[int] = []
        last_key = None
        for site, size in zip(sites, sizes):
            key = site.owner or site.name
            if key == last_key:
                units[-1].append(site.name)
                unit_sizes[-1] += size
            else:
                units.append([site.name])
                unit_sizes.append(size)
            last_key = key
        parts = split_groups(unit_sizes, groups) if offload is None else []
        entries_all = []
        if offload is not None:  # recorded as the resident path records one group
            entries_all = _structured_blockwise(model, sites, calib, offload, weights, method, s, percdamp,
                                                sequential, progress)
            S.record_shrink(model, entries_all, {"method": method, "sparsity": s, "group": 0})
            report["offload"] = {"device": str(offload), "sequential": sequential}
        for gi, part in enumerate(tqdm(parts, desc="groups", unit="group",
                                       disable=not progress or len(parts) <= 1)):
            names = [n for u in part for n in units[u]]
            entries = _structured_group(model, names, blocks, calib, weights, method, s, percdamp, progress,
                                        f"calibration {gi + 1}/{len(parts)}")
            S.record_shrink(model, entries, {"method": method, "sparsity": s, "group": gi})
            entries_all += entries
        report["sites"] = [{k: e[k] for k in ("site", "kind", "before", "after")} for e in entries_all]
    else:
        units_l = find_linear_units(model, blocks)
        if not units_l:
            raise HpruneError("no prunable Linear layers in the selected blocks")
        for u in units_l:
            check_nm_fits(u.in_features, pat, what=u.name)
        parts = split_groups([u.numel for u in units_l], groups) if offload is None else []
        layers: list[dict[str, Any]] = []
        if offload is not None:
            layers = _prune_blockwise(model, units_l, calib, offload, weights, method, s, pat, blocksize, percdamp,
                                      sequential, progress, spill)
            report["offload"] = {"device": str(offload), "sequential": sequential}
        for gi, part in enumerate(tqdm(parts, desc="groups", unit="group", disable=not progress or len(parts) <= 1)):
            group = [units_l[i] for i in part]
            hs = (_collect(model, calib, {u.name: [l for _, l in u.linears] for u in group}, weights, progress,
                           f"calibration {gi + 1}/{len(parts)}") if method != "magnitude" else {})
            for u in tqdm(group, desc=f"pruning {gi + 1}/{len(parts)}", unit="unit", disable=not progress,
                          leave=False):
                layers += _prune_unit(u, hs.get(u.name), method, s, pat, blocksize, percdamp)
                hs.pop(u.name, None)  # free the Hessian as soon as its layers are done
        zeros = sum(r["sparsity"] * r["shape"][0] * r["shape"][1] for r in layers)
        total = sum(r["shape"][0] * r["shape"][1] for r in layers)
        report["layers"] = layers
        report["pruned_fraction"] = zeros / total
        recipe.record(model, "sparsity", {"method": method, "pattern": pat.name, "sparsity": s,
                                          "groups": groups, "weighting": report["weighting"],
                                          "layers": [r["layer"] for r in layers]})
    report["params_before"] = params_before
    report["params_after"] = param_count(model)
    report["seconds"] = round(time.perf_counter() - t0, 3)
    return report


@recipe.register_op("sparsity")
def _replay_sparsity(model: nn.Module, spec: dict[str, Any]) -> nn.Module:
    """Unstructured / N:M pruning keeps every shape (the zeros are in the weights): nothing to
    rebuild. Kept in the recipe for provenance (and for `to_semi_structured` to know the pattern)."""
    recipe.record(model, "sparsity", spec)
    return model
