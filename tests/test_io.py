"""fastdiff.io: checksummed safetensors (corruption refused, other tools' files still load) and the
write probe that lets a run refuse an unwritable output before it starts."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import fastdiff
import fastdiff.io
from fastdiff import UNet2D
from fastdiff.io import CHECKSUM_KEY, load_tensors, read_metadata, save_tensors, tensors_sha256

TENSORS = {  # every kind of tensor a checkpoint holds: weights, a 0-d step count, RNG bytes, bf16
    "conv.weight": torch.arange(24, dtype=torch.float32).reshape(2, 3, 2, 2),
    "step": torch.tensor(7.0),
    "rng": torch.arange(16, dtype=torch.uint8),
    "half": torch.linspace(-1, 1, 5, dtype=torch.bfloat16),
    "empty": torch.zeros(0, 3),
}


def data_section(path: Path) -> tuple[int, int]:
    """(offset, length) of a safetensors file's tensor bytes: after the u64 header length and the header."""
    header_length = struct.unpack("<Q", path.read_bytes()[:8])[0]
    start = 8 + header_length
    return start, path.stat().st_size - start


def corrupt_data_section(path: Path, size: int = 16) -> None:
    """Flip ``size`` bytes in the middle of the tensor data, the header left byte for byte intact."""
    start, length = data_section(path)
    assert length > size, "no tensor data to corrupt"
    data = bytearray(path.read_bytes())
    middle = start + length // 2
    data[middle:middle + size] = bytes(b ^ 0xFF for b in data[middle:middle + size])
    path.write_bytes(bytes(data))


def test_save_stores_a_checksum_that_load_verifies(tmp_path):
    path = save_tensors(TENSORS, tmp_path / "t.safetensors", metadata={"format": "pt"})
    metadata = read_metadata(path)
    assert metadata["format"] == "pt" and metadata[CHECKSUM_KEY] == tensors_sha256(TENSORS)
    loaded = load_tensors(path)
    assert loaded.keys() == TENSORS.keys()
    assert all(loaded[k].dtype == v.dtype and torch.equal(loaded[k], v) for k, v in TENSORS.items())


def test_checksum_ignores_order_but_not_names_dtypes_or_shapes():
    digest = tensors_sha256(TENSORS)
    assert tensors_sha256(dict(reversed(TENSORS.items()))) == digest  # the order safetensors writes does not matter
    weight = TENSORS["conv.weight"]
    renamed = {("conv.bias" if k == "conv.weight" else k): v for k, v in TENSORS.items()}
    same_bytes_other_shape = {**TENSORS, "conv.weight": weight.reshape(4, 6)}
    same_bytes_other_dtype = {**TENSORS, "conv.weight": weight.view(torch.int32)}
    other_values = {**TENSORS, "conv.weight": weight + 1}
    for changed in (renamed, same_bytes_other_shape, same_bytes_other_dtype, other_values):
        assert tensors_sha256(changed) != digest


def test_non_contiguous_tensors_are_saved_as_their_values(tmp_path):
    base = torch.randn(4, 6, 5, 3)
    tensors = {"transposed": base.transpose(0, 1), "channels_last": base.to(memory_format=torch.channels_last),
               "base": base, "view": base[1]}  # views share memory, which safetensors alone refuses
    loaded = load_tensors(save_tensors(tensors, tmp_path / "t.safetensors"))
    assert all(torch.equal(loaded[k], v) for k, v in tensors.items())


def test_corrupt_weights_are_refused_naming_the_file(tmp_path):
    torch.manual_seed(0)
    UNet2D(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
           attention_resolutions=(4,), norm_num_groups=4).save_pretrained(tmp_path / "unet")
    path = tmp_path / "unet" / "model.safetensors"
    header = path.read_bytes()[:data_section(path)[0]]
    corrupt_data_section(path)
    assert path.read_bytes()[:len(header)] == header  # the header is intact: safetensors alone would load it
    with pytest.raises(ValueError, match=rf"weights: {path}.*corrupt"):
        UNet2D.from_pretrained(tmp_path / "unet")


def test_a_tampered_checksum_is_refused(tmp_path):
    path = tmp_path / "t.safetensors"
    save_file(TENSORS, str(path), metadata={CHECKSUM_KEY: "0" * 64})
    with pytest.raises(ValueError, match="corrupt"):
        load_tensors(path)
    save_file(TENSORS, str(path), metadata={CHECKSUM_KEY: tensors_sha256(TENSORS)})  # another writer, right sum
    assert load_tensors(path).keys() == TENSORS.keys()


def test_files_without_a_checksum_still_load(tmp_path):
    path = tmp_path / "plain.safetensors"
    save_file(TENSORS, str(path))  # what diffusers and other tools write
    assert CHECKSUM_KEY not in read_metadata(path)
    assert torch.equal(load_tensors(path)["conv.weight"], TENSORS["conv.weight"])


def test_the_embedded_digits_model_has_no_checksum_and_loads():
    weights = Path(fastdiff.__file__).parent / "pretrained" / "digits" / "unet" / "model.safetensors"
    before = weights.read_bytes()
    assert CHECKSUM_KEY not in read_metadata(weights)
    pipe = fastdiff.load_pretrained("digits")
    assert all(torch.isfinite(p).all() for p in pipe.unet.parameters())
    assert weights.read_bytes() == before  # loading never rewrites it


def test_a_header_length_ending_in_0x80_is_not_mistaken_for_pickle(tmp_path):
    """Pickle protocol 2+ starts with 0x80, and so does a safetensors file whose header length is
    128 mod 256: the pickle sniff must only explain a file that failed to parse."""
    path = tmp_path / "t.safetensors"
    for pad in range(256):
        save_tensors({"a": torch.zeros(2)}, path, metadata={"pad": "x" * pad})
        if path.read_bytes()[:1] == b"\x80":
            break
    assert path.read_bytes()[:1] == b"\x80"
    assert torch.equal(load_tensors(path)["a"], torch.zeros(2))


def test_load_verifies_on_the_cpu_then_moves(tmp_path):
    path = save_tensors(TENSORS, tmp_path / "t.safetensors")
    loaded = load_tensors(path, device="meta")  # a device the bytes cannot be hashed on
    assert all(v.device.type == "meta" and v.shape == TENSORS[k].shape for k, v in loaded.items())
    corrupt_data_section(path, size=4)
    with pytest.raises(ValueError, match="corrupt"):
        load_tensors(path, device="meta")


@pytest.mark.gpu
def test_save_and_load_of_a_gpu_tensor_round_trip(tmp_path):
    tensors = {k: v.cuda() for k, v in TENSORS.items()}
    loaded = load_tensors(save_tensors(tensors, tmp_path / "t.safetensors"), device="cuda")
    assert all(v.is_cuda and torch.equal(v.cpu(), TENSORS[k]) for k, v in loaded.items())
