"""``rankserve gateway`` (one backend) and ``rankserve route`` (several): the same proxy."""

from __future__ import annotations

import argparse

from rankserve.cli.flags import checked as flag_type
from rankserve.cli.flags import non_negative, non_negative_int, port, positive, positive_int
from rankserve.learn import TEXT_MODEL_KINDS
from rankserve.route.backends import normalize_url
from rankserve.route.body import DEFAULT_PRIORITY_SCALE, DEFAULT_XARGS_KEY, SCORE_MODES
from rankserve.route.policies import ROUTER_NAMES
from rankserve.route.scoring import choose_predictor

PREDICTOR_CHOICES = (*TEXT_MODEL_KINDS, "none")


def add_route_commands(sub) -> None:
    """The ``gateway`` and ``route`` subcommands."""
    checked = {name: flag_type(f) for name, f in {"backend": normalize_url, "port": port, "positive": positive,
                                                  "positive_int": positive_int, "non_negative": non_negative,
                                                  "non_negative_int": non_negative_int}.items()}
    g = sub.add_parser("gateway", help="an OpenAI-compatible proxy that scores each request for one backend "
                                       "(e.g. vLLM with --scheduling-policy priority)")
    g.add_argument("--backend", required=True, type=checked["backend"], help="the backend's URL, http://HOST:PORT[/v1]")
    _add_proxy_options(g, checked, default_mode="priority")
    g.set_defaults(run=cmd_proxy, parser=g, router="round-robin")

    r = sub.add_parser("route", help="an OpenAI-compatible router over several backends (rankserve or vLLM)")
    r.add_argument("--backend", required=True, action="append", type=checked["backend"],
                   help="a backend's URL, http://HOST:PORT[/v1] (repeat for each backend)")
    r.add_argument("--router", choices=ROUTER_NAMES, default="sal",
                   help="sal: least predicted outstanding work (default); least-requests, pow2, least-kv, "
                        "round-robin, random")
    _add_proxy_options(r, checked, default_mode="none")
    r.set_defaults(run=cmd_proxy, parser=r)


def _add_proxy_options(p: argparse.ArgumentParser, checked: dict, default_mode: str) -> None:
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=checked["port"], default=8080)
    p.add_argument("--mode", choices=SCORE_MODES, default=default_mode,
                   help=f"how the score travels: priority (vLLM's priority field, an int, lower first), xargs "
                        f"(vllm_xargs, for rankserve's vLLM scheduler class), none (forward unchanged); "
                        f"default {default_mode}")
    p.add_argument("--predictor", choices=PREDICTOR_CHOICES + ("auto",), default="auto",
                   help="length predictor run on each prompt; auto: classifier when the router reads lengths "
                        "(sal), else ranker when --mode needs a score, else none")
    p.add_argument("--predictor-weights", default=None,
                   help="trained weights (.safetensors) for --predictor; default: the shipped ones")
    p.add_argument("--ignore-max-tokens", action="store_true",
                   help="do not bound predicted lengths by the request's max_tokens (for replayed traces, "
                        "where max_tokens is the true length and would tell the router everything)")
    p.add_argument("--tokenizer", default="smollm2-135m-instruct",
                   help="counts prompt tokens for the load trackers: a model name, a local tokenizer "
                        "directory, or 'approx' (4 characters per token)")
    p.add_argument("--xargs-key", default=DEFAULT_XARGS_KEY, help="the vllm_xargs key of --mode xargs")
    p.add_argument("--priority-scale", type=checked["positive"], default=DEFAULT_PRIORITY_SCALE,
                   help="--mode priority: priority = round(score x this)")
    p.add_argument("--health-interval", type=checked["positive"], default=2.0, help="seconds between health checks")
    p.add_argument("--max-retries", type=checked["non_negative_int"], default=3,
                   help="backends tried after the first fails before answering")
    p.add_argument("--kv-capacity-tokens", type=checked["positive_int"], default=None,
                   help="KV capacity of backends that do not report it (rankserve), for memory-aware routing")
    p.add_argument("--prefill-weight", type=checked["non_negative"], default=0.5,
                   help="a prompt token's cost in decode tokens (sal)")
    p.add_argument("--seed", type=int, default=0)


def cmd_proxy(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    import uvicorn

    from rankserve.predict import make_predictor
    from rankserve.route.proxy import RouterConfig, RoutingProxy, build_proxy_app
    from rankserve.route.scoring import PromptScorer
    from rankserve.server.prompt_tokens import token_counter

    backends = args.backend if isinstance(args.backend, list) else [args.backend]
    if len(set(backends)) < len(backends):
        parser.error(f"argument --backend: a backend is given twice ({', '.join(backends)})")
    if args.mode == "xargs" and not args.xargs_key:
        parser.error("argument --xargs-key: must not be empty")
    config = RouterConfig(backends, router=args.router, mode=args.mode, xargs_key=args.xargs_key,
                          priority_scale=args.priority_scale, health_interval_s=args.health_interval,
                          max_retries=args.max_retries, kv_capacity_tokens=args.kv_capacity_tokens,
                          prefill_weight=args.prefill_weight, bound_by_max_tokens=not args.ignore_max_tokens,
                          seed=args.seed)
    predictor_name = choose_predictor(args.predictor, args.router, args.mode)
    try:
        counter = token_counter(args.tokenizer)
    except (OSError, ValueError) as exc:
        parser.error(f"argument --tokenizer: {exc}")
    try:
        predictor = make_predictor(predictor_name, weights=args.predictor_weights) if predictor_name else None
    except (OSError, ValueError) as exc:
        parser.error(f"argument {'--predictor-weights' if args.predictor_weights else '--predictor'}: {exc}")
    proxy = RoutingProxy(config, PromptScorer(predictor, counter))
    print(f"{args.command}: {len(backends)} backend(s) {', '.join(backends)}; router {args.router}; "
          f"score mode {args.mode}; predictor {predictor_name or 'none'}; on http://{args.host}:{args.port}/v1",
          flush=True)
    uvicorn.run(build_proxy_app(proxy), host=args.host, port=args.port, log_level="info")
    return 0
