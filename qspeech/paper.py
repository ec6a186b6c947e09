"""Published numbers of Yeh et al., "Efficient Speech Representation Learning with Low-Bit
Quantization", arXiv 2301.00652 (abstract; SUPERB ASR, test-clean WER without LM)."""

SOURCE = "paper: Yeh et al. 2023 (arXiv 2301.00652)"

ROWS = [
    {"model": "hubert", "quant": "paper", "bits": 32, "task": "asr", "metric": "wer", "value": 7.06,
     "storage_mb": 184.42, "est_runtime": 1.00},
    {"model": "hubert", "quant": "paper", "bits": 2, "task": "asr", "metric": "wer", "value": 12.68,
     "storage_mb": 35.84, "est_runtime": 0.15},
    {"model": "hubert", "quant": "paper", "bits": 1, "task": "asr", "metric": "wer", "value": 15.96,
     "storage_mb": 25.23, "est_runtime": 0.12},
    {"model": "distilhubert", "quant": "paper", "bits": 32, "task": "asr", "metric": "wer", "value": 13.37,
     "storage_mb": 46.98, "est_runtime": 0.73},
]
