"""OFT, BOFT, HRA, RoAd and DeLoRA against HF PEFT's twins (a test-only dependency): with the same parameter values,
moved off their start, the same outputs and the same gradients on a tiny BERT."""
import copy
import pytest, torch
import peft
from subspace_nb.inject import apply_tuning, tuners
from subspace_nb.models import tiny_model, tiny_batch
from subspace_nb.catalogue.orthogonal import skew
from subspace_nb.studies.bench import peft_boft_without_cuda


peft_boft_without_cuda()          # the benchmark's stand-in for PEFT's CUDA extension: else one butterfly factor on CPU


def as_is(p, lay): return p
def boft_q(q, lay):                                             # our strict upper triangles -> PEFT's full blocks (skew part used)
    return skew(q, lay.boft_block_size['default'])
def boft_q_grad(G, lay):                                        # d/dq_ij = dL/dQ_ij - dL/dQ_ji = 2 dL/dA_ij, Q = (A - A^T)/2
    b = lay.boft_block_size['default']
    rows, cols = torch.triu_indices(b, b, 1)
    return 2 * G[..., rows, cols]

TARGETS = ['query', 'value', 'intermediate.dense']        # n = 32 on each: PEFT's OFT needs n to be a multiple of b

CASES = {  # method: (our hyper-parameters, PEFT's config, [(our parameter, PEFT's parameter[, ours -> theirs, their grad -> ours])])
    'oft': (dict(block_size=8), lambda: peft.OFTConfig(r=0, oft_block_size=8, use_cayley_neumann=False,
                                                        target_modules=TARGETS),
            [('q', lambda l: l.oft_R['default'].weight)]),
    'boft': (dict(block_size=4, factors=3), lambda: peft.BOFTConfig(boft_block_size=4, boft_n_butterfly_factor=3,
                                                                    target_modules=TARGETS),
             [('q', lambda l: l.boft_R['default'], boft_q, boft_q_grad), ('s', lambda l: l.boft_s['default'])]),
    'hra': (dict(r=4), lambda: peft.HRAConfig(r=4, target_modules=TARGETS), [('u', lambda l: l.hra_u['default'])]),
    'road': (dict(group_size=8), lambda: peft.RoadConfig(variant='road_1', group_size=8, target_modules=['query', 'value']),
             [('theta', lambda l: l.road_theta['default']), ('alpha', lambda l: l.road_alpha['default'])]),
    'delora': (dict(r=4, lam=15.0), lambda: peft.DeloraConfig(r=4, delora_lambda=15, target_modules=TARGETS),
               [('A', lambda l: l.delora_A['default']), ('B', lambda l: l.delora_B['default']),
                ('lam', lambda l: l.delora_lambda['default'])]),
}


def pair(name, seed=1):
    base = tiny_model('bert')
    hp, cfg, params = CASES[name]
    targets = cfg().target_modules
    ours = apply_tuning(copy.deepcopy(base), name, targets=sorted(targets), trainable=[], **hp)
    pm = peft.get_peft_model(copy.deepcopy(base), cfg())
    g = torch.Generator().manual_seed(seed)
    found = 0
    with torch.no_grad():
        for n, t in tuners(ours).items():
            lay = pm.base_model.model.get_submodule(n)
            for ours_name, theirs, to, _ in map(full, params):
                p = getattr(t, ours_name)
                p.add_(torch.randn(p.shape, generator=g))                      # as if trained: off the start
                theirs(lay).copy_(to(p, lay).view_as(theirs(lay)))
            found += 1
    assert found == 2 * len(targets)                                                  # two layers of each target
    return base, ours.eval(), pm.eval(), params


def full(param):
    "(ours, theirs, ours -> theirs, their grad -> ours): the same numbers in the same shape unless the case says otherwise."
    return (*param, as_is, as_is)[:4]


def out(m, x):
    "The last hidden states: the tiny model's pooled head would hide most of a change."
    return m(**x, output_hidden_states=True).hidden_states[-1]


@pytest.mark.parametrize('name', list(CASES))
@pytest.mark.parametrize('n_seq', [2, 8])   # without gradients, 8 rows are enough tokens that the weight is turned
def test_equals_peft(name, n_seq):
    base, ours, pm, params = pair(name)
    x = tiny_batch(n=n_seq, l=8)
    with torch.no_grad(): y0, y1, y2 = out(base, x), out(ours, x), out(pm, x)
    assert (y1 - y0).abs().max() > 1e-2                                               # the change does something
    torch.testing.assert_close(y1, y2, rtol=1e-5, atol=1e-5)
    out(ours, x).square().sum().backward(); out(pm, x).square().sum().backward()
    for n, t in tuners(ours).items():
        lay = pm.base_model.model.get_submodule(n)
        for ours_name, theirs, _, back in map(full, params):
            g1, g2 = getattr(t, ours_name).grad, back(theirs(lay).grad, lay)
            assert g1 is not None and g1.abs().sum() > 0
            torch.testing.assert_close(g1, g2.view_as(g1), rtol=1e-4, atol=1e-5)


def test_merged_weights_equal_peft():
    for name in CASES:
        base, ours, pm, _ = pair(name)
        for n, t in tuners(ours).items():
            want = t.tuned()[0].detach()
            lay = pm.base_model.model.get_submodule(n)
            lay.merge()
            torch.testing.assert_close(lay.get_base_layer().weight, want, rtol=1e-5, atol=1e-6)
