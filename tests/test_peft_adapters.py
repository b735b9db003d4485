"""Adapters saved by HF PEFT (a test-only dependency) load into our tuners and compute what PEFT computes; ours saved in
PEFT's format load with `PeftModel.from_pretrained` and compute what ours compute. LoRA, DoRA and (IA)^3, on the five
tiny architectures (GPT-2's Conv1D included) and the embedded MiniLM; refusals leave the model bit-identical."""
import copy, json, math
import pytest, torch
from peft import LoraConfig, IA3Config, PeftModel, get_peft_model   # imported, never skipped
from safetensors.torch import load_file, save_file
from subspace_nb.peft_adapters import load_peft_adapter, save_peft_adapter, read_peft_adapter, PEFT_CONFIG, PEFT_WEIGHTS
from subspace_nb.studies.analysis import delta_weights, layer_analysis
from subspace_nb.inject import apply_tuning, tuners, default_trainable
from subspace_nb.reconstruction.mode2 import IA3, FFN_DOWN
from subspace_nb.models import ARCHS, tiny_model, tiny_batch, load_minilm
import subspace_nb.extension.lora, subspace_nb.combination.decomposed  # noqa: F401  (register the methods)

LORA_TARGETS = {'bert': ['query', 'value', 'intermediate.dense'], 'roberta': ['query', 'key', 'output.dense'],
                'deberta-v2': ['query_proj', 'value_proj'], 'gpt2': ['c_attn', 'c_fc', 'c_proj'],
                'llama': ['q_proj', 'v_proj', 'down_proj'], 'minilm': ['query', 'value']}


def model_and_batch(arch):
    if arch != 'minilm': return tiny_model(arch), tiny_batch()
    base, tok = load_minilm()
    return base, dict(tok(['a gripping, funny film', 'tedious and far too long'], padding=True, return_tensors='pt'))


def logits(model, x):
    model.eval()
    with torch.no_grad(): return model(**x).logits


def perturb(module, seed=0, scale=0.05):
    "Move every trainable parameter of `module` (adapter and head), so that nothing is at its initial value."
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in module.named_parameters():
            if p.requires_grad:
                if 'magnitude' in n or 'ia3_l' in n or n.endswith(('l_in', 'l_out')):
                    p.mul_(torch.exp(0.2 * torch.randn(p.shape, generator=g)))
                else: p.add_(scale * torch.randn(p.shape, generator=g))


def peft_made(base, kind, arch, tmp_path, **extra):
    "An adapter made and saved by PEFT on a copy of `base`, with moved weights and head: (folder, PeftModel)."
    heads = default_trainable(base)
    if kind == 'ia3':
        cfg = IA3Config(target_modules=IA3.targets, feedforward_modules=FFN_DOWN, modules_to_save=heads, **extra)
    else:
        cfg = LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS[arch], use_dora=kind == 'dora',
                         modules_to_save=heads, **extra)
    pm = get_peft_model(copy.deepcopy(base), cfg)
    perturb(pm)
    path = tmp_path / f'peft-{kind}-{arch}'
    pm.save_pretrained(path)
    return path, pm


def snapshot(model):
    return (type(model), {k: v.clone() for k, v in model.state_dict().items()},
            {n: p.requires_grad for n, p in model.named_parameters()}, [type(m) for m in model.modules()],
            hasattr(model, 'subspace'), getattr(model.config, 'subspace', None))


def assert_untouched(model, snap):
    now = snapshot(model)
    assert now[0] is snap[0] and now[2] == snap[2] and now[3] == snap[3] and now[4:] == snap[4:]
    assert now[1].keys() == snap[1].keys() and all(torch.equal(now[1][k], snap[1][k]) for k in snap[1])


@pytest.mark.parametrize('kind', ['lora', 'dora', 'ia3'])
@pytest.mark.parametrize('arch', [*ARCHS, 'minilm'])
def test_peft_adapter_loads_into_ours(arch, kind, tmp_path):
    base, x = model_and_batch(arch)
    path, pm = peft_made(base, kind, arch, tmp_path)
    ours = load_peft_adapter(copy.deepcopy(base), path)
    assert ours.subspace['method'] == kind
    assert sorted(ours.subspace['trainable']) == sorted(default_trainable(base))    # the head came along
    y0, y1, y2 = logits(base, x), logits(ours, x), logits(pm, x)
    assert not torch.allclose(y0, y2, atol=1e-3)                                    # the adapter does something
    torch.testing.assert_close(y1, y2, rtol=1e-5, atol=1e-5)
    n_layers = sum(1 for k in load_file(str(path / PEFT_WEIGHTS)) if k.endswith(('lora_A.weight', 'ia3_l')))
    assert len(tuners(ours)) == n_layers


