"""Client subcommands: `optiforge models upload …`, `optiforge optimize …`, `optiforge infer …`.

They are part of the server's `optiforge` command and, on a machine with only this SDK,
`optiforge-client`. `--url` (or $OPTIFORGE_URL) says which server.
"""

from __future__ import annotations

import argparse
import json
import sys
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from pydantic import BaseModel

from optiforge_client.client import Client, default_url
from optiforge_client.errors import OptiforgeError
from optiforge_client.models import Job, Model
from optiforge_client.tensors import ProtocolError


def _print_json(value: Any) -> None:
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    elif isinstance(value, list):
        value = [item.model_dump(mode="json") if isinstance(item, BaseModel) else item for item in value]
    print(json.dumps(value, indent=2, default=str))


def _print_table(rows: list[dict[str, Any]], columns: Sequence[str]) -> None:
    cells = [[str(row.get(column, "")) for column in columns] for row in rows]
    widths = [max([len(column)] + [len(line[i]) for line in cells]) for i, column in enumerate(columns)]
    print("  ".join(column.ljust(width) for column, width in zip(columns, widths, strict=True)))
    for line in cells:
        print("  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)))


class ProgressBar:
    """A one-line progress bar on stderr, redrawn on every poll of the job."""

    def __init__(self, width: int = 30, stream: Any = None):
        self.width, self.stream, self.seen_messages = width, stream or sys.stderr, 0

    def __call__(self, job: Job) -> None:
        for message in job.messages[self.seen_messages :]:
            self.stream.write(f"\r\033[K  · {message}\n")
        self.seen_messages = len(job.messages)
        filled = round(job.progress * self.width)
        bar = "█" * filled + "·" * (self.width - filled)
        self.stream.write(f"\r\033[K{job.id} [{bar}] {job.progress * 100:5.1f}% {job.status}: {job.stage}")
        if job.finished:
            self.stream.write("\n")
        self.stream.flush()


def _check_choices(client: Client, args: argparse.Namespace) -> None:
    """Precisions and criteria are the server's (GET /v1/capabilities), never a copy kept here."""
    wanted = {
        "precision": getattr(args, "precision", None),
        "prune": getattr(args, "prune", None),
        "fuse": getattr(args, "fuse", None),
    }
    if not any(wanted.values()):
        return
    offered = client.capabilities()
    graph = offered.get("graph_optimization", {})
    choices = {
        "precision": offered["precisions"],
        "prune": [criterion["name"] for criterion in offered["prune_methods"]],
        "fuse": [*graph.get("modes", []), *(item["name"] for item in graph.get("model_types", []))],
    }
    for option, value in wanted.items():
        if value and value not in choices[option]:
            raise SystemExit(f"error: --{option} {value}: the server offers {', '.join(choices[option])}")


def _recipe(args: argparse.Namespace) -> dict[str, Any]:
    recipe: dict[str, Any] = json.loads(Path(args.recipe).read_text()) if args.recipe else {}
    if args.precision:
        recipe["precision"] = args.precision
    if args.target:
        recipe["targets"] = args.target
    if args.batch_sizes:
        recipe["batch_sizes"] = [int(size) for size in args.batch_sizes.split(",")]
    if args.sequence_lengths:
        recipe["sequence_lengths"] = [int(length) for length in args.sequence_lengths.split(",")]
    if args.prune:
        recipe["prune"] = {**recipe.get("prune", {}), "method": args.prune, "ratio": args.prune_ratio}
    if args.finetune_epochs:
        recipe["finetune"] = {**recipe.get("finetune", {}), "epochs": args.finetune_epochs}
    stated = {"num_heads": args.num_heads, "hidden_size": args.hidden_size}
    if args.fuse or any(stated.values()):
        graph = {**recipe.get("graph_optimization", {}), "model_type": args.fuse or "auto"}
        recipe["graph_optimization"] = {**graph, **{k: v for k, v in stated.items() if v is not None}}
    return recipe


def _wait_and_report(client: Client, job: Job, quiet: bool) -> int:
    job = client.wait_for_job(job.id, on_progress=None if quiet else ProgressBar())
    print(client.job_report(job.id, format="md"))
    return 0


def parse_budget(text: str) -> tuple[float, bool]:
    """`1%` or `1pt` is one point (0.01); `0.01` the same; `1%rel` is 1 % of the original's score."""
    relative = text.endswith("rel")
    value = text.removesuffix("rel").strip()
    if value.endswith(("%", "pt")):
        return float(value.rstrip("%").removesuffix("pt")) / 100.0, relative
    return float(value), relative


def parse_objective_at(text: str) -> tuple[str, int, int | None]:
    """`latency@8`, `throughput@32`, `size`; `latency@1x128`: batch 1 at sequence length 128 (a
    model with a sequence axis): (metric, batch size, sequence length or None)."""
    metric, _, shape = text.partition("@")
    batch, _, length = shape.partition("x")
    return metric, int(batch) if batch else 1, int(length) if length else None


def parse_objective(text: str) -> tuple[str, int]:
    """`latency@8`, `throughput@32`, `size`: (metric, batch size)."""
    metric, batch, _length = parse_objective_at(text)
    return metric, batch


def _run_search(
    client: Client, args: argparse.Namespace, model_id: str, calibration: Any, evaluation: Any
) -> int:
    """`optimize --budget …`: the autotune search, a live line with the current best, then its table."""
    if evaluation is None:
        raise SystemExit("error: --budget needs an evaluation set (--eval): every candidate is scored on it")
    max_drop, relative = parse_budget(args.budget)
    metric, batch_size, sequence_length = parse_objective_at(args.objective)
    space = {"backends": args.target} if args.target else {}
    job = client.optimize(
        model_id,
        evaluation.id,
        calibration.id if calibration else None,
        objective=metric,
        batch_size=batch_size,
        sequence_length=sequence_length,
        max_drop=max_drop,
        budget_metric=args.budget_metric or ("top1" if evaluation.has_labels else "fidelity"),
        relative=relative,
        time_budget_minutes=args.time_budget,
        space=space,
        alias=args.alias,
    )
    if not args.wait:
        print(job.id)
        return 0
    job = client.wait_for_job(
        job.id, timeout=args.time_budget * 60 * 1.5 + 600, on_progress=None if args.quiet else ProgressBar()
    )
    if job.status != "succeeded":
        print(f"job {job.id} {job.status}: {job.error}", file=sys.stderr)
        return 1
    print(client.autotune_report(job.id, format="md"))
    return 0


def _upload(
    client: Client, file: str, name: str | None, opset: int | None = None, wait: bool = True
) -> Model:
    """Upload a model file; a PyTorch program (.pt2) is converted on the server: with `wait`, wait
    until it is ready (a failed conversion raises its error: `unsupported_op` names the operators)."""
    model = client.upload_model(file, name=name, opset=opset)
    if wait and model.status == "converting":
        print(f"model {model.id}: converting to ONNX (job {model.conversion_job_id})…", file=sys.stderr)
        model = client.wait_for_model(model.id)
    return model


def cmd_upload_model(client: Client, args: argparse.Namespace) -> int:
    _print_json(_upload(client, args.file, args.name, args.opset, wait=args.wait))
    return 0


def _tokenization(args: argparse.Namespace) -> dict[str, Any] | None:
    """The tokenization spec of `datasets upload` from its options (None: the server's defaults)."""
    spec: dict[str, Any] = json.loads(Path(args.tokenization).read_text()) if args.tokenization else {}
    if args.max_length is not None:
        spec["max_length"] = args.max_length
    if args.padding:
        spec["padding"] = args.padding
    if args.no_truncation:
        spec["truncation"] = False
    if args.input_names:
        spec["input_names"] = [name.strip() for name in args.input_names.split(",") if name.strip()]
    if args.dtype:
        spec["dtype"] = args.dtype
    return spec or None


def cmd_upload_dataset(client: Client, args: argparse.Namespace) -> int:
    text_options = (args.tokenization, args.max_length, args.padding, args.no_truncation, args.input_names)
    if not args.tokenizer and (args.for_model or args.dtype or any(o for o in text_options)):
        raise SystemExit("error: the tokenization options go with --tokenizer (a JSONL of texts)")
    dataset = client.upload_dataset(
        args.file,
        name=args.name,
        tokenizer=args.tokenizer,
        tokenization=_tokenization(args) if args.tokenizer else None,
        model_id=args.for_model,
        classes=[name.strip() for name in args.classes.split(",")] if args.classes else None,
    )
    _print_json(dataset)
    return 0


def cmd_optimize(client: Client, args: argparse.Namespace) -> int:
    _check_choices(client, args)
    model = _upload(client, args.model, args.name)
    parameters = f"{model.parameters:,}" if model.parameters is not None else "?"
    print(f"model {model.id}: {model.name}, {parameters} parameters", file=sys.stderr)
    calibration = client.upload_dataset(args.calib) if args.calib else None
    evaluation = client.upload_dataset(args.eval) if args.eval else None
    if args.budget:
        return _run_search(client, args, model.id, calibration, evaluation)
    job = client.create_job(
        model.id,
        _recipe(args),
        calibration_dataset_id=calibration.id if calibration else None,
        evaluation_dataset_id=evaluation.id if evaluation else (calibration.id if calibration else None),
    )
    if not args.wait:
        print(job.id)
        return 0
    return _wait_and_report(client, job, args.quiet)


def cmd_create_job(client: Client, args: argparse.Namespace) -> None:
    _check_choices(client, args)
    job = client.create_job(
        args.model_id, _recipe(args), calibration_dataset_id=args.calib, evaluation_dataset_id=args.eval
    )
    _print_json(job)


def cmd_infer(client: Client, args: argparse.Namespace) -> int:
    inputs: dict[str, np.ndarray] = {}
    for item in args.input:
        name, _, path = item.partition("=")
        if not path or not path.endswith(".npy"):
            raise SystemExit(f"--input takes NAME=FILE.npy (one array per input), got {item!r}")
        inputs[name] = np.load(path, allow_pickle=False)
    result = client.infer(args.name, inputs, binary=not args.json_tensors)
    if args.out:
        np.savez(args.out, **result.outputs)
    summary = {
        "model_version": result.model_version,
        "compute_ms": result.compute_ms,
        "queue_ms": result.queue_ms,
        "batch_size": result.batch_size,
        "outputs": {
            name: {"shape": list(array.shape), "dtype": array.dtype.name, "argmax": array.argmax(-1).tolist()}
            if array.ndim == 2
            else {"shape": list(array.shape), "dtype": array.dtype.name}
            for name, array in result.outputs.items()
        },
    }
    _print_json(summary)
    return 0


def cmd_triton(client: Client, args: argparse.Namespace) -> int:
    """Download the engines as one Triton model repository; print where it went and what it holds."""
    path = client.triton_repository(args.engines, args.out)
    with zipfile.ZipFile(path) as archive:
        models = sorted({name.split("/")[0] for name in archive.namelist()})
    _print_json({"path": str(path), "size_bytes": path.stat().st_size, "models": models})
    print(
        f"serve it: unzip {path} -d model_repository && tritonserver --model-repository=model_repository",
        file=sys.stderr,
    )
    return 0


def _list(rows: list[BaseModel], columns: Sequence[str]) -> int:
    _print_table([row.model_dump(mode="json") for row in rows], columns)
    return 0


def _commands() -> dict[str, Any]:
    """command path -> function(client, args)."""
    return {
        "models upload": cmd_upload_model,
        "models list": lambda c, a: _list(
            c.list_models(), ["id", "name", "status", "parameters", "macs", "size_bytes"]
        ),
        "models get": lambda c, a: _print_json(c.get_model(a.id)),
        "models delete": lambda c, a: c.delete_model(a.id),
        "datasets upload": cmd_upload_dataset,
        "datasets list": lambda c, a: _list(c.list_datasets(), ["id", "name", "samples", "has_labels"]),
        "jobs create": lambda c, a: (
            _check_choices(c, a),
            _print_json(
                c.create_job(
                    a.model_id, _recipe(a), calibration_dataset_id=a.calib, evaluation_dataset_id=a.eval
                )
            ),
        )[-1],
        "capabilities": lambda c, a: _print_json(c.capabilities()),
        "jobs list": lambda c, a: _list(
            c.list_jobs(a.status), ["id", "model_id", "status", "stage", "progress"]
        ),
        "jobs get": lambda c, a: _print_json(c.get_job(a.id)),
        "jobs wait": lambda c, a: _wait_and_report(c, c.get_job(a.id), a.quiet),
        "jobs cancel": lambda c, a: _print_json(c.cancel_job(a.id)),
        "jobs report": lambda c, a: print(
            c.job_report(a.id, format="md") if a.format == "md" else json.dumps(c.job_report(a.id), indent=2)
        ),
        "engines list": lambda c, a: _list(
            c.list_engines(model_id=a.model_id, job_id=a.job_id),
            ["id", "backend", "precision", "alias", "size_bytes"],
        ),
        "engines get": lambda c, a: _print_json(c.get_engine(a.id)),
        "engines alias": lambda c, a: _print_json(c.set_alias(a.id, a.alias)),
        "engines batching": lambda c, a: _print_json(
            c.set_batching(a.id, a.max_batch_size, a.max_queue_delay_ms)
        ),
        "engines triton": cmd_triton,
        "optimize": cmd_optimize,
        "infer": cmd_infer,
    }


def _add_recipe_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--recipe", help="a JSON recipe file; the options below override it")
    parser.add_argument("--precision", help="one of the server's (optiforge capabilities)")
    parser.add_argument("--target", action="append", help="backend, e.g. onnxruntime-cpu (repeatable)")
    parser.add_argument("--batch-sizes", help="comma-separated, e.g. 1,8")
    parser.add_argument(
        "--sequence-lengths",
        help="a model with token inputs of dynamic length: time each batch size at each, e.g. 16,128",
    )
    parser.add_argument("--prune", help="a pruning criterion of the server's (optiforge capabilities)")
    parser.add_argument("--prune-ratio", type=float, default=0.5)
    parser.add_argument("--finetune-epochs", type=int)
    parser.add_argument(
        "--fuse",
        metavar="MODEL_TYPE",
        help="transformer graph optimization: auto (detected), or a model type of the server's "
        "(optiforge capabilities), e.g. bert",
    )
    parser.add_argument("--num-heads", type=int, help="with --fuse: attention heads, where detection fails")
    parser.add_argument("--hidden-size", type=int, help="with --fuse: hidden size, where detection fails")


def add_client_commands(sub: Any) -> None:
    """Add the client subcommands to an argparse subparsers object."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--url", default=None, help="the server (default: $OPTIFORGE_URL or http://127.0.0.1:8000)"
    )
    common.add_argument("--api-key", default=None, help="an API key (default: $OPTIFORGE_API_KEY)")

    def group(name: str, help: str) -> Any:
        return sub.add_parser(name, help=help).add_subparsers(dest="action", required=True)

    def leaf(parent: Any, path: str, help: str) -> argparse.ArgumentParser:
        parser = parent.add_parser(path.split()[-1], help=help, parents=[common])
        parser.set_defaults(client_command=path)
        return parser

    models = group("models", "upload, list, get, delete models")
    upload = leaf(
        models, "models upload", "upload an .onnx (or .zip with external data), or a torch.export .pt2"
    )
    upload.add_argument("file")
    upload.add_argument("--name")
    upload.add_argument("--opset", type=int, help="a .pt2: the ONNX opset to convert to (18 or later)")
    upload.add_argument(
        "--wait", action="store_true", help="a .pt2: wait until it is converted (ready) or failed"
    )
    leaf(models, "models list", "list models")
    leaf(models, "models get", "describe a model (its status: ready, converting, failed)").add_argument("id")
    leaf(models, "models delete", "delete a model, its jobs and engines").add_argument("id")

    datasets = group("datasets", "upload and list datasets")
    upload = leaf(
        datasets,
        "datasets upload",
        "upload a .npz (inputs by name, optional labels), or a JSONL of texts with --tokenizer",
    )
    upload.add_argument("file")
    upload.add_argument("--name")
    texts = upload.add_argument_group('texts (a JSONL: one {"text", "text_pair", "label"} per line)')
    texts.add_argument("--tokenizer", help="the tokenizer.json that tokenizes the texts")
    texts.add_argument(
        "--for-model", metavar="MODEL_ID", help="the model the arrays are made for and checked against"
    )
    texts.add_argument("--max-length", type=int, help="tokens per row (default: the model's, else 128)")
    texts.add_argument("--padding", choices=["max_length", "longest"], help="default: max_length")
    texts.add_argument("--no-truncation", action="store_true", help="refuse a line over max-length")
    texts.add_argument("--input-names", help="arrays to produce, e.g. input_ids,attention_mask")
    texts.add_argument("--dtype", choices=["int64", "int32"], help="default: the model's, else int64")
    texts.add_argument(
        "--tokenization", metavar="JSON_FILE", help="a tokenization spec; the options override it"
    )
    texts.add_argument("--classes", help="class names in the model's output order, comma-separated")
    leaf(datasets, "datasets list", "list datasets")

    jobs = group("jobs", "create, follow and read jobs")
    create = leaf(jobs, "jobs create", "start a job from a recipe")
    create.add_argument("model_id")
    create.add_argument("--calib", help="calibration dataset id")
    create.add_argument("--eval", help="evaluation dataset id")
    _add_recipe_options(create)
    leaf(jobs, "jobs list", "list jobs").add_argument("--status")
    leaf(jobs, "jobs get", "a job's state").add_argument("id")
    wait = leaf(jobs, "jobs wait", "wait with a progress bar, then print the report")
    wait.add_argument("id")
    wait.add_argument("--quiet", action="store_true")
    leaf(jobs, "jobs cancel", "cancel a job").add_argument("id")
    report = leaf(jobs, "jobs report", "the comparison table")
    report.add_argument("id")
    report.add_argument("--format", choices=["md", "json"], default="md")

    engines = group("engines", "list engines, name them, batch them, export them to Triton")
    listing = leaf(engines, "engines list", "list engines")
    listing.add_argument("--model-id")
    listing.add_argument("--job-id")
    leaf(engines, "engines get", "an engine with its metrics").add_argument("id")
    alias = leaf(engines, "engines alias", "point an alias at an engine")
    alias.add_argument("id")
    alias.add_argument("alias")
    batching = leaf(engines, "engines batching", "turn on dynamic batching")
    batching.add_argument("id")
    batching.add_argument("--max-batch-size", type=int, default=16)
    batching.add_argument("--max-queue-delay-ms", type=float, default=2.0)
    triton = leaf(engines, "engines triton", "download engines as one Triton model repository (zip)")
    triton.add_argument("engines", nargs="+", metavar="ENGINE", help="engine id or alias; a model each")
    triton.add_argument("--out", required=True, help="the zip to write, e.g. repo.zip")

    optimize = sub.add_parser(
        "optimize", help="upload a model (and data), optimize it, wait, print the report", parents=[common]
    )
    optimize.set_defaults(client_command="optimize")
    optimize.add_argument("model", help=".onnx file, or a torch.export .pt2 (converted first)")
    optimize.add_argument("--calib", help="calibration .npz (needed for int8)")
    optimize.add_argument("--eval", help="evaluation .npz (default: the calibration set)")
    optimize.add_argument("--name")
    optimize.add_argument("--wait", action="store_true", help="follow the job and print the report")
    optimize.add_argument("--quiet", action="store_true", help="no progress bar")
    optimize.add_argument(
        "--budget",
        help="search for the fastest engine within this accuracy drop (1%% or 1pt = one point; 1%%rel = "
        "1%% of the original's score) instead of running one recipe; needs --eval",
    )
    optimize.add_argument(
        "--objective",
        default="latency@1",
        help="latency@BATCH, throughput@BATCH or size; latency@1x128: batch 1 at sequence length 128",
    )
    optimize.add_argument("--budget-metric", choices=["top1", "fidelity"], help="default: top1 with labels")
    optimize.add_argument("--time-budget", type=float, default=30.0, help="minutes the search may take")
    optimize.add_argument("--alias", help="give the chosen engine this alias")
    _add_recipe_options(optimize)

    capabilities = sub.add_parser(
        "capabilities", help="what the server offers: precisions, criteria, backends", parents=[common]
    )
    capabilities.set_defaults(client_command="capabilities")

    infer = sub.add_parser("infer", help="run inference on an engine id or alias", parents=[common])
    infer.set_defaults(client_command="infer")
    infer.add_argument("name", help="engine id, alias, or model id")
    infer.add_argument("--input", action="append", required=True, help="NAME=FILE.npy (repeatable)")
    infer.add_argument("--out", help="write the outputs to this .npz")
    infer.add_argument("--json-tensors", action="store_true", help="JSON instead of binary tensors")


def run_client_command(args: argparse.Namespace) -> int:
    """Run a parsed client subcommand; server errors print their code and detail, exit status 1."""
    command = _commands()[args.client_command]
    url = default_url(args.url)
    try:
        with Client(url, api_key=args.api_key) as client:
            status = command(client, args)
    except OptiforgeError as exc:
        print(f"error: {exc.code}: {exc.detail}", file=sys.stderr)
        return 1
    except httpx.HTTPError as exc:
        print(f"error: cannot reach optiforge at {url} ({exc}); set --url or OPTIFORGE_URL", file=sys.stderr)
        return 1
    except ProtocolError as exc:
        print(f"error: the server's answer does not follow the protocol: {exc}", file=sys.stderr)
        return 1
    return status if isinstance(status, int) else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="optiforge-client", description=__doc__.splitlines()[0])
    add_client_commands(parser.add_subparsers(dest="command", required=True))
    return run_client_command(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
