"""Structured OBS pruning: whole attention heads and FFN neurons, with the layers physically shrunk.

A head (or neuron) is a group of input columns of the Linear(s) that consume it:
    attention heads  columns [h·d, (h+1)·d) of attn.to_out.0 (image stream) and attn.to_add_out
                     (context stream: joint attention shares its heads between both streams, so
                     their losses are summed); for a FLUX single block, of proj_out;
    FFN neurons      input column j of ff.net.2 (ff_context.net.2); for a FLUX single block,
                     column dim_attn + j of proj_out.
Removing group S from a consumer with weight W (out, in) and input Hessian H costs
    ΔL(S) = tr(W_:S [(H⁻¹)_SS]⁻¹ W_:Sᵀ)
once the remaining columns are compensated by  W ← W - W_:S [(H⁻¹)_SS]⁻¹ (H⁻¹)_S:  (OBS for a
group), after which H⁻¹ ← H⁻¹ - (H⁻¹)_:S [(H⁻¹)_SS]⁻¹ (H⁻¹)_S: is the inverse Hessian of the
remaining columns. Groups are removed greedily, cheapest first, re-scoring after each removal
(a few groups at a time for FFN neurons). Then the producers lose the matching rows (to_q/k/v,
add_q/k/v_proj; ff.net.0.proj; proj_mlp), the consumers the columns, and `attn.heads` drops.
q/k RMSNorms normalise over head_dim with one weight shared by all heads, so they stay as they are.

The shrink is recorded in the model's recipe as op "shrink" (paths and sizes), so artifacts
rebuild the smaller layers on the meta device before loading the weights.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import torch
import torch.nn as nn

from hprune import recipe
from hprune.errors import CheckpointError, HpruneError

HEADS, NEURONS = "heads", "neurons"


@dataclass
class StructuredSite:
    """One prunable family of groups: the heads of one attention or the neurons of one FFN.

    producers: paths of Linears whose output rows form the groups (sliced by rows);
    consumers: (path, column offset) of Linears whose input columns form the groups;
    group_size: head_dim for heads, 1 for neurons; count: number of groups now."""

    name: str
    block: int
    kind: str
    producers: list[str]
    consumers: list[tuple[str, int]]
    group_size: int
    count: int
    attention: str | None = None  # the attention module (heads only)
    owner: str | None = None  # FLUX single block path (its bookkeeping attributes change too)
    norms: list[str] = field(default_factory=list)

    def columns(self, offset: int) -> torch.Tensor:
        """(count, group_size) input-column indices of each group in a consumer."""
        return offset + torch.arange(self.count * self.group_size).view(self.count, self.group_size)


def _linear(model: nn.Module, path: str) -> nn.Linear | None:
    try:
        m = model.get_submodule(path)
    except AttributeError:
        return None
    return m if isinstance(m, nn.Linear) else None


def _attention_site(model: nn.Module, block: int, attn_path: str, owner: str | None) -> StructuredSite | None:
    attn = model.get_submodule(attn_path)
    heads = int(attn.heads)
    producers = [f"{attn_path}.{n}" for n in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj")
                 if isinstance(getattr(attn, n, None), nn.Linear)]
    q = _linear(model, producers[0])
    head_dim = q.out_features // heads
    consumers: list[tuple[str, int]] = []
    if owner is not None:  # FLUX single block: attention output = the first columns of proj_out
        consumers.append((f"{owner}.proj_out", 0))
    else:
        to_out = getattr(attn, "to_out", None)
        if to_out is not None and isinstance(to_out[0], nn.Linear):
            consumers.append((f"{attn_path}.to_out.0", 0))
        if isinstance(getattr(attn, "to_add_out", None), nn.Linear):
            consumers.append((f"{attn_path}.to_add_out", 0))
    norms = []
    for n in ("norm_q", "norm_k", "norm_added_q", "norm_added_k"):
        norm = getattr(attn, n, None)
        w = getattr(norm, "weight", None) if norm is not None else None
        if w is not None and w.numel() != head_dim:
            raise HpruneError(f"{attn_path}.{n} normalises across heads ({w.numel()} features, head_dim "
                              f"{head_dim}); removing heads would change it, so structured pruning does not "
                              f"support this attention")
        if w is not None:
            norms.append(f"{attn_path}.{n}")
    if not consumers or heads < 2:
        return None
    return StructuredSite(f"{attn_path}", block, HEADS, producers, consumers, head_dim, heads,
                          attention=attn_path, owner=owner, norms=norms)


def find_sites(model: nn.Module, blocks: Iterable[int] | None = None) -> list[StructuredSite]:
    """Structured sites of `model`'s blocks (all, or the given block indices), in execution order.
    Removed blocks and components have none."""
    from hprune.models import get_adapter

    ad = get_adapter(model)
    wanted = set(range(ad.num_blocks(model))) if blocks is None else set(blocks)
    sites: list[StructuredSite] = []
    for info in ad.blocks(model):
        if info.index not in wanted or "block" in info.removed:
            continue
        blk = ad.get_block(model, info.index)
        base = info.name
        if info.kind == "flux_single":
            attn_w = _single_attn_cols(blk)
            if getattr(blk, "attn", None) is not None:
                s = _attention_site(model, info.index, f"{base}.attn", owner=base)
                if s is not None:
                    sites.append(s)
            if getattr(blk, "proj_mlp", None) is not None and blk.proj_mlp.out_features > 1:
                sites.append(StructuredSite(f"{base}.proj_mlp", info.index, NEURONS, [f"{base}.proj_mlp"],
                                            [(f"{base}.proj_out", attn_w)], 1, blk.proj_mlp.out_features,
                                            owner=base))
            continue
        for attn_name in ("attn", "attn2"):
            if getattr(blk, attn_name, None) is not None:
                s = _attention_site(model, info.index, f"{base}.{attn_name}", owner=None)
                if s is not None:
                    sites.append(s)
        for ff_name in ("ff", "ff_context"):
            ff = getattr(blk, ff_name, None)
            if ff is None:
                continue
            prod, cons = _linear(model, f"{base}.{ff_name}.net.0.proj"), _linear(model, f"{base}.{ff_name}.net.2")
            if prod is None or cons is None:
                raise HpruneError(f"{base}.{ff_name}: unsupported feed-forward layout (expected net.0.proj and net.2)")
            if prod.out_features > 1:
                sites.append(StructuredSite(f"{base}.{ff_name}", info.index, NEURONS, [f"{base}.{ff_name}.net.0.proj"],
                                            [(f"{base}.{ff_name}.net.2", 0)], 1, prod.out_features))
    return sites


def _single_attn_cols(block: nn.Module) -> int:
    """Columns of a FLUX single block's proj_out that carry the attention output."""
    cols = getattr(block, "_attn_cols", None)
    if cols is not None:
        return int(cols)
    attn = getattr(block, "attn", None)
    return attn.to_q.out_features if attn is not None else 0


