"""The house's layers: every import inside pill points down (or sideways), never up.

The layers, bottom to top (README, "Layout"):

0. foundations -- errors, config machinery, precision policy, file writes, the modality registry,
   image and audio decoding;
1. parts -- the plug-in modules, LLM families and loading, encoders;
2. plugging -- plug() into an LLM;
3. model inputs -- the processor;
4. model and data -- the vision-language model and its chat path, datasets and batches, the run configs;
5. build -- configs -> models and data, checkpoints;
6. work -- training, evaluation, the web server, the Hub, integrations with other tools, checkpoint
   conversion;
7. entry points -- the command line, the demo and the sub-command handlers.
"""
import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "pill"

LAYERS = [
    ["errors", "config", "precision", "io", "modalities", "data.images", "data.audio"],
    ["modules", "families", "models", "attention", "vpg", "encoders"],
    ["plug"],
    ["processor"],
    ["vlm", "chat", "data", "runconfig"],
    ["build", "checkpoint"],
    ["train", "eval", "web", "hub", "integrations", "convert"],
    ["cli", "commands", "demo", "__init__", "data.commands", "train.commands", "eval.commands",
     "eval.run_commands", "web.commands", "web.make_examples", "__main__"],
]


def layer_of(module: str) -> int:
    """The layer of ``module`` (dotted, without the ``pill.`` prefix): its longest listed prefix wins."""
    best, depth = None, -1
    for i, names in enumerate(LAYERS):
        for name in names:
            if (module == name or module.startswith(name + ".")) and name.count(".") > depth:
                best, depth = i, name.count(".")
    if best is None:
        raise AssertionError(f"pill.{module} is in no layer of tests/test_layers.py: add it to LAYERS")
    return best


def modules():
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC).with_suffix("")
        parts = list(rel.parts)
        is_pkg = parts[-1] == "__init__"
        if is_pkg:
            parts = parts[:-1]
        yield ".".join(parts) or "__init__", path, is_pkg


def imports_of(name: str, path: Path, is_pkg: bool):
    """The pill modules ``path`` imports (module level and inside functions), dotted, without ``pill.``."""
    package = name.split(".") if is_pkg else name.split(".")[:-1]
    if name == "__init__":
        package = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("pill."):
                    yield a.name[5:], node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            elif node.module and (node.module == "pill" or node.module.startswith("pill.")):
                target = node.module[5:]
            else:
                continue
            if node.module is None or not target:  # `from . import x`: x is a module of the package
                for a in node.names:
                    yield ".".join(p for p in (target, a.name) if p), node.lineno
            else:
                yield target, node.lineno


def test_every_module_has_a_layer():
    for name, _, _ in modules():
        layer_of(name)


def test_imports_point_down():
    up = []
    for name, path, is_pkg in modules():
        mine = layer_of(name)
        for target, line in imports_of(name, path, is_pkg):
            if target in ("", "__init__") or target.split(".")[0] == "__version__":
                continue
            try:
                theirs = layer_of(target)
            except AssertionError:
                continue  # a name imported from a package (`from . import Sample`), not a module
            if theirs > mine:
                up.append(f"pill/{path.relative_to(SRC)}:{line} (layer {mine}) imports pill.{target} (layer {theirs})")
    assert not up, "imports that point up:\n" + "\n".join(up)


@pytest.mark.parametrize("name", ["pill.inference", "pill.train.config", "pill.train.checkpoint"])
def test_training_internals_are_not_where_other_layers_look(name):
    import importlib

    with pytest.raises(ModuleNotFoundError):
        importlib.import_module(name)