@pytest.mark.parametrize('kind', ['lora', 'dora', 'ia3'])
@pytest.mark.parametrize('arch', [*ARCHS, 'minilm'])
def test_ours_loads_into_peft(arch, kind, tmp_path):
    base, x = model_and_batch(arch)
    hp = {} if kind == 'ia3' else dict(r=4, alpha=6)
    ours = apply_tuning(copy.deepcopy(base), kind, **hp)
    perturb(ours, seed=1)
    path = save_peft_adapter(ours, tmp_path / 'ours')
    pm = PeftModel.from_pretrained(copy.deepcopy(base), path)
    y0, y1, y2 = logits(base, x), logits(ours, x), logits(pm, x)
    assert not torch.allclose(y0, y1, atol=1e-3)
    torch.testing.assert_close(y2, y1, rtol=1e-5, atol=1e-5)
    back = load_peft_adapter(copy.deepcopy(base), path)                             # and back again: the same tensors
    mine, again = ours.state_dict(), back.state_dict()
    assert mine.keys() == again.keys() and all(torch.equal(mine[k], again[k]) for k in mine)
    for k in ('method', 'layers', 'shapes', 'trainable'): assert back.subspace[k] == ours.subspace[k], k


def test_rslora_scale(tmp_path):
    "use_rslora: s = lora_alpha / sqrt(r); ours takes alpha = lora_alpha sqrt(r)."
    base, x = tiny_model('llama'), tiny_batch()
    path, pm = peft_made(base, 'lora', 'llama', tmp_path, use_rslora=True)
    ours = load_peft_adapter(copy.deepcopy(base), path)
    t = next(iter(tuners(ours).values()))
    assert math.isclose(t.s, 8 / math.sqrt(4), rel_tol=1e-12)
    torch.testing.assert_close(logits(ours, x), logits(pm, x), rtol=1e-5, atol=1e-5)


def test_delta_weights_of_an_imported_adapter_are_peft_merged_minus_base(tmp_path):
    base, _ = load_minilm()
    path, pm = peft_made(base, 'lora', 'minilm', tmp_path)
    ours = load_peft_adapter(copy.deepcopy(base), path)
    dW = delta_weights(ours)
    merged = pm.merge_and_unload()
    for n, d in dW.items():
        torch.testing.assert_close(d, merged.get_submodule(n).weight - base.get_submodule(n).weight, rtol=1e-4, atol=1e-6)
    rows = layer_analysis(ours, k=8)
    assert len(rows) == 12 and all(r['rank'] == 4 for r in rows)                    # r = 4: rank 4, not 8


def test_head_under_wrapped_names(tmp_path):
    "A head stored as '<head>.modules_to_save.<adapter>.<parameter>' (a PEFT state dict's names) loads too."
    base, x = tiny_model('bert'), tiny_batch()
    path, pm = peft_made(base, 'lora', 'bert', tmp_path)
    sd = load_file(str(path / PEFT_WEIGHTS))
    sd = {k.replace('model.classifier.', 'model.classifier.modules_to_save.default.'): v for k, v in sd.items()}
    assert any('modules_to_save.default' in k for k in sd)
    save_file(sd, str(path / PEFT_WEIGHTS))
    torch.testing.assert_close(logits(load_peft_adapter(copy.deepcopy(base), path), x), logits(pm, x), rtol=1e-5, atol=1e-5)


def edit_config(path, **changes):
    cfg = json.loads((path / PEFT_CONFIG).read_text())
    cfg.update(changes)
    (path / PEFT_CONFIG).write_text(json.dumps(cfg))


