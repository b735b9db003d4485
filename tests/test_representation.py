"""LoReFT beyond the generic matrix: the equation on a real model's blocks, positions that count real tokens whatever
the padding, the key/value cache, calls that bypass the model, and the Hugging Face save path."""
import copy
import pytest, torch
from subspace_nb.catalogue.representation import LoReFT
from subspace_nb.extension.adapters import blocks
from subspace_nb.inject import apply_tuning, from_pretrained, remove_tuning
from subspace_nb.models import tiny_model, tiny_lm, tiny_batch


def perturb_(m, scale=0.3, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.reft.parameters(): p.add_(scale * torch.randn(p.shape, generator=g))
    return m


def block_outputs(m, x):
    "The output hidden state of every block of `m` for the batch `x`."
    outs, hooks = {}, []
    for n, b in blocks(m).items():
        hooks.append(b.register_forward_hook(lambda mod, a, o, n=n: outs.__setitem__(n, o[0] if isinstance(o, tuple) else o)))
    with torch.no_grad(): m(**x)
    for h in hooks: h.remove()
    return outs


@pytest.mark.parametrize('arch', ['deberta-v2', 'gpt2'])
def test_block_outputs_follow_the_equation(arch):
    "Each block's output is Phi(h) of what the block computed from the previous tuned state, at the chosen positions only."
    m = perturb_(apply_tuning(tiny_model(arch), 'loreft', r=3, positions='f2+l1'))
    x = tiny_batch()
    tuned = block_outputs(m, x)
    names = list(blocks(m))
    mask = x['attention_mask'].bool()
    last = mask.sum(1) - 1                                       # right padding in tiny_batch
    for i, n in enumerate(names):
        iv = m.reft.ivs[i]
        # recompute block i on the tuned input to it, without its intervention
        m.reft.ivs[i].forward = lambda h: h
        raw = block_outputs(m, x)[n]
        del m.reft.ivs[i].forward
        sel = torch.zeros(mask.shape, dtype=torch.bool)
        sel[:, :2] = True
        sel[torch.arange(len(last)), last] = True
        sel &= mask
        with torch.no_grad(): want = torch.where(sel[..., None], iv(raw), raw)
        torch.testing.assert_close(tuned[n], want, rtol=1e-5, atol=1e-5)
        R = iv.R.detach()
        torch.testing.assert_close(tuned[n][sel] @ R.T, raw[sel] @ iv.W.detach().T + iv.b.detach(), rtol=1e-4, atol=1e-4)


def test_positions_count_real_tokens_under_left_padding():
    "A left-padded row gives the logits of the same row alone: first and last count the tokens the mask keeps."
    m = perturb_(apply_tuning(tiny_lm('llama'), 'loreft', r=2, positions='f2+l1'))
    ids = torch.randint(2, 99, (1, 5), generator=torch.Generator().manual_seed(0))
    alone = m(input_ids=ids).logits[0, -1]
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], 1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones_like(ids)], 1)
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    y = m(input_ids=padded, attention_mask=mask, position_ids=pos).logits[0, -1]
    torch.testing.assert_close(y, alone, rtol=1e-4, atol=1e-4)


def test_last_positions_refuse_the_cache_and_generate_without_it():
    m = perturb_(apply_tuning(tiny_lm('gpt2'), 'loreft', r=2, positions='l2'))
    ids = torch.randint(2, 99, (2, 4), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"positions='l2'.*use_cache=False"):
        m.generate(ids, max_new_tokens=2, do_sample=False, use_cache=True)
    seq = ids
    for _ in range(3):                                           # a full forward per token, by hand
        seq = torch.cat([seq, m(input_ids=seq).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(m.generate(ids, max_new_tokens=3, do_sample=False, use_cache=False), seq)
    assert m.reft.where is None                                  # the failed call left no positions behind


def test_a_block_called_outside_the_model_is_refused_when_positions_matter():
    m = apply_tuning(tiny_model('bert'), 'loreft', r=2, positions='f1')
    h = torch.randn(2, 5, 32)
    with pytest.raises(RuntimeError, match='call the tuned model itself'): m.bert.encoder.layer[0](h)
    m = apply_tuning(tiny_model('bert'), 'loreft', r=2)         # 'all': no positions to work out
    assert m.bert.encoder.layer[0](h).shape == h.shape


def test_R_stays_orthonormal_while_training():
    m = apply_tuning(tiny_model('roberta'), 'loreft', r=4)
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=0.1)
    x = tiny_batch()
    for _ in range(3):
        m(**x).logits.square().sum().backward()
        opt.step(); opt.zero_grad()
    A0 = apply_tuning(tiny_model('roberta'), 'loreft', r=4).reft.ivs[0].A
    assert not torch.allclose(m.reft.ivs[0].A, A0)                # A moved off its orthonormal start
    for iv in m.reft.ivs:
        R = iv.R.detach()
        torch.testing.assert_close(R @ R.T, torch.eye(4), rtol=0, atol=1e-5)


def test_save_pretrained_round_trip(tmp_path):
    m = perturb_(apply_tuning(tiny_model('llama'), 'loreft', r=2, positions='f1+l1', targets=[1]))
    x = tiny_batch()
    with torch.no_grad(): y = m(**x).logits
    m.save_pretrained(tmp_path)
    m2 = from_pretrained(tmp_path)
    assert m2.subspace['targets'] == [1] and len(m2.reft.ivs) == 1
    with torch.no_grad(): assert torch.equal(m2(**x).logits, y)


def test_count_follows_the_formula():
    assert LoReFT.n_params(384, 384, r=4) == 2 * 4 * 384 + 4
    with pytest.raises(ValueError, match='n=4 and m=5'): LoReFT.n_params(4, 5, r=1)


def test_a_deep_copy_runs_its_own_interventions():
    "The hooks of a copied model use the copy's parameters and come off with its tuning (the original keeps its own)."
    m = apply_tuning(tiny_model('bert'), 'loreft', r=2, positions='f2')
    x = tiny_batch()
    with torch.no_grad(): y = m(**x).logits
    c = perturb_(copy.deepcopy(m))
    with torch.no_grad():
        assert torch.equal(m(**x).logits, y)
        assert (c(**x).logits - y).abs().max() > 1e-4
    remove_tuning(c)
    assert sum(len(b._forward_hooks) for b in blocks(c).values()) == 0
    assert sum(len(b._forward_hooks) for b in blocks(m).values()) == 2


def test_gradient_checkpointing_gives_the_same_gradients():
    "Recomputing the blocks in the backward pass (Trainer(gradient_checkpointing=True)) keeps the positions and the gradients."
    grads = []
    for ck in (False, True):
        m = apply_tuning(tiny_model('llama'), 'loreft', r=2, positions='f1+l1')
        if ck: m.gradient_checkpointing_enable()
        m.train()
        m(**tiny_batch()).logits.square().sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in m.reft.parameters()]))
    assert grads[0].abs().max() > 0
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-6)