def removal_count(count: int, sparsity: float, multiple: int = 1) -> int:
    """Groups to remove from `count` at `sparsity`, rounded so that the number kept is a multiple
    of `multiple` when `count` is (GEMM-friendly widths; N:M pruning afterwards needs widths
    divisible by M), and at least one group (or `multiple`) is kept."""
    keep = count - int(round(sparsity * count))
    if multiple > 1 and count % multiple == 0:
        keep = max(multiple, int(round(keep / multiple)) * multiple)
    return max(0, min(count - 1, count - keep))


# -- the OBS state of one consumer Linear ----------------------------------------------------------
class ColumnOBS:
    """Weight W (out, in) and inverse Hessian H⁻¹ (in, in) of one consumer, in float64, under
    group removals. `percdamp` damps H by that fraction of its mean diagonal; dead inputs (zero
    diagonal) get weight 0 and diagonal 1, as in SparseGPT."""

    def __init__(self, weight: torch.Tensor, hessian: torch.Tensor, percdamp: float = 0.01):
        self.W = weight.detach().to(torch.float64).clone()
        H = hessian.detach().to(device=self.W.device, dtype=torch.float64).clone()
        if H.shape != (self.W.shape[1], self.W.shape[1]):
            raise HpruneError(f"hessian {tuple(H.shape)} does not fit a weight with {self.W.shape[1]} inputs")
        diag = torch.diagonal(H)
        dead = diag == 0
        diag[dead] = 1.0
        self.W[:, dead] = 0
        diag.add_(percdamp * diag.mean())
        L, info = torch.linalg.cholesky_ex(H)
        if int(info) != 0:
            raise HpruneError("consumer Hessian is not positive definite (non-finite activations?)")
        self.Hinv = torch.cholesky_inverse(L)

    def group_losses(self, cols: torch.Tensor) -> torch.Tensor:
        """cols (G, g) -> (G,) loss tr(W_:S [(H⁻¹)_SS]⁻¹ W_:Sᵀ) of removing each group alone."""
        cols = cols.to(self.W.device)
        Hs = self.Hinv[cols.unsqueeze(2), cols.unsqueeze(1)]  # (G, g, g)
        Ws = self.W[:, cols].permute(1, 2, 0)  # (G, g, out)
        if cols.shape[1] == 1:
            return Ws.square().sum((1, 2)) / Hs.view(-1)
        return (Ws * torch.linalg.solve(Hs, Ws)).sum((1, 2))

    def remove(self, cols: torch.Tensor) -> None:
        """Removes input columns `cols` (k,) and compensates the others (OBS group update)."""
        cols = cols.to(self.W.device).flatten()
        coef = torch.linalg.solve(self.Hinv[cols][:, cols], self.Hinv[cols, :])  # (k, in)
        self.W -= self.W[:, cols] @ coef
        self.Hinv -= self.Hinv[:, cols] @ coef
        self.W[:, cols] = 0  # exact (the update makes them ~0)
        # Keep the removed rows/cols of H⁻¹ inert for later solves.
        self.Hinv[cols, :] = 0
        self.Hinv[:, cols] = 0
        self.Hinv[cols, cols] = 1


