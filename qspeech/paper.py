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

# The distilled students among the upstreams, each with its teacher: a run is compared with the student of its
# teacher (DistilHuBERT for HuBERT), and runtimes are also shown relative to the full-precision teacher.
DISTILLED = {"distilhubert": "hubert", "tiny_distilhubert": "tiny_hubert"}
REFERENCE_STUDENT = "distilhubert"  # the paper's comparison for an upstream without a student of its own


def is_student(model: str) -> bool:
    return model in DISTILLED


def teacher_of(model: str) -> str:
    """The full-precision teacher `model`'s runtime is shown against: its own teacher, else itself."""
    return DISTILLED.get(model, model)


def student_of(model: str) -> str:
    """The distilled model a run of `model` is compared with: a student itself, the student of `model`, else
    the paper's DistilHuBERT."""
    if model in DISTILLED:
        return model
    return next((s for s, t in DISTILLED.items() if t == model), REFERENCE_STUDENT)
