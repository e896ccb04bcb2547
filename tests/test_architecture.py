"""The import graph of mdtrain/, built from the source (AST): no cycles, and every edge goes down the layering written
in mdtrain/ARCHITECTURE.md. A new module must be given a layer here (and there)."""
import ast
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Lowest first. A module may import modules of its own package (the first two dotted parts, e.g. mdtrain.models)
# and modules of strictly lower layers; never a module of its own layer's other packages, never one above.
LAYERS = [
    ["mdtrain", "mdtrain.configtools", "mdtrain.rng", "mdtrain.signals", "mdtrain.metrics", "mdtrain.testing",
     "mdtrain.faults"],
    ["mdtrain.models", "mdtrain.objectives", "mdtrain.data"],
    ["mdtrain.parallel", "mdtrain.optim", "mdtrain.errors", "mdtrain.launch.config"],
    ["mdtrain.config", "mdtrain.modeling", "mdtrain.checkpoint", "mdtrain.evaluate", "mdtrain.rundir"],
    ["mdtrain.exported"],
    ["mdtrain.inference", "mdtrain.sampling_images"],
    ["mdtrain.trainer", "mdtrain.sampling_cli", "mdtrain.compare", "mdtrain.interop", "mdtrain.harness"],
    ["mdtrain.eval_cli"],  # draws its gen-PPL samples exactly as `mdtrain sample` does (sampling_cli's options)
    ["mdtrain.launch.slurm", "mdtrain.launch.torchrun"],
    ["mdtrain.sweep"],
    ["mdtrain.cli"],
    ["mdtrain.__main__"],
]
# third-party imports that single-device model code must never make (parallelism is applied from outside)
MODELS_NEVER_IMPORT = ("torch.distributed", "deepspeed", "megatron")


def _modules() -> dict:
    mods = {}
    for d, _, files in os.walk(os.path.join(REPO, "mdtrain")):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(d, f)
                name = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".")
                mods[name[: -len(".__init__")] if name.endswith(".__init__") else name] = path
    return mods


def _imports(name: str, path: str) -> set:
    """Every module name an ``import`` / ``from ... import`` in the file refers to (absolute), lazy ones included."""
    out = set()
    pkg = name if path.endswith("__init__.py") else name.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(open(path).read(), path)):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = pkg.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names)
    return out


def _graph() -> dict:
    mods = _modules()
    graph = {}
    for name, path in mods.items():
        targets = set()
        for imp in _imports(name, path):
            while imp and imp not in mods:  # `from mdtrain.models import build_model` -> mdtrain.models
                imp = imp.rsplit(".", 1)[0] if "." in imp else ""
            if imp and imp != name:
                targets.add(imp)
        graph[name] = targets
    return graph


def _layer(name: str) -> int:
    best, best_len = None, -1
    for i, layer in enumerate(LAYERS):
        for prefix in layer:
            if (name == prefix or name.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = i, len(prefix)
    if best is None:
        raise AssertionError(f"module {name} has no layer: add it to LAYERS here and to mdtrain/ARCHITECTURE.md")
    return best


def _package(name: str) -> str:
    return ".".join(name.split(".")[:2])


def test_the_import_graph_has_no_cycles():
    graph = _graph()
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_every_import_goes_down_the_layers():
    graph = _graph()
    bad = []
    for src, targets in sorted(graph.items()):
        for dst in sorted(targets):
            if _package(src) == _package(dst):
                continue  # inside one package (mdtrain.models.*, mdtrain.sweep.*, ...)
            if dst == "mdtrain":
                continue  # the root package holds only __version__
            if _layer(dst) >= _layer(src):
                bad.append(f"{src} (layer {_layer(src)}) imports {dst} (layer {_layer(dst)})")
    assert not bad, "imports against the layering of mdtrain/ARCHITECTURE.md:\n" + "\n".join(bad)


@pytest.mark.parametrize("package,forbidden", [
    ("mdtrain.models", ("mdtrain.parallel", "mdtrain.trainer", "mdtrain.checkpoint", "mdtrain.data",
                        "mdtrain.objectives")),
    ("mdtrain.objectives", ("mdtrain.models", "mdtrain.parallel", "mdtrain.data")),
    ("mdtrain.data", ("mdtrain.models", "mdtrain.objectives", "mdtrain.parallel")),
])
def test_the_math_and_the_data_never_import_each_other_or_anything_above(package, forbidden):
    graph = _graph()
    bad = [f"{src} imports {dst}" for src, targets in graph.items() if _package(src) == package
           for dst in targets if any(dst == f or dst.startswith(f + ".") for f in forbidden)]
    assert not bad, bad


def test_model_code_is_single_device():
    mods = _modules()
    bad = [f"{name} imports {imp}" for name, path in mods.items() if name.startswith("mdtrain.models")
           for imp in _imports(name, path) if imp.startswith(MODELS_NEVER_IMPORT)]
    assert not bad, bad


def test_the_layering_check_can_fail(tmp_path):
    """The checker itself: an upward edge and a cycle are reported."""
    assert _layer("mdtrain.models.transformer") < _layer("mdtrain.trainer")
    fake = tmp_path / "m.py"
    fake.write_text("from mdtrain.trainer import run\nimport mdtrain.models.registry\n")
    assert {"mdtrain.trainer", "mdtrain.trainer.run", "mdtrain.models.registry"} <= _imports("mdtrain.models.m",
                                                                                             str(fake))
    with pytest.raises(AssertionError, match="has no layer"):
        _layer("mdtrain_unknown.x")
