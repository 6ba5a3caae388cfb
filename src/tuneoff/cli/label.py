"""`tuneoff label ...`: queue comparisons, serve the labelling page, manage annotators, export, statistics.

    tuneoff label add --db fb.sqlite --prompts p.jsonl --responses-a a.jsonl --responses-b b.jsonl
    tuneoff label add --db fb.sqlite --prompts p.jsonl --responses a.jsonl b.jsonl c.jsonl   (K > 2: rank them)
    tuneoff label add --db fb.sqlite --prompts p.jsonl --model-a review-gpt [--model-b runs/sft/model]
    tuneoff label add --db fb.sqlite --pandalm ../shared/data/pandalm/testset-v1.json.gz
    tuneoff label add --db fb.sqlite --preferences prefs.jsonl [--as-annotator file-labels]
    tuneoff label add --db fb.sqlite --experiment runs/X [--max-prompts 50] [--arm-vs-arm 100]   (blind, vs base)
    tuneoff label annotators add NAME --db fb.sqlite [--lead]   (prints the token once; a lead also sees /admin)
    tuneoff label annotators revoke NAME --db fb.sqlite         (the token and every session end; labels stay)
    tuneoff label annotators rotate NAME --db fb.sqlite         (a new token; the old one and every session end)
    tuneoff label serve --db fb.sqlite --host 127.0.0.1 --port 8000 --annotators-per-task 3 [--guidelines G.md]
    tuneoff label export --db fb.sqlite --out prefs.jsonl [--mode majority|per-annotator] [--ties drop|keep]
    tuneoff label stats --db fb.sqlite [--json stats.json] [--experiment runs/X]

Heavy imports (FastAPI, uvicorn, torch) happen inside the handlers.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import math
import sys

from tuneoff.errors import TuneoffError


def add_parser(subparsers) -> None:
    label = subparsers.add_parser(
        "label",
        help="collect human preferences in a browser and measure agreement",
        description="Human feedback collection: queue, serve, export, statistics.",
    )
    verbs = label.add_subparsers(dest="label_verb", required=True, metavar="SUBVERB")

    add = verbs.add_parser("add", help="queue comparison tasks (from generation files, models or a preference file)")
    _db(add)
    add.add_argument("--prompts", help='prompts file, {"prompt"} or {"messages"} per line')
    add.add_argument(
        "--responses-a", help='generation file for side a: {"completion"|"response"|"output", "prompt"?} per line'
    )
    add.add_argument(
        "--responses-b", help="generation file for side b, line i answering the same prompt as line i of a"
    )
    add.add_argument(
        "--responses",
        nargs="+",
        help="K generation files answering the same prompts line by line: K = 2 a pair, K > 2 a ranking task",
    )
    add.add_argument("--model-a", help="sample response a from this model (preset name or HF folder); with --prompts")
    add.add_argument("--model-b", help="sample response b from this model (default: a second sample from --model-a)")
    add.add_argument("--max-new-tokens", type=int, default=128)
    add.add_argument("--temperature", type=float, default=1.0)
    add.add_argument("--top-p", type=float, default=1.0)
    add.add_argument("--seed", type=int, default=0)
    add.add_argument("--batch-size", type=int, default=8)
    add.add_argument("--pandalm", help="import PandaLM's human test set with its three annotators' labels")
    add.add_argument("--preferences", help='import the pairs of a {"prompt","chosen","rejected"} file as tasks')
    add.add_argument("--as-annotator", help="with --preferences: also keep the file's labels under this annotator name")
    add.add_argument(
        "--experiment",
        help="queue blind comparisons of this experiment folder's arms (each against base, same prompt and seed)",
    )
    add.add_argument("--max-prompts", type=int, default=0, help="with --experiment: first N held-out prompts per seed")
    add.add_argument(
        "--arm-vs-arm", type=int, default=0, help="with --experiment: also up to N comparisons between tuned arms"
    )
    add.add_argument("--seeds", type=int, nargs="+", help="with --experiment: only these seeds (default: all)")
    add.set_defaults(func=run_add)

    serve = verbs.add_parser("serve", help="serve the labelling page and its JSON API")
    _db(serve)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument(
        "--annotators-per-task",
        type=int,
        default=3,
        help="distinct annotators each task gets (overlap makes agreement measurable)",
    )
    serve.add_argument(
        "--lease-minutes",
        type=float,
        default=30.0,
        help="an assigned task left unanswered this long is offered to someone else",
    )
    serve.add_argument("--guidelines", help="a Markdown file of task guidelines, shown above every comparison")
    serve.set_defaults(func=run_serve)

    annotators = verbs.add_parser("annotators", help="create, list, revoke annotators or rotate their tokens")
    annotator_verbs = annotators.add_subparsers(dest="annotators_verb", required=True, metavar="SUBVERB")
    annotator_add = annotator_verbs.add_parser("add", help="create an annotator and print their token (once)")
    annotator_add.add_argument("name")
    annotator_add.add_argument("--lead", action="store_true", help="a lead: also sees the admin page (/admin)")
    _db(annotator_add)
    annotator_add.set_defaults(func=run_annotators_add)
    revoke = annotator_verbs.add_parser("revoke", help="end an annotator's access: token and sessions; labels stay")
    revoke.add_argument("name")
    _db(revoke)
    revoke.set_defaults(func=run_annotators_revoke)
    rotate = annotator_verbs.add_parser("rotate", help="a new token for an annotator (printed once); the old ends")
    rotate.add_argument("name")
    _db(rotate)
    rotate.set_defaults(func=run_annotators_rotate)
    annotator_list = annotator_verbs.add_parser("list", help="list annotators")
    _db(annotator_list)
    annotator_list.set_defaults(func=run_annotators_list)

    export = verbs.add_parser("export", help="write the preference JSONL the reward model reads")
    _db(export)
    export.add_argument("--out", required=True)
    export.add_argument("--mode", choices=("majority", "per-annotator"), default="majority")
    export.add_argument("--ties", choices=("drop", "keep"), default="drop")
    export.add_argument(
        "--min-annotators", type=int, default=1, help="majority mode: tasks with fewer labels are left out"
    )
    export.set_defaults(func=run_export)

    stats = verbs.add_parser("stats", help="agreement (Cohen, Fleiss, Krippendorff) and biases (position, length)")
    _db(stats)
    stats.add_argument("--json", help="also write the figures to this JSON file")
    stats.add_argument(
        "--experiment", help="what people preferred among this experiment's arms (win rates vs base, Bradley-Terry)"
    )
    stats.set_defaults(func=run_stats)


def _db(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--db", required=True, help="the feedback SQLite database")


def run_add(args: argparse.Namespace) -> int:
    from tuneoff.feedback import store as fb

    sources = [
        bool(args.pandalm),
        bool(args.preferences),
        bool(args.responses_a or args.responses_b),
        bool(args.responses),
        bool(args.model_a),
        bool(args.experiment),
    ]
    if sum(sources) != 1:
        raise TuneoffError(
            "give exactly one source: --pandalm, --preferences, --responses-a/--responses-b, --responses, --model-a "
            "or --experiment"
        )
    if args.experiment:
        from tuneoff.compare.human import comparison_tasks

        if args.max_prompts < 0 or args.arm_vs_arm < 0:
            raise TuneoffError("--max-prompts and --arm-vs-arm must be 0 or more")
        tasks, made = comparison_tasks(
            args.experiment, prompts=args.max_prompts, arm_vs_arm=args.arm_vs_arm, seeds=args.seeds
        )
        with fb.Store(args.db) as store:
            added, existing = store.add_tasks(tasks)
        print(
            f"{args.db}: {added} comparisons queued, {existing} already there ({made['vs_base']} arm vs base, "
            f"{made['arm_vs_arm']} arm vs arm; {made['identical']} left out: both arms wrote the same text)"
        )
        return 0
    if args.as_annotator and not args.preferences:
        raise TuneoffError("--as-annotator goes with --preferences")
    if args.model_b and not args.model_a:
        raise TuneoffError("--model-b needs --model-a")
    store = fb.Store(args.db)
    if args.pandalm:
        counts = fb.import_pandalm(store, args.pandalm)
    elif args.preferences:
        counts = fb.import_preferences(store, args.preferences, as_annotator=args.as_annotator)
    elif args.responses:
        added, existing = store.add_tasks(fb.tasks_from_generation_files(args.prompts, args.responses))
        counts = {"tasks_added": added, "tasks_existing": existing}
    elif args.responses_a or args.responses_b:
        if not (args.responses_a and args.responses_b):
            raise TuneoffError("--responses-a and --responses-b go together")
        added, existing = store.add_tasks(fb.tasks_from_generations(args.prompts, args.responses_a, args.responses_b))
        counts = {"tasks_added": added, "tasks_existing": existing}
    else:
        if not args.prompts:
            raise TuneoffError("--model-a needs --prompts")
        prompts = fb.load_prompt_texts(args.prompts)
        pairs = sample_response_pairs(
            prompts,
            args.model_a,
            args.model_b,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            seed=args.seed,
            batch_size=args.batch_size,
        )
        source_b = args.model_b or args.model_a
        tasks = [
            fb.NewTask(prompt, a, b, messages, source_a=args.model_a, source_b=source_b)
            for (prompt, messages), (a, b) in zip(prompts, pairs)
        ]
        added, existing = store.add_tasks(tasks)
        counts = {"tasks_added": added, "tasks_existing": existing}
    store.close()
    print(f"{args.db}: " + ", ".join(f"{key.replace('_', ' ')} {value}" for key, value in counts.items()))
    return 0


def sample_response_pairs(
    prompts: list[tuple[str, list | None]],
    model_a: str,
    model_b: str | None = None,
    *,
    max_new_tokens: int = 128,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    batch_size: int = 8,
) -> list[tuple[str, str]]:
    """Two sampled responses per prompt: one from each model, or two from ``model_a`` alone."""
    import torch

    from tuneoff.models.load import load_model_and_tokenizer

    generator = torch.Generator().manual_seed(seed)
    options = dict(
        max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, batch_size=batch_size, generator=generator
    )
    model, tokenizer = load_model_and_tokenizer(model_a)
    first = _generate(model, tokenizer, prompts, **options)
    if model_b is not None and model_b != model_a:
        del model
        model, tokenizer = load_model_and_tokenizer(model_b)
    second = _generate(model, tokenizer, prompts, **options)
    return list(zip(first, second))


def _generate(model, tokenizer, prompts, *, max_new_tokens, temperature, top_p, batch_size, generator) -> list[str]:
    """One sampled response per prompt through tuneoff's sampler (:func:`tuneoff.rollout.sample_responses`)."""
    from tuneoff.data.tokenize import chat_ids, text_ids
    from tuneoff.rollout import sample_responses

    # Instruct models (with a chat template) get the prompt as a user turn; base models continue the text.
    chat = getattr(tokenizer, "chat_template", None) is not None
    ids = [
        chat_ids(tokenizer, messages or ({"role": "user", "content": prompt},), add_generation_prompt=True)
        if chat
        else text_ids(tokenizer, prompt)
        for prompt, messages in prompts
    ]
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    _, texts, _ = sample_responses(model, tokenizer, ids, max_new_tokens, temperature, generator, batch_size, top_p)
    return [text.strip() for text in texts]


