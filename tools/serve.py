"""Serve a megaphi checkpoint or HuggingFace phi folder over an OpenAI-compatible HTTP API.

    python tools/serve.py --load runs/phi1 --port 8000
    python tools/serve.py --hf phi-1/ --port 8000 --host 0.0.0.0 --model-name phi-1

Endpoints: POST /v1/completions, POST /v1/chat/completions (streaming with "stream": true), GET /v1/models,
GET /health. Any OpenAI client works, e.g. `OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")`.
Binds 127.0.0.1 unless --host says otherwise; --port 0 picks a free port. The server prints
"serving MODEL on http://HOST:PORT/v1" once it accepts requests. See megaphi/serve.py for the parameters and
the chat template.
"""

import argparse
import sys
from pathlib import Path


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--load", help="a megaphi --save folder or iter_ folder")
    src.add_argument("--hf", help="a HuggingFace phi folder")
    p.add_argument("--iteration", type=int, default=None, help="which checkpoint of --load (default: the latest)")
    p.add_argument("--port", type=int, default=8000, help="0 = any free port")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--model-name", default=None, help="the model id clients see (default: the folder's name)")
    p.add_argument("--tokenizer-type", default=None, help="override the checkpoint's tokenizer")
    p.add_argument("--tokenizer-model", default=None)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    p.add_argument("--quiet", action="store_true", help="no per-request log lines")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from megaphi.hf.loading import load_model_and_tokenizer
    from megaphi.serve import Engine, make_server

    try:
        model, tokenizer = load_model_and_tokenizer(args.load, args.hf, args.iteration, args.device, args.dtype,
                                                    args.tokenizer_type, args.tokenizer_model)
        source = Path(args.load or args.hf).resolve()
        name = args.model_name or (source.parent.name if source.name.startswith("iter_") else source.name)
        server = make_server(Engine(model, tokenizer, name), args.host, args.port, verbose=not args.quiet)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    host, port = server.server_address[:2]
    print(f"serving {name} on http://{host}:{port}/v1", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
