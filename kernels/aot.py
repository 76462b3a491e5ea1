"""Ahead-of-time compile of every kernel configuration fastdiff can launch, for a real GPU target,
on any machine (no GPU needed): PTX + cubin through ``triton.compile``, then ``cuobjdump`` for the
resource figures (registers, spill stack, shared memory) and the SASS (tensor-core instructions).

    python -m fastdiff.kernels.aot --arch 90            # a table
    python -m fastdiff.kernels.aot --arch 80 --json     # one JSON record per configuration

Run it without ``TRITON_INTERPRET`` (under the interpreter ``@triton.jit`` gives functions that do
not compile); ``tests/test_kernels_aot.py`` runs it in a subprocess for sm_80 and sm_90.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter

from . import OP_MODULES
from ._common import KernelConfig

# Largest shared memory one block may use (bytes), from the CUDA programming guide's tables.
SHARED_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
TENSOR_CORE_SASS = {80: "HMMA", 86: "HMMA", 89: "HMMA", 90: "HGMMA"}


def all_configs() -> list[tuple[str, KernelConfig]]:
    """(module name, configuration) for every configuration of every op module, without duplicates."""
    configs, seen = [], set()
    for module_name in dict.fromkeys(OP_MODULES.values()):
        module = importlib.import_module(f".{module_name}", __package__)
        for config in module.launch_configs():
            if config.name not in seen:
                seen.add(config.name)
                configs.append((module_name, config))
    return configs


def cuobjdump() -> str:
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(path):
        raise FileNotFoundError(f"cuobjdump is not where triton ships it: {path}")
    return path


def compile_config(config: KernelConfig, arch: int) -> dict:
    """Compile ``config`` for sm_``arch``; return its resource figures."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    # what the JIT's specialisation says of a 16-byte aligned pointer or of an int divisible by 16
    divisible = [name for name, kind in config.signature.items()
                 if (config.aligned_pointers and kind.startswith("*")) or name in config.aligned_ints]
    attrs = {(config.kernel.arg_names.index(name),): [["tt.divisibility", 16]] for name in divisible} or None
    source = ASTSource(fn=config.kernel, signature=config.signature, constexprs=config.constexprs, attrs=attrs)
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": config.num_warps, "num_stages": config.num_stages, **config.options})
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "kernel.cubin")
        with open(cubin, "wb") as f:
            f.write(compiled.asm["cubin"])
        usage = subprocess.run([cuobjdump(), "-res-usage", cubin], capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([cuobjdump(), "-sass", cubin], capture_output=True, text=True, check=True).stdout
    figures = {key.lower(): int(value) for key, value in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", usage)}
    instruction = TENSOR_CORE_SASS.get(arch, "HMMA")
    return {
        "name": config.name,
        "arch": arch,
        "registers": figures.get("reg", 0),
        "stack_bytes": figures.get("stack", 0),  # > 0: registers spilled to local memory
        "local_bytes": figures.get("local", 0),
        # Triton's shared memory is dynamic: cuobjdump shows only the static part
        "shared_bytes": max(figures.get("shared", 0), int(compiled.metadata.shared)),
        "shared_limit": SHARED_LIMIT.get(arch),
        "threads": 32 * config.num_warps,
        "tensor_core_instruction": instruction,
        "tensor_core_count": len(re.findall(rf"\b{instruction}\b", sass)),
        # global stores by width: STG.E.128 is a 16-byte vector store, STG.E (.U16, .64) narrower
        "stores": dict(Counter(re.findall(r"\bSTG\.E(?:\.\w+)*", sass))),
        "vector_stores_expected": bool(config.aligned_ints),
        "wants_tensor_cores": config.tensor_cores,
        "may_spill": config.may_spill,
        "ptx_bytes": len(compiled.asm["ptx"]),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastdiff.kernels.aot", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability without the dot (80, 90)")
    parser.add_argument("--json", action="store_true", help="print one JSON record per line")
    parser.add_argument("--only", default="", help="compile only configs whose name contains this")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        parser.error("unset TRITON_INTERPRET: interpreted kernels cannot be compiled")
    failed = 0
    for module_name, config in all_configs():
        if args.only not in config.name:
            continue
        try:
            record = compile_config(config, args.arch)
        except Exception as error:  # report every config, not just the first failure
            failed += 1
            record = {"name": config.name, "arch": args.arch, "error": f"{type(error).__name__}: {error}"[:2000]}
        record["module"] = module_name
        if args.json:
            print(json.dumps(record), flush=True)
        elif "error" in record:
            print(f"FAILED {record['name']}: {record['error']}", flush=True)
        else:
            print(f"sm_{args.arch} regs {record['registers']:3d} stack {record['stack_bytes']:5d} "
                  f"smem {record['shared_bytes']:6d} {record['tensor_core_instruction']}x"
                  f"{record['tensor_core_count']:<4d} {record['name']}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
