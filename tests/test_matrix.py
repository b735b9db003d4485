"""The generic test matrix: every registered method, on five tiny architectures and the embedded MiniLM.

A method registered in any notebook is picked up here without new test code."""
import copy, tempfile
import pytest, torch
from subspace_nb.core import METHODS, MODES, load_all, get_method, taxonomy
from subspace_nb.inject import (apply_tuning, tuners, report, merge, unmerge, remove_tuning, save_tuning, load_tuning,
                                default_trainable, regularizer, added_params, hparams)
from subspace_nb.models import ARCHS, tiny_model, tiny_batch, load_minilm
from tuned_helpers import outputs, method_params

load_all()
NAMES = sorted(n for n in METHODS if not n.startswith('_'))
CLS = {n: get_method(n) for n in NAMES}
HP = {n: getattr(CLS[n], 'test_hp', {}) for n in NAMES}   # hyper-parameters small enough for the tiny models
# (method, architecture) pairs where the method cannot apply: it must refuse with a clear error, touching nothing
NOT_APPLICABLE = {
    ('prefix-tuning', 'deberta-v2'): 'DisentangledSelfAttention',   # computes attention itself: no prefix interface
    ('bitfit', 'llama'): 'no biases',                               # LLaMA's layers have no biases to train
}


def applicable(name, arch):
    "True if `name` applies to `arch`; else check that it refuses clearly and leaves the model untouched."
    if (name, arch) not in NOT_APPLICABLE: return True
    m = tiny_model(arch)
    names0 = [n for n, _ in m.named_modules()]
    with pytest.raises((TypeError, ValueError)) as e: apply_tuning(m, name, **HP[name])
    assert NOT_APPLICABLE[name, arch] in str(e.value), str(e.value)
    assert [n for n, _ in m.named_modules()] == names0 and not hasattr(m, 'subspace')
    assert all(p.requires_grad for p in m.parameters())
    return False


def tuned(name, arch, dtype=torch.float32, seed=0):
    assert (name, arch) not in NOT_APPLICABLE
    m = tiny_model(arch, dtype=dtype)
    return apply_tuning(m, name, seed=seed, **HP[name])


def perturb_(m, scale=0.1, seed=1):
    "Move every trainable parameter of the method (not the head) as training would."
    g = torch.Generator().manual_seed(seed)
    head = m.subspace['trainable']
    with torch.no_grad():
        for n, p in m.named_parameters():
            if p.requires_grad and not any(n == h or n.startswith(h + '.') for h in head):
                p.add_(scale * torch.randn(p.shape, generator=g).to(p.dtype))


def frozen_state(m):
    return {n: p.detach().clone() for n, p in m.named_parameters() if not p.requires_grad}


@pytest.mark.parametrize('arch', ARCHS)
@pytest.mark.parametrize('name', [n for n in NAMES if CLS[n].preserving])
def test_function_preserving_at_init(name, arch):
    if not applicable(name, arch): return
    x = tiny_batch()
    y0 = outputs(tiny_model(arch), x)
    torch.testing.assert_close(outputs(tuned(name, arch), x), y0, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('arch', ARCHS)
@pytest.mark.parametrize('name', NAMES)
def test_gradients_reach_only_tuner_parameters(name, arch):
    if not applicable(name, arch): return
    m = tuned(name, arch)
    x = tiny_batch()
    before = frozen_state(m)
    loss = m(**x).logits.square().sum() + regularizer(m)
    loss.backward()
    for n, p in m.named_parameters():
        if not p.requires_grad: assert p.grad is None, f"frozen {n} got a gradient"
    mine = method_params(m)
    assert mine, f"{name} trains nothing"
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in mine.values()), f"no gradient reaches {name}"
    start = {n: p.detach().clone() for n, p in mine.items()}
    torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2).step()
    for n, p in m.named_parameters():
        if n in before: assert torch.equal(p, before[n]), f"optimizer step changed frozen {n}"
    assert any(not torch.equal(p, start[n]) for n, p in mine.items()), f"the step moved no parameter of {name}"


@pytest.mark.parametrize('arch', ARCHS)
@pytest.mark.parametrize('name', NAMES)
def test_trainable_count_equals_formula(name, arch):
    if not applicable(name, arch): return
    cls = CLS[name]
    fresh = tiny_model(arch)
    layers = cls.select(fresh, cls.targets, exclude=default_trainable(fresh))
    m = tuned(name, arch)
    r = report(m)
    assert r['trainable'] == cls.count(layers, **HP[name])
    assert r['trainable'] == sum(p.numel() for p in method_params(m).values())
    assert 0 < r['per_mille'] <= 1000


