"""llama.cpp on the same machine, model and images as ``benchmarks.run``: its rows for the report.

    python -m benchmarks.peers.llama_cpp --merge-into bench-out/result.json

Optional and slow the first time (the build takes 10-40 minutes, the conversion a few); everything
is cached outside the repository, in ~/.cache/vlbot-bench/llama.cpp ($VLBOT_BENCH_CACHE):

1. the llama-cpp-python sdist from PyPI (``pip download --no-binary :all:``), whose vendor/llama.cpp
   is the llama.cpp source (a released, pinned snapshot);
2. ``llama-mtmd-cli`` and ``llama-quantize`` built with cmake, Release, at ``nice -n 19``: a
   ``native`` build (``-march=native``), an ``avx2`` one (AVX2+FMA+F16C, no AVX-512), the peer of
   vlbot's forced AVX2 tier, and an ``avx512`` one (AVX-512 without VNNI, BF16 or AMX), the peer
   of its forced `avx512` tier. All come from one build folder (only ggml's CPU backend differs);
   the binaries are static and kept per build;
3. the full-size random model converted by llama.cpp's ``convert_hf_to_gguf.py``, in a venv of its
   own (torch CPU, transformers, sentencepiece, protobuf; never the project's .venv): the text model
   in BF16, then F16 / Q8_0 / Q4_K_M with ``llama-quantize``, and an F16 vision projector. The
   converter is taught the locally made tokenizer (see convert_driver.py);
4. ``llama-mtmd-cli`` once per (build, weights, image): the benchmark's JPEGs, the same visual-token
   budget as vlbot (``--image-max-tokens``), greedy, the same number of forced new tokens, the same
   threads. First token from the log's timestamps (prompt start to first token, see
   llama_cpp_log.py), decode = its eval timings, peak RSS from the kernel's accounting of the child
   (wait4). Every run's log is kept in logs/.

The JSON goes to --out; with --merge-into it is also stored under ``llama_cpp`` in a
``benchmarks.run`` result, whose Markdown report is written again with the section
"llama.cpp on the same machine".
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.helpers import IMAGES
from benchmarks.images import write_images
from benchmarks.peers.convert_driver import BASE_PY, check_text, token_hash
from benchmarks.peers.llama_cpp_log import LlamaCppLogError, parse_mtmd_log

CACHE = Path(os.environ.get("VLBOT_BENCH_CACHE", Path.home() / ".cache" / "vlbot-bench"))
WORK = CACHE / "llama.cpp"
PACKAGE = "llama-cpp-python"
DEFAULT_VERSION = "0.3.36"
TARGETS = ("llama-mtmd-cli", "llama-quantize")
QUESTION = "Describe this image in detail."  # the benchmark's question (benchmarks.run)
CONTEXT = 4096  # tokens: 1024 visual + prompt + answer fit; the model's 256 K would size a huge KV cache
# the converter's dependencies, in their own venv; torch pinned with the CPU index so pip never picks
# a CUDA build; transformers as in the project's venv (added below), which hashed the tokenizer
CONVERTER_REQUIREMENTS = (
    "torch==2.13.0",
    "numpy",
    "sentencepiece",
    "protobuf",
    "safetensors",
)
PRE_TOKENIZER = "qwen2"  # how the test tokenizer splits text (byte-level BPE, Qwen2Tokenizer)

_COMMON_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=OFF",  # static binaries: each build's copies stand alone
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_SERVER=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_CURL=OFF",
)
_NO_AVX512 = tuple(
    f"-DGGML_{f}=OFF"
    for f in (
        "AVX512",
        "AVX512_VBMI",
        "AVX512_VNNI",
        "AVX512_BF16",
        "AVX_VNNI",
        "AMX_TILE",
        "AMX_INT8",
        "AMX_BF16",
    )
)
# x86 without -march=native: AVX2 + FMA + F16C (+ BMI2), each build adding or excluding AVX-512
_X86_BASE = (
    "-DGGML_NATIVE=OFF",
    "-DGGML_AVX=ON",
    "-DGGML_AVX2=ON",
    "-DGGML_FMA=ON",
    "-DGGML_F16C=ON",
    "-DGGML_BMI2=ON",
)
BUILDS: dict[str, tuple[str, ...]] = {
    "native": ("-DGGML_NATIVE=ON",),
    "avx2": (*_X86_BASE, *_NO_AVX512),
    # AVX-512 F/CD/BW/DQ/VL without VNNI, BF16 or AMX: the peer of vlbot's forced `avx512` tier
    "avx512": (*_X86_BASE, "-DGGML_AVX512=ON", *(f for f in _NO_AVX512 if f != "-DGGML_AVX512=OFF")),
}
QUANTS = ("BF16", "F16", "Q8_0", "Q4_K_M")  # text weights; BF16 is the converter's output


def log(message: str) -> None:
    print(f"llama.cpp: {message}", flush=True)


def run_logged(cmd: Sequence[str], name: str, cwd: Path | None = None) -> None:
    """Run a build or conversion step at nice 19, its output to logs/<name>.log; stop on failure."""
    path = WORK / "logs" / f"{name}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as out:
        code = subprocess.run(
            ["nice", "-n", "19", *cmd], stdout=out, stderr=subprocess.STDOUT, cwd=cwd
        ).returncode
    if code != 0:
        tail = path.read_text(encoding="utf-8", errors="replace").splitlines()[-15:]
        raise SystemExit("\n".join([f"llama.cpp: {name} failed (exit {code}); the end of {path}:", *tail]))


# --- source, build, conversion -----------------------------------------------------------------


def source_dir(version: str) -> Path:
    """vendor/llama.cpp of the llama-cpp-python sdist, downloaded and unpacked once."""
    unpacked = WORK / "src" / f"llama_cpp_python-{version}"
    llama = unpacked / "vendor" / "llama.cpp"
    if (llama / "CMakeLists.txt").is_file():
        return llama
    sdist = WORK / "sdist"
    sdist.mkdir(parents=True, exist_ok=True)
    archive = sdist / f"llama_cpp_python-{version}.tar.gz"
    if not archive.is_file():
        log(f"downloading the {PACKAGE} {version} sdist")
        pip = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"]
        subprocess.run([*pip, f"{PACKAGE}=={version}", "-d", str(sdist)], check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(WORK / "src", filter="data")
    if not (llama / "CMakeLists.txt").is_file():
        raise SystemExit(f"{archive} has no vendor/llama.cpp")
    return llama


def bin_dir(version: str, build: str) -> Path:
    return WORK / f"bin-{version}-{build}"


def ensure_build(llama: Path, version: str, build: str) -> Path:
    """The build's binaries: configured and built (nice 19, one job: the machine is shared)."""
    out = bin_dir(version, build)
    if all((out / t).is_file() for t in TARGETS):
        return out
    folder = WORK / f"build-{version}"
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    log(f"building {build} in {folder} (one job at nice 19: 10-40 minutes)")
    started = time.monotonic()
    configure = ["cmake", "-S", str(llama), "-B", str(folder), *generator, *_COMMON_FLAGS, *BUILDS[build]]
    run_logged(configure, f"configure-{build}")
    targets = [a for t in TARGETS for a in ("--target", t)]
    run_logged(["cmake", "--build", str(folder), "-j", "1", *targets], f"build-{build}")
    out.mkdir(parents=True, exist_ok=True)
    for target in TARGETS:
        shutil.copy2(folder / "bin" / target, out / target)
    log(f"built {build} in {time.monotonic() - started:.0f} s")
    return out


