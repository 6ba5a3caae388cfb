"""The ``tuneoff gold`` verb: build (once) the gold sentiment judge, report its accuracy, score text.

tuneoff gold                      # build if needed; print where it is cached
tuneoff gold --eval               # ... and print "dev accuracy 0.831" / "test accuracy 0.843"
tuneoff gold --score "a gem"      # ... and print P(positive) of each text, one per line
"""

from __future__ import annotations

import argparse


def gold(args: argparse.Namespace) -> int:
    from tuneoff.feedback.gold import evaluate, load_gold_judge

    judge = load_gold_judge(args.cache_dir)
    seconds = judge.info.get("build_seconds", float("nan"))
    if judge.from_cache:
        print(f"gold judge cached at {judge.path} (built earlier in {seconds:.1f} s)")
    else:
        print(f"gold judge built in {seconds:.1f} s, cached at {judge.path}")
    if args.eval:
        accuracy = evaluate(judge)
        print(f"dev accuracy {accuracy['dev']:.3f}")
        print(f"test accuracy {accuracy['test']:.3f}")
    if args.score:
        for probability in judge.score(args.score):
            print(f"{probability:.4f}")
    return 0


def add_parser(subparsers) -> None:
    """Register ``gold`` with the top-level CLI's subparsers."""
    parser = subparsers.add_parser(
        "gold",
        help="build, evaluate or query the gold sentiment judge (SST-2 tf-idf logistic regression)",
        description="The gold judge stands in for people in the default experiment. It is built on first use "
        "(seconds) from the shipped SST-2 train split and cached under $TUNEOFF_CACHE/gold "
        "(default ~/.cache/tuneoff/gold).",
    )
    parser.add_argument("--eval", action="store_true", help="print its accuracy on SST-2 dev and test")
    parser.add_argument(
        "--score", metavar="TEXT", action="append", help="print P(positive) of TEXT (repeat the flag for several texts)"
    )
    parser.add_argument("--cache-dir", metavar="DIR", help="where to keep the judge (default: $TUNEOFF_CACHE/gold)")
    parser.set_defaults(func=gold)
