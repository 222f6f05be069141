"""sentence-transformers on the same CPU: the embeddings peer. Runs in the bench venv as a subprocess.

python -m bench.st_embed MODEL_DIR --threads 2 --single-runs 20 --batch-runs 5   # prints one JSON object
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

# 32 inputs of mixed length, from a few words to a paragraph; shared with the HTTP side of the comparison.
TEXTS = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "A man is riding a horse.",
    "A woman is playing violin.",
    "Two men pushed carts through the woods.",
    "A man is riding a white horse on an enclosed ground.",
    "A monkey is playing drums.",
    "Someone in a gorilla costume is playing a set of drums.",
    "The weather is lovely today.",
    "It's so sunny outside!",
    "He drove to the stadium.",
    "How do I reset the fan profile on the device?",
    "The thermal governor lowers engine concurrency before the critical trip point.",
    "USB Power Delivery negotiates voltage and current between a source and a sink.",
    "Which port does the cluster API listen on by default?",
    "Edge devices run inference close to where the data is produced.",
    "Continuous batching admits new sequences into a running batch at every decode step.",
    "The quick brown fox jumps over the lazy dog.",
    "Paris is the capital and most populous city of France.",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "The stock market closed higher on Friday after a volatile week.",
    "Please summarise the attached report in three bullet points.",
    "A lighthouse keeper kept a careful log of the weather four times a day for decades.",
    "Transformers compute attention over every pair of tokens in the context window.",
    "She planted tomatoes, basil and peppers in the raised bed behind the house.",
    "The library opens at nine in the morning and closes at six in the evening on weekdays.",
    "An embedding maps a sentence to a point in a vector space where similar meanings lie close together.",
    "The train was delayed by forty minutes because of a signalling fault near the junction.",
    "Magnetic stacking lets several boxes share power and form a cluster without cables.",
    (
        "Automation ended the era of resident keepers in 1987; the last keeper handed the keys to an engineer from "
        "the coastal authority and moved into a cottage in the village, from where he could still see the light."
    ),
    (
        "Visitors often ask whether the light is still needed now that every ship carries satellite navigation, "
        "and the answer is that electronic systems fail in exactly the conditions in which a sailor most needs "
        "certainty, and that a light on a headland is a fact that no software fault can change."
    ),
]


def main() -> int:
    """Time single-input and 32-input encodes; print the batch's vectors for the cosine check."""
    parser = argparse.ArgumentParser()
    parser.add_argument("model_dir")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--single-runs", type=int, default=20)
    parser.add_argument("--batch-runs", type=int, default=5)
    args = parser.parse_args()
    import torch
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    model = SentenceTransformer(args.model_dir, device="cpu")
    load_s = time.perf_counter() - started

    def encode(texts: list[str]) -> tuple[float, list[list[float]]]:
        t0 = time.perf_counter()
        vectors = model.encode(texts, batch_size=len(texts), convert_to_numpy=True, normalize_embeddings=True)
        return time.perf_counter() - t0, vectors.tolist()

    encode(TEXTS[:1])
    encode(TEXTS)
    singles = [encode([TEXTS[i % len(TEXTS)]])[0] for i in range(args.single_runs)]
    batches, vectors = [], []
    for _ in range(args.batch_runs):
        elapsed, vectors = encode(TEXTS)
        batches.append(elapsed)
    import sentence_transformers

    json.dump(
        {
            "sentence_transformers": sentence_transformers.__version__,
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "load_s": round(load_s, 2),
            "single_runs": args.single_runs,
            "batch_runs": args.batch_runs,
            "batch_size": len(TEXTS),
            "single_ms_median": round(statistics.median(singles) * 1000, 2),
            "batch_ms_median": round(statistics.median(batches) * 1000, 2),
            "emb_s_1": round(1 / statistics.median(singles), 1),
            "emb_s_batch": round(len(TEXTS) / statistics.median(batches), 1),
            "vectors": vectors,
        },
        sys.stdout,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
