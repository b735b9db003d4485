"""Round trips against HF PEFT (a test-only dependency) for what `test_peft_adapters` does not cover: PEFT's own (IA)^3
placement, VeRA, AdaLoRA (pruned by its rank allocation or not), LoRA's per-layer `rank_pattern` / `alpha_pattern`,
and `modules_to_save` beyond the task head. Each way: PEFT makes and saves an adapter with moved weights -> ours loads it
and computes PEFT's logits; ours saves -> `PeftModel.from_pretrained` computes ours. Refusals leave the model untouched."""
import copy, json
import pytest, torch
from peft import AdaLoraConfig, IA3Config, LoraConfig, PeftModel, VeraConfig, get_peft_model   # imported, never skipped
from safetensors.torch import load_file, save_file
from subspace_nb.peft_adapters import load_peft_adapter, save_peft_adapter, PEFT_CONFIG, PEFT_WEIGHTS
from subspace_nb.inject import apply_tuning, tuners, hparams, remove_tuning
from subspace_nb.core import get_method
from subspace_nb.reconstruction.mode2 import PEFT_IA3
from subspace_nb.models import tiny_model, tiny_batch
import subspace_nb.extension.lora_family, subspace_nb.extension.shared, subspace_nb.combination.decomposed  # noqa: F401  (register the methods)

X = tiny_batch()


def logits(model):
    "The logits and the last hidden states, flattened (the tiny models' logits alone barely move)."
    model.eval()
    with torch.no_grad(): o = model(**X, output_hidden_states=True)
    return torch.cat([o.logits.flatten(), o.hidden_states[-1].flatten()])


def changes(y, y0) -> bool:
    "Does the tuning change the outputs by more than 0.1% (a hundred times the tolerance of the comparisons)?"
    return bool((y - y0).norm() > 1e-3 * y0.norm())


def moved(module, seed=0, scale=0.1):
    "Every trainable parameter of `module` moved off its initial value (vectors near 1 multiplied, the rest shifted)."
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in module.named_parameters():
            if not p.requires_grad: continue
            if n.endswith(('ia3_l.default', 'l_in', 'l_out')): p.mul_(torch.exp(0.2 * torch.randn(p.shape, generator=g)))
            else: p.add_(scale * torch.randn(p.shape, generator=g))
    return module


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, {n: p.requires_grad for n, p in model.named_parameters()}


def untouched(model, snap):
    sd, flags = snapshot(model)
    return (not hasattr(model, 'subspace') and not tuners(model) and flags == snap[1] and sd.keys() == snap[0].keys()
            and all(torch.equal(sd[k], snap[0][k]) for k in sd))


def peft_to_ours(base, cfg, tmp_path, seed=0):
    "PEFT makes and saves an adapter with moved weights; ours loads it: (ours, PeftModel)."
    pm = moved(get_peft_model(copy.deepcopy(base), cfg), seed)
    pm.save_pretrained(tmp_path / 'theirs')
    ours = load_peft_adapter(copy.deepcopy(base), tmp_path / 'theirs')
    y = logits(pm)
    assert changes(y, logits(base))                                           # the adapter does something
    torch.testing.assert_close(logits(ours), y, rtol=1e-5, atol=1e-5)
    return ours, pm


def ours_to_peft(base, ours, tmp_path, **kw):
    "Ours saves in PEFT's format; PeftModel.from_pretrained computes our logits, and ours reads the folder back exactly."
    path = save_peft_adapter(ours, tmp_path / 'ours', **kw)
    pm = PeftModel.from_pretrained(copy.deepcopy(base), path)
    y = logits(ours)
    assert changes(y, logits(base))
    torch.testing.assert_close(logits(pm), y, rtol=1e-5, atol=1e-5)
    back = load_peft_adapter(copy.deepcopy(base), path)
    torch.testing.assert_close(logits(back), y, rtol=1e-6, atol=1e-6)
    return path, pm, back


# -- (IA)^3 with PEFT's default placement for BERT: the attention's output projection scaled on its input --------------

