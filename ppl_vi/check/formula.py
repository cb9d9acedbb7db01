"""The objective Pyro optimises, written out from the traces with the user's own site names and distributions.

From one run of the guide and the model replayed against it, every observed site x contributes
-log p(x | ...) and every latent site z contributes log q(z | ...) - log p(z | ...) to the negative
ELBO, each inside E_q and times the site's scale (N/B of a subsampled plate, β under
``poutine.scale``)::

    -ELBO(x) = E_q(z|x)[-log Bernoulli(x | logits=f(z))] + E_q(z|x)[log Normal(z | μ=g(x), σ=g(x)) - log Normal(z | μ=0, σ=1)]

A distribution's parameter is shown as its number where it is one fixed constant, θ (model) or φ
(guide) where it is one learnable constant, and ``f(...)`` (model) or ``g(...)`` (guide) of what it
may depend on otherwise. The same objective is given as LaTeX (for
the HTML report, rendered there without TeX) and, for the importance-weighted bound, as
-log (1/K) Σ_k p(x, z_k) / q(z_k | x).
"""

from __future__ import annotations

from typing import Dict, List, Optional

import torch
from pyro import poutine

from ppl_vi.check.preflight import deepest_plate
from ppl_vi.check.terms import SiteTerms, read_draw_set, trace_pairs
from ppl_vi.models.base import Batch
from ppl_vi.sites import is_deterministic, is_latent, is_variable

GREEK = {"loc": ("μ", r"\mu"), "scale": ("σ", r"\sigma"), "probs": ("p", "p"), "logits": ("logits", r"\mathrm{logits}"),
         "df": ("ν", r"\nu"), "concentration": ("α", r"\alpha"), "rate": ("λ", r"\lambda"),
         "concentration1": ("α", r"\alpha"), "concentration0": ("β", r"\beta"), "covariance_matrix": ("Σ", r"\Sigma"),
         "scale_tril": ("L", "L")}


def _base(fn):
    """The distribution inside Independent / masked / expanded wrappers (a LogNormal stays a LogNormal)."""
    while type(fn).__name__ in ("Independent", "MaskedDistribution", "ExpandedDistribution"):
        fn = fn.base_dist
    return fn


def _number(v: float) -> str:
    return f"{v:.4g}"


def _depends(value, sources: Dict[str, object]) -> List[str]:
    """The names of ``sources`` (data tensors, latent draws) that ``value`` is a function of (autograd)."""
    if not value.requires_grad:
        return []
    names = [n for n, t in sources.items() if torch.is_tensor(t) and t.requires_grad]
    if not names:
        return []
    grads = torch.autograd.grad(value.sum(), [sources[n] for n in names], allow_unused=True, retain_graph=True)
    return [n for n, g in zip(names, grads) if g is not None]


def _params(fn, sources: Dict[str, object], f: str, learned: str, fallback: str) -> List[tuple]:
    """(text, latex) of each parameter a distribution was built with: ``f(z)`` of the data or latents it
    depends on (autograd); ``fallback`` where it varies without such a dependency (a discrete draw's
    index); else θ/φ (``learned``) where it is learnable, its number where it is one fixed constant."""
    fn = _base(fn)
    keys = getattr(fn, "arg_constraints", {})
    given = {k: v for k, v in vars(fn).items() if k in keys and torch.is_tensor(v)}
    if not given:  # parameters held as properties (LogNormal's loc and scale live on its base)
        given = {k: getattr(fn, k) for k in keys if torch.is_tensor(getattr(fn, k, None))}
    if "logits" in given and "probs" in given:  # one was computed from the other: show the logits
        given.pop("probs")
    out = []
    for key, value in given.items():
        text, tex = GREEK.get(key, (key, r"\mathrm{" + key.replace("_", r"\_") + "}"))
        flat = value.detach().reshape(-1)
        deps = _depends(value, sources)
        constant = flat.numel() and bool((flat == flat[0]).all())
        if deps:
            shown = f"{f}({', '.join(deps)})"
        elif not constant and fallback:  # varies: a function of something autograd cannot see (a discrete draw)
            shown = fallback
        elif value.requires_grad:
            shown = learned
        elif constant:
            shown = _number(flat[0].item())
        else:
            shown = "fixed"
        shown_tex = {"θ": r"\theta", "φ": r"\phi"}.get(shown, shown.replace("_", r"\_"))
        out.append((f"{text}={shown}", f"{tex}={shown_tex}"))
    return out


def _tex_name(name: str) -> str:
    return r"\mathrm{" + name.replace("_", r"\_") + "}"


