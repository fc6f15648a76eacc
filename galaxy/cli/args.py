"""Arguments the subcommands share, declared once: value types, the model, the input, generation and
which devices to use. Each subcommand module adds its own options beside these."""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

from .. import units
from ..addresses import AddressError, split_address
from ..engine.arguments import stop_strings
from ..engine.generation import GenerationConfig
from ..engine.sampling import SamplingConfig
from ..model.quant import FormatError, parse_format
from ..parallel.threads import DECODE_MAX_TOKENS


def progress(msg: str) -> None:
    """A line of progress on stderr (stdout stays for results and --json)."""
    print(f"galaxy: {msg} ...", file=sys.stderr, flush=True)


# --- value types ---------------------------------------------------------------------------------

def ids(text: str) -> list[int]:
    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--input-ids wants comma-separated integers, got {text!r}") from None


def floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def rates(text: str) -> list[float]:
    try:
        return [units.parse_rate(x) for x in text.split(",") if x]
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def size(text: str) -> int:
    try:
        return units.parse_bytes(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def int_at_least(low: int, hint: str = ""):
    """An argparse type: an integer >= low (refused when parsed, before any worker starts)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} is below the minimum, {low}{hint}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


def number_in(low: float, high: float = math.inf, low_open: bool = False):
    """An argparse type: a finite number in [low, high] ((low, high] with low_open)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value) or (value <= low if low_open else value < low) or value > high:
            if math.isfinite(high):
                raise argparse.ArgumentTypeError(f"{text} is outside {'(' if low_open else '['}{low:g}, {high:g}]")
            raise argparse.ArgumentTypeError(f"{text} must be {'>' if low_open else '>='} {low:g}")
        return value

    parse.__name__ = "number"
    return parse


def output_file(text: str) -> str:
    """An argparse type: a file we can write, checked up front (not after profiling or a forward pass)."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a directory; give a file name in it")
    parent = path.parent
    if not parent.is_dir():
        raise argparse.ArgumentTypeError(f"cannot write {text}: the directory {parent} does not exist "
                                         f"(create it with `mkdir -p {parent}`)")
    if not os.access(parent, os.W_OK):
        raise argparse.ArgumentTypeError(f"cannot write {text}: the directory {parent} is not writable")
    return text


def addresses(text: str) -> list[str]:
    out = [a.strip() for a in text.split(",") if a.strip()]
    if not out:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT[,HOST:PORT...], got {text!r}")
    for a in out:
        try:
            split_address(a)
        except AddressError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return out


# --- argument groups -----------------------------------------------------------------------------

def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--model", help="HF-style directory, .gguf file, or an embedded default: "
                   "'smollm2' (causal LM, the default) or 'minilm' (encoder)")
    g.add_argument("--random-init", metavar="PRESET",
                   help="random weights of a preset shape (e.g. gpt2-large, bert-large, opt-xl)")
    p.add_argument("--seed", type=int, default=0, help="seed for random weights / random input ids")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="weights and activations on the devices: float32 (default, exact) or bfloat16 (half "
                   "the memory, checked with a looser tolerance)")


def weights_format(text: str) -> str:
    """A --weights-format value: "auto" or a model.quant.parse_format spec, refused here (before any worker
    starts) with the format's own error naming it."""
    if text != "auto":
        try:
            parse_format(text)
        except FormatError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return text


def add_weights_format_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--weights-format", type=weights_format, metavar="FORMAT",
                   help="how each device holds its linear weights: fp32 (the exact reference), bf16, fp16, int8, "
                   "int4, int4-fp32, ... (NAME[-ACT][-gGROUP][:HEAD]), or auto: the file's own, int4 for a Q4 GGUF "
                   "such as the embedded SmolLM2, fp32 for float checkpoints (default: the --plan's, else auto; fp32 "
                   "for run --check and with --dtype bfloat16 or --backend onnx / auto); a streamed shard travels in "
                   "it (docs/decode-formats.md)")


def add_decode_threads_arg(p) -> None:
    p.add_argument("--decode-threads", type=int_at_least(1), metavar="N",
                   help=f"intra-op threads of a decode step (at most {DECODE_MAX_TOKENS} tokens) on every device; "
                   "prompt chunks keep all of a device's threads (default: each device times its decode matmuls "
                   "at 1 and at all its threads when it loads, and keeps the faster; docs/decode-formats.md)")


