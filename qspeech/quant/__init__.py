"""The quantization core: low-bit fake quantization of a model's weights (rtn, kmeans, lsq, bit), one module
per method found through a registry, bit packing and storage rounding. Imports only torch/numpy and
qspeech's leaves; quantizing a run's upstream (qspeech.quantize_upstream: PTQ, or QAT by distillation) and the
packed file (qspeech.export) build on it.

    from qspeech.quant import quant_config, quantize_
    quantize_(upstream.model, quant_config("rtn"), bits=4)   # in place, returns the model
"""

import qspeech.quant.methods  # noqa: F401 - registers the built-in methods first
from qspeech.quant.api import (
    clone_model,
    dequantize_parts,
    make_weight_quantizer,
    quantize_,
    quantized_modules,
    quantized_weight_parts,
    remove_quantization_,
    weight_quantizer,
)
from qspeech.quant.config import (
    DistillConfig,
    QuantConfig,
    act_bits_of,
    as_quant_config,
    overhead_values,
    quant_config,
    supported_act_bits,
    supported_bits,
    validate_quant_config,
)
from qspeech.quant.methods.bit import BitConfig
from qspeech.quant.methods.bit_exact import BitExactConfig
from qspeech.quant.methods.kmeans import KMeansConfig
from qspeech.quant.methods.lsq import LSQConfig
from qspeech.quant.methods.rtn import RTNConfig
from qspeech.quant.packing import is_storage_exact, round_to_storage_
from qspeech.quant.registry import QuantMethod, get_method, method_names, quant_schemas, register

__all__ = [
    "BitConfig",
    "BitExactConfig",
    "DistillConfig",
    "KMeansConfig",
    "LSQConfig",
    "QuantConfig",
    "QuantMethod",
    "RTNConfig",
    "act_bits_of",
    "as_quant_config",
    "clone_model",
    "dequantize_parts",
    "get_method",
    "is_storage_exact",
    "make_weight_quantizer",
    "method_names",
    "overhead_values",
    "quant_config",
    "quant_schemas",
    "quantize_",
    "quantized_modules",
    "quantized_weight_parts",
    "register",
    "remove_quantization_",
    "round_to_storage_",
    "supported_act_bits",
    "supported_bits",
    "validate_quant_config",
    "weight_quantizer",
]
