"""Runs llama.cpp's ``convert_hf_to_gguf.py`` (in the converter's own venv, not the project's) with
its BPE pre-tokenizer table taught one more tokenizer.

The full-size random model's tokenizer is trained locally by engine/devmodel.py, so the hash that
``get_vocab_base_pre`` computes from it is in no table of llama.cpp's and the converter stops with
"BPE pre-tokenizer was not recognized". That tokenizer splits text as Qwen's does (byte-level BPE,
Qwen2Tokenizer), so its hash is mapped to ``qwen2``. The patch is made at run time; llama.cpp's code
is neither copied nor changed. Standard library only: this file also runs outside the project.

    python convert_driver.py LLAMA_CPP_DIR CHKHSH PRE_NAME -- <convert_hf_to_gguf.py arguments>
"""

from __future__ import annotations

import ast
import hashlib
import importlib
import runpy
import sys
from pathlib import Path
from typing import Any

BASE_PY = Path("conversion") / "base.py"  # where get_vocab_base_pre lives, under vendor/llama.cpp


def check_text(base_py: Path) -> str:
    """The text `get_vocab_base_pre` encodes to fingerprint a tokenizer (its ``chktxt``)."""
    tree = ast.parse(base_py.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.name == "get_vocab_base_pre":
            for stmt in node.body:
                if isinstance(stmt, ast.Assign) and any(
                    isinstance(t, ast.Name) and t.id == "chktxt" for t in stmt.targets
                ):
                    value = ast.literal_eval(stmt.value)
                    if isinstance(value, str):
                        return value
    raise ValueError(f"no chktxt in get_vocab_base_pre of {base_py}")


def token_hash(token_ids: list[int]) -> str:
    """The converter's fingerprint of a tokenizer: sha256 of the token list's repr."""
    return hashlib.sha256(str(token_ids).encode()).hexdigest()


def teach_hash(base: Any, text: str, chkhsh: str, pre: str) -> None:
    """Wrap ``TextModel.get_vocab_base_pre``: the tokenizer whose hash is `chkhsh` gets `pre`;
    every other tokenizer is left to the converter's own table."""
    original = base.TextModel.get_vocab_base_pre

    def get_vocab_base_pre(self: Any, tokenizer: Any) -> str:
        if token_hash(list(tokenizer.encode(text))) == chkhsh:
            return pre
        return str(original(self, tokenizer))

    base.TextModel.get_vocab_base_pre = get_vocab_base_pre


def main(argv: list[str]) -> None:
    if len(argv) < 4 or argv[3] != "--":
        raise SystemExit(__doc__)
    llama_dir, chkhsh, pre, _, *convert_args = argv
    root = Path(llama_dir)
    sys.path[:0] = [str(root), str(root / "gguf-py")]
    base = importlib.import_module("conversion.base")
    teach_hash(base, check_text(root / BASE_PY), chkhsh, pre)
    sys.argv = [str(root / "convert_hf_to_gguf.py"), *convert_args]
    runpy.run_path(sys.argv[0], run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
