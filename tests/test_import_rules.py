"""Which package may import which: read from the source with `ast`, so an import inside a
function or under `if TYPE_CHECKING:` counts as much as one at the top of a module.

The rules:
1. bot/ imports engine/ only in the composition root, bot/app.py and bot/cli.py; the rest of bot/
   knows engines through the port it owns, bot/engine_port.py (the Engine protocol, its errors,
   EngineInfo, StreamStats).
2. engine/ imports from bot/ only bot.models and bot.engine_port.
3. Nothing in bot/ or engine/ imports adapters/ (bot/app.py builds them: the one exception).
4. Code outside engine/ in the product (bot/, adapters/) imports engine's public face, `engine`
   itself and the names in its `__all__`, never a submodule such as engine.qwen.engine.
   tests/ and benchmarks/ may import submodules: they test and measure the parts themselves.
5. Inside engine/, the subpackages point one way: engine.cpu imports only engine.cpu;
   engine.qwen imports engine.qwen, engine.cpu and engine.intake; engine.ocr imports engine.ocr
   and engine.intake; engine.intake imports nothing of engine/; engine.auto imports
   engine.intake; engine.remote imports engine.remote and engine.intake; engine/__init__.py (the
   face) may import all of engine/.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
COMPOSITION_ROOT = {"bot/app.py", "bot/cli.py"}
ENGINE_MAY_IMPORT_FROM_BOT = {"bot.models", "bot.engine_port"}
ENGINE_LAYERS: dict[str, tuple[str, ...]] = {  # an engine module's prefix -> what of engine it may import
    "engine.cpu": ("engine.cpu",),
    "engine.qwen": ("engine.qwen", "engine.cpu", "engine.intake"),
    "engine.ocr": ("engine.ocr", "engine.intake"),
    "engine.intake": (),
    "engine.auto": ("engine.intake",),
    "engine.remote": ("engine.remote", "engine.intake"),
    "engine.devmodel": (),
    "engine": ("engine",),  # engine/__init__.py, the public face
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> Iterator[tuple[int, str, list[str]]]:
    """(line, imported module, names taken from it) for every import statement of `path`."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name, []
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            target = ".".join([*base, node.module] if node.module else base)
            yield node.lineno, target, [alias.name for alias in node.names]


def files(*packages: str) -> list[Path]:
    return sorted(p for package in packages for p in (ROOT / package).rglob("*.py"))


def within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def where(path: Path, line: int, module: str) -> str:
    return f"{path.relative_to(ROOT)}:{line} imports {module}"


def public_face() -> set[str]:
    """engine/__init__.py's `__all__`, read from its source."""
    tree = ast.parse((ROOT / "engine" / "__init__.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets
        ):
            return set(ast.literal_eval(node.value))
    raise AssertionError("engine/__init__.py has no __all__")


def test_bot_imports_engine_only_in_the_composition_root() -> None:
    wrong = [
        where(path, line, module)
        for path in files("bot")
        if str(path.relative_to(ROOT)) not in COMPOSITION_ROOT
        for line, module, _ in imports(path)
        if within(module, "engine")
    ]
    assert wrong == []


def test_engine_imports_only_the_port_and_the_models_of_bot() -> None:
    wrong = [
        where(path, line, module)
        for path in files("engine")
        for line, module, _ in imports(path)
        if within(module, "bot") and module not in ENGINE_MAY_IMPORT_FROM_BOT
    ]
    assert wrong == []


def test_bot_and_engine_never_import_adapters() -> None:
    wrong = [
        where(path, line, module)
        for path in files("bot", "engine")
        if str(path.relative_to(ROOT)) != "bot/app.py"
        for line, module, _ in imports(path)
        if within(module, "adapters")
    ]
    assert wrong == []


def test_the_product_imports_engine_through_its_public_face() -> None:
    face = public_face()
    wrong = [
        where(path, line, module if module != "engine" else f"engine.{name}")
        for path in files("bot", "adapters")
        for line, module, names in imports(path)
        if within(module, "engine")
        for name in (names or ["*"])
        if module != "engine" or name not in face
    ]
    assert wrong == []


def test_engine_subpackages_import_one_way() -> None:
    wrong = []
    for path in files("engine"):
        importer = module_name(path)
        layer = max((p for p in ENGINE_LAYERS if within(importer, p)), key=len)
        allowed = ENGINE_LAYERS[layer]
        for line, module, _ in imports(path):
            if within(module, "engine") and not any(within(module, a) for a in allowed):
                wrong.append(where(path, line, module))
    assert wrong == []


@pytest.mark.parametrize("name", sorted(public_face()))
def test_every_name_of_the_public_face_resolves(name: str) -> None:
    import engine

    assert getattr(engine, name) is not None