def converter_python() -> Path:
    """The converter's venv (its own, under the cache); created with CPU torch once."""
    venv = CACHE / "convert-venv"
    python = venv / "bin" / "python"
    if not python.is_file():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        cpu_index = ["--extra-index-url", "https://download.pytorch.org/whl/cpu"]
        same = f"transformers=={importlib.metadata.version('transformers')}"
        pip = [str(python), "-m", "pip", "install", *cpu_index, *CONVERTER_REQUIREMENTS, same]
        subprocess.run(pip, check=True)
    return python


def tokenizer_hash(model: Path, llama: Path) -> str:
    """The converter's fingerprint of the model's (locally made) tokenizer."""
    from transformers import AutoTokenizer

    tokenizer: Any = AutoTokenizer.from_pretrained(str(model))
    return token_hash(list(tokenizer.encode(check_text(llama / BASE_PY))))


def gguf_dir(model: Path, version: str) -> Path:
    """Where `model`'s GGUFs are kept: per folder as it is now (its config and tokenizer files'
    bytes, its weight files' sizes and times), so a model made again is converted again."""
    digest = hashlib.sha256()
    for path in sorted(model.iterdir()):
        if path.suffix == ".json" or path.name.endswith(".jinja"):
            digest.update(path.name.encode() + path.read_bytes())
        elif path.suffix == ".safetensors":
            stat = path.stat()
            digest.update(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return WORK / "gguf" / f"{model.name}-{version}-{digest.hexdigest()[:12]}"


def ensure_gguf(
    model: Path, llama: Path, version: str, quants: Sequence[str], quantize: Path
) -> dict[str, Path]:
    """Text GGUFs per quant and the F16 mmproj (key "mmproj"), converted once."""
    out = gguf_dir(model, version)
    out.mkdir(parents=True, exist_ok=True)
    driver = Path(__file__).with_name("convert_driver.py")
    files = {"mmproj": out / "mmproj-F16.gguf", **{q: out / f"text-{q}.gguf" for q in quants}}
    bf16 = out / "text-BF16.gguf"
    jobs = [(bf16, ["--outtype", "bf16"]), (files["mmproj"], ["--mmproj", "--outtype", "f16"])]
    for path, extra in jobs:
        if path.is_file():
            continue
        log(f"converting {model} -> {path.name}")
        head = [
            str(converter_python()),
            str(driver),
            str(llama),
            tokenizer_hash(model, llama),
            PRE_TOKENIZER,
            "--",
        ]
        partial = path.with_suffix(".partial")
        run_logged([*head, str(model), *extra, "--outfile", str(partial)], f"convert-{path.stem}", cwd=out)
        partial.rename(path)
    for quant in quants:
        path = files[quant]
        if not path.is_file():
            log(f"quantizing -> {path.name}")
            partial = path.with_suffix(".partial")
            run_logged([str(quantize), str(bf16), str(partial), quant], f"quantize-{quant}")
            partial.rename(path)
    return files


# --- the runs ----------------------------------------------------------------------------------


def run_mtmd(
    cli: Path,
    text: Path,
    mmproj: Path,
    image: str,
    tokens: int,
    threads: int,
    max_tokens: int,
    log_path: Path,
) -> dict[str, Any]:
    """One llama-mtmd-cli run: its parsed timings and the child's peak RSS."""
    cmd = [
        str(cli), "-m", str(text), "--mmproj", str(mmproj), "--image", image, "-p", QUESTION,
        "-n", str(tokens), "--ignore-eos", "--temp", "0", "-t", str(threads), "-c", str(CONTEXT),
        "--image-max-tokens", str(max_tokens),
        "-lv", "4",  # libllama's and mtmd's INFO lines (timings, image batches) count as trace here
    ]  # fmt: skip
    started = time.monotonic()
    with log_path.open("w", encoding="utf-8") as out:
        child = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    row: dict[str, Any] = {
        "command": " ".join(cmd),
        "wall_s": round(time.monotonic() - started, 2),
        "peak_rss_bytes": usage.ru_maxrss * 1024,  # Linux reports KiB
        "text_gguf_bytes": text.stat().st_size,
        "mmproj_bytes": mmproj.stat().st_size,
        "log": str(log_path),
    }
    try:
        t = parse_mtmd_log(log_path.read_text(encoding="utf-8", errors="replace"))
    except LlamaCppLogError as e:
        return {**row, "error": f"exit {child.returncode}: {e} (log: {log_path})"}
    return {
        **row,
        "visual_tokens": t.visual_tokens,
        "first_token_s": round(t.first_token_s, 3),
        "encode_s": round(t.encode_ms / 1000, 3),
        "image_prefill_s": round(t.image_decode_ms / 1000, 3),
        "prompt_eval_s": round(t.prompt_eval_ms / 1000, 3),
        "prompt_tokens": t.prompt_tokens,
        "decode_tok_s": t.decode_tok_s,
        "eval_runs": t.eval_runs,
        "load_s": None if t.load_ms is None else round(t.load_ms / 1000, 3),
    }


def parse_plan(text: str) -> list[tuple[str, str]]:
    """``native:BF16,Q8_0;avx2:Q4_K_M`` -> [(build, quant), ...], validated."""
    plan = []
    for part in filter(None, text.split(";")):
        build, _, quants = part.partition(":")
        if build not in BUILDS:
            raise SystemExit(f"unknown build {build!r}: choose from {', '.join(BUILDS)}")
        for quant in filter(None, quants.split(",")):
            if quant not in QUANTS:
                raise SystemExit(f"unknown weights {quant!r}: choose from {', '.join(QUANTS)}")
            plan.append((build, quant))
    if not plan:
        raise SystemExit("empty --plan")
    return plan


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.peers.llama_cpp", description=__doc__.split("\n\n")[0]
    )
    p.add_argument(
        "--version", default=DEFAULT_VERSION, help=f"{PACKAGE} sdist version (default %(default)s)"
    )
    p.add_argument(
        "--plan",
        default="native:BF16,Q8_0,Q4_K_M;avx2:Q8_0,Q4_K_M",
        help="builds and text weights to run, e.g. 'native:F16,Q4_K_M;avx2:Q4_K_M' (default %(default)s)",
    )
    p.add_argument("--model", help="full-size model folder (default: the benchmark's cached one)")
    p.add_argument(
        "--images", help=f"comma-separated subset of {','.join(IMAGES)} (default: the result's, or 640x480)"
    )
    p.add_argument("--tokens", type=int, help="forced new tokens (default: the result's, or 64)")
    p.add_argument("--threads", type=int, help="threads (default: the result's, or physical cores)")
    p.add_argument("--max-visual-tokens", type=int, help="visual tokens per image (default: vlbot's budget)")
    p.add_argument("--out", default="bench-out/llama_cpp.json", help="JSON written here")
    p.add_argument("--merge-into", help="a benchmarks.run result JSON: store the rows there, rewrite its .md")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    from benchmarks.report import render_report
    from benchmarks.run import ensure_model
    from engine import IntakeLimits, physical_cores

    result: dict[str, Any] = {}
    if args.merge_into:
        result = json.loads(Path(args.merge_into).read_text(encoding="utf-8"))
    config = result.get("config") or {}
    labels = args.images.split(",") if args.images else list(config.get("images") or ["640x480"])
    if unknown := [label for label in labels if label not in IMAGES]:
        raise SystemExit(f"unknown image {unknown[0]!r}: choose from {', '.join(IMAGES)}")
    tokens = args.tokens or int(config.get("new_tokens") or 64)
    threads = args.threads or int(config.get("threads") or physical_cores())
    max_tokens = args.max_visual_tokens or IntakeLimits().max_visual_tokens
    plan = parse_plan(args.plan)

    model = ensure_model(args.model or config.get("model"))
    images = write_images(CACHE / "images", {label: IMAGES[label] for label in labels})
    llama = source_dir(args.version)
    bins = {build: ensure_build(llama, args.version, build) for build in dict.fromkeys(b for b, _ in plan)}
    quantize = next(iter(bins.values())) / "llama-quantize"
    files = ensure_gguf(model, llama, args.version, list(dict.fromkeys(q for _, q in plan)), quantize)

    peers: dict[str, Any] = {
        "source": f"{PACKAGE} {args.version} sdist, vendor/llama.cpp",
        "builds": {b: " ".join(BUILDS[b]) for b in bins},
        "threads": threads,
        "new_tokens": tokens,
        "max_visual_tokens": max_tokens,
        "context": CONTEXT,
        "mmproj": "F16",
        "loadavg_start": os.getloadavg(),
        "runs": [],
    }
    logs = WORK / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    for label in labels:
        for build, quant in plan:
            log(f"{build} {quant} {label} ...")
            row = run_mtmd(
                bins[build] / "llama-mtmd-cli", files[quant], files["mmproj"], images[label],
                tokens, threads, max_tokens, logs / f"{build}-{quant}-{label}.log",
            )  # fmt: skip
            row = {"build": build, "quant": quant, "image": label, **row}
            peers["runs"].append(row)
            log(json.dumps({k: v for k, v in row.items() if k not in ("command", "log")}))
    peers["loadavg_end"] = os.getloadavg()

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(peers, indent=2), encoding="utf-8")
    log(f"wrote {out}")
    if args.merge_into:
        target = Path(args.merge_into)
        result["llama_cpp"] = peers
        target.write_text(json.dumps(result, indent=2, default=str), encoding="utf-8")
        target.with_suffix(".md").write_text(render_report(result), encoding="utf-8")
        log(f"merged into {target} and {target.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
