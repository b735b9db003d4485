"""One test per contract a tuned model keeps (the defects these contracts fixed are named in each docstring)."""
import copy, logging
import pytest, torch
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.utils import logging as hf_logging
import subspace_nb
from subspace_nb import (apply_tuning, tuners, merge, unmerge, disable_tuning, report, load_minilm, tiny_model,
                         tiny_batch, few_steps, METHODS)


def causal_lm(tie=True):
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=40, n_positions=16,
                                      tie_word_embeddings=tie)).eval()


def test_all_linear_leaves_out_output_layers():
    "'all-linear' on a causal LM used to tune lm_head; it leaves out the output layers, as PEFT does."
    m = apply_tuning(causal_lm(), 'lora', targets='all-linear', r=2)
    assert m.subspace['layers'] and not any('lm_head' in n for n in m.subspace['layers'])


@pytest.mark.parametrize('name', ['lora', 'sam-parser', 'fish-mask'])
def test_merge_never_writes_through_tied_weights(name):
    "Merging a tuned lm_head tied to the input embeddings used to change the embeddings too (logits off by 2.6)."
    m = apply_tuning(causal_lm(), name, targets=['lm_head'], trainable=[])
    emb = m.transformer.wte.weight.detach().clone()
    with pytest.raises(ValueError, match='tied weights'): merge(m)
    assert torch.equal(m.transformer.wte.weight, emb) and not any(t.merged for t in tuners(m).values())
    m2 = apply_tuning(causal_lm(tie=False), name, targets=['lm_head'], trainable=[])
    merge(m2)                                                   # untied: merges


def test_merged_layer_never_stale():
    "An optimizer step on a merged model used to leave the forward on the old merged weight."
    m = apply_tuning(tiny_model('bert'), 'lora', r=2).eval()
    x = tiny_batch()
    merge(m)
    with torch.no_grad():
        for t in tuners(m).values(): t.B.add_(0.1)             # what an optimizer step does
    y_merged = m(**x).logits
    unmerge(m)
    torch.testing.assert_close(y_merged, m(**x).logits, rtol=1e-5, atol=1e-5)
    merge(m)
    with pytest.warns(UserWarning, match='unmerges'): m.train()
    assert not any(t.merged for t in tuners(m).values())


def test_stochastic_methods_merge_their_deterministic_form():
    "Diff pruning merged in train mode used to merge a random gate sample."
    m = apply_tuning(tiny_model('bert'), 'diff-pruning')
    with torch.no_grad():
        for t in tuners(m).values(): t.w.normal_(0, 0.1)
    m.eval(); W_eval = {n: t.tuned()[0].detach().clone() for n, t in tuners(m).items()}
    m.train(); merge(m)
    for n, t in tuners(m).items(): assert torch.equal(t.base.weight, W_eval[n])


def test_targets_naming_the_head():
    "targets=['classifier'] used to say 'matched no module'."
    with pytest.raises(ValueError, match='task head') as e: apply_tuning(tiny_model('bert'), 'lora', targets=['classifier'])
    assert 'trainable=[]' in str(e.value)


def test_loading_leaves_process_logging_alone():
    "load_minilm used to set transformers' logging to ERROR for the whole process."
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_warning()
    try:
        load_minilm()
        assert hf_logging.get_verbosity() == logging.WARNING and hf_logging.is_progress_bar_enabled()
    finally: hf_logging.set_verbosity(level)


def test_disable_tuning_restores_after_an_error():
    m = apply_tuning(tiny_model('bert'), 'lora', r=2).eval()
    with torch.no_grad():
        for t in tuners(m).values(): t.B.normal_()
    x = tiny_batch(); y = m(**x).logits.detach()
    merge(m)
    with pytest.raises(RuntimeError, match='boom'):
        with disable_tuning(m): raise RuntimeError('boom')
    assert all(t.merged and not t.disabled for t in tuners(m).values())
    torch.testing.assert_close(m(**x).logits, y, rtol=1e-5, atol=1e-5)


def test_safe_merge_writes_nothing_when_a_weight_is_not_finite():
    m = apply_tuning(tiny_model('bert'), 'lora', r=2)
    ts = list(tuners(m).values())
    with torch.no_grad(): ts[-1].B.fill_(float('nan'))
    before = [t.base.weight.detach().clone() for t in ts]
    with pytest.raises(ValueError, match='NaN or inf; nothing was merged'): merge(m, safe=True)
    assert all(not t.merged and torch.equal(t.base.weight, b) for t, b in zip(ts, before))


def test_bf16_merge_rounds_once():
    "phi(W) of a bf16 base is computed in float32 and rounded once to bf16."
    m = apply_tuning(tiny_model('bert', dtype=torch.bfloat16), 'lora', r=2)
    with torch.no_grad():
        for t in tuners(m).values(): t.B.normal_(0, 0.1)
    expect = {n: (t.W.float() + t.delta().float()).to(torch.bfloat16) for n, t in tuners(m).items()}
    merge(m)
    for n, t in tuners(m).items(): assert torch.equal(t.base.weight, expect[n])


@pytest.mark.parametrize('name, check', [('fish-mask', lambda t: bool(t.chosen)), ('diff-pruning', lambda t: t.projected)])
def test_protocol_runs_by_name_in_our_training(name, check):
    "fish-mask and diff-pruning used to train as their baselines by name (no Fisher mask, no projection)."
    m, tok = load_minilm()
    apply_tuning(m, name, targets=['query'])
    few_steps(m, tok, steps=2, batch_size=4)
    assert all(check(t) for t in tuners(m).values())


def test_public_api():
    assert {'apply_tuning', 'SubspaceTrainer', 'from_pretrained', 'load_minilm', 'merge'} <= set(subspace_nb.__all__)
    assert all(hasattr(subspace_nb, n) for n in subspace_nb.__all__)
    assert {'lora', 'ssb', 'dora', 'adalora', 'fish-mask'} <= set(METHODS)   # registered by the import alone