REFUSALS = [
    (dict(bias='all'), "bias='all' is not supported"),
    (dict(use_rslora='yes'), "use_rslora='yes'"),
    (dict(rank_pattern={'query': 0}), "rank_pattern={'query': 0} is not supported"),
    (dict(layers_to_transform=[0]), 'layers_to_transform=[0]'),
    (dict(init_lora_weights='pissa'), 'rewrite the base weight'),
    (dict(peft_type='POLY'), "peft_type='POLY'"),
    (dict(r=8), 'r=8 in the config'),                                  # the tensors have r = 4
    (dict(use_dora=True), 'use_dora=True'),                           # no magnitudes in the file
    (dict(target_modules=['query']), 'only in the weights'),          # value layers not selected by the config
    (dict(modules_to_save=None), 'neither'),                          # the head's tensors then belong to nothing
    (dict(lora_dropout=1.5), 'lora_dropout=1.5'),
]


@pytest.mark.parametrize('change,msg', REFUSALS)
def test_refusals_leave_the_model_untouched(change, msg, tmp_path):
    base = load_minilm()[0]
    path, _ = peft_made(base, 'lora', 'minilm', tmp_path)
    edit_config(path, **change)
    model = copy.deepcopy(base)
    snap = snapshot(model)
    with pytest.raises((ValueError, TypeError), match=None) as e:
        load_peft_adapter(model, path)
    assert msg in str(e.value), str(e.value)
    assert_untouched(model, snap)


def test_refusals_of_the_files(tmp_path):
    base = tiny_model('bert')
    path, _ = peft_made(base, 'lora', 'bert', tmp_path)
    for make_bad, msg in [
        (lambda: tiny_model('llama'), 'does not have'),                                       # another base model
        (lambda: tiny_model('bert', num_labels=3), 'another number of labels'),              # another head
        (lambda: apply_tuning(tiny_model('bert'), 'lora'), 'already tuned'),
    ]:
        model = make_bad()
        snap = snapshot(model)
        with pytest.raises(ValueError) as e: load_peft_adapter(model, path)
        assert msg in str(e.value), str(e.value)
        assert_untouched(model, snap)
    sd = load_file(str(path / PEFT_WEIGHTS))
    save_file({k.removeprefix('base_model.model.'): v for k, v in sd.items()}, str(path / PEFT_WEIGHTS))
    with pytest.raises(ValueError, match="does not start with 'base_model.model.'"): load_peft_adapter(copy.deepcopy(base), path)
    save_file(sd | {'base_model.model.bert.embeddings.word_embeddings.lora_embedding_A': torch.zeros(4, 99)},
              str(path / PEFT_WEIGHTS))
    with pytest.raises(ValueError, match='lora_embedding_A'): load_peft_adapter(copy.deepcopy(base), path)
    (path / PEFT_WEIGHTS).unlink()
    with pytest.raises(FileNotFoundError, match=PEFT_WEIGHTS): read_peft_adapter(path)


def test_ia3_side_mismatch_refused(tmp_path):
    "A layer PEFT scales on the output where its name says feedforward for us cannot be expressed: refused, untouched."
    base = tiny_model('bert')
    pm = get_peft_model(copy.deepcopy(base), IA3Config(target_modules=['key', 'value', 'output.dense'],
                                                       feedforward_modules=['output.dense']))
    pm.save_pretrained(tmp_path / 'ia3')
    cfg = json.loads((tmp_path / 'ia3' / PEFT_CONFIG).read_text())      # the tensors say: input side on output.dense
    (tmp_path / 'ia3' / PEFT_CONFIG).write_text(json.dumps(dict(cfg, feedforward_modules=['intermediate.dense'])))
    model = copy.deepcopy(base)
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r'attention.output.dense: l saved \(1, 32\), the layer needs \(32, 1\)'):
        load_peft_adapter(model, tmp_path / 'ia3')
    assert_untouched(model, snap)


def test_export_refusals(tmp_path):
    base = tiny_model('bert')
    with pytest.raises(ValueError, match="tuned with 'ssb'"): save_peft_adapter(apply_tuning(copy.deepcopy(base), 'ssb'), tmp_path)
    with pytest.raises(ValueError, match="mpc='n'"):
        save_peft_adapter(apply_tuning(copy.deepcopy(base), 'lora', mpc='n'), tmp_path)
    with pytest.raises(ValueError, match='not tuned'): save_peft_adapter(base, tmp_path)
    with pytest.warns(UserWarning, match="mpc='o'"):
        save_peft_adapter(apply_tuning(copy.deepcopy(base), 'lora', mpc='o'), tmp_path / 'o')
    assert not (tmp_path / PEFT_WEIGHTS).exists()