def test_ia3_peft_default_placement_both_ways(tmp_path):
    base = tiny_model('bert')
    ours, _ = peft_to_ours(base, IA3Config(target_modules=['key', 'value', 'output.dense'],
                                           feedforward_modules=['output.dense']), tmp_path)
    ts = tuners(ours)
    assert ts['bert.encoder.layer.0.attention.output.dense'].sides == ('in',) and len(ts) == 8
    mine = moved(apply_tuning(copy.deepcopy(base), 'ia3', **PEFT_IA3), seed=3)
    path, _, back = ours_to_peft(base, mine, tmp_path)
    cfg = json.loads((path / PEFT_CONFIG).read_text())
    assert sorted(cfg['feedforward_modules']) == sorted(n for n, t in tuners(mine).items() if t.sides == ('in',))
    assert {n: t.sides for n, t in tuners(back).items()} == {n: t.sides for n, t in tuners(mine).items()}


def test_ia3_paper_placement_keeps_its_record(tmp_path):
    "An adapter with the paper's placement loads as a plain `ia3` (no feedforward hyper-parameter recorded)."
    base = tiny_model('bert')
    from subspace_nb.reconstruction.mode2 import IA3, FFN_DOWN
    ours, _ = peft_to_ours(base, IA3Config(target_modules=IA3.targets, feedforward_modules=FFN_DOWN), tmp_path)
    assert ours.subspace['hp'] == {}


# -- VeRA: one projection pair, regenerated from projection_prng_key ---------------------------------------------------

@pytest.mark.parametrize('save_projection', [True, False])
def test_vera_peft_to_ours(save_projection, tmp_path):
    base = tiny_model('bert')
    cfg = VeraConfig(r=4, target_modules=['query', 'value'], projection_prng_key=11, save_projection=save_projection,
                     d_initial=0.1)
    ours, _ = peft_to_ours(base, cfg, tmp_path)
    assert ours.subspace['seed'] == 11 and ours.subspace['hp'] == dict(r=4, d_init=0.1)
    assert ('base_model.vera_A' in load_file(str(tmp_path / 'theirs' / PEFT_WEIGHTS))) == save_projection


def test_vera_ours_to_peft(tmp_path):
    base = tiny_model('bert')
    mine = moved(apply_tuning(copy.deepcopy(base), 'vera', targets=['query', 'key'], r=4, seed=5), seed=2)
    path, pm, back = ours_to_peft(base, mine, tmp_path)
    assert torch.equal(pm.base_model.vera_A['default'], next(iter(tuners(mine).values())).A)
    assert back.subspace['seed'] == 5


def test_vera_refusals(tmp_path):
    base = tiny_model('bert')
    several = get_peft_model(copy.deepcopy(base), VeraConfig(r=4, target_modules=['query', 'intermediate.dense']))
    several.save_pretrained(tmp_path / 'several')
    model, snap = copy.deepcopy(base), None
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r'several shapes \(n, m\) \[\(32, 32\), \(32, 37\)\]'):
        load_peft_adapter(model, tmp_path / 'several')
    assert untouched(model, snap)
    pm = get_peft_model(copy.deepcopy(base), VeraConfig(r=4, target_modules=['query']))
    pm.save_pretrained(tmp_path / 'one')
    sd = load_file(str(tmp_path / 'one' / PEFT_WEIGHTS))
    save_file(dict(sd, **{'base_model.vera_A': sd['base_model.vera_A'] * 2}), str(tmp_path / 'one' / PEFT_WEIGHTS))
    with pytest.raises(ValueError, match='not the ones projection_prng_key=0 regenerates'):
        load_peft_adapter(model, tmp_path / 'one')
    assert untouched(model, snap)
    cfg = json.loads((tmp_path / 'one' / PEFT_CONFIG).read_text())
    (tmp_path / 'one' / PEFT_CONFIG).write_text(json.dumps(dict(cfg, vera_dropout=0.1)))
    with pytest.raises(ValueError, match='vera_dropout=0.1 is not supported'): load_peft_adapter(model, tmp_path / 'one')
    assert untouched(model, snap)
    two = apply_tuning(copy.deepcopy(base), 'vera', targets=['query', 'intermediate.dense'], r=4)
    with pytest.raises(ValueError, match='several shapes'): save_peft_adapter(two, tmp_path / 'no')
    assert not (tmp_path / 'no').exists()


