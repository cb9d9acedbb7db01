"""Diagnose, don't just fail: name the likely mistake in a hand bound from value and gradient evidence.

On the very draws where the hand bound h and Pyro's estimate p disagree (per datapoint, (B,)),
the residual r = h - p is held against the shapes the common mistakes leave, each a one-line
verdict that starts with its keyword:

* **constant**: r is the same at every datapoint (a data-independent offset). The constant is
  matched against ½·log 2π·D (D summed over any sites' sizes), log K, log 2, ... each possibly times
  the minibatch scale N/B; the gradients say whether it moves a parameter (a dropped normalising
  constant does not; a dropped -log σ does).
* **sign**: h = -p (the bound, not the negative bound), or one term with its sign flipped:
  r = -2 t for a site's term t (e.g. the KL).
* **missing entropy** / **missing term**: r = -t for one piece t (log q(z|x): the entropy).
* **scale**: h = a·p, or one term scaled, r = (a - 1) t, with a matched against N/B, 1/K, K, B,
  1/B, β (mean vs sum over the batch or over particles, the minibatch scale twice or not at all).
* **log-mean-exp**: an IWAE bound written as the mean of log w (the ELBO: Jensen's gap), or an ELBO
  written as a log-mean-exp; **scale** also for N/B (or β) *inside* the log-mean-exp:
  -log (1/K) Σ_k exp(c log w_k) instead of -c log (1/K) Σ_k w_k.
* **per datapoint**: a (K, B) result (one value per particle) or a batch total.
* **missing log-Jacobian**: a transformed distribution's density (LogNormal...) taken as its base
  density, the log|dθ/du| left out; **missing term** also for a dropped normalising -log σ.
* **constant** also for a data-only normalising constant (-Σ log x! of a Poisson, log C(n, x) of a
  Binomial) and for a residual that does not change with the draws but differs per datapoint.
* with global latents, for a global latent's term counted once per datapoint (factor B) or scaled by
  N/B, and 1/D for a mean over a site's D values (a binary cross-entropy averaged over pixels).

A column of evidence is one datapoint, or, with several draw sets side by side (the user-file
checker's, :func:`ppl_vi.check.terms.view`), one datapoint of one draw set; with global latents, one
draw set's batch total. Every test is "equal at every column to rounding" (``rtol``), so a verdict is
evidence, not a guess; with none matching, the verdict says so and names the columns and the residual.
"""

from __future__ import annotations

import itertools
import math
import re
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ppl_vi.check.terms import SiteTerms, site_terms

LOG_2PI = math.log(2 * math.pi)


def _close(a: Tensor, b: Tensor, rtol: float) -> bool:
    a, b = a.detach().double(), b.detach().double()
    if a.shape != b.shape:
        return False
    tol = rtol * max(a.abs().max().item(), b.abs().max().item(), 1.0)
    return bool(((a - b).abs() <= tol).all())


def _fmt(x: float) -> str:
    return f"{x:.6g}"


def _datapoints(idx: Sequence[int]) -> str:
    idx = list(idx)
    return f"{idx[:8]}{' ...' if len(idx) > 8 else ''}"


# ------------------------------------------------------------------------------------------------
# what a constant or a factor may be