def magnitude_group_scores(weights: Sequence[torch.Tensor], cols: Sequence[torch.Tensor]) -> torch.Tensor:
    """L1-norm baseline: Σ over consumers of |W| over each group's columns. -> (G,) float64."""
    return sum(w.detach().double().abs()[:, c].sum((0, 2)) for w, c in zip(weights, cols))


def wanda_group_scores(weights: Sequence[torch.Tensor], hessians: Sequence[torch.Tensor],
                       cols: Sequence[torch.Tensor]) -> torch.Tensor:
    """Wanda baseline: Σ over consumers and the group's columns of |W_ij|·‖X_j‖₂. -> (G,)."""
    total = 0
    for w, h, c in zip(weights, hessians, cols):
        norms = torch.diagonal(h.to(device=w.device, dtype=torch.float64)).clamp_min(0).sqrt()
        total = total + (w.detach().double().abs() * norms.unsqueeze(0))[:, c].sum((0, 2))
    return total


def greedy_obs_removal(states: Sequence[ColumnOBS], cols: Sequence[torch.Tensor], n_remove: int,
                       max_rounds: int = 32) -> torch.Tensor:
    """Removes `n_remove` of G groups from every state, cheapest summed loss first, re-scoring
    after each round; a round removes ceil(n_remove / max_rounds) groups (one at a time for heads
    in practice). cols[i]: (G, g) columns of the groups in states[i]. Returns the kept group
    indices (sorted)."""
    G = cols[0].shape[0]
    alive = torch.ones(G, dtype=torch.bool)
    per_round = max(1, -(-n_remove // max_rounds))
    done = 0
    while done < n_remove:
        idx = torch.nonzero(alive).flatten()
        loss = sum(s.group_losses(c[idx]).cpu() for s, c in zip(states, cols))
        k = min(per_round, n_remove - done)
        pick = idx[torch.topk(loss, k, largest=False).indices]
        for s, c in zip(states, cols):
            s.remove(c[pick])
        alive[pick] = False
        done += k
    return torch.nonzero(alive).flatten()


# -- physical shrinking ---------------------------------------------------------------------------
def sliced_linear(lin: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None,
                  weight: torch.Tensor | None = None, device: torch.device | str | None = None) -> nn.Linear:
    """A new Linear holding `lin`'s rows and/or columns (index tensors), in lin's dtype, on `device`
    (default lin's: block by block, a block's layers are sliced on the compute device and the new
    ones made on the host); `weight` (full shape of lin) replaces lin.weight's values first. Meta
    stays meta."""
    out_f = lin.out_features if rows is None else len(rows)
    in_f = lin.in_features if cols is None else len(cols)
    where = lin.weight.device if device is None or lin.weight.device.type == "meta" else torch.device(device)
    new = nn.Linear(in_f, out_f, bias=lin.bias is not None, device=where, dtype=lin.weight.dtype)
    if lin.weight.device.type != "meta":
        with torch.no_grad():
            w = lin.weight if weight is None else weight.to(lin.weight)
            dev = lin.weight.device
            if rows is not None:
                w = w.index_select(0, rows.to(dev))
            if cols is not None:
                w = w.index_select(1, cols.to(dev))
            new.weight.copy_(w)
            if lin.bias is not None:
                new.bias.copy_(lin.bias if rows is None else lin.bias.index_select(0, rows.to(dev)))
    new.weight.requires_grad_(lin.weight.requires_grad)
    if new.bias is not None:
        new.bias.requires_grad_(lin.bias.requires_grad)
    return new


def apply_shrink(model: nn.Module, entry: dict[str, Any], keep: torch.Tensor | None = None,
                 device: torch.device | str | None = None) -> None:
    """Physically removes groups of one site, in place.

    entry: {"site", "kind", "producers": [path], "consumers": [[path, offset]], "group_size",
    "before", "after", optional "attention", "owner"}; keep: (after,) kept group indices (None:
    the first `after`, enough when weights are loaded afterwards, as on replay); device: where
    the shrunk Linears are made (default: where the old ones are)."""
    g, before, after = int(entry["group_size"]), int(entry["before"]), int(entry["after"])
    keep = torch.arange(after) if keep is None else torch.as_tensor(keep, dtype=torch.long).sort().values
    if len(keep) != after or not 0 < after <= before:
        raise CheckpointError(f"shrink of {entry.get('site')}: inconsistent sizes (before {before}, after {after})")
    rows = (keep.view(-1, 1) * g + torch.arange(g)).flatten()
    for path in entry["producers"]:
        lin = _linear(model, path)
        if lin is None or lin.out_features != before * g:
            raise CheckpointError(f"shrink of {entry['site']}: {path} is not a Linear with {before * g} outputs")
        model.set_submodule(path, sliced_linear(lin, rows=rows, device=device))
    for path, offset in entry["consumers"]:
        lin = _linear(model, path)
        if lin is None or lin.in_features < offset + before * g:
            raise CheckpointError(f"shrink of {entry['site']}: {path} has no input columns "
                                  f"[{offset}, {offset + before * g})")
        cols = torch.cat([torch.arange(offset), offset + rows,
                          torch.arange(offset + before * g, lin.in_features)])
        model.set_submodule(path, sliced_linear(lin, cols=cols, device=device))
    if entry["kind"] == HEADS:
        attn = model.get_submodule(entry["attention"])
        attn.heads = after
        for attr in ("inner_dim", "inner_kv_dim"):
            if isinstance(getattr(attn, attr, None), int):
                setattr(attn, attr, after * g)
    owner = entry.get("owner")
    if owner:  # FLUX single block: proj_out's column split between attention and MLP changed
        blk = model.get_submodule(owner)
        attn_cols = after * g if entry["kind"] == HEADS else _single_attn_cols(blk)
        blk._attn_cols = attn_cols
        mlp = getattr(blk, "proj_mlp", None)
        if mlp is not None:
            if hasattr(blk, "mlp_hidden_dim"):
                blk.mlp_hidden_dim = mlp.out_features
            if hasattr(blk.proj_out, "_tp_packed_row_blocks"):
                blk.proj_out._tp_packed_row_blocks = [attn_cols, mlp.out_features]


def shrink_entry(site: StructuredSite, keep: torch.Tensor) -> dict[str, Any]:
    """The recipe entry for removing all groups of `site` but `keep`."""
    entry: dict[str, Any] = {"site": site.name, "block": site.block, "kind": site.kind,
                             "producers": list(site.producers), "consumers": [list(c) for c in site.consumers],
                             "group_size": site.group_size, "before": site.count, "after": int(len(keep))}
    if site.attention:
        entry["attention"] = site.attention
        entry["kept"] = [int(k) for k in keep]  # head indices: small, useful provenance
    else:  # neurons: thousands per FFN, so a bitmask (hprune.lora slices a LoRA with it)
        entry["kept_mask"] = _mask_hex(keep)
    if site.owner:
        entry["owner"] = site.owner
    return entry


def _mask_hex(keep: torch.Tensor) -> str:
    """Kept group indices as a hex integer whose bit i is set when group i is kept."""
    value = 0
    for k in torch.as_tensor(keep).tolist():
        value |= 1 << int(k)
    return format(value, "x")


def kept_groups(entry: dict[str, Any]) -> torch.Tensor | None:
    """(after,) sorted indices of the groups a shrink entry kept, or None when the recipe did not
    record them (artifacts written before hprune recorded neuron masks)."""
    if "kept" in entry:
        return torch.as_tensor(entry["kept"], dtype=torch.long).sort().values
    if "kept_mask" in entry:
        value = int(entry["kept_mask"], 16)
        idx = [i for i in range(int(entry["before"])) if value >> i & 1]
        return torch.as_tensor(idx, dtype=torch.long)
    return None


def record_shrink(model: nn.Module, entries: list[dict[str, Any]], meta: dict[str, Any]) -> None:
    if entries:
        recipe.record(model, "shrink", {"sites": entries, **meta})


@recipe.register_op("shrink")
def _replay_shrink(model: nn.Module, spec: dict[str, Any]) -> nn.Module:
    sites = spec.get("sites")
    if not isinstance(sites, list):
        raise CheckpointError("recipe op 'shrink' without a list of sites")
    for entry in sites:
        apply_shrink(model, entry)
    recipe.record(model, "shrink", spec)
    return model