# -- AdaLoRA: full rank, or pruned to PEFT's rank_pattern ---------------------------------------------------------------

ADA = dict(init_r=4, target_r=2, lora_alpha=8, tinit=2, tfinal=3, total_step=20, deltaT=2, beta1=0.8, beta2=0.9,
           orth_reg_weight=0.2, target_modules=['query', 'value'])


def test_adalora_peft_to_ours(tmp_path):
    base = tiny_model('bert')
    ours, _ = peft_to_ours(base, AdaLoraConfig(**ADA), tmp_path)
    t = next(iter(tuners(ours).values()))
    assert (t.r, t.target_r, t.alpha, t.init_warmup, t.final_warmup, t.mask_every, t.beta1, t.beta2, t.mpc, t.mpc_weight) \
        == (4, 2, 8.0, 2, 3, 2, 0.8, 0.9, 'o', 0.2)


def test_adalora_pruned_peft_to_ours(tmp_path):
    "PEFT's final allocation: rank_pattern in the config, each layer's kept triplets only in the file."
    base = tiny_model('bert')
    pm = moved(get_peft_model(copy.deepcopy(base), AdaLoraConfig(**ADA)))
    masks = {}
    with torch.no_grad():
        for i, (n, mod) in enumerate((n, mod) for n, mod in pm.base_model.model.named_modules() if hasattr(mod, 'lora_E')):
            keep = [j != i % 4 for j in range(4)] if i % 3 else [False] * 4   # one layer dropped whole
            masks[f'{n}.lora_E.default'] = keep
            mod.lora_E['default'][[j for j in range(4) if not keep[j]]] = 0.
    pm.peft_config['default'].rank_pattern = masks
    y = logits(pm)
    pm.save_pretrained(tmp_path / 'theirs')
    saved = load_file(str(tmp_path / 'theirs' / PEFT_WEIGHTS))
    assert {v.shape[0] for k, v in saved.items() if k.endswith('lora_A')} == {0, 3}
    ours = load_peft_adapter(copy.deepcopy(base), tmp_path / 'theirs')
    reloaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / 'theirs')
    torch.testing.assert_close(logits(reloaded), y, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logits(ours), y, rtol=1e-5, atol=1e-5)
    from subspace_nb.extension.lora_family import adalora_ranks
    assert sorted(adalora_ranks(ours).values()) == sorted(sum(m) for m in masks.values())


@pytest.mark.parametrize('state', ['full', 'pruned', 'revived'])
def test_adalora_ours_to_peft(state, tmp_path):
    "Full rank; after an allocation (written pruned, as PEFT does); dropped triplets moved again since (written whole)."
    base = tiny_model('bert')
    mine = moved(apply_tuning(copy.deepcopy(base), 'adalora', r=4, target_r=2, alpha=8, init_warmup=0.1, seed=1))
    if state != 'full':
        from subspace_nb.extension.lora_family import AdaLoRA
        ts = list(tuners(mine).values())
        for i, t in enumerate(ts):
            t._ema = {k: (torch.rand(p.shape, generator=torch.Generator().manual_seed(i)), torch.ones(p.shape))
                      for k, p in (('A', t.A), ('B', t.B), ('D', t.D))}
        AdaLoRA.allocate(ts, budget=2 * len(ts))
        assert not all(bool(t.rank_mask.all()) for t in ts)
        if state == 'revived':
            with torch.no_grad(): ts[0].D.add_(0.1)
    path, _, back = ours_to_peft(base, mine, tmp_path, total_step=30)
    cfg = json.loads((path / PEFT_CONFIG).read_text())
    assert (cfg['tinit'], cfg['total_step'], cfg['rank_pattern'] is not None) == (3, 30, state == 'pruned')
    for n, t in tuners(back).items():
        assert torch.equal(t.rank_mask, tuners(mine)[n].rank_mask if state == 'pruned' else torch.ones_like(t.rank_mask))


