"""`python -m adapterkit.serve --base ... --store ...`: the server without the typer CLI."""

from __future__ import annotations

import argparse
import os


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    parser = argparse.ArgumentParser(prog="python -m adapterkit.serve", description=__doc__)
    parser.add_argument("--base", required=True, help="hub id or local path of the base model")
    parser.add_argument("--store", required=True, help="folder of adapters")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--cache-bytes", type=int, default=512 << 20)
    parser.add_argument("--keys", default=None, help="keys.json: API key -> tenant")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--scheduling", choices=["continuous", "static"], default="continuous",
                        help="generation: rows join and leave at every step, or a batch decodes to its end")
    parser.add_argument("--served-model-name", default=None, help="the base model's name in the OpenAI API")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="the most tokens one generation may ask for")
    parser.add_argument("--merge-after", type=int, default=8,
                        help="forwards in a row for one mergeable adapter before it is served merged (0: never)")
    parser.add_argument("--quantize", choices=["nf4", "int8", "int4"], default=None,
                        help="the base's Linear layers: nf4 (bitsandbytes), int8 or int4 weight-only (torchao)")
    parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32", help="the base's dtype")
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N | auto")
    args = parser.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    from . import serve_command

    serve_command(args.base, args.store, port=args.port, host=args.host, max_batch=args.max_batch,
                  max_wait_ms=args.max_wait_ms, cache_bytes=args.cache_bytes, keys=args.keys,
                  scheduling=args.scheduling, served_name=args.served_model_name, max_new_tokens=args.max_new_tokens,
                  merge_after=args.merge_after, quantize=args.quantize, dtype=args.dtype,
                  device=args.device)


if __name__ == "__main__":
    main()
