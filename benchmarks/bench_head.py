"""The ASR head's BiLSTM on CPU: qspeech.tasks.rnn.BiLSTM (two unidirectional LSTMs on padded batches, the
backward one on per-sequence reversed input) against nn.LSTM(bidirectional=True) on packed sequences (s3prl's
RNNLayer), the same weights and the same outputs. One training step (forward + backward) of one layer; also
rnn.BiLSTM under bf16 autocast (fast where the CPU has AVX-512 BF16 or AMX, but not the same numbers).

    python benchmarks/bench_head.py [--threads 1] [--batch 16] [--frames 80] [--repeats 20]

Prints median ms per step of each, their ratio, and the max abs difference of the outputs.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from qspeech.tasks.rnn import BiLSTM


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--frames", type=int, default=80, help="longest sequence (asr_small: ~25 frames/s)")
    ap.add_argument("--size", type=int, default=256, help="input and hidden size (asr_small: 256)")
    ap.add_argument("--repeats", type=int, default=20)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    packed_lstm = torch.nn.LSTM(a.size, a.size, batch_first=True, bidirectional=True)
    ours = BiLSTM(a.size, a.size)
    with torch.no_grad():
        for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            getattr(ours.fwd, f"{n}_l0").copy_(getattr(packed_lstm, f"{n}_l0"))
            getattr(ours.bwd, f"{n}_l0").copy_(getattr(packed_lstm, f"{n}_l0_reverse"))
    x = torch.randn(a.batch, a.frames, a.size, requires_grad=True)
    lens = torch.randint(a.frames // 2, a.frames + 1, (a.batch,))
    lens[0] = a.frames

    def packed():
        p = pack_padded_sequence(x, lens, batch_first=True, enforce_sorted=False)
        return pad_packed_sequence(packed_lstm(p)[0], batch_first=True, total_length=a.frames)[0]

    def padded():
        return ours(x, lens)

    def padded_bf16():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return ours(x, lens).float()

    diff = (packed() - padded()).abs().max().item()
    diff_bf16 = (padded_bf16() - padded()).abs().max().item()
    times = {}
    for _ in range(2):  # interleaved rounds: both see the same machine state
        for name, fn in (("packed nn.LSTM", packed), ("rnn.BiLSTM", padded), ("rnn.BiLSTM bf16", padded_bf16)):
            for _ in range(a.repeats // 2):
                t = time.perf_counter()
                fn().sum().backward()
                times.setdefault(name, []).append(time.perf_counter() - t)
    base = statistics.median(times["packed nn.LSTM"])
    for name, ts in times.items():
        m = statistics.median(ts)
        print(f"{name:16s} {m * 1e3:8.1f} ms/step  {base / m:5.2f}x")
    print(f"max abs output difference: {diff:.2e} rnn.BiLSTM vs packed, {diff_bf16:.2e} bf16 vs fp32 (batch "
          f"{a.batch}, {a.frames} frames, size {a.size}, {a.threads} thread(s))")


if __name__ == "__main__":
    main()