def test_adalora_export_needs_total_step(tmp_path):
    mine = apply_tuning(tiny_model('bert'), 'adalora', r=4, init_warmup=2, final_warmup=2)
    with pytest.raises(ValueError, match='total_step=None'): save_peft_adapter(mine, tmp_path / 'a')
    with pytest.raises(ValueError, match='expected total_step > 4'): save_peft_adapter(mine, tmp_path / 'a', total_step=3)
    with pytest.raises(ValueError, match="total_step=5 is for an adalora"):
        save_peft_adapter(apply_tuning(tiny_model('bert'), 'lora'), tmp_path / 'a', total_step=5)
    assert not (tmp_path / 'a').exists()


# -- modules_to_save beyond the head --------------------------------------------------------------------------------------

def test_modules_to_save_implicit_head_and_norms_both_ways(tmp_path):
    "task_type='SEQ_CLS' makes PEFT save the classifier without naming it; 'LayerNorm' saves every LayerNorm whole."
    base = tiny_model('bert')
    ours, _ = peft_to_ours(base, LoraConfig(r=4, target_modules=['query'], task_type='SEQ_CLS',
                                            modules_to_save=['LayerNorm']), tmp_path)
    norms = [n for n, _ in base.named_modules() if n.endswith('LayerNorm')]
    assert sorted(ours.subspace['trainable']) == sorted(norms + ['classifier'])
    mine = moved(apply_tuning(copy.deepcopy(base), 'lora', r=4, targets=['value'], trainable=['classifier', *norms[:2]]))
    path, pm, back = ours_to_peft(base, mine, tmp_path)
    assert sorted(back.subspace['trainable']) == sorted(mine.subspace['trainable'])


# -- LoRA's rank_pattern / alpha_pattern ------------------------------------------------------------------------------------

def test_lora_patterns_both_ways(tmp_path):
    base = tiny_model('bert')
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=['query', 'value', 'dense'], rank_pattern={'value': 2, r'layer\.1\..*query': 3},
                     alpha_pattern={'intermediate.dense': 3.0}, use_dora=False)
    ours, _ = peft_to_ours(base, cfg, tmp_path)
    ts = tuners(ours)
    assert ts['bert.encoder.layer.0.attention.self.value'].r == 2 and ts['bert.encoder.layer.1.attention.self.query'].r == 3
    assert ts['bert.encoder.layer.0.attention.self.query'].r == 4 and ts['bert.encoder.layer.0.intermediate.dense'].s == 3.0 / 4
    mine = moved(apply_tuning(copy.deepcopy(base), 'dora', r=4, rank_pattern={'key': 2}, alpha_pattern={'query': 5.0}))
    path, _, back = ours_to_peft(base, mine, tmp_path)
    assert {n: (t.r, t.alpha) for n, t in tuners(back).items()} == {n: (t.r, t.alpha) for n, t in tuners(mine).items()}


def test_pattern_refusals(tmp_path):
    base = tiny_model('bert')
    pm = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, target_modules=['query'], rank_pattern={'query': 2}))
    pm.save_pretrained(tmp_path / 'p')
    cfg = json.loads((tmp_path / 'p' / PEFT_CONFIG).read_text())
    model = copy.deepcopy(base)
    snap = snapshot(model)
    for change, msg in ((dict(use_rslora=True), 'use_rslora=true with rank_pattern'),
                        (dict(rank_pattern={'query': 0}), "rank_pattern={'query': 0} is not supported"),
                        (dict(rank_pattern={'query': 3}), 'does not fit')):
        (tmp_path / 'p' / PEFT_CONFIG).write_text(json.dumps(dict(cfg, **change)))
        with pytest.raises(ValueError, match=msg): load_peft_adapter(model, tmp_path / 'p')
        assert untouched(model, snap)
