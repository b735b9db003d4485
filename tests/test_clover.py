"""CLOVER: each head's Q-K and V-O pairs as a joint SVD with a trained core T, carried on the pair's first layer.

The generic matrix (tests/test_matrix.py, tests/test_properties.py) covers preservation, merge, save/load, removal and
generation; here: the pair equation against an independent SVD, rotary models, refusals, named tunings, and a few
steps on the embedded MiniLM."""
import pytest, torch
from subspace_nb.core import weight_of
from subspace_nb.inject import apply_tuning, tuners, report, merge, unmerge
from subspace_nb.named import add_tuning, set_tuning
from subspace_nb.models import tiny_model, tiny_batch, load_minilm
from subspace_nb.catalogue.svd_basis import CLOVER, head_blocks


def moved(m, scale=0.1, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in tuners(m).values(): t.D.add_(scale * torch.randn(t.D.shape, generator=g))
    return m


def test_pair_equation_against_an_independent_svd():
    "Per head, tuned query . plain key = [x,1] U T V^T [x',1]^T, with U, S, V from torch's SVD of the joint map and T = S + D."
    m = tiny_model('bert')
    att = m.bert.encoder.layer[1].attention
    k, o = att.self.key, att.output.dense
    H = m.config.num_attention_heads
    n = k.in_features
    d = n // H
    Wq = head_blocks(weight_of(att.self.query).detach(), att.self.query.bias.detach(), slice(0, n), H)
    Wk = head_blocks(weight_of(k).detach(), k.bias.detach(), slice(0, n), H)
    Wv = head_blocks(weight_of(att.self.value).detach(), att.self.value.bias.detach(), slice(0, n), H)
    Go = weight_of(o).detach().T.reshape(H, d, -1)
    moved(apply_tuning(m, 'clover'))
    tq, tv = att.self.query, att.self.value
    g = torch.Generator().manual_seed(0)
    x, x2 = torch.randn(5, n, generator=g), torch.randn(6, n, generator=g)
    one = lambda z: torch.cat([z, torch.ones(len(z), 1)], 1)
    with torch.no_grad():
        for h in range(H):
            s = slice(h * d, (h + 1) * d)
            for t, J, first, second in ((tq, Wq[h] @ Wk[h].T, tq(x)[:, s], k(x2)[:, s].T),
                                        (tv, Wv[h] @ Go[h], tv(x)[:, s], Go[h])):
                U, S, Vh = torch.linalg.svd(J)
                U, S, V = U[:, :d], S[:d], Vh[:d].T                    # the joint map's own SVD, rank d
                Ut = torch.cat([t.U[:, s], t.u0[None, s]])              # the tuner's basis, (n+1, d)
                Rot = U.T @ Ut                                          # the two bases span the same space ...
                torch.testing.assert_close(Rot @ Rot.T, torch.eye(d), atol=1e-4, rtol=0)
                torch.testing.assert_close(torch.linalg.svdvals(t.T0[h]), S, atol=1e-4, rtol=1e-4)   # ... and T0 = Sigma
                Vt = (torch.linalg.pinv(Ut @ t.T0[h]) @ J).T            # the tuner's output-side vectors
                right = one(x2).T if t is tq else torch.eye(Go.shape[-1])
                torch.testing.assert_close(first @ second, one(x) @ Ut @ t.core()[h] @ Vt.T @ right, atol=1e-3, rtol=1e-3)


def test_rotary_model_orthogonalises_q_k_v_alone():
    "LLaMA (rotary, grouped values): q, k and v are each W~_h = U_h R_h by QR, T0 = R, P = I; the count follows the heads."
    m = tiny_model('llama')
    cfg = m.config
    H, kv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
    W = {x: weight_of(getattr(m.model.layers[0].self_attn, x)).detach() for x in ('q_proj', 'k_proj', 'v_proj')}
    apply_tuning(m, 'clover')
    att = m.model.layers[0].self_attn
    assert {n.rsplit('.', 1)[1] for n in tuners(m)} == {'q_proj', 'k_proj', 'v_proj'}
    for x, h in (('q_proj', H), ('k_proj', kv), ('v_proj', kv)):
        t = getattr(att, x)
        assert t.u0 is None and t.P.shape == (h, d, d)
        torch.testing.assert_close(t.P, torch.eye(d).expand(h, d, d))
        torch.testing.assert_close(t.T0, t.T0.triu())                   # R of the QR
        Wt = torch.einsum('ngd,gde->nge', t.U.view(-1, h, d), t.T0).reshape(-1, h * d)   # U_h R_h, paper layout
        torch.testing.assert_close(Wt, W[x].T, atol=1e-5, rtol=1e-5)
    assert report(m)['trainable'] == cfg.num_hidden_layers * (H + 2 * kv) * d * d


def test_refusals_leave_the_model_untouched():
    m = tiny_model('bert')
    m.config.num_key_value_heads = 2                                  # grouped heads, no rotary embeddings
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(ValueError, match='num_key_value_heads=2, num_attention_heads=4'): apply_tuning(m, 'clover')
    del m.config.num_key_value_heads
    with torch.no_grad(): m.bert.encoder.layer[0].attention.output.dense.weight[:, :8] = 0   # head 0 reads nothing
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(ValueError, match='nearly singular'): apply_tuning(m, 'clover')
    assert not tuners(m) and not hasattr(m, 'subspace')
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())
    with pytest.raises(ValueError, match='no attention block'): apply_tuning(torch.nn.Sequential(torch.nn.Linear(4, 4)), 'clover')


def test_named_tunings_switch_clover_in_and_out():
    x = tiny_batch()
    m = tiny_model('bert')
    with torch.no_grad(): y0 = m(**x).logits
    add_tuning(m, 'c', 'clover'); moved(m)
    with torch.no_grad(): yc = m(**x).logits
    add_tuning(m, 'l', 'lora', r=2)
    with torch.no_grad(): torch.testing.assert_close(m(**x).logits, y0)   # LoRA at init: the plain model
    set_tuning(m, 'c')
    with torch.no_grad(): assert torch.equal(m(**x).logits, yc)
    merge(m)
    with torch.no_grad(): torch.testing.assert_close(m(**x).logits, yc, atol=1e-5, rtol=1e-4)
    unmerge(m)


def test_few_steps_on_minilm_lower_the_loss():
    from subspace_nb.studies.experiments import few_steps
    model, tok = load_minilm()
    apply_tuning(model, 'clover')
    losses = few_steps(model, tok, steps=12, lr=2e-3, batch_size=8, max_len=32)
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4, losses


@pytest.mark.parametrize('arch', ['bert', 'gpt2'])
def test_one_gemm_and_thin_forms_agree(arch):
    "Many tokens take x phi(W)^T + b' in one GEMM, a few tokens the thin form: same outputs, same gradients."
    m = moved(apply_tuning(tiny_model(arch), 'clover'))
    t = next(iter(tuners(m).values()))
    d = t.P.shape[-1]
    x = torch.randn(2 * d, t.n, generator=torch.Generator().manual_seed(0))
    assert t.one_gemm(x) and not t.one_gemm(x[:1])
    ys, gs = [], []
    for rows in (x, *x[:, None]):                                      # all at once, then one token at a time
        t.D.grad = None
        y = t(rows); y.square().sum().backward()
        ys.append(y.detach()); gs.append(t.D.grad.clone())
    torch.testing.assert_close(torch.cat(ys[1:]), ys[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(sum(gs[1:]), gs[0], atol=1e-4, rtol=1e-4)