def _per_datapoint_dims(terms: SiteTerms) -> Dict[str, int]:
    """Numbers per datapoint of each local site (per batch of a global one), whatever a column is."""
    b = terms.batch_size or 1
    return {n: (d // b if terms.totals and not terms.is_global(n) and d % b == 0 else d) for n, d in terms.dims.items()}


def constant_names(terms: SiteTerms) -> List[Tuple[float, str]]:
    """(value, description) of the constants a hand derivation commonly drops or adds, per column: per
    datapoint, or (``terms.totals``) per batch, where a per-datapoint constant counts B times and a
    global site's once."""
    out: List[Tuple[float, str]] = []
    gaussian = "a Gaussian normalising constant dropped (or added)"
    dims = _per_datapoint_dims(terms)
    local = [n for n in list(terms.observed) + [n for n in dims if n not in terms.observed] if not terms.is_global(n)]
    for n in local:
        out.append((0.5 * LOG_2PI * dims[n], f"½·log 2π·D, D = {dims[n]} (the size of site {n!r}): {gaussian}"))
    total = sum(dims[n] for n in local)
    out.append((0.5 * LOG_2PI * total, f"½·log 2π·D, D = {total} (all sites): {gaussian}"))
    out += [(0.5 * LOG_2PI * d, f"½·log 2π·D, D = {d}: {gaussian}") for d in range(1, total + 1)]
    k = terms.num_particles
    if k > 1:
        out.append((math.log(k), f"log K, K = {k}: the 1/K of a log-mean-exp"))
    out += [(math.log(2), "log 2"), (math.log(math.pi), "log π"), (0.5 * math.log(math.pi), "½·log π"),
            (1.0, "1"), (0.5, "½")]
    c = terms.c
    if c != 1.0:
        def scaled(text: str) -> str:
            head, _, tail = text.partition(": ")
            return f"N/B · {head}, N/B = {_fmt(c)} (the minibatch scale)" + (f": {tail}" if tail else "")

        out = out + [(c * v, scaled(text)) for v, text in out]
    if terms.totals:  # per batch: a per-datapoint constant B times, a global site's once, data constants summed
        b = terms.batch_size
        out = [(b * v, f"B × ({text}), B = {b} datapoints") for v, text in out]
        for n in terms.global_sites:
            out.append((0.5 * LOG_2PI * dims[n], f"½·log 2π·D, D = {dims[n]} (the size of the global site {n!r}): "
                        f"{gaussian}"))
        for values, what in terms.data_constants:
            out.append((c * values.detach().double().mean().item(), f"{what}, summed over the batch: a data-only "
                        "normalising constant dropped (or added)"))
    return out


def factor_names(terms: SiteTerms, batch_size: int, global_piece: bool = False) -> List[Tuple[float, str]]:
    """(factor, description) of the scale factors a hand derivation commonly gets wrong; ``global_piece``:
    for a term of a global latent (counted once for the batch, never scaled by N/B)."""
    c, k = terms.c, terms.num_particles
    b = terms.batch_size or batch_size
    out = []
    if global_piece and b > 1:
        out += [(b, f"B = {b}: a global latent's term counted once per datapoint, where it counts once for the batch")]
    if global_piece and c != 1.0:
        out += [(c, f"N/B = {_fmt(c)}: the minibatch scale applied to a global latent's term (Pyro scales only the "
                    "data plate's sites)")]
    betas = {round(terms.scales[n] / c, 12) for n in terms.prior if c and not terms.is_global(n)} - {1.0}
    for beta in betas:  # a latent site's weight (poutine.scale) first: its likelier story
        out += [(beta, f"β = {_fmt(beta)}: the latent sites' weight β applied once more (or to the wrong term)"),
                (1 / beta, f"1/β = 1/{_fmt(beta)}: the latent sites' weight β (poutine.scale) left out")]
    if c != 1.0:
        out += [(c, f"N/B = {_fmt(c)}: the minibatch scale applied twice"),
                (1 / c, f"B/N = 1/{_fmt(c)}: the minibatch scale N/B left out")]
    if k > 1:
        out += [(k, f"K = {k}: a sum over the particles where Pyro averages"),
                (1 / k, f"1/K = 1/{k}: averaged over the particles twice")]
    if b > 1:
        out += [(b, f"B = {b}: a sum over the batch where each datapoint has its own value"),
                (1 / b, f"1/B = 1/{b}: a mean over the batch (the loss sums over datapoints)")]
    for n, d in _per_datapoint_dims(terms).items():
        if d > 1 and n in terms.observed:
            out += [(1 / d, f"1/D = 1/{d}: a mean over the D = {d} values of site {n!r} (e.g. a binary cross-entropy "
                            "averaged over pixels), where log p sums them"),
                    (d, f"D = {d}: the values of site {n!r} counted once more")]
    out += [(2.0, "2"), (0.5, "½")]
    return out


def _match(rtol: float) -> float:
    """How near a fitted constant or factor must be to a catalogue entry (relative): 1e-6 in float64,
    looser with the check's tolerance (float32)."""
    return max(1e-6, 10 * rtol)


def _name(value: float, catalogue: List[Tuple[float, str]], rtol: float) -> Optional[str]:
    """The catalogue entry ``|value|`` matches, signed; several distinct ones (β = K = 3) all said, the
    first the likeliest."""
    found, keys = [], []
    for v, text in catalogue:  # one story told twice (D = 5 of site x, and D = 5): the first, more specific
        key = (text.split(":")[0].split(" (")[0], round(v, 9))
        if abs(abs(value) - v) <= max(rtol, 1e-9) * max(abs(v), 1.0) and key not in keys:
            found.append(text)
            keys.append(key)
    if not found:
        return None
    return ("−" if value < 0 else "+") + " or ".join(found[:3])


# ------------------------------------------------------------------------------------------------
# the verdicts


def _gradient_note(grads_agree: Optional[bool]) -> str:
    if grads_agree is None:
        return ""
    return ("; the gradients agree (it moves no parameter)" if grads_agree
            else "; but the gradients differ: a parameter-dependent term (e.g. -log σ), not a pure constant")


def _columns(terms: SiteTerms, size: int) -> str:
    """What ``size`` columns are, in words."""
    if terms.totals:
        return f"batch totals of {size} draw sets"
    if terms.draw_sets > 1 and terms.batch_size:
        return f"{terms.batch_size} datapoints × {terms.draw_sets} draw sets"
    return f"{size} datapoints"


def _constant_verdict(label: str, what: str, const: float, size: int, terms: SiteTerms,
                      grads_agree: Optional[bool], rtol: float = 1e-7) -> str:
    named = _name(const, constant_names(terms), _match(rtol))
    unit = "per batch" if terms.totals else "per datapoint"
    return (f"constant: {label}: {what} differs from Pyro's by {_fmt(const)} {unit}, the same at all "
            f"{_columns(terms, size)}" + (f" = {named}" if named else " (no known constant matched)")
            + _gradient_note(grads_agree))


def _is_global_piece(name: str, terms: SiteTerms) -> bool:
    return "global latents" in name or any(f"[{n}]" in name or f"site {n!r}" in name
                                           or (name.startswith("of sites [") and f"{n!r}" in name)
                                           for n in terms.global_sites)


def _piece_verdict(label: str, name: str, a: float, terms: SiteTerms, size: int, rtol: float = 1e-7) -> str:
    """The verdict for r = a · piece: a = -2 a flipped sign, -1 a missing term, else a scale 1 + a."""
    if abs(a + 2) <= _match(rtol) * 2:
        return (f"sign: {label}: the term {name} has its sign flipped (the hand bound = Pyro's - 2 × that term "
                f"at every {'draw set' if terms.totals else 'datapoint'})")
    if abs(a + 1) <= _match(rtol):
        if "log-Jacobian" in name:
            return (f"missing log-Jacobian: {label}: the {name} is left out (a transformed distribution's density "
                    "in θ is the base density at u = T⁻¹(θ) divided by |dθ/du|)")
        if "the density at its location" in name:
            return (f"constant: {label}: the {name} is dropped (or added): the density's whole normalising constant "
                    "(½·log 2πσ², log 2b, log πσ, ...)")
        if "normalising constant" in name:
            return f"constant: {label}: the data-dependent {name} is dropped (or added): it differs per datapoint"
        if "normalising -log σ" in name:
            return (f"missing term: {label}: the {name} is left out (a dropped normalising term that moves the "
                    "scale's parameters)")
        entropy = "entropy" in name
        return (f"missing {'entropy' if entropy else 'term'}: {label}: the term {name} is left out"
                + (" (the guide's entropy -E_q log q(z|x))" if entropy else ""))
    named = _name(1 + a, factor_names(terms, size, _is_global_piece(name, terms)), _match(rtol))
    return (f"scale: {label}: the term {name} is multiplied by {_fmt(1 + a)}"
            + (f", a factor {named}" if named else " (no known factor matched)"))


def _data_pieces(terms: SiteTerms) -> Dict[str, Tensor]:
    """Data-only constants as pieces of Pyro's -ELBO, per column (scaled as their site)."""
    out = {}
    for values, what in terms.data_constants:
        out[f"{what} (a data-only normalising constant)"] = -terms.c * values.detach().double()
    return out


def residual_verdicts(label: str, hand: Tensor, reference: Tensor, terms: SiteTerms,
                      pieces: Dict[str, Tensor], rtol: float, grads_agree: Optional[bool] = None,
                      what: str = "the hand bound") -> List[str]:
    """Verdicts for a hand value against the reference, both one value per column (a datapoint, of one or
    several draw sets, or a batch total per draw set): constant offset, whole-bound factor or sign, one
    piece with its sign flipped, missing or scaled, a data-only constant, a residual that does not vary
    with the draws, and one such piece together with a constant offset (two mistakes at once)."""
    hand, reference = hand.detach().double(), reference.detach().double()
    if _close(hand, reference, rtol):
        return []
    r = hand - reference
    tol = rtol * max(hand.abs().max().item(), reference.abs().max().item(), 1.0)
    size = hand.numel()
    constant = (r.max() - r.min()).item() <= 10 * tol and size > 1
    ratio = None
    if bool((reference.abs() > tol).all()):
        q = hand / reference
        if (q.max() - q.min()).item() <= 10 * rtol * q.abs().max().item():
            ratio = q.mean().item()
    factor = None if ratio is None else _whole_factor(label, what, ratio, terms, size, rtol)
    named_factor = factor is not None and "no known factor" not in factor
    named_constant = constant and _name(r.mean().item(), constant_names(terms), _match(rtol)) is not None
    if named_factor and not named_constant:
        return [factor]
    pieces = {**pieces, **_data_pieces(terms)}
    if constant and not named_constant:  # a piece that does not vary either (a closed-form KL), mistaken?
        for name, piece in pieces.items():
            piece = piece.detach().double()
            if piece.abs().min().item() > tol and (piece.max() - piece.min()).item() <= 10 * tol:
                verdict = _piece_verdict(label, name, r.mean().item() / piece.mean().item(), terms, size, rtol)
                if "no known factor" not in verdict:
                    return [verdict]
    if constant:
        return [_constant_verdict(label, what, r.mean().item(), size, terms, grads_agree, rtol)]
    if factor:
        return [factor]
    for name, piece in pieces.items():  # one piece wrong
        a = _fit(r, piece)
        if a is not None and _close(reference + a * piece.detach().double(), hand, rtol):
            return [_piece_verdict(label, name, a, terms, size, rtol)]
    for name, piece in combined_pieces(pieces).items():  # the same mistake at several sites
        a = _fit(r, piece)
        if a is not None and _close(reference + a * piece, hand, rtol):
            verdict = _piece_verdict(label, name, a, terms, size, rtol)
            if "no known factor" not in verdict:
                return [verdict]
    m, b = terms.draw_sets, terms.batch_size
    if not terms.totals and b > 1 and size == m * b:  # a term averaged over the batch, its mean given to each
        for name, piece in {what: reference, **pieces, **combined_pieces(pieces)}.items():
            piece = piece.detach().double().reshape(m, b)
            if _close(reference + (piece.mean(1, keepdim=True) - piece).flatten(), hand, rtol):
                return [f"per datapoint: {label}: {name if name == what else 'the term ' + name} is averaged over the "
                        "batch, each datapoint given the batch's mean (1/B) Σ_i, where each datapoint has its own "
                        f"value (B = {b})"]
    if size >= 3:  # one piece wrong and a constant offset: least squares r = a · piece + C
        for name, piece in pieces.items():
            design = torch.stack([piece.detach().double(), torch.ones_like(r)], 1)
            if torch.linalg.matrix_rank(design).item() < 2:
                continue
            a, const = torch.linalg.lstsq(design, r.unsqueeze(1)).solution.flatten().tolist()
            if _close(reference + a * piece.detach().double() + const, hand, rtol):
                return [_piece_verdict(label, name, a, terms, size, rtol),
                        _constant_verdict(label, what, const, size, terms, None, rtol)]
    if not terms.totals and m > 1 and b and size == m * b:  # the same at every draw set: data, not draws
        by_set = r.reshape(m, b)
        if bool(((by_set - by_set[0]).abs() <= 10 * tol).all()):
            return [f"constant: {label}: {what} differs from Pyro's by a residual that does not change with the draws "
                    f"but differs per datapoint ({_fmt(by_set[0].min().item())} .. {_fmt(by_set[0].max().item())}): a "
                    "data-dependent constant dropped or added (no known one matched)" + _gradient_note(grads_agree)]
    bad = ((r.abs() > tol).nonzero().flatten().tolist())
    return [f"unexplained: {label}: {what} differs from Pyro's at {'draw sets' if terms.totals else 'datapoints'} "
            f"{_datapoints(bad)} of {_columns(terms, size)} (residual {_fmt(r.min().item())} .. {_fmt(r.max().item())}); no common mistake "
            "matched it exactly" + ("" if grads_agree is None else ("; the gradients agree" if grads_agree
                                                                    else "; the gradients differ"))]


def _fit(r: Tensor, piece: Tensor) -> Optional[float]:
    """The least-squares a of r = a · piece (None for a zero piece)."""
    piece = piece.detach().double()
    denom = (piece * piece).sum().item()
    return (r * piece).sum().item() / denom if denom else None


SITE_IN_PIECE = (re.compile(r"^of site '([^']+)' \("), re.compile(r"\[([^\]\s,]+)\]"))
MAX_COMBINED = 6  # sites of one kind taken in every combination; beyond, only all of them together


def _kind(name: str) -> Optional[Tuple[str, str]]:
    """(kind, site) of a one-site piece of :func:`pieces_for` or :meth:`SiteTerms.pieces`: a site's whole
    term ("site term"), or a finer piece with the site's name taken out (the log-Jacobian of a guide's
    transform, log q, ...); None for a piece of several sites."""
    whole = SITE_IN_PIECE[0].match(name)
    if whole:
        return "site term", whole.group(1)
    found = SITE_IN_PIECE[1].findall(name)
    if len(found) != 1:
        return None
    site = found[0]
    for where in ("[{}]", "d{}/du", "({}|", "({})"):  # where the pieces' names hold the site
        name = name.replace(where.format(site), where.format("·"))
    return name, site


def combined_pieces(pieces: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """The same mistake made at several sites at once (a log-Jacobian left out of two LogNormal guides, the
    entropy of two guide sites dropped, two observed sites averaged over the batch): the sums of 2 or more
    one-site pieces of one kind, each named after the pieces it sums ("A + B"), fewest sites first."""
    by_kind: Dict[str, List[str]] = {}
    for name in pieces:
        found = _kind(name)
        if found:
            by_kind.setdefault(found[0], []).append(name)
    out: Dict[str, Tensor] = {}
    for size in range(2, MAX_COMBINED + 1):
        for names in by_kind.values():
            for chosen in itertools.combinations(names, size) if len(names) <= MAX_COMBINED else ():
                out[_joined(chosen)] = sum(pieces[n].detach().double() for n in chosen)
    for names in by_kind.values():
        if len(names) > MAX_COMBINED:
            out[_joined(names)] = sum(pieces[n].detach().double() for n in names)
    return out


def _joined(names: Sequence[str]) -> str:
    """One name for several pieces: the sites' whole terms as "of sites [...] (each site's term, summed)",
    finer pieces joined by " + "."""
    if all(SITE_IN_PIECE[0].match(n) for n in names):
        return f"of sites {[SITE_IN_PIECE[0].match(n).group(1) for n in names]} (their terms, summed)"
    return " + ".join(names)


def _whole_factor(label: str, what: str, a: float, terms: SiteTerms, size: int, rtol: float) -> str:
    """The verdict for hand = a · Pyro's, a the same at every column."""
    if abs(a + 1) <= _match(rtol):
        return f"sign: {label}: {what} is minus Pyro's at every {'draw set' if terms.totals else 'datapoint'}" + (
            ": it returns the bound, not the negative bound (the loss)" if what == "the hand bound"
            else ": its sign is flipped")
    if abs(a) <= _match(rtol):
        return f"missing term: {label}: {what} is zero at every {'draw set' if terms.totals else 'datapoint'}: " \
               "the term it stands for is left out"
    global_term = what != "the hand bound" and terms.totals
    named = _name(a, factor_names(terms, size, global_term), _match(rtol))
    return (f"scale: {label}: {what} is {_fmt(a)} × Pyro's at every {'draw set' if terms.totals else 'datapoint'}"
            + (f", a factor {named}" if named else " (no known factor matched)"))


def shape_verdicts(label: str, hand: Tensor, reference: Tensor, terms: SiteTerms, objective: str,
                   rtol: float) -> List[str]:
    """Verdicts for a hand value whose shape is not (B,): per particle, or one number for the batch."""
    k, size = terms.num_particles, reference.numel()
    hand = hand.detach().double()
    if terms.totals and hand.dim() > 0:  # global latents: one number for the batch
        how = ""
        if objective == "iwae" and hand.shape == (terms.batch_size,):
            how = (": an IWAE bound per datapoint, but a global latent ties the datapoints together; the bound is "
                   "-log (1/K) Σ_k Π_i w_ik · (the global terms)_k, joint over the batch")
        expected = "one number for the batch, shape ()" if objective == "iwae" else \
            f"the batch total, shape (), or one value per datapoint, ({terms.batch_size},)"
        return [f"per datapoint: {label}: the bound returns shape {tuple(hand.shape)}; with global latents it is "
                f"{expected}{how}"]
    if hand.shape == (k, size) and k > 1:
        evidence = ""
        per_particle = -terms.c * terms.log_weights.detach().double()
        if objective == "elbo" and _close(hand.mean(0), reference, rtol):
            evidence = "; averaged over the particles it equals Pyro's at every datapoint"
        elif _close(hand, per_particle, rtol):
            evidence = ("; each row is one particle's -c log w_k" + (
                ", and the IWAE bound is -c log (1/K) Σ_k w_k, not their mean" if objective == "iwae" else ""))
        return [f"per datapoint: {label}: the bound returns one value per particle, shape (K, B) = {tuple(hand.shape)}, "
                f"not one per datapoint ({size},){evidence}"]
    if hand.dim() == 0:
        how = ""
        if _close(hand, reference.sum(), rtol):
            how = ": it equals the sum over the batch of Pyro's per-datapoint values"
        elif _close(hand, reference.mean(), rtol):
            how = ": it equals the mean over the batch of Pyro's per-datapoint values"
        return [f"per datapoint: {label}: the bound returns one number for the whole batch, not one per datapoint "
                f"({size},){how}"]
    return [f"per datapoint: {label}: the bound returns shape {tuple(hand.shape)}; expected ({size},), one value "
            "per datapoint"]


def iwae_verdicts(label: str, hand: Tensor, terms: SiteTerms, rtol: float) -> List[str]:
    """Jensen and scale confusions of an importance-weighted bound (hand (B,), the negative bound)."""
    log_w, c, k = terms.log_weights.detach().double(), terms.c, terms.num_particles
    lme = lambda v: torch.logsumexp(v, 0) - math.log(k)  # noqa: E731
    candidates = [
        ("log-mean-exp", -c * log_w.mean(0),
         "the mean of log w over the particles (the ELBO, by Jensen below IWAE_K), where IWAE_K is "
         "log (1/K) Σ_k w_k: log-mean-exp, not mean of log"),
        ("log-mean-exp", -c * torch.logsumexp(log_w, 0), "log Σ_k w_k without the 1/K (off by c·log K)"),
    ]
    if c != 1.0:
        candidates.append(("scale", -lme(c * log_w),
                           f"the minibatch scale N/B = {_fmt(c)} inside the log-mean-exp, -log (1/K) Σ_k exp(c log w_k); "
                           "Pyro's loss (IWAELoss) applies it outside: -c log (1/K) Σ_k w_k"))
        candidates.append(("scale", -lme(log_w), f"no minibatch scale N/B = {_fmt(c)} (Pyro's loss is c times the bound)"))
    betas = {round(terms.scales[n] / c, 12) for n in terms.prior if c} - {1.0}
    for keyword, value, text in candidates:
        if _close(hand, value, rtol):
            return [f"{keyword}: {label}: the hand bound is {text}"]
    if k > 1 and betas:
        return [f"scale: {label}: a latent scale β = {sorted(betas)} in the importance weights bounds nothing"]
    return []


def elbo_verdicts(label: str, hand: Tensor, terms: SiteTerms, rtol: float) -> List[str]:
    """An ELBO written as a log-mean-exp (the IWAE bound) instead of the mean of log w."""
    if terms.num_particles < 2:
        return []
    log_w, c, k = terms.log_weights.detach().double(), terms.c, terms.num_particles
    if _close(hand, -c * (torch.logsumexp(log_w, 0) - math.log(k)), rtol):
        return [f"log-mean-exp: {label}: the hand bound is the IWAE_K bound -c log (1/K) Σ_k w_k, where the ELBO "
                "averages log w over the particles (mean of log, not log-mean-exp)"]
    return []


def pieces_for(terms: SiteTerms, objective: str, analytic: bool = False) -> Dict[str, Tensor]:
    """The per-datapoint pieces a mistake may touch: each site's term, then its finer pieces
    (ELBO only: the IWAE bound is not a sum over sites)."""
    if objective != "elbo":
        return {}
    def what(n: str) -> str:
        if n in terms.observed:
            return terms.observed_desc(n) if terms.is_factor(n) else "-log p(x|z)"
        return "KL(q || p) in closed form" if analytic and n in terms.analytic_kl else "log q - log p"

    comps = terms.components(analytic)
    out = {f"of site {n!r} ({what(n)})": v for n, v in comps.items()}
    out.update(terms.pieces())
    glob = [n for n in terms.prior if terms.is_global(n)]
    local = [n for n in terms.prior if not terms.is_global(n)]
    for kind, names in (("global", glob), ("local", local)):
        if len(names) > 1 or (names and len(names) < len(terms.prior)):
            out[f"of the {kind} latents {names} (log q - log p)"] = sum(comps[n] for n in names)
    return out


def diagnose(label: str, hand, terms: SiteTerms, objective: str, *, analytic: bool = False,
             rtol: float = 1e-6, grads_agree: Optional[bool] = None) -> List[str]:
    """One-line verdicts for a hand bound (a tensor; a dict's total) against Pyro's ``objective``
    ("elbo" or "iwae") on the draws of ``terms``; [] when they agree at every datapoint."""
    reference = terms.negative_iwae() if objective == "iwae" else terms.negative_elbo() if not analytic \
        else sum(terms.components(analytic=True).values())
    reference = reference.detach().double()
    hand = hand.detach().double()
    if hand.shape != reference.shape:
        return shape_verdicts(label, hand, reference, terms, objective, rtol)
    if _close(hand, reference, rtol):
        return []
    special = iwae_verdicts(label, hand, terms, rtol) if objective == "iwae" else elbo_verdicts(label, hand, terms, rtol)
    return special or residual_verdicts(label, hand, reference, terms, pieces_for(terms, objective, analytic), rtol,
                                        grads_agree)


# ------------------------------------------------------------------------------------------------
# term by term

HINTS = (
    (re.compile(r"rec|lik|nll|recon|data|fit|obs", re.I), "observed"),
    (re.compile(r"glob", re.I), "global"),
    (re.compile(r"local", re.I), "local"),
    (re.compile(r"kl|prior|reg|latent|div", re.I), "latent"),
)


def _site_desc(terms: SiteTerms, name: str, analytic: bool) -> str:
    """What Pyro's term of one site (or enumerated group) is, in words."""
    given = ", ".join(n for n in terms.prior if n not in terms.enumerated) or "z"
    summed = terms.enumerated.get(name)
    where = " (global)" if terms.is_global(name) else ""
    if name in terms.observed:
        if summed:
            return f"site {name!r}{where}: -log Σ_{{{', '.join(summed)}}} p({', '.join(summed)}) p({name}|...)"
        return f"site {name!r}{where}: {terms.observed_desc(name, given)}"
    if analytic and name in terms.analytic_kl:
        return f"site {name!r}{where}: KL(q || p) in closed form"
    return f"site {name!r}{where}: log q({name}|x) - log p({name})"


def pyro_groups(terms: SiteTerms, analytic: bool = False, sites=None) -> Dict[str, Tuple[str, Tensor]]:
    """Pyro's terms a hand term may correspond to: key -> (description, value per column); each site's,
    and "observed" / "latent" for all observed / latent sites. ``sites`` restricts them to those sites."""
    comps = terms.components(analytic)
    keep = [n for n in comps if sites is None or n in sites]
    observed = [n for n in keep if n in terms.observed]
    latent = [n for n in keep if n in terms.prior]
    out = {n: (_site_desc(terms, n, analytic), comps[n]) for n in keep}
    if len(observed) > 1:
        kind = " and factors" if any(terms.is_factor(n) for n in observed) else ""
        out["observed"] = (f"all observed sites{kind}: -log p(x|z)", sum(comps[n] for n in observed))
    if len(latent) > 1:
        kind = "global " if all(terms.is_global(n) for n in latent) else ""
        out["latent"] = (f"all {kind}latent sites {latent}: log q - log p", sum(comps[n] for n in latent))
    if len(observed) == 1:
        out["observed"] = out[observed[0]]
    if len(latent) == 1:
        out["latent"] = out[latent[0]]
    for kind, names in (("global", [n for n in latent if terms.is_global(n)]),
                        ("local", [n for n in latent if not terms.is_global(n)])):
        if names:  # a hand term named after the kind (both kinds, or a view of one kind)
            out[kind] = (f"the {kind} latent sites {names}: log q - log p", sum(comps[n] for n in names))
    return out


def match_terms(hand_terms: Dict[str, Tensor], terms: SiteTerms, analytic: bool = False, sites=None,
                nearest: bool = True) -> Dict[str, str]:
    """Each hand term's Pyro counterpart (a key of :func:`pyro_groups`): by site name (the whole name, or
    one site's name as a word of it: 'kl_c' for site 'c'), then by name hints (rec/lik/nll -> the observed sites, kl/prior -> the latent sites), then (``nearest``) the
    nearest in value; a term left unmatched is not in the result."""
    groups = pyro_groups(terms, analytic, sites)
    site_names = [g for g in groups if g in terms.observed or g in terms.prior]
    out = {}
    for name, value in hand_terms.items():
        if name in groups and name not in ("observed", "latent"):
            out[name] = name
            continue
        tokens = set(re.split(r"[^A-Za-z0-9]+|_", name))  # "kl_c", "kl(z)": a site named in the term's name
        named = [g for g in site_names if g in tokens or (g != name and re.sub(r"[^A-Za-z0-9]+", "_", g) in tokens)]
        if len(named) == 1 and len(tokens) > 1:
            out[name] = named[0]
            continue
        hinted = next((g for rx, g in HINTS if rx.search(name) and g in groups), None)
        if hinted:
            out[name] = hinted
            continue
        value = value.detach().double()
        if nearest and value.dim() == 1 and groups:
            out[name] = min(groups, key=lambda g: (value - groups[g][1].detach().double()).norm().item())
    return out


def explain_failures(report, model, guide, batch, comparisons, max_plate_nesting: int = 1, seed: int = 0,
                     rtol: float = 1e-6) -> None:
    """Add to ``report.verdicts`` the likely mistake of each same-sample comparison whose rows failed
    (a built-in or registered model's check: its hand bounds come from ``log_terms``). Nothing runs
    for a passing comparison; one that is scaled (β), re-drawn or targets no bound is left alone, and
    a diagnosis that cannot run adds nothing (the rows already fail)."""
    failing = {c.name for c in comparisons
               if any(r.kind == "same sample" and not r.passed and r.name.startswith(c.name + ":") for r in report.rows)}
    verdicts = []
    for c in comparisons:
        objective = c.objective()
        if c.name not in failing or not c.same_sample or c.model is not None or c.draws is not None \
                or objective not in ("elbo", "iwae"):
            continue
        gradient_row = next((r for r in report.rows if r.name.startswith(f"{c.name}: gradients of")), None)
        try:
            terms = site_terms(model, c.guide or guide, batch, c.num_particles, max_plate_nesting, seed)
            hand = c.hand(batch, terms.draws)
            analytic = type(c.loss).__name__ == "TraceMeanField_ELBO"
            verdicts += diagnose(c.name.split(" vs ")[0], hand, terms, objective, analytic=analytic, rtol=rtol,
                                 grads_agree=None if gradient_row is None else gradient_row.passed)
        except Exception:  # noqa: BLE001 - no verdict rather than no report
            continue
    report.verdicts += merge_verdicts(verdicts)


def merge_verdicts(verdicts: List[str]) -> List[str]:
    """Verdicts that say the same of several losses ("keyword: LABEL: the same text"), as one line
    naming every loss."""
    merged: Dict[Tuple[str, str], List[str]] = {}
    for v in verdicts:
        keyword, label, text = (v.split(": ", 2) + ["", ""])[:3]
        merged.setdefault((keyword, text), []).append(label)
    return [f"{keyword}: {', '.join(labels)}: {text}" for (keyword, text), labels in merged.items()]
