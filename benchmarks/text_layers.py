"""How fast do the text model's factorized layers run on a CPU?

The built-in ``text-lstm`` (embedding 8,002 x 256, LSTM 128, linear) on a batch of real
``wordnet`` glosses (256 x 32 token ids): the dense model against a TT-embedding (ranks 16,16),
an SVD LSTM (rank 32, which runs the recurrence step by step: PyTorch's fused kernel takes
dense weights only), a TT-matrix LSTM (ranks 8, 8: each matrix run the cheaper way, here its
dense matrix built once per call) and TT-embedding + SVD LSTM; the TT-embedding's lookup
alone, a row per token against a row per distinct token; and the TT LSTM's hidden-to-hidden
matrix, its factorized chain against its dense matrix built once. Every variant is timed
alternately in one process (median of repeated runs), so the ratios hold on a shared, noisy
machine.

    python benchmarks/text_layers.py        # under a minute on a 2-core CPU
"""

from __future__ import annotations

import platform
import time

import torch

from tdsearch.data._wordnet import WordNetGlosses
from tdsearch.models.text import TextLSTM
from tdsearch.tensor import LayerRanks, RankTable, compress, count_macs, count_params, survey
from tdsearch.tensor.compress import make_spec
from tdsearch.tensor.layers._recurrent import _apply


def median_ms(call, repeats: int = 21, warmup: int = 3) -> float:
    for _ in range(warmup):
        call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return 1000 * sorted(times)[len(times) // 2]


def main() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(2)
    dense = TextLSTM(45).eval()
    embedding = survey(dense, (32,))[0][0]
    tt = LayerRanks("tt-matrix", (16, 16), make_spec(embedding, "tt-matrix").modes)
    svd = LayerRanks("svd", (32,))
    lstm = survey(dense, (32,))[0][1]
    tt_lstm = make_spec(lstm, "tt-matrix", (8, 8))
    models = {
        "dense": dense,
        "TT-embedding": compress(dense, RankTable([("embedding", tt)])),
        "SVD LSTM": compress(dense, RankTable([("lstm", svd)])),
        "TT LSTM": compress(dense, RankTable([("lstm", tt_lstm)])),
        "both": compress(dense, RankTable([("embedding", tt), ("lstm", svd)])),
    }
    tokens = WordNetGlosses()().val.tensors[0][:256]
    times = {name: [] for name in models}
    with torch.inference_mode():
        for _ in range(3):  # alternate the variants, so that load hits all of them alike
            for name, model in models.items():
                times[name].append(median_ms(lambda model=model: model(tokens), repeats=7))
        per_token = median_ms(lambda: models["TT-embedding"].embedding._rows(tokens.reshape(-1)))
        per_distinct = median_ms(lambda: models["TT-embedding"].embedding(tokens))
        lookup = median_ms(lambda: dense.embedding(tokens))
        # the TT LSTM's hidden-to-hidden matrix over one batch's 32 steps: its factorized chain
        # on every row, against its dense matrix built once (what the module runs)
        hh = models["TT LSTM"].lstm.hh[0]
        h = torch.randn(tokens.shape[0], 128)
        chain = median_ms(lambda: [hh(h) for _ in range(32)])
        built = median_ms(lambda: [apply(h) for apply in [_apply(hh, 32 * len(h))] * 32])
    base = sorted(times["dense"])[1]
    print(f"text-lstm on 256 wordnet glosses x 32 tokens, {platform.processor() or 'cpu'}")
    print(f"{'model':<14}{'params':>10}{'MACs':>12}{'ms':>9}{'vs dense':>10}")
    for name, model in models.items():
        ms = sorted(times[name])[1]
        print(
            f"{name:<14}{count_params(model):>10,}{count_macs(model, (32,)):>12,}"
            f"{ms:>9.1f}{ms / base:>9.2f}x"
        )
    print(
        f"TT LSTM hidden-to-hidden matrix (512 x 128, TT ranks 8, 8), 32 steps of "
        f"{tokens.shape[0]} rows: factorized chain {chain:.1f} ms, dense matrix built once "
        f"{built:.1f} ms ({chain / built:.1f}x faster)"
    )
    distinct = len(torch.unique(tokens))
    print(
        f"TT-embedding lookup of {tokens.numel()} tokens ({distinct} distinct): a row per token "
        f"{per_token:.1f} ms, a row per distinct token {per_distinct:.1f} ms "
        f"({per_token / per_distinct:.1f}x faster); the dense table {lookup:.2f} ms"
    )


if __name__ == "__main__":
    main()
