"""Low-bit fake quantization of upstream weights (rtn, kmeans, lsq, bit) and QAT by distillation.

    from qspeech.quant import QuantConfig, quantize_, prepare_quantized_upstream
    quantize_(upstream.model, QuantConfig(method="rtn"), bits=4)   # in place, returns the model
"""

from qspeech.quant.api import (
    dequantize_parts,
    quantize_,
    quantized_modules,
    quantized_weight_parts,
    remove_quantization_,
    weight_quantizer,
)
from qspeech.quant.config import (
    METHODS,
    QuantConfig,
    as_quant_config,
    overhead_values,
    supported_act_bits,
    supported_bits,
    validate_quant_config,
)
from qspeech.quant.distill import clone_upstream, distill_loss, hidden_state_error, prepare_quantized_upstream, quant_cache_key

__all__ = [
    "METHODS",
    "QuantConfig",
    "as_quant_config",
    "clone_upstream",
    "dequantize_parts",
    "distill_loss",
    "hidden_state_error",
    "overhead_values",
    "prepare_quantized_upstream",
    "quant_cache_key",
    "quantize_",
    "quantized_modules",
    "quantized_weight_parts",
    "remove_quantization_",
    "supported_act_bits",
    "supported_bits",
    "validate_quant_config",
    "weight_quantizer",
]
