"""The declared floors of settings.ini's `requirements`, as exact pins, for testing on the oldest versions we claim.

    python3 tools/min_requirements.py            # every requirement `pkg>=X` as `pkg==X`, space separated
    python3 tools/min_requirements.py torch      # only the named ones
    python tools/min_requirements.py --check     # in an environment built from those pins: each one installed at
                                                 # exactly its floor, and importable

Every requirement must declare a floor (`>=X`): a dependency without one cannot be tested at its oldest version.
Upper bounds (`<2`) are left out of the pins: the floor itself satisfies them."""
import re, sys
from configparser import ConfigParser
from pathlib import Path

SETTINGS = Path(__file__).resolve().parent.parent / 'settings.ini'
REQ = re.compile(r'^([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?(.*)$')


def norm(name: str) -> str: return re.sub(r'[-_.]+', '-', name).lower()


def floors(path=SETTINGS) -> dict:
    "{package name: floor version} for every entry of `requirements`."
    cfg = ConfigParser(delimiters=['='])
    cfg.read(path, encoding='utf-8')
    res = {}
    for req in cfg['DEFAULT'].get('requirements', '').split():
        m = REQ.match(req)
        if not m: raise SystemExit(f"requirement {req!r}: expected a name followed by version specifiers, e.g. 'pkg>=1.2'")
        name, spec = m.group(1), m.group(3)
        lo = [s[2:] for s in spec.split(',') if s.startswith('>=')]
        if len(lo) != 1:
            raise SystemExit(f"requirement {req!r} in {path.name} declares {len(lo)} floors: each requirement needs exactly "
                             f"one '>=X' (the oldest version it is tested with, by `make test-min`)")
        res[name] = lo[0]
    return res


def release(v: str) -> tuple:
    "'2.13' and '2.13.0+cpu' -> (2, 13): the release numbers, trailing zeros and local label dropped."
    t = [int(x) for x in re.match(r'\d+(?:\.\d+)*', v).group(0).split('.')]
    while len(t) > 1 and t[-1] == 0: t.pop()
    return tuple(t)


def check(fl: dict) -> None:
    "Each pinned package is installed at exactly its floor and its top-level module imports."
    import importlib, importlib.metadata as md
    by_dist = {}
    for mod, dists in md.packages_distributions().items():
        for d in dists: by_dist.setdefault(norm(d), []).append(mod)
    bad = []
    for name, lo in fl.items():
        try: have = md.version(name)
        except md.PackageNotFoundError: bad.append(f"{name}: not installed (floor {lo})"); continue
        if release(have) != release(lo): bad.append(f"{name}: {have} installed, floor is {lo}")
        mods = sorted(m for m in by_dist.get(norm(name), []) if not m.startswith('_'))
        mod = next((m for m in mods if norm(m) == norm(name)), mods[0] if len(mods) == 1 else None)
        if mod is None: bad.append(f"{name}: cannot tell its module among {mods}"); continue
        try: importlib.import_module(mod)
        except Exception as e: bad.append(f"{name} {have}: import {mod} failed: {type(e).__name__}: {e}")
        else: print(f"{name}=={have} (import {mod}) ok")
    if bad: raise SystemExit('floors not met:\n  ' + '\n  '.join(bad))


if __name__ == '__main__':
    fl, args = floors(), sys.argv[1:]
    if args == ['--check']: check(fl); sys.exit()
    unknown = [a for a in args if a not in fl]
    if unknown: raise SystemExit(f"{unknown}: not in requirements; expected some of {list(fl)}")
    print(' '.join(f'{n}=={v}' for n, v in fl.items() if not args or n in args))