@pytest.mark.parametrize('arch', ARCHS)
@pytest.mark.parametrize('name', NAMES)
def test_merge_unmerge_restores(name, arch):
    if not applicable(name, arch): return
    m = tuned(name, arch)
    perturb_(m)
    x = tiny_batch()
    y = outputs(m, x)
    state = {n: t.detach().clone() for n, t in m.state_dict().items()}
    if not CLS[name].linear:
        with pytest.raises(TypeError, match='not linear'): merge(m)
        assert all(torch.equal(t, state[n]) for n, t in m.state_dict().items())
        return
    merge(m)
    torch.testing.assert_close(outputs(m, x), y, rtol=1e-4, atol=1e-5)
    unmerge(m)
    for n, t in m.state_dict().items(): assert torch.equal(t, state[n]), f"unmerge did not restore {n}"
    assert torch.equal(outputs(m, x), y)


@pytest.mark.parametrize('arch', ARCHS)
@pytest.mark.parametrize('name', NAMES)
def test_save_load_reproduces_outputs(name, arch, tmp_path):
    if not applicable(name, arch): return
    m = tuned(name, arch, seed=3)
    perturb_(m)
    with torch.no_grad():                                   # the head trains too
        for h in m.subspace['trainable']:
            for p in m.get_submodule(h).parameters(): p.add_(0.1)
    x = tiny_batch()
    y = outputs(m, x)
    save_tuning(m, tmp_path)
    m2 = load_tuning(tiny_model(arch), tmp_path)
    assert torch.equal(outputs(m2, x), y)


@pytest.mark.parametrize('arch', ARCHS)
@pytest.mark.parametrize('name', NAMES)
def test_remove_gives_back_plain_model(name, arch):
    if not applicable(name, arch): return
    x = tiny_batch()
    plain = tiny_model(arch)
    y0 = outputs(plain, x)
    names0 = [n for n, _ in plain.named_modules()]
    m = tuned(name, arch)
    remove_tuning(m)
    assert [n for n, _ in m.named_modules()] == names0
    assert all(p.requires_grad for p in m.parameters()) and not tuners(m)
    if CLS[name].preserving: torch.testing.assert_close(outputs(m, x), y0, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('arch', ['bert', 'llama'])
@pytest.mark.parametrize('name', NAMES)
def test_bfloat16_base(name, arch):
    if not applicable(name, arch): return
    x = tiny_batch()
    y0 = outputs(tiny_model(arch, dtype=torch.bfloat16), x)
    m = tuned(name, arch, dtype=torch.bfloat16)
    y = outputs(m, x)
    assert y.dtype == torch.bfloat16
    if CLS[name].preserving: torch.testing.assert_close(y, y0, rtol=2e-2, atol=2e-2)
    m(**x).logits.float().square().sum().backward()
    assert any(p.grad is not None for p in method_params(m).values())
    perturb_(m)
    state = {n: t.detach().clone() for n, t in m.state_dict().items()}
    if CLS[name].linear:
        merge(m); unmerge(m)
        for n, t in m.state_dict().items(): assert torch.equal(t, state[n]), f"unmerge did not restore {n}"


@pytest.fixture(scope='module')
def minilm():
    return load_minilm()


@pytest.mark.parametrize('name', NAMES)
def test_on_embedded_minilm(name, minilm):
    base, tok = minilm
    x = tok(['a gripping, funny film', 'tedious'], padding=True, return_tensors='pt')
    y0 = outputs(base, x)
    m = apply_tuning(copy.deepcopy(base), name)
    if CLS[name].preserving: torch.testing.assert_close(outputs(m, x), y0, rtol=1e-4, atol=1e-4)
    r = report(m)
    cls = CLS[name]
    assert r['trainable'] == cls.count(cls.select(base, cls.targets, exclude=default_trainable(base)))
    (m(**x).logits.square().sum() + regularizer(m)).backward()
    assert any(p.grad is not None for p in method_params(m).values())


def test_registry_declarations_are_complete():
    assert {'lora', 'full'} <= set(NAMES)
    table = taxonomy()
    for n in NAMES:
        c = CLS[n]
        assert c.mode in MODES and c.equation and c.formula, n
        assert f'| {n} |' in table
        hparams(c)                      # the signature can be read


@pytest.mark.parametrize('arch', ['bert', 'llama'])
@pytest.mark.parametrize('name', NAMES)
def test_trains_under_autocast(name, arch):
    "A float32 model trained under bfloat16 autocast (what Trainer(bf16=True) does): forward, backward, finite gradients."
    if not applicable(name, arch): return
    m = tuned(name, arch)
    x = tiny_batch(n=8, l=16)                   # enough tokens that the one-GEMM layers would otherwise take their fast form
    with torch.autocast('cpu', dtype=torch.bfloat16):
        loss = m(**x).logits.float().square().sum() + regularizer(m)
    loss.backward()
    grads = [p.grad for p in method_params(m).values() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads), f"{name} under autocast: no or non-finite gradients"