def add_decode_layout_arg(p: argparse.ArgumentParser, default: str | None) -> None:
    """--decode-layout (galaxy.runtime.decode_layout): where a causal LM decodes after every device prefills
    (`default` None: auto, split with --check; `galaxy run` resolves it)."""
    p.add_argument("--decode-layout", default=default, metavar="auto|split|DEVICE",
                   help="where generation decodes: auto -- the planner's fastest predicted layout (the split over "
                   "every device, fewer, or one device holding the whole model beside its prefill shard), said in "
                   "one line at load; split -- tensor-parallel on the loaded split (the exact path --check pins); "
                   "or a device (index, worker name or address) that decodes alone (default "
                   f"{default or 'auto; split with --check'}; "
                   "docs/decode-formats.md)")


def add_input_args(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--prompt", help="text to encode with the model's tokenizer")
    g.add_argument("--input-ids", type=ids, help="token ids, e.g. 1,2,3")
    g.add_argument("--seq-len", type=int_at_least(1), help="random input of this many tokens")


def add_generation_args(p: argparse.ArgumentParser, default_tokens: int | None = None) -> None:
    g = p.add_argument_group("generation (causal LMs)")
    g.add_argument("--max-new-tokens", type=int_at_least(1, " (leave the option out for one forward pass)"
                                                       if default_tokens is None else ""),
                   default=default_tokens, metavar="N",
                   help="generate up to N tokens, streaming the text" if default_tokens is None else
                   f"tokens per reply (default {default_tokens})")
    g.add_argument("--temperature", type=number_in(0.0), default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-k", type=int_at_least(0), default=0,
                   help="sample among the K most likely tokens (0 = all, default)")
    g.add_argument("--top-p", type=number_in(0.0, 1.0, low_open=True), default=1.0,
                   help="sample among the most likely tokens holding this much probability (default 1.0 = all)")
    g.add_argument("--stop", action="append", help="stop string (repeatable)")
    g.add_argument("--prefill-chunk", type=int_at_least(0), default=0, help="prompt tokens per prefill step (0: all)")


def generation_config(args) -> GenerationConfig:
    """The generation options, checked before any worker starts (InvalidRequest names the bad one)."""
    sampling = SamplingConfig(args.temperature, args.top_k, args.top_p, args.seed)
    return GenerationConfig(args.max_new_tokens, sampling, stop_strings(args.stop), prefill_chunk=args.prefill_chunk)


def add_cluster_args(p: argparse.ArgumentParser, *, local_help: str = "spawn N local workers on loopback "
                     "(default 3)", discover: bool = True, transport: bool = True, recover: bool = False) -> None:
    """Which devices: local workers, running workers, a cluster file or discovery -- one of them."""
    g = p.add_argument_group("devices (one of --local, --workers, --cluster" + (", --discover)" if discover else ")"))
    where = g.add_mutually_exclusive_group()
    where.add_argument("--local", type=int_at_least(1), metavar="N", help=local_help)
    where.add_argument("--workers", type=addresses, metavar="HOST:PORT,...",
                       help="use running workers at these addresses (ring order)")
    where.add_argument("--cluster", metavar="FILE.yaml", help="devices from a cluster file (emulated or real)")
    if discover:
        where.add_argument("--discover", nargs="?", const="galaxy", metavar="CLUSTER_NAME",
                           help="find the workers announcing themselves on the LAN (cluster name, default 'galaxy')")
        g.add_argument("--expect", type=int, metavar="N", help="with --discover: wait for exactly N workers")
    if transport:
        g.add_argument("--transport", choices=["grpc", "inproc"], default="grpc",
                       help="grpc: worker processes (default); inproc: threads of this process (debugging)")
    g.add_argument("--threads", type=int_at_least(1), help="intra-op threads per local worker (default: cores / N)")
    g.add_argument("--token", default=os.environ.get("GALAXY_TOKEN"),
                   help="shared cluster token (default $GALAXY_TOKEN)")
    g.add_argument("--tls", metavar="DIR", help="mutual TLS: the cluster CA and the coordinator's key pair "
                   "(from `galaxy keys init DIR`)")
    if recover:
        g.add_argument("--recover", action="store_true",
                       help="re-split over the surviving devices when one drops out, and away from stragglers")
