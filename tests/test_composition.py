"""Compositions g(f(W)) of every wrapping reconstruction f with every wrapping extension g (nbs/31_composition).

The two declared pairs are in the generic matrix; here every other pair is built on demand and checked against an
independent construction: g applied to a plain layer that holds f's W' and b'."""
import copy
import pytest, torch
from torch import nn
from subspace_nb.core import METHODS, load_all, get_method, hparams
from subspace_nb.combination.composition import compose, RECONSTRUCTION
from subspace_nb.inject import apply_tuning, tuners, added_params, merge, unmerge, save_tuning, load_tuning, report, remove_tuning
from subspace_nb.models import tiny_model, tiny_batch

load_all()
F_NAMES = sorted(n for n, c in METHODS.items() if c.mode in RECONSTRUCTION and c.wraps)
G_NAMES = sorted(n for n, c in METHODS.items() if c.mode == 'extension' and c.wraps)
PAPER = ('subspace_nb.reconstruction.', 'subspace_nb.extension.')      # the paper's own methods: every pair of them


def _clash(f, g): return set(hparams(get_method(f))) & set(hparams(get_method(g)))


def _partner(name, others, first):
    "The first of `others` (trying `first` before the rest) that shares no hyper-parameter name with `name`."
    return next(o for o in [first, *others] if o in others and not _clash(name, o))


paper = lambda n: get_method(n).__module__.startswith(PAPER)
PAIRS = [(f, g) for f in F_NAMES for g in G_NAMES if paper(f) and paper(g) and not _clash(f, g)]
COVER = sorted({(f, _partner(f, G_NAMES, 'lora')) for f in F_NAMES} | {(_partner(g, F_NAMES, 'ssb'), g) for g in G_NAMES})   # every f and every g once
CLASHES = [(f, g) for f in F_NAMES for g in G_NAMES if _clash(f, g)]
HP = dict(r=2, density=0.05)


def test_pairs_cover_the_registry():
    assert {'sam-parser', 'ia3', 'ssl', 'ssb', 'fish-mask', 'diff-pruning'} <= set(F_NAMES)
    assert {'lora', 'trilora', 'flora', 'adalora', 'hadapter', 'padapter', 'pa'} <= set(G_NAMES)
    assert {f for f, _ in COVER} == set(F_NAMES) and {g for _, g in COVER} == set(G_NAMES)


@pytest.mark.parametrize('f,g', CLASHES[:8])
def test_a_pair_that_shares_a_hyper_parameter_is_refused(f, g):
    "Two methods that both take, say, `r` cannot share one keyword: the composition says so instead of guessing."
    with pytest.raises(ValueError, match='both take'): compose(f, g)


def moved(f, g, seed=0):
    cls = compose(f, g)
    m = apply_tuning(tiny_model('bert'), [f, g], **{k: v for k, v in HP.items() if k in _hp(cls)})
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in added_params(m).values():
            if p.dtype.is_floating_point: p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return m.eval()


def _hp(cls):
    from subspace_nb.inject import hparams
    return hparams(cls)


@pytest.mark.parametrize('f,g', PAIRS)
def test_composition_is_g_on_f(f, g):
    m = moved(f, g)
    for name, t in list(tuners(m).items())[:4]:
        x = torch.randn(4, 3, t.n, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            W1, b1 = t.f.tuned()                               # f's W', b', by f alone
            lay = nn.Linear(t.n, t.m, bias=b1 is not None)
            lay.weight.copy_(W1)
            if b1 is not None: lay.bias.copy_(b1)
            ref = copy.deepcopy(t.g)
            ref.__dict__['base'] = lay                         # g on a plain layer holding f(W)
            torch.testing.assert_close(t(x), ref.forward_tuned(x), rtol=1e-5, atol=1e-6)
            if t.linear: torch.testing.assert_close(t.tuned()[0], ref.tuned()[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('f,g', COVER)
def test_composition_contracts(f, g, tmp_path):
    cls = get_method(f'{f},{g}')
    assert cls.mode == 'combination' and cls.parts == (get_method(f), get_method(g))
    x = tiny_batch()
    with torch.no_grad(): y0 = tiny_model('bert')(**x).logits
    m0 = apply_tuning(tiny_model('bert'), [f, g], **{k: v for k, v in HP.items() if k in _hp(cls)})
    assert cls.preserving == (get_method(f).preserving and get_method(g).preserving)
    if cls.preserving:                                  # ETHER's reflections are not the identity at init: nor is f,g
        with torch.no_grad(): torch.testing.assert_close(m0(**x).logits, y0, rtol=1e-4, atol=1e-5)
    r = report(m0)
    assert set(r['by_mode']) == {get_method(f).mode, 'extension'} and sum(r['by_mode'].values()) == r['trainable']
    m = moved(f, g)
    with torch.no_grad(): y = m(**x).logits
    state = {k: v.clone() for k, v in m.state_dict().items()}
    if cls.linear:
        merge(m)
        with torch.no_grad(): torch.testing.assert_close(m(**x).logits, y, rtol=1e-4, atol=1e-5)
        unmerge(m)
        assert all(torch.equal(v, state[k]) for k, v in m.state_dict().items())
    save_tuning(m, tmp_path)
    m2 = load_tuning(tiny_model('bert'), tmp_path).eval()
    with torch.no_grad(): assert torch.equal(m2(**x).logits, y)
    remove_tuning(m2)
    assert not tuners(m2) and not tuners(m2, parts=True)
