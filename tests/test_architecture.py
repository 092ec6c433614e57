"""The house's import rules (docs/architecture.md), read from the source's AST: each layer imports only the
layers below it, model families never import each other, and an import hidden inside a function says why."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OURS = ("pdmd", "megatron_adapters", "data")
EVERYTHING = OURS
# package (or module) -> the packages of ours it may import; the longest matching key decides.
ALLOWED: dict[str, tuple[str, ...]] = {
    "data": ("data",),
    "pdmd.core": ("pdmd.core",),
    "pdmd.run": ("pdmd.core", "pdmd.run", "data"),
    "pdmd.plan": ("pdmd.core", "pdmd.plan"),
    # the metrics and networks stand alone; the command generates its videos through `pdmd sample`, lazily
    "pdmd.eval": ("pdmd.core", "pdmd.eval", "pdmd.sample"),
    # converting starts by loading the Megatron experts (megatron_adapters/experts.py), lazily
    "pdmd.export": ("pdmd.core", "pdmd.run", "pdmd.export", "data", "megatron_adapters.experts"),
    "megatron_adapters": ("megatron_adapters", "pdmd.core"),
    # the commands and the benchmarks stand on everything
    "pdmd.cli": EVERYTHING,
    "pdmd.train": EVERYTHING,
    "pdmd.sample": EVERYTHING,
    "pdmd.bench": EVERYTHING,
}
EXACT = {"pdmd": ()}  # pdmd/__init__.py (the version) imports nothing; a new pdmd package needs its own rule
FAMILIES = "megatron_adapters.families."
LAZY_NOTE = "# lazy:"


def _module(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


def _rule(module: str) -> tuple[str, ...] | None:
    if module in EXACT:
        return EXACT[module]
    keys = [k for k in ALLOWED if module == k or module.startswith(k + ".")]
    return ALLOWED[max(keys, key=len)] if keys else None


def _within(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _family(module: str) -> str | None:
    rest = module[len(FAMILIES):].split(".") if module.startswith(FAMILIES) else []
    return rest[0] if len(rest) > 1 else None  # families/wan/x.py -> wan; families/registry.py -> None


def _has_lazy_note(lines: list[str], lineno: int) -> bool:
    """The import's own line, or a comment line above its group of imports, says ``# lazy: why``."""
    i = lineno - 1
    if LAZY_NOTE in lines[i]:
        return True
    i -= 1
    while i >= 0 and lines[i].strip().startswith(("from ", "import ", "#")):
        if LAZY_NOTE in lines[i]:
            return True
        i -= 1
    return False


def violations(module: str, source: str) -> list[str]:
    """Every import of ``source`` (module ``module``) that breaks a rule, as readable lines."""
    tree = ast.parse(source)
    lines = source.splitlines()
    top = {id(n) for n in tree.body}
    type_only = {id(x) for n in tree.body if isinstance(n, ast.If) and "TYPE_CHECKING" in ast.dump(n.test)
                 for x in ast.walk(n)}
    allowed = _rule(module)
    if allowed is None:
        return [f"{module}: no import rule covers it (add its package to tests/test_architecture.py ALLOWED)"]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        for name in (n for n in names if n.split(".")[0] in OURS):
            where = f"{module}:{node.lineno} imports {name}"
            if not _within(name, allowed):
                found.append(f"{where}: {module.split('.')[0]} layer may import only {', '.join(allowed)}")
            mine, theirs = _family(module), _family(name)
            if mine and theirs and mine != theirs:
                found.append(f"{where}: model families never import each other (share it in layers/)")
            if id(node) not in top and id(node) not in type_only and not _has_lazy_note(lines, node.lineno):
                found.append(f"{where} inside a function without a '{LAZY_NOTE} why' comment")
    return found


def test_every_module_follows_the_import_rules():
    found = []
    for package in OURS:
        for path in sorted((ROOT / package).rglob("*.py")):
            found += violations(_module(path), path.read_text())
    assert not found, "\n".join(found)


def test_the_checker_catches_each_kind_of_violation():
    assert violations("pdmd.core.method", "from pdmd.run.rundir import RunDir\n")  # upward arrow
    assert violations("megatron_adapters.backend", "import pdmd.export.layout\n")  # adapters reach into the app
    assert violations("data.loader", "from megatron_adapters.runtime import comm\n")
    assert violations("megatron_adapters.families.qwen_image.specs",
                      "from megatron_adapters.families.wan.specs import spec_for\n")  # siblings
    lazy = "def f():\n    from pdmd.core.schedule import PhasePlan\n"
    assert violations("pdmd.export.files", lazy)  # a hidden import without its reason
    assert not violations("pdmd.export.files", lazy.replace("PhasePlan\n", "PhasePlan  # lazy: cycle\n"))
    assert not violations("pdmd.export.files", "def f():\n    # lazy: why\n    from pdmd.core import schedule\n")
    assert violations("pdmd.newpackage.x", "import torch\n")  # every package needs a rule
    assert not violations("megatron_adapters.families.registry",
                          "from megatron_adapters.families.wan.family import WanFamily\n")


def test_the_megatron_backend_has_every_member_of_the_protocol():
    from megatron_adapters.backend import MegatronBackend
    from pdmd.core.backend import Backend

    members = [name for name in vars(Backend) if not name.startswith("_")]
    assert "train_step" in members and "velocity" in members
    missing = [name for name in members if not hasattr(MegatronBackend, name)]
    assert not missing, f"MegatronBackend lacks {missing} of pdmd/core/backend.py's protocol"