def run_serve(args: argparse.Namespace) -> int:
    """Check every input (the database, the options, the address), then print the page's URL and serve.

    Nothing is printed before the checks pass: a bad input is one error line and exit status 2, never a URL
    that leads nowhere.
    """
    import uvicorn

    from tuneoff.feedback.app import create_app

    if not 1 <= args.port <= 65535:
        raise TuneoffError(f"--port must be between 1 and 65535, got {args.port}")
    if args.annotators_per_task < 1:
        raise TuneoffError("--annotators-per-task must be at least 1")
    if not math.isfinite(args.lease_minutes) or args.lease_minutes <= 0:
        raise TuneoffError(f"--lease-minutes must be a positive number, got {args.lease_minutes}")
    _check_address(args.host, args.port)
    guidelines = None
    if args.guidelines:
        try:
            guidelines = open(args.guidelines, encoding="utf-8").read()
        except (OSError, UnicodeDecodeError) as error:
            raise TuneoffError(f"--guidelines {args.guidelines}: {error}") from None
    app = create_app(
        args.db,
        annotators_per_task=args.annotators_per_task,  # opens the database: it must exist
        lease_seconds=args.lease_minutes * 60,
        guidelines=guidelines,
    )
    if not _is_loopback(args.host):
        print(
            f"warning: serving on {args.host} over plain HTTP: tokens cross the network in clear text; "
            "put a TLS proxy in front",
            file=sys.stderr,
        )
    where = f"[{args.host}]" if ":" in args.host else args.host  # an IPv6 address goes in brackets in a URL
    print(f"labelling page: http://{where}:{args.port}/login  (annotators log in with their token)", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0


def _check_address(host: str, port: int) -> None:
    """TuneoffError unless ``host`` resolves and ``port`` can be bound there (it may be taken by another server)."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as error:
        raise TuneoffError(f"--host {host}: not an address of this machine ({error.strerror})") from None
    family, kind, protocol, _, address = infos[0]
    with socket.socket(family, kind, protocol) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds
        try:
            probe.bind(address)
        except OSError as error:
            raise TuneoffError(f"cannot serve on {host}:{port}: {error.strerror or error}") from None


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def run_annotators_add(args: argparse.Namespace) -> int:
    from tuneoff.feedback.store import Store

    with Store(args.db) as store:
        annotator, token = store.add_annotator(args.name, role="lead" if args.lead else "annotator")
    print(f"{annotator.role} {annotator.name}: token {token}")
    print("Give this token to the annotator; it is shown only once (the database keeps its hash).", file=sys.stderr)
    return 0


def run_annotators_revoke(args: argparse.Namespace) -> int:
    from tuneoff.feedback.store import Store

    with Store(args.db, create=False) as store:
        annotator = store.revoke(args.name)
    print(f"annotator {annotator.name}: access revoked (token and sessions ended; their labels stay)")
    return 0


def run_annotators_rotate(args: argparse.Namespace) -> int:
    from tuneoff.feedback.store import Store

    with Store(args.db, create=False) as store:
        token = store.rotate(args.name)
    print(f"annotator {args.name}: new token {token}")
    print("The old token and every open session no longer work; the new token is shown only once.", file=sys.stderr)
    return 0


def run_annotators_list(args: argparse.Namespace) -> int:
    from tuneoff.feedback.store import Store

    with Store(args.db, create=False) as store:
        for a in store.annotators():
            access = "revoked" if a.revoked else ("token" if a.can_log_in else "imported")
            print(f"{a.id}\t{a.name}\t{a.role}\t{access}")
    return 0


def run_export(args: argparse.Namespace) -> int:
    from tuneoff.feedback.store import Store, export_preferences

    if args.min_annotators < 1:
        raise TuneoffError("--min-annotators must be at least 1")
    with Store(args.db, create=False) as store:
        counts = export_preferences(store, args.out, mode=args.mode, ties=args.ties, min_annotators=args.min_annotators)
    print(f"{args.out}: " + ", ".join(f"{key.replace('_', ' ')} {value}" for key, value in counts.items()))
    return 0


def run_stats(args: argparse.Namespace) -> int:
    from tuneoff.feedback.agreement import finite, format_summary, summarize
    from tuneoff.feedback.store import Store

    if args.experiment:
        from tuneoff.compare.human import human_block
        from tuneoff.compare.report import human_lines

        summary = human_block(args.experiment, args.db)
        print("\n".join(human_lines(summary)))
    else:
        with Store(args.db, create=False) as store:
            summary = summarize(store.judgments())
        print(format_summary(summary))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(finite(summary), handle, indent=2)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run ``label`` alone, as the ``tuneoff`` CLI would: ``python -m tuneoff.cli.label label stats --db X``."""
    parser = argparse.ArgumentParser(prog="tuneoff")
    add_parser(parser.add_subparsers(dest="verb", required=True, metavar="VERB"))
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except TuneoffError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
