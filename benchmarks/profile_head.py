"""Where a training step of the demo's ASR head (task=asr_small) spends its time on CPU: torch.profiler over
steps on features shaped like the demo's (tiny_hubert: 7 hidden states of 256 at 50 frames/s, utterances of
1-4.5 s in length-bucketed batches of 16; random values: the time depends on shapes only), grouped into the
BiLSTM's forward and backward, SpecAugment's time warp, dropout and the rest.

    python benchmarks/profile_head.py [--threads 1] [--steps 50] [--amp off|bf16]
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch.profiler import ProfilerActivity, profile

from qspeech.checks import typed
from qspeech.config import CONF_DIR
from qspeech.tasks.asr import ASRConfig, ASRHead

GROUPS = {  # profiler op name -> group (the rest is "other")
    "aten::mkldnn_rnn_layer": "BiLSTM forward", "aten::mkldnn_rnn_layer_backward": "BiLSTM backward",
    "aten::upsample_bicubic2d": "time warp", "aten::upsample_bicubic2d_backward": "time warp",
    "aten::bernoulli_": "dropout",
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--amp", choices=("off", "bf16"), default="off")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    raw = OmegaConf.load(CONF_DIR / "task" / "asr_small.yaml")
    raw.pop("defaults")
    cfg = typed(ASRConfig, raw, "task")
    model = ASRHead(7, 256, 30, cfg).train()
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)

    def batch() -> tuple[torch.Tensor, torch.Tensor]:  # bucketed: lengths within 10 frames of each other
        longest = int(torch.randint(50, 226, ()))
        lens = longest - torch.randint(0, 10, (16,))
        lens[0] = longest
        return torch.randn(16, longest, 7, 256), lens

    batches = [batch() for _ in range(8)]  # made outside the profiled steps

    def step(i: int) -> None:
        feats, lens = batches[i % len(batches)]
        ctx = torch.autocast("cpu", dtype=torch.bfloat16, enabled=a.amp == "bf16")
        with ctx:
            logits, out_lens = model(feats, lens)
        logp = F.log_softmax(logits.float(), dim=-1).transpose(0, 1)
        target_lens = (out_lens // 3).clamp(1, 40)
        targets = torch.randint(1, 30, (int(target_lens.sum()),))
        loss = F.ctc_loss(logp, targets, out_lens, target_lens, zero_infinity=True)
        opt.zero_grad()
        loss.backward()
        opt.step()

    for i in range(5):
        step(i)
    t = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for i in range(a.steps):
            step(i)
    wall = (time.perf_counter() - t) / a.steps
    share: dict[str, float] = defaultdict(float)
    for ev in prof.key_averages():
        share[GROUPS.get(ev.key, "other")] += ev.self_cpu_time_total
    total = sum(share.values())
    print(f"asr_small head, amp={a.amp}, {a.threads} thread(s): {wall * 1e3:.1f} ms/step under the profiler")
    for name, us in sorted(share.items(), key=lambda kv: -kv[1]):
        print(f"  {name:16s} {100 * us / total:5.1f} %  {us / a.steps / 1e3:7.1f} ms/step")


if __name__ == "__main__":
    main()
