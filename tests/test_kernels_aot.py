"""Every kernel configuration fastdiff can launch compiles ahead of time for sm_80 (A100) and sm_90
(H100) on this CPU-only machine, and the compiled code is what we want on the chip: no register
spills (unless the config says why it may), shared memory within the block limit, registers
within the register file, and tensor-core instructions (HMMA on sm_80, HGMMA on sm_90) where the
config is meant to use them.

The compile runs ``python -m fastdiff.kernels.aot`` in a subprocess: under ``TRITON_INTERPRET=1``
(this test session's setting without a GPU) ``@triton.jit`` functions cannot be compiled.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

from fastdiff.kernels import OP_MODULES  # noqa: E402

ARCHS = (80, 90)
REGISTER_FILE = 65536  # 32-bit registers per SM on sm_80 and sm_90


@pytest.fixture(scope="module")
def compiled() -> dict[int, list[dict]]:
    """arch -> one record per configuration; both architectures compile at once (one process each)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    procs = {arch: subprocess.Popen([sys.executable, "-m", "fastdiff.kernels.aot", "--arch", str(arch), "--json"],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for arch in ARCHS}
    records = {}
    for arch, proc in procs.items():
        out, err = proc.communicate(timeout=1800)
        lines = [line for line in out.splitlines() if line.startswith("{")]
        assert lines, f"sm_{arch}: the AOT tool printed no records (exit {proc.returncode}):\n{err[-3000:]}"
        records[arch] = [json.loads(line) for line in lines]
    return records


def table(records: list[dict]) -> str:
    return "\n".join(json.dumps(r) for r in records)


@pytest.mark.parametrize("arch", ARCHS)
def test_every_config_compiles(compiled, arch):
    failed = [r for r in compiled[arch] if "error" in r]
    assert not failed, f"sm_{arch}: configurations that do not compile:\n{table(failed)}"


@pytest.mark.parametrize("arch", ARCHS)
def test_every_op_module_lists_its_configs(compiled, arch):
    assert {r["module"] for r in compiled[arch]} == set(OP_MODULES.values())


@pytest.mark.parametrize("arch", ARCHS)
def test_no_config_spills(compiled, arch):
    spilling = [r for r in compiled[arch] if "error" not in r and (r["stack_bytes"] or r["local_bytes"])
                and not r["may_spill"]]
    assert not spilling, f"sm_{arch}: register spills (stack/local bytes > 0):\n{table(spilling)}"


@pytest.mark.parametrize("arch", ARCHS)
def test_shared_memory_and_registers_fit(compiled, arch):
    ok = [r for r in compiled[arch] if "error" not in r]
    too_much_smem = [r for r in ok if r["shared_bytes"] > r["shared_limit"]]
    too_many_regs = [r for r in ok if r["registers"] > 255 or r["registers"] * r["threads"] > REGISTER_FILE]
    assert not too_much_smem, f"sm_{arch}: shared memory over the block limit:\n{table(too_much_smem)}"
    assert not too_many_regs, f"sm_{arch}: registers over the limit:\n{table(too_many_regs)}"


@pytest.mark.parametrize("arch", ARCHS)
def test_tensor_core_configs_use_tensor_cores(compiled, arch):
    wanted = [r for r in compiled[arch] if "error" not in r and r["wants_tensor_cores"]]
    missing = [r for r in wanted if r["tensor_core_count"] == 0]
    assert not missing, f"sm_{arch}: no {missing[0]['tensor_core_instruction']} in the SASS of:\n{table(missing)}"


def test_attention_has_tensor_core_configs(compiled):
    """The flash attention kernel's fp16/bf16 configs are the ones that must run on tensor cores."""
    attention = [r for r in compiled[90] if r["module"] == "attention" and "error" not in r]
    assert attention and any(r["wants_tensor_cores"] and r["tensor_core_count"] > 0 for r in attention)


@pytest.mark.parametrize("arch", ARCHS)
def test_elementwise_configs_store_16_bytes_at_a_time(compiled, arch):
    """With a row's length and the rows' strides multiples of 16 (``aligned_ints``: what the JIT
    specialises for U-Net-sized tensors), every global store of the noising and step kernels is a
    16-byte vector store (STG.E.128), the multistep kernel's masked slot stores too. A narrower one
    would cost these memory-bound kernels bandwidth."""
    expected = [r for r in compiled[arch] if "error" not in r and r["vector_stores_expected"]]
    assert {r["module"] for r in expected} == {"q_sample", "scheduler_step", "multistep"}
    narrow = [r for r in expected if set(r["stores"]) != {"STG.E.128"}]
    assert not narrow, f"sm_{arch}: stores narrower than 16 bytes:\n{table(narrow)}"
