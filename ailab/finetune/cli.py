"""`ailab-finetune`: fine-tune from the shell, without a running gateway.

    ailab-finetune run mybot --base smollm2-135m --jsonl train.jsonl --epochs 3
    ailab-finetune run mybot --match 'support-*'     # conversations stored by the gateway
    ailab-finetune status                            # this job or the gateway's
    ailab-finetune cancel

`run` works in the foreground and prints its progress; Ctrl-C cancels it.
"""

from __future__ import annotations

import argparse
import signal
import sys
from typing import Any

from ailab import config
from ailab.errors import AilabError
from ailab.finetune import data
from ailab.finetune.job import Workspace, prepare_job
from ailab.finetune.service import current_status, select_ids
from ailab.finetune.spec import FinetuneSpec, FinetuneStatus
from ailab.storage import Store

EXIT_CODES = {"done": 0, "failed": 1, "cancelled": 130}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ailab-finetune", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="fine-tune a model (in the foreground)")
    run.add_argument("name", help="the new model's key: models/custom/NAME.gguf")
    run.add_argument("--base", help="base model key (default: AILAB_DEFAULT_MODEL)")
    source = run.add_mutually_exclusive_group(required=True)
    source.add_argument("--ids", help="comma-separated conversation ids")
    source.add_argument("--match", help="glob over conversation ids ('*' for all)")
    source.add_argument("--jsonl", help="a file written by the JSONL export")
    run.add_argument("--no-tools", action="store_true", help="leave tool calls out")
    run.add_argument("--epochs", type=int, default=FinetuneSpec.model_fields["epochs"].default)
    run.add_argument("--lr", type=float, default=FinetuneSpec.model_fields["learning_rate"].default)
    run.add_argument("--window", type=int, default=FinetuneSpec.model_fields["window"].default)
    run.add_argument("--quant", default="Q8_0", choices=["Q8_0", "F16", "F32"])
    commands.add_parser("status", help="show the current or latest fine-tune")
    commands.add_parser("cancel", help="stop the running fine-tune")
    return parser


def _spec(args: argparse.Namespace, settings: config.Settings) -> FinetuneSpec:
    values: dict[str, Any] = {
        "name": args.name,
        "base": args.base or settings.default_model,
        "tools": not args.no_tools,
        "epochs": args.epochs,
        "lr": args.lr,
        "window": args.window,
        "quant": args.quant,
        "ids": args.ids.split(",") if args.ids else None,
        "match": args.match,
        "jsonl": args.jsonl,
    }
    return FinetuneSpec.model_validate({k: v for k, v in values.items() if v is not None})


def _records(settings: config.Settings, spec: FinetuneSpec) -> tuple[list[data.Record], str]:
    if spec.jsonl is not None:
        return data.records_from_jsonl(spec.jsonl), "jsonl"
    with Store(settings.database_path) as store:
        known = [summary.id for summary in store.list_conversations()]
        chosen = {cid: store.get_messages(cid) for cid in select_ids(spec, known)}
        system_prompt = store.get_setting("system_prompt", config.DEFAULT_SYSTEM_PROMPT)
    return data.records_from_conversations(
        chosen, system_prompt, spec.include_tools
    ), "conversations"


def _print_status(status: FinetuneStatus) -> None:
    print(status.summary(), flush=True)


def run(args: argparse.Namespace, settings: config.Settings) -> int:
    spec = _spec(args, settings)
    records, kind = _records(settings, spec)
    job = prepare_job(settings, spec, records, kind)
    print(f"{spec.name}: {len(records)} conversations, about {job.status.memory_estimate_mb:,} MB")
    job.on_update = _print_status
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: job.cancel())
    final = job.run()
    _print_status(final)
    return EXIT_CODES.get(final.state, 1)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = config.load_settings()
        workspace = Workspace(settings)
        if args.command == "status":
            _print_status(current_status(workspace))
            return 0
        if args.command == "cancel":
            if not workspace.is_locked():
                print("no fine-tune is running")
                return 1
            workspace.cancel_file.touch()
            print("cancel requested")
            return 0
        return run(args, settings)
    except (AilabError, config.ConfigError, ValueError) as exc:
        print(f"ailab-finetune: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
