"""Teacher-forced agreement of OrtExecutor with llama.cpp on the bundled SmolLM2-135M Q4_1.

Usage:
  python -m bench.agreement --llama-cpp /path/to/site-packages   # a directory holding the llama_cpp package

Both engines read the same ~256-token English text in one pass; at every position we compare our logits with
llama.cpp's: top-1 agreement (argmax equal) and the Pearson correlation of the logit vectors. llama-cpp-python is a
scratch tool, not a dependency: without it (no --llama-cpp, or no llama_cpp there) the script prints a JSON object
with "skipped" and exits 0.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from bench.executor_speed import REPO, bundled_gguf
from engines.convert import ensure_converted
from engines.onnxruntime import OrtExecutor
from engines.text import TextPipeline

F32 = npt.NDArray[np.float32]
TEXT = (
    "The history of the lighthouse is a history of people who kept small lights burning against a large dark. "
    "Before electricity, keepers trimmed wicks, polished brass and wound the clockwork that turned the lens, "
    "often through the night and in every kind of weather. The work was lonely and repetitive, but it mattered: "
    "a ship's captain approaching an unfamiliar coast could read the pattern of flashes and know exactly where "
    "he was. Each light had its own signature, published in almanacs, so that a single glimpse on a stormy "
    "evening was enough to fix a position on the chart. Over the twentieth century the keepers disappeared one "
    "by one. Automatic lamps, solar panels and radio beacons replaced them, and satellite navigation made many "
    "lights unnecessary altogether. Yet most of the towers still stand. Some have become museums or holiday "
    "cottages; others are maintained by volunteers who climb the stairs once a month to check the batteries and "
    "clean the glass. Visitors come for the views, for the stories of shipwrecks and rescues, and for the odd "
    "feeling of standing in a building whose whole purpose was to be seen from far away. On a clear night you "
    "can still count the beams sweeping across the water, each one a reminder of the people who kept them lit. "
)
DECISIVE = 0.5  # logits between llama.cpp's first and second choice for a position to count as decisive


def llama_logits(path: Path, gguf: Path, ids: list[int], threads: int) -> F32 | None:
    """llama.cpp's logits [len(ids), vocab] for one pass over `ids`; None if llama_cpp cannot be imported."""
    sys.path.append(str(path))
    try:
        import llama_cpp  # optional scratch tool, found through `path`
    except ImportError:
        return None
    llm = llama_cpp.Llama(str(gguf), n_ctx=1024, n_batch=1024, n_threads=threads, logits_all=True, verbose=False)
    llm.eval(ids)
    scores = np.array(llm.scores[: len(ids)], dtype=np.float32)  # filled only because logits_all=True
    llm.close()
    return scores


def compare(ours: F32, theirs: F32) -> dict[str, Any]:
    """Top-1 agreement and logit correlation per position."""
    corr = np.array([np.corrcoef(a, b)[0, 1] for a, b in zip(ours, theirs, strict=True)])
    agree = ours.argmax(-1) == theirs.argmax(-1)
    top2 = np.sort(theirs, axis=-1)[:, -2:]
    decisive = top2[:, 1] - top2[:, 0] >= DECISIVE
    return {
        "top1": round(float(np.mean(agree)), 4),
        "top1_decisive": round(float(np.mean(agree[decisive])), 4),
        "decisive_positions": int(decisive.sum()),
        "corr_median": round(float(np.median(corr)), 5),
        "corr_min": round(float(corr.min()), 5),
    }


def main() -> None:
    """Run both engines and print the comparison as JSON."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llama-cpp", type=Path, help="a directory containing the llama_cpp package")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache", type=Path, default=REPO / ".cache" / "test-models")
    args = parser.parse_args()

    gguf = bundled_gguf()
    ids = TextPipeline.from_gguf(gguf).tokenizer.encode(TEXT, add_special=False)
    theirs = llama_logits(args.llama_cpp, gguf, ids, args.threads) if args.llama_cpp else None
    if theirs is None:
        print(json.dumps({"skipped": "llama_cpp not found; pass --llama-cpp <dir containing llama_cpp>"}))
        return
    result: dict[str, Any] = {"tokens": len(ids)}
    for flavour in ("fused", "standard"):
        converted = ensure_converted(gguf, args.cache, flavour=flavour, logits="all")
        for level in (4, 0):
            ex = OrtExecutor(converted, threads=args.threads, accuracy_level=level, max_batch=1)
            ours = ex.prefill_all(ex.new_sequence(), ids)
            ex.close()
            result[f"{flavour}_acc{level}"] = compare(ours, theirs)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
