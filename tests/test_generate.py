"""Generation with every registered method that applies to a causal LM.

Greedy `generate`, with and without the key/value cache, must give the tokens and the logits of a loop written by
hand that runs a plain forward of the tuned model on the whole sequence for every new token. Inside
`disable_tuning`, generation is the plain model's. A method registered in any notebook is picked up here."""
import pytest, torch
from subspace_nb.core import METHODS, load_all, get_method
from subspace_nb.inject import apply_tuning, disable_tuning
from subspace_nb.models import tiny_lm

load_all()
NAMES = sorted(n for n in METHODS if not n.startswith('_'))
HP = {n: getattr(get_method(n), 'test_hp', {}) for n in NAMES}    # hyper-parameters small enough for the tiny models
# (method, architecture) pairs where the method cannot apply to the causal LM: it must say why
NOT_APPLICABLE = {('bitfit', 'llama'): 'no biases'}               # LLaMA's layers have no biases to train
IN_PLACE = {'full', 'bitfit'}                                     # change the model's own weights: no base to run
NEW = 5                                                           # tokens to generate


def perturb_(m, scale=0.5, seed=1):
    "Move the method's trainable parameters off their initial values, as training would (heads excluded)."
    g = torch.Generator().manual_seed(seed)
    heads = m.subspace['trainable']
    with torch.no_grad():
        for n, p in m.named_parameters():
            if p.requires_grad and not any(n == h or n.startswith(h + '.') for h in heads):
                p.add_(scale * torch.randn(p.shape, generator=g).to(p.dtype))
    return m


@torch.no_grad()
def greedy(m, ids, n=NEW):
    "`n` greedy tokens by hand, one plain forward of the whole sequence each: (sequence, logits of each new token)."
    seq, logits = ids, []
    for _ in range(n):
        y = m(input_ids=seq).logits[:, -1]
        logits.append(y)
        seq = torch.cat([seq, y.argmax(-1, keepdim=True)], 1)
    return seq, torch.stack(logits, 1)


def generate(m, ids, use_cache):
    out = m.generate(ids, max_new_tokens=NEW, do_sample=False, use_cache=use_cache, return_dict_in_generate=True,
                     output_logits=True)
    return out.sequences, torch.stack(out.logits, 1)


IDS = torch.randint(2, 99, (2, 4), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize('arch', ['gpt2', 'llama'])
@pytest.mark.parametrize('name', NAMES)
def test_generate(name, arch):
    if (name, arch) in NOT_APPLICABLE:
        with pytest.raises((TypeError, ValueError), match=NOT_APPLICABLE[name, arch]):
            apply_tuning(tiny_lm(arch), name, **HP[name])
        return
    m = perturb_(apply_tuning(tiny_lm(arch), name, seed=0, **HP[name]))
    plain = tiny_lm(arch)
    want, logits = greedy(m, IDS)
    assert (logits[:, 0] - greedy(plain, IDS, 1)[1][:, 0]).abs().max() > 1e-3, "the method must change the outputs"
    for use_cache in (True, False):
        seq, y = generate(m, IDS, use_cache)
        assert torch.equal(seq, want), f"use_cache={use_cache}: {seq.tolist()} != {want.tolist()}"
        torch.testing.assert_close(y, logits, rtol=1e-4, atol=1e-4)   # cached: other summation order


@pytest.mark.parametrize('arch', ['gpt2', 'llama'])
@pytest.mark.parametrize('name', NAMES)
def test_generate_disabled(name, arch):
    "Inside `disable_tuning` the tuned model generates as the plain model does; after it, as the tuned one does."
    if (name, arch) in NOT_APPLICABLE: return
    m = perturb_(apply_tuning(tiny_lm(arch), name, seed=0, **HP[name]))
    before = generate(m, IDS, True)[0]
    if name in IN_PLACE:
        with pytest.raises(TypeError, match='in place'):
            with disable_tuning(m): pass
        return
    with disable_tuning(m): seq = generate(m, IDS, True)[0]
    assert torch.equal(seq, greedy(tiny_lm(arch), IDS)[0])
    assert torch.equal(generate(m, IDS, True)[0], before)
