"""The quantized upstream as files: the bit-packed safetensors format with its writer and exact loader
(packed), the dequantized copy in s3prl's checkpoint format (s3prl_checkpoint), and the `qspeech export`
command (command).

    from qspeech.export import export_packed, load_packed
    upstream = load_packed("outputs/.../upstream.packed.safetensors")
"""

from qspeech.export.command import main
from qspeech.export.packed import FORMAT, export_packed, load_packed, packed_tensors, read_packed, unpacked_parts
from qspeech.export.s3prl_checkpoint import dequantized_weights, export_s3prl, load_s3prl, s3prl_path

__all__ = ["FORMAT", "dequantized_weights", "export_packed", "export_s3prl", "load_packed", "load_s3prl", "main",
           "packed_tensors", "read_packed", "s3prl_path", "unpacked_parts"]