def _density(site, sources: Dict[str, object], f: str, learned: str, fallback: str) -> tuple:
    """('Normal(z | μ=0, σ=1)', LaTeX) of a site."""
    dist_name = type(_base(site["fn"])).__name__
    params = _params(site["fn"], sources, f, learned, fallback)
    text = f"{dist_name}({site['name']} | {', '.join(p[0] for p in params)})" if params else f"{dist_name}({site['name']})"
    tex_params = ", ".join(p[1] for p in params)
    tex = r"\mathrm{" + dist_name + "}(" + _tex_name(site["name"]) + (r"\mid " + tex_params if params else "") + ")"
    return text, tex


def _data_plate_name(model_trace, max_plate_nesting: int) -> Optional[str]:
    """The name of the plate at dim -max_plate_nesting around the observed sites (a built-in model's data plate)."""
    for site in model_trace.nodes.values():
        if site["type"] == "sample" and site["is_observed"]:
            for f in site["cond_indep_stack"]:
                if f.dim == -max_plate_nesting:
                    return f.name
    return None


def bound_formula(model, guide, batch: Batch, max_plate_nesting: Optional[int] = 1, terms: Optional[SiteTerms] = None,
                  data_plate: Optional[str] = None, vectorized: bool = True, shapes=None) -> Dict[str, str]:
    """{"text", "latex", "iwae_text", "iwae_latex"}: the negative ELBO (and IWAE_K bound) Pyro optimises
    for this pair, local terms per datapoint, global latents' terms once for the batch, model-enumerated
    sites summed out inside the likelihood; {} where the pair does not run. ``terms`` is unused (kept for
    callers that pass it)."""
    # one plain particle, the data marked as requiring grad: autograd then says what each parameter depends on
    traced = {k: (v.detach().clone().requires_grad_(True) if torch.is_tensor(v) and v.is_floating_point() else v)
              for k, v in batch.items()}
    try:
        with torch.enable_grad(), torch.random.fork_rng():
            nest = max_plate_nesting
            if nest is None:  # read off one plain run, as the checker does
                plain = poutine.trace(guide).get_trace(**batch)
                nest = deepest_plate(plain, poutine.trace(poutine.replay(model, trace=plain)).get_trace(**batch))
            gt, _ = trace_pairs(model, guide, traced, 1, nest, vectorized=False)[0]
            # again at the same draws made leaves: the model's parameters then depend on the data only directly
            leaves = {n: s["value"].detach().clone().requires_grad_(s["value"].is_floating_point()).unsqueeze(0)
                      for n, s in gt.nodes.items() if is_latent(s)}
            pairs = trace_pairs(model, guide, traced, 1, nest, vectorized=False, values=leaves)
            gt, mt = pairs[0]
            plate = data_plate or _data_plate_name(mt, nest)
            if plate is None:
                return {}
            size = next(v for v in batch.values() if torch.is_tensor(v)).shape[0]
            own = read_draw_set(pairs, 1, nest, plate, False, size, shapes or {})
    except Exception:  # noqa: BLE001 - no formula rather than no check
        return {}
    data_sources = dict(traced)
    summed = {n for names in own.enumerated.values() for n in names}
    latents = [n for n, s in gt.nodes.items() if is_latent(s) and n in mt.nodes]  # not an autoguide's auxiliary
    data = ", ".join(batch)
    z = ", ".join(latents) or "∅"
    q_text = f"q({z} | {data})"
    q_tex = "q(" + ", ".join(_tex_name(n) for n in latents) + r"\mid " + ", ".join(_tex_name(n) for n in batch) + ")"
    observed = [n for n in own.observed]
    c = next((own.scales[n] for n in observed if n not in own.global_sites), 1.0)
    order = list(mt.nodes)
    local_text, local_tex, global_text, global_tex, ratio_text, ratio_tex = [], [], [], [], [], []

    def density(name: str, side: str) -> tuple:
        trace = mt if side == "p" else gt
        before = [n for n in order if n in latents + list(summed) and order.index(n) < order.index(name)]
        sources = {**{n: mt.nodes[n]["value"] for n in before},
                   **{n: v for n, v in data_sources.items() if n != name}}  # latents before it, other data
        discrete = [n for n in before if not getattr(mt.nodes[n]["fn"], "has_rsample", False)]
        if side == "p":
            return _density(trace.nodes[name], sources, "f", "θ", f"f({', '.join(before)})" if discrete else "")
        return _density(trace.nodes[name], data_sources, "g", "φ", "")

    sites = [n for n in order if is_variable(mt.nodes[n]) and n not in summed and not is_deterministic(mt.nodes[n])]
    for name in sorted(sites, key=lambda n: not mt.nodes[n]["is_observed"]):  # the likelihood first
        group = next((key for key in own.enumerated if name in key.split("+")), None)
        scale = own.scales.get(group or name, c)
        is_global = name in own.global_sites or (group is not None and group in own.global_sites)
        weight = scale / c if c and not is_global else scale
        w_text = "" if abs(weight - 1) < 1e-12 else f"{_number(weight)} × "
        w_tex = "" if abs(weight - 1) < 1e-12 else _number(weight) + r"\,"
        p_text, p_tex = density(name, "p")
        if group is not None and mt.nodes[name]["is_observed"]:  # log Σ_c p(c) p(x | c, ...)
            factors = [density(n, "p") for n in own.enumerated[group]] + [(p_text, p_tex)]
            names = ", ".join(own.enumerated[group])
            p_text = f"Σ_{{{names}}} " + " · ".join(f[0] for f in factors)
            p_tex = r"\sum_{" + ", ".join(_tex_name(n) for n in own.enumerated[group]) + "} " + r"\,".join(
                f[1] for f in factors)
        if mt.nodes[name]["is_observed"]:
            text = f"{w_text}E_{q_text}[−log {p_text}]"
            tex = w_tex + r"\mathbb{E}_{" + q_tex + r"}[-\log " + p_tex + "]"
        else:
            g_text, g_tex = density(name, "q")
            text = f"{w_text}E_{q_text}[log {g_text} − log {p_text}]"
            tex = w_tex + r"\mathbb{E}_{" + q_tex + r"}[\log " + g_tex + r" - \log " + p_tex + "]"
        (global_text if is_global else local_text).append(text)
        (global_tex if is_global else local_tex).append(tex)
        ratio_text.append(p_text)
        ratio_tex.append(p_tex)
    auxiliary = [n for n, s in gt.nodes.items() if is_latent(s) and n not in mt.nodes]  # an autoguide's
    for name in auxiliary:  # its log q is a term of Pyro's loss, with no log p
        g_text, g_tex = _density(gt.nodes[name], data_sources, "g", "φ", "")
        is_global = name in own.global_sites
        (global_text if is_global else local_text).append(f"E_{q_text}[log {g_text}]")
        (global_tex if is_global else local_tex).append(r"\mathbb{E}_{" + q_tex + r"}[\log " + g_tex + "]")
    guides = [density(n, "q") for n in latents] + [_density(gt.nodes[n], data_sources, "g", "φ", "")
                                                    for n in auxiliary]
    guide_text, guide_tex = [g[0] for g in guides], [g[1] for g in guides]
    scale_text = "" if c == 1 else "N/B × "
    scale_tex = "" if c == 1 else r"\frac{N}{B}\,"
    lhs = f"−ELBO({data})"
    tex_lhs = r"-\mathrm{ELBO}(" + ", ".join(_tex_name(n) for n in batch) + ") = "
    if not global_text:
        text = f"{lhs} = {scale_text}{'(' if c != 1 else ''}{' + '.join(local_text)}{')' if c != 1 else ''}"
        latex = (tex_lhs + scale_tex + (r"\left(" if c != 1 else "") + " + ".join(local_tex)
                 + (r"\right)" if c != 1 else ""))
    else:  # local terms summed over the batch's datapoints, the global ones once
        text = f"{lhs} = {scale_text}Σ_i [{' + '.join(local_text)}] + {' + '.join(global_text)}"
        latex = (tex_lhs + scale_tex + r"\sum_i \left[" + " + ".join(local_tex) + r"\right] + "
                 + " + ".join(global_tex))
    joint = "" if not global_text else " (joint over the batch: Π_i over the local factors)"
    iwae_text = (f"−IWAE_K({data}) = −{scale_text}log (1/K) Σ_k [{' · '.join(ratio_text)}] / "
                 f"[{' · '.join(guide_text)}],  {', '.join(n + '_k' for n in latents)} ~ {q_text}{joint}")
    iwae_latex = (r"-\mathrm{IWAE}_K = -" + scale_tex + r"\log \frac{1}{K}\sum_{k=1}^{K} \frac{"
                  + r"\,".join(ratio_tex) + "}{" + r"\,".join(guide_tex) + "}")
    out = {"text": text, "latex": latex, "iwae_text": iwae_text, "iwae_latex": iwae_latex}
    notes = []
    if c != 1:
        notes.append(f"N/B = {_number(c)}: the minibatch scale of the subsampled data plate")
    if global_text:
        latents = [n for n in own.global_sites if n not in own.observed]
        factors = [n for n in own.global_sites if n in own.observed]
        notes.append(f"global latent(s) {latents}" + (f" and factor(s) {factors}" if factors else "")
                     + ": their terms count once for the batch, not per datapoint")
    if summed:
        notes.append(f"{sorted(summed)} enumerated in the model: summed out inside the likelihood (TraceEnum_ELBO)")
    if notes:
        out["note"] = "; ".join(notes)
    return out
