"""Hyper-parameter values are checked in one place, for every registered method; unknown method names are answered
with the closest ones.

The registry is read, not listed: a method added in any notebook is covered here without new test code, and its
numeric hyper-parameters must have a declared range (`HP_RANGES` in core, or the class's `bounds`)."""
import math, re
import pytest, torch
from subspace_nb.core import METHODS, load_all, get_method, check_values, value_ranges, hp_range
from subspace_nb.inject import apply_tuning, hparams, tuners
from subspace_nb.models import tiny_model

load_all()
NAMES = sorted(n for n in METHODS if not n.startswith('_'))
CHOICES = {'mpc', 'act', 'feedforward', 'rank_pattern', 'alpha_pattern'}   # default None, values named by the method (MPC_KINDS, ACTIVATIONS, layer names, per-layer patterns)


def numeric(name: str, default) -> bool:
    "A numeric hyper-parameter: a number or bool by default, or None by default without being a named choice."
    return (default is None and name not in CHOICES) or isinstance(default, (bool, int, float))


HPS = [(n, k, d) for n in NAMES for k, d in hparams(METHODS[n]).items() if numeric(k, d)]


def out_of_range(alts) -> list:
    "Values of the right type just outside every bound of the alternatives `alts` (none fits any of them)."
    vals = []
    for a in alts:
        if a.kind is bool: vals.append(2); continue
        step = 1 if a.kind is int else 0.5
        if a.lo is not None: vals.append(a.lo if a.lo_open else a.lo - step)
        if a.hi is not None: vals.append(a.hi if a.hi_open else a.hi + step)
    return [v for v in vals if not any(a.accepts(v) for a in alts)]


def refused(cls, k, v):
    with pytest.raises((TypeError, ValueError), match=re.escape(f"method {cls.name!r}: {k}={v!r}")) as e:
        check_values(cls, {k: v})
    return str(e.value)


def test_registry_is_covered():
    assert len(HPS) > 40 and {'lora', 'vera', 'lotr', 'adalora', 'prompt-tuning'} <= {n for n, _, _ in HPS}


@pytest.mark.parametrize('name,k,default', HPS, ids=[f'{n}-{k}' for n, k, _ in HPS])
def test_every_numeric_hp_has_a_declared_range(name, k, default):
    cls = METHODS[name]
    if not isinstance(default, bool): assert hp_range(cls, k) is not None, f"{name}: {k} has no declared range"
    alts = value_ranges(cls, k, default)
    if default is not None:
        assert type(default) in {a.kind for a in alts}, f"{name}: {k}'s range {alts} is not of its default's type"
        check_values(cls, {k: default})                                   # the default is accepted
    test_hp = getattr(cls, 'test_hp', {})
    if k in test_hp: check_values(cls, {k: test_hp[k]})


@pytest.mark.parametrize('name,k,default', HPS, ids=[f'{n}-{k}' for n, k, _ in HPS])
def test_bad_values_are_refused_naming_the_parameter(name, k, default):
    cls = METHODS[name]
    alts = value_ranges(cls, k, default)
    what = ' or '.join(map(str, alts))
    for v in ('1', [1], float('nan'), math.inf, -math.inf):              # wrong type, not finite
        assert what in refused(cls, k, v)
    if any(a.kind is not bool for a in alts) and any(a.kind is not bool and (a.lo, a.hi) != (None, None) for a in alts):
        bad = out_of_range(alts)
        assert bad, f"{name}: no value outside {what}"
        for v in bad: assert 'out of range' in refused(cls, k, v)
    if default is not None: refused(cls, k, None)                        # None only where it is the default


@pytest.mark.parametrize('name,hp,says', [
    ('lora', dict(alpha=0), "method 'lora': alpha=0 is out of range; expected a finite number > 0"),
    ('lora', dict(alpha=float('nan')), "method 'lora': alpha=nan is not finite"),
    ('lora', dict(alpha='16'), "method 'lora': alpha='16' is of the wrong type (str)"),
    ('lora', dict(r=0), "method 'lora': r=0 is out of range; expected an int >= 1"),
    ('adalora', dict(init_warmup=1.5), "init_warmup=1.5 is out of range; expected an int >= 0 (steps) or a number in [0, 1)"),
    ('vera', dict(d_init=0.0), "method 'vera': d_init=0.0 is out of range"),
    ('diff-pruning', dict(density=0), "method 'diff-pruning': density=0 is out of range; expected a number in (0, 1]"),
    ('ssb,lora', dict(dropout=1.0), "method 'ssb,lora': dropout=1.0 is out of range"),      # a composition: its parts'
])
def test_apply_tuning_refuses_before_building(name, hp, says):
    m = tiny_model('bert')
    names = [n for n, _ in m.named_modules()]
    with pytest.raises((TypeError, ValueError), match=re.escape(says)): apply_tuning(m, name, **hp)
    assert [n for n, _ in m.named_modules()] == names and not hasattr(m, 'subspace') and not tuners(m)
    assert all(p.requires_grad for p in m.parameters())


def test_lora_alpha_zero_was_a_silent_no_op():
    "What the check prevents: alpha = 0 gives s = 0, so B A never reaches the output whatever training does."
    t = get_method('lora')(torch.nn.Linear(6, 5), r=2, alpha=0)
    with torch.no_grad(): t.B.normal_(generator=torch.Generator().manual_seed(0))
    x = torch.randn(3, 6, generator=torch.Generator().manual_seed(1))
    assert torch.equal(t(x), t.base(x))


def test_unknown_method_suggests_the_closest():
    with pytest.raises(ValueError, match=r"unknown method 'lorra'; did you mean 'lora'") as e: get_method('lorra')
    assert "''" not in str(e.value) and 'known methods: ' in str(e.value) and 'vera' in str(e.value)
    with pytest.raises(ValueError, match="did you mean 'dora'"): get_method('DoRA ')
    with pytest.raises(ValueError, match=r"unknown method 'zzz'; known methods: "): get_method('zzz')
    with pytest.raises(ValueError, match="unknown method 'loar'; did you mean .*'lora'"): get_method(['ssb', 'loar'])
    with pytest.raises(ValueError, match="did you mean 'lora'"): apply_tuning(tiny_model('bert'), 'lorra')
