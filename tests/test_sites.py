"""The trace helpers of ppl_vi.sites: each answer held against one written out by hand (float64, seconds)."""

from __future__ import annotations

import itertools
import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine

from ppl_vi.errors import ConfigError
from ppl_vi.sites import (FixValues, LogMeanExp, chunk_sizes, data_plate_dim, guide_sites, in_data_plate,
                          is_deterministic, is_latent, is_variable, model_only_sites, split_scales, tuple_digits)

DT = torch.float64


@pytest.mark.parametrize("total, chunk", [(7, None), (7, 3), (7, 7), (7, 10), (1, 1), (12, 4)])
def test_chunked_log_mean_exp_is_the_log_mean_exp(total, chunk):
    """Catches a chunk dropped or counted twice, a log K off by the chunking, a running sum not in log space."""
    x = torch.randn(total, 5, dtype=DT) * 30  # large spread: exp would overflow without the logsumexp
    sizes = chunk_sizes(total, chunk)
    assert sum(sizes) == total and all(0 < s <= (chunk or total) for s in sizes)
    acc, start = LogMeanExp(), 0
    for size in sizes:
        acc.add(x[start:start + size])
        start += size
    expected = torch.logsumexp(x, 0) - math.log(total)
    torch.testing.assert_close(acc.value(), expected, rtol=1e-14, atol=1e-12)


def test_tuple_digits_enumerate_every_tuple_once():
    """Catches digits that repeat or skip a tuple, or a tensor index that disagrees with an int one."""
    sizes, k = (3, 2), 2
    t = math.prod(sizes) ** k
    vectorised = tuple_digits(sizes, k, torch.arange(t))  # per site (T, K)
    assert [v.shape for v in vectorised] == [(t, k), (t, k)]
    rows = {tuple(torch.cat([v[i] for v in vectorised]).tolist()) for i in range(t)}
    assert rows == set(itertools.product(range(3), range(3), range(2), range(2)))
    for i in (0, 5, t - 1):
        one = tuple_digits(sizes, k, i)
        assert all(torch.equal(a, b[i]) for a, b in zip(one, vectorised))
    assert tuple_digits(sizes, k, 1)[0].tolist() == [1, 0]  # the first site's first particle is least significant


@pytest.mark.parametrize("obs, latent, c, beta", [([2.0, 2.0], [6.0], 2.0, 3.0), ([1.0], [], 1.0, 1.0),
                                                  ([0.0], [5.0], 0.0, 1.0), ([4.0], [4.0, 4.0], 4.0, 1.0)])
def test_split_scales(obs, latent, c, beta):
    assert split_scales(obs, latent) == (c, beta)


def test_split_scales_refuses_what_has_no_one_c_or_beta():
    with pytest.raises(ConfigError, match="share one scale"):
        split_scales([1.0, 2.0], [])
    with pytest.raises(ConfigError, match="one scale β"):
        split_scales([2.0], [2.0, 4.0])
    with pytest.raises(ConfigError, match="observed site"):
        split_scales([], [1.0])
    beta = torch.tensor(0.5)  # tensor scales unchecked (no host sync): β = latent scale / c
    c, b = split_scales([torch.tensor(2.0)], [torch.tensor(2.0) * beta], check=False)
    assert float(c) == 2.0 and float(b) == 0.5


def _model(x):
    theta = pyro.sample("theta", dist.Normal(torch.zeros((), dtype=DT), 1.0))
    with pyro.plate("data", x.shape[0], subsample_size=2, dim=-1):
        c = pyro.sample("c", dist.Categorical(logits=torch.zeros(3, dtype=DT)), infer={"enumerate": "parallel"})
        z = pyro.sample("z", dist.Normal(theta + c.to(DT), 1.0))
        pyro.deterministic("twice", 2 * z)
        pyro.sample("x", dist.Normal(z, 1.0), obs=x[:2])


def _guide(x):
    pyro.sample("theta", dist.Normal(torch.zeros((), dtype=DT), 1.0))
    with pyro.plate("data", x.shape[0], subsample_size=2, dim=-1):
        pyro.sample("z", dist.Normal(torch.zeros(2, dtype=DT), 1.0))


def test_site_kinds_and_the_data_plate():
    """Catches a subsample site taken for a latent, a global latent taken for a local one, a deterministic
    value taken for a density, a model-only enumerated site taken for an unguided one."""
    x = torch.randn(4, dtype=DT)
    guide_trace = poutine.trace(_guide).get_trace(x)
    model_trace = poutine.trace(poutine.replay(poutine.enum(_model, first_available_dim=-2),
                                               trace=guide_trace)).get_trace(x)
    nodes = model_trace.nodes
    assert not is_variable(nodes["data"]) and not is_latent(nodes["data"])  # the plate's subsample site
    assert [n for n, s in nodes.items() if is_latent(s)] == ["theta", "c", "z"]
    assert is_variable(nodes["x"]) and is_deterministic(nodes["twice"]) and not is_deterministic(nodes["x"])
    assert not in_data_plate(nodes["theta"], 1) and in_data_plate(nodes["z"], 1) and in_data_plate(nodes["z"], 2, "data")
    assert data_plate_dim(nodes["x"], 1) == -1 and data_plate_dim(nodes["x"], 1, "other") is None
    assert model_only_sites(guide_trace, model_trace) == (("c",), ())
    unguided = poutine.trace(poutine.replay(_model, trace=guide_trace)).get_trace(x)  # c not enumerated
    assert model_only_sites(guide_trace, unguided) == ((), ("c",))


def test_guide_sites_undo_the_draws_and_fix_values_fixes_them():
    x = torch.randn(4, dtype=DT)
    torch.manual_seed(0)
    sites = guide_sites(_guide, {"x": x})
    after = torch.randn(())
    torch.manual_seed(0)
    assert torch.equal(after, torch.randn(())) and list(sites) == ["theta", "z"]
    fixed = torch.tensor([0.25, -0.5], dtype=DT)
    trace = poutine.trace(FixValues({"z": fixed, "x": torch.zeros(2)})(_model)).get_trace(x)
    assert torch.equal(trace.nodes["z"]["value"], fixed) and not torch.equal(trace.nodes["x"]["value"], torch.zeros(2))
