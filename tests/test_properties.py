"""Property tests of the core invariants over random layer shapes, dtypes, ranks and target sets, for every method.

Fast by default (a few examples per property); SUBSPACE_EXAMPLES=200 pytest tests/test_properties.py for a long run."""
import os, json, tempfile, copy
from pathlib import Path
import pytest, torch
from hypothesis import given, settings, assume, strategies as st, HealthCheck
from transformers import BertConfig, GPT2Config, BertForSequenceClassification, GPT2ForSequenceClassification
from subspace_nb.core import METHODS, load_all, get_method
from subspace_nb.inject import (apply_tuning, tuners, merge, unmerge, save_tuning, load_tuning, hparams, WEIGHTS,
                                CONFIG)

load_all()
NAMES = sorted(n for n in METHODS if not n.startswith('_'))
EXAMPLES = int(os.environ.get('SUBSPACE_EXAMPLES', '3'))   # per method and property
SETTINGS = dict(max_examples=EXAMPLES, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@st.composite
def cases(draw, name):
    "A random tiny model (BERT or GPT-2 layout, random widths), a method, its rank, dtype and targets, and a seed."
    arch = draw(st.sampled_from(['bert', 'gpt2']))
    heads = draw(st.sampled_from([1, 2, 4]))
    hidden = heads * draw(st.integers(2, 5)) * 2
    inter = draw(st.integers(3, 3 * hidden))
    layers = draw(st.integers(1, 2))
    cls = get_method(name)
    hp = {}
    if 'r' in hparams(cls): hp['r'] = draw(st.integers(1, min(4, hidden // 2)))
    hp |= {k: v for k, v in getattr(cls, 'test_hp', {}).items() if k != 'r'}
    targets = draw(st.sampled_from([None, 'all-linear'])) if cls.wraps else None
    dtype = draw(st.sampled_from([torch.float32, torch.float32, torch.bfloat16]))
    seed = draw(st.integers(0, 2**16))
    return dict(arch=arch, hidden=hidden, heads=heads, inter=inter, layers=layers, name=name, hp=hp, targets=targets,
                dtype=dtype, seed=seed)


def model_of(c):
    torch.manual_seed(c['seed'])
    if c['arch'] == 'bert':
        cfg = BertConfig(hidden_size=c['hidden'], num_hidden_layers=c['layers'], num_attention_heads=c['heads'],
                         intermediate_size=c['inter'], vocab_size=50, max_position_embeddings=32)
        m = BertForSequenceClassification(cfg)
    else:
        cfg = GPT2Config(n_embd=c['hidden'], n_layer=c['layers'], n_head=c['heads'], n_inner=c['inter'], vocab_size=50,
                         n_positions=32, pad_token_id=0)
        m = GPT2ForSequenceClassification(cfg)
    return m.to(c['dtype']).eval()


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, 50, (2, 6), generator=g)
    mask = torch.ones_like(ids); mask[1, 4:] = 0
    return dict(input_ids=ids, attention_mask=mask)


def tuned(c):
    "The tuned model; a rank the drawn widths cannot hold is refused by the method (checked elsewhere) and skipped."
    m = model_of(c)
    try: return apply_tuning(m, c['name'], targets=c['targets'], seed=c['seed'], **c['hp'])
    except ValueError as e:
        assume(f"r={c['hp'].get('r')}" not in str(e))
        raise


def out(m, x):
    with torch.no_grad(): return m(**x).logits.float()


def perturb_(m, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if p.requires_grad: p.add_((0.05 * torch.randn(p.shape, generator=g)).to(p.dtype))


def snapshot(m):
    "Everything a failed apply or load must leave alone: tensors, flags, module types, hooks, the tuning record."
    hooks = [(len(x._forward_hooks), len(x._forward_pre_hooks), len(x._state_dict_hooks)) for x in m.modules()]
    return ({k: v.clone() for k, v in m.state_dict().items()}, {n: p.requires_grad for n, p in m.named_parameters()},
            [type(x).__name__ for x in m.modules()], hooks, copy.deepcopy(getattr(m, 'subspace', None)),
            copy.deepcopy(getattr(m.config, 'subspace', None)))


def same(a, b):
    return a[0].keys() == b[0].keys() and all(torch.equal(a[0][k], b[0][k]) for k in a[0]) and a[1:] == b[1:]


def tol(c): return dict(rtol=0, atol=3e-2) if c['dtype'] == torch.bfloat16 else dict(rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('name', [n for n in NAMES if get_method(n).preserving])
@settings(**SETTINGS)
@given(data=st.data())
def test_preserving_at_init(name, data):
    c = data.draw(cases(name))
    x = batch()
    y0 = out(model_of(c), x)
    torch.testing.assert_close(out(tuned(c), x), y0, **tol(c))


@pytest.mark.parametrize('name', [n for n in NAMES if get_method(n).linear])
@settings(**SETTINGS)
@given(data=st.data())
def test_merge_unmerge_bit_exact(name, data):
    c = data.draw(cases(name))
    m = tuned(c); perturb_(m)
    x = batch()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    weights = {n: p.detach().clone() for n, p in m.named_parameters()}
    y = out(m, x)
    merge(m)
    torch.testing.assert_close(out(m, x), y, **(tol(c) if c['dtype'] == torch.bfloat16 else dict(rtol=1e-4, atol=1e-4)))
    unmerge(m)
    assert all(torch.equal(p, weights[n]) for n, p in m.named_parameters())
    after = m.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())


@pytest.mark.parametrize('name', NAMES)
@settings(**SETTINGS)
@given(data=st.data())
def test_save_load_exact(name, data):
    c = data.draw(cases(name))
    m = tuned(c); perturb_(m)
    x = batch()
    y = out(m, x)
    with tempfile.TemporaryDirectory() as d:
        save_tuning(m, d)
        m2 = load_tuning(model_of(c), d)
    assert torch.equal(out(m2, x), y)


@pytest.mark.parametrize('name', NAMES)
@settings(**SETTINGS)
@given(data=st.data(), how=st.sampled_from(['bad-hp', 'bad-target', 'unknown-hp']))
def test_failed_apply_leaves_model_identical(name, data, how):
    c = data.draw(cases(name))
    m = model_of(c)
    before = snapshot(m)
    cls = get_method(c['name'])
    if how == 'bad-hp' and 'r' in hparams(cls): kw = dict(c['hp'], r=0)
    elif how == 'bad-target' and cls.wraps: kw = dict(c['hp'], targets=['no_such_layer'])
    else: kw = dict(c['hp'], no_such_hp=1)
    with pytest.raises((TypeError, ValueError)): apply_tuning(m, c['name'], **kw)
    assert same(snapshot(m), before)


@pytest.mark.parametrize('name', NAMES)
@settings(**SETTINGS)
@given(data=st.data(), how=st.sampled_from(['truncated', 'rank', 'method', 'other-base', 'bad-json']))
def test_failed_load_leaves_model_identical(name, data, how):
    c = data.draw(cases(name))
    m = tuned(c); perturb_(m)
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        save_tuning(m, d)
        cfg = json.loads((d / CONFIG).read_text())
        if how == 'truncated': (d / WEIGHTS).write_bytes((d / WEIGHTS).read_bytes()[:100])
        elif how == 'rank' and 'r' in cfg['hp']: cfg['hp']['r'] += 1; (d / CONFIG).write_text(json.dumps(cfg))
        elif how == 'method': cfg['method'] = 'no-such-method'; (d / CONFIG).write_text(json.dumps(cfg))
        elif how == 'bad-json': (d / CONFIG).write_text('{"method": ')
        else:                                          # a tuning saved on a model of other widths
            o = dict(c, hidden=c['hidden'] + 2 * c['heads'], inter=c['inter'] + 1)
            other = apply_tuning(model_of(o), c['name'], targets=c['targets'], seed=c['seed'], **c['hp'])
            save_tuning(other, d)
        for target in (model_of(c), m):                # into a plain model, and into the tuned one
            before = snapshot(target)
            try: load_tuning(target, d)
            except (TypeError, ValueError, FileNotFoundError, KeyError): pass
            else:
                if how == 'rank' and 'r' not in cfg['hp']: continue       # nothing was changed: a valid load
                raise AssertionError(f"loading a {how} tuning did not fail")
            assert same(snapshot(target), before), f"a failed load ({how}) changed the model"
