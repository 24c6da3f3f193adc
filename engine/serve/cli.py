"""``python -m engine serve``: load a model and serve it over the OpenAI API with uvicorn.

Every EngineConfig field is a flag (``--block-size 32``, ``--enable-prefix-caching false`` or
``--no-enable-prefix-caching``, ``--quantization int8``, ``--num-gpu-blocks none``), so a sweep's
server command template can set any of them.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
from pathlib import Path

from ..config import parse_value


def build_parser() -> argparse.ArgumentParser:
    from ..config import EngineConfig

    ap = argparse.ArgumentParser(prog="python -m engine serve", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="preset name (random weights) or HF checkpoint folder "
                    "(default: the shipped model)")
    ap.add_argument("--served-model-name", default=None, help="the name clients use (default: --model as given)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
                    help="weight dtype (default: bfloat16 on CUDA, float32 on CPU)")
    ap.add_argument("--log-level", default="warning", help="uvicorn's log level (default: warning)")
    ap.add_argument("--access-log", action="store_true", help="log every HTTP request")
    group = ap.add_argument_group("engine", "EngineConfig fields (see engine/config.py)")
    for f in dataclasses.fields(EngineConfig):
        flag = "--" + f.name.replace("_", "-")
        if isinstance(f.default, bool):
            group.add_argument(flag, dest=f.name, nargs="?", const=True, type=parse_value, default=None, metavar="BOOL")
            group.add_argument("--no-" + f.name.replace("_", "-"), dest=f.name, action="store_const", const=False)
        else:
            group.add_argument(flag, dest=f.name, type=parse_value, default=None, metavar=f.name.upper())
    return ap


def config_from_args(args):
    from ..config import EngineConfig

    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(EngineConfig)
             if getattr(args, f.name) is not None}
    # "--num-gpu-blocks none" gives None explicitly, the same as leaving it out.
    return EngineConfig(**given)


def main(argv=None) -> None:
    import torch
    import uvicorn

    from ..__main__ import default_model
    from .. import LLM
    from .app import build_app

    args = build_parser().parse_args(argv)
    model = args.model or default_model()
    cfg = config_from_args(args)
    dtype = getattr(torch, args.dtype) if args.dtype else None
    llm = LLM.from_pretrained(model, cfg, dtype=dtype) if Path(model).is_dir() else LLM.random(model, cfg, dtype=dtype)
    name = args.served_model_name or args.model or Path(model).name
    st = llm.engine.stats()
    logging.getLogger("engine.serve").warning(
        "serving %s as %r on http://%s:%d: %d KV blocks x %d tokens, backend %s", model, name, args.host, args.port,
        st.num_gpu_blocks, st.block_size, st.attention_backend)
    print(f"serving {model} as {name!r} on http://{args.host}:{args.port} ({st.num_gpu_blocks} KV blocks x "
          f"{st.block_size} tokens, backend {st.attention_backend}, device {llm.device})", flush=True)
    uvicorn.run(build_app(llm, name), host=args.host, port=args.port, log_level=args.log_level,
                access_log=args.access_log)
